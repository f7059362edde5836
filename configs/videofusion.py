"""VideoFusion training: the official recipe (specs/videofusion.md section 8) and a `tiny` variant.

  python -m vidfusion_jax.train --config=configs/videofusion.py --workdir=/tmp/vf
  python -m vidfusion_jax.train --config=configs/videofusion.py:tiny --workdir=/tmp/vf_tiny \
      --config.data.path=/tmp/m3svd_mini_tfrecord
"""

import ml_collections

# The official `network_g` of options/train/train_VideoFusion.yml.
NETWORK_G = {
    "in_channels": 3,
    "out_channels": 3,
    "num_features": 32,
    "num_blocks": [2, 2, 4],
    "num_decoder_blocks": 2,
    "num_heads": [2, 4, 8],
    "ffn_expansion_factor": 1,
    "bias": False,
    "LayerNorm_type": "WithBias",
    "embed_dim": 32,
    "groups": [4, 8, 16],
}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """Official recipe; `variant` "tiny" shrinks model, data and schedule to CPU-minutes."""
  config = ml_collections.ConfigDict()
  config.seed = 3047

  config.model = ml_collections.ConfigDict()
  config.model.name = "videofusion"
  config.model.config = dict(NETWORK_G)
  config.model.dtype = "float32"  # compute dtype; "bfloat16" keeps float32 params
  config.model.remat = False
  # "auto": the CPU memory orderings on CPU, plain flax.linen on GPU/TPU (models/schedule.py).
  config.model.schedule = "auto"
  # jax.checkpoint policy of `remat` in the plain schedule: full, dots, dots_with_no_batch_dims.
  config.model.remat_policy = "full"
  config.model.init_checkpoint = ""  # optional PyTorch .pth to start from

  config.data = ml_collections.ConfigDict()
  config.data.source = "tfrecord"  # or "synthetic": random clips, for benchmarks and tests
  config.data.path = ""
  config.data.train_split = "train"
  config.data.eval_split = "val"
  config.data.clip_length = 6
  config.data.crop_size = 128
  config.data.worker_count = 0
  config.data.flip = False
  config.data.rotate = False
  config.data.degrade = "auto"

  config.batch_size = 12  # global, over all devices and processes
  config.grad_accum_steps = 1
  config.total_steps = 220_000

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-4
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 1e-5
  config.optimizer.grad_clip_norm = 0.01
  config.optimizer.schedule = "warmup_cosine"  # or "step_decay", "constant"
  config.optimizer.warmup_steps = 5000
  config.optimizer.cosine_period = 500_000
  config.optimizer.min_learning_rate = 1e-6
  config.optimizer.decay_every_steps = 0  # "step_decay" only
  config.optimizer.decay_rate = 1.0  # "step_decay" only

  config.mesh = ml_collections.ConfigDict()
  config.mesh.axis_names = ("data", "fsdp")
  config.mesh.shape = (-1, 1)

  config.sharding = ml_collections.ConfigDict()
  config.sharding.batch_axes = ("data", "fsdp")
  config.sharding.param_rules = ((".*", "fsdp"),)
  config.sharding.min_sharded_size = 2**14

  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 5000
  config.keep_checkpoints = 3
  config.keep_best_checkpoints = 1
  config.best_metric = "psnr_fused"
  config.best_metric_mode = "max"
  config.async_checkpointing = True

  config.eval = ml_collections.ConfigDict()
  config.eval.clip_length = 10
  config.eval.max_sequences = 0  # 0: all
  config.eval.crop_size = 0  # 0: full frames; otherwise a centre crop of this size
  # vidfusion_jax.metrics.compute names, of the fused frames against the clean sources.
  config.eval.fusion_metrics = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM")
  config.eval.num_grid_frames = 2

  if variant == "tiny":
    config.model.config = dict(NETWORK_G, num_features=16, embed_dim=16, num_blocks=[1, 1, 1],
                               num_decoder_blocks=1)
    config.data.clip_length = 3
    config.data.crop_size = 32
    config.batch_size = 2
    config.total_steps = 60
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 10
    config.optimizer.cosine_period = 60
    config.optimizer.min_learning_rate = 1e-5
    config.optimizer.grad_clip_norm = 1.0
    config.sharding.min_sharded_size = 0
    config.log_every_steps = 10
    config.eval_every_steps = 30
    config.checkpoint_every_steps = 20
    config.eval.clip_length = 4
    config.eval.max_sequences = 1
    config.eval.crop_size = 64
    config.eval.fusion_metrics = ("EN", "SD", "SF", "AG")
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/videofusion.py; known: 'tiny'")
  return config
