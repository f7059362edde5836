"""The two conversion engines behind one interface: a local process pool, or an Apache Beam job.

Both run the same planned shard tasks (`writer.plan_split`) through `writer.write_shard`, so for
the same inputs and options they write byte-identical shards, indexes and `dataset_info.json`:
the plan fixes which clips go into which shard and in what order, each shard is written under a
temporary name and renamed when complete, and `dataset_info.json` is written once, last, from the
summaries of every shard. Beam (the `beam` extra) runs on any runner: the direct runner on one
machine, or Dataflow, Flink and Spark across many.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from vidfusion_jax.data import writer

_CONVERSION_ERROR = re.compile(r"ConversionError: (sequence .*?)(?: \[while running .*\])?$",
                               re.MULTILINE)


def finish(output_dir, plans: Sequence[writer.SplitPlan],
           summaries: Mapping[str, Sequence[Mapping[str, Any]]],
           source: Mapping[str, Any]) -> None:
  """Writes `dataset_info.json` from every shard's summary (in shard order), split by split."""
  for plan in plans:
    writer.write_dataset_info(output_dir, plan.split, plan.info(summaries[plan.split]), source)


def run_pool(output_dir, plans: Sequence[writer.SplitPlan], source: Mapping[str, Any], *,
             workers: int, progress: bool) -> None:
  """Converts on a pool of `workers` local processes."""
  finish(output_dir, plans, {plan.split: writer.write_split(plan, workers, progress)
                             for plan in plans}, source)


def _write_shard(element: tuple[str, int, Any]) -> tuple[str, int, dict]:
  split, shard, task = element
  return split, shard, writer.write_shard(task)


def _finish_job(results: Sequence[tuple[str, int, dict]], output_dir,
                plans: Sequence[writer.SplitPlan], source: Mapping[str, Any]) -> None:
  summaries = {plan.split: [None] * len(plan.tasks) for plan in plans}
  for split, shard, summary in results:
    summaries[split][shard] = summary
  missing = [f"{split}:{k}" for split, shards in summaries.items()
             for k, summary in enumerate(shards) if summary is None]
  if missing:
    raise RuntimeError(f"shards {missing} were not written; dataset_info.json is not written")
  finish(output_dir, plans, summaries, source)


def run_beam(output_dir, plans: Sequence[writer.SplitPlan], source: Mapping[str, Any],
             pipeline_args: Sequence[str]) -> None:
  """Converts as a Beam job configured by `pipeline_args` (`--runner=...` and its options).

  One element per shard, spread over the workers; the last step collects the shard summaries and
  writes `dataset_info.json`, so it exists only when every shard of every split is final.
  """
  try:
    # pylint: disable-next=import-outside-toplevel
    import apache_beam as beam
    from apache_beam.options import pipeline_options  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError("--runner needs Apache Beam: pip install 'vidfusion-jax[beam]'") from error
  shards = [(plan.split, k, task) for plan in plans for k, task in enumerate(plan.tasks)]
  options = pipeline_options.PipelineOptions(list(pipeline_args))
  try:
    with beam.Pipeline(options=options) as pipeline:
      _ = (pipeline
           | "PlanShards" >> beam.Create(shards)
           | "Spread" >> beam.Reshuffle()
           | "WriteShard" >> beam.Map(_write_shard)
           | "Collect" >> beam.combiners.ToList()
           | "WriteDatasetInfo" >> beam.Map(_finish_job, output_dir, plans, source))
  except Exception as error:  # runners wrap worker errors, often as a traceback in a string
    named = _CONVERSION_ERROR.findall(f"{type(error).__name__}: {error}")
    if not named:
      raise
    raise writer.ConversionError(f"the Beam job failed: {named[-1]}") from error
