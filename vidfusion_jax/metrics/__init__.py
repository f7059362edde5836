"""Fusion metrics: spatial (per frame, JAX) and temporal consistency (per video, pluggable flow).

`compute(fused, ir, vis)` scores frames with the CDDFuse Evaluator's definitions;
`temporal_metrics(fused, ir, vis, flow=...)` scores videos with the project's definitions,
`vfbench_temporal`, `temcoco_flowd` and `feacd.feacd` with the published protocols.
See docs/metrics.md.
"""

from vidfusion_jax.metrics.feacd import ResNet18Logits
from vidfusion_jax.metrics.flow import (FLOW_BACKENDS, FarnebackFlow, FlowBackend, SeaRaftFlow,
                                        ZeroFlow, backend_name, get_flow_backend)
from vidfusion_jax.metrics.spatial import (CONVENTIONS, METRIC_NAMES, MI_UNITS, PER_SOURCE_METRICS,
                                           SSIM_DATA_RANGE_REFERENCE, average_gradient, compute,
                                           entropy, mean_squared_error, mutual_information, qabf,
                                           scd, spatial_frequency, ssim, standard_deviation,
                                           to_gray, vif)
from vidfusion_jax.metrics.temporal import (TEMPORAL_METRIC_NAMES, TemporalMeter, TemporalResult,
                                            as_metric_frame, temcoco_flowd, temporal_metrics,
                                            vfbench_temporal, warp, warp_error)

__all__ = [
    "CONVENTIONS", "FLOW_BACKENDS", "METRIC_NAMES", "MI_UNITS", "PER_SOURCE_METRICS",
    "SSIM_DATA_RANGE_REFERENCE", "TEMPORAL_METRIC_NAMES", "FarnebackFlow", "FlowBackend",
    "ResNet18Logits", "SeaRaftFlow", "TemporalMeter", "TemporalResult", "ZeroFlow",
    "as_metric_frame", "average_gradient", "backend_name", "compute", "entropy",
    "get_flow_backend", "mean_squared_error", "mutual_information", "qabf", "scd",
    "spatial_frequency", "ssim", "standard_deviation", "temcoco_flowd", "temporal_metrics",
    "to_gray", "vif", "vfbench_temporal", "warp", "warp_error",
]
