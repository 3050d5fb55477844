"""OBS pruning: StructuredOBS (true OBS with per-row Schur downdates), SparseGPT / magnitude / OBD
baselines on the same scope objects, exact re-solve on a support, layer error, and a model-level
driver (Hessians from forward hooks, layer-by-layer pruning with checkpoints and resume).
"""
from gradkit.obs.baselines import magnitude, obd, sparsegpt  # noqa: F401
from gradkit.obs.driver import (METHODS, CheckpointError, DistributedPruneError, Hessians,  # noqa: F401
                                LayerReport, PruneReport, collect_hessians, prune_model)
from gradkit.obs.layout import ObsLayout, obs_layout  # noqa: F401
from gradkit.obs.metrics import NotPositiveDefiniteError, damped_hessian, output_error, resolve  # noqa: F401
from gradkit.obs.structured import StructuredOBS, compute_inverse  # noqa: F401

__all__ = ["StructuredOBS", "compute_inverse", "sparsegpt", "magnitude", "obd", "resolve", "output_error",
           "damped_hessian", "NotPositiveDefiniteError", "collect_hessians", "prune_model", "Hessians",
           "LayerReport", "PruneReport", "CheckpointError", "DistributedPruneError", "METHODS", "ObsLayout",
           "obs_layout"]
