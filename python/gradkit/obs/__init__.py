"""OBS pruning: StructuredOBS (true OBS with per-row Schur downdates), SparseGPT / magnitude / OBD
baselines on the same scope objects, exact re-solve on a support, layer error, and a model-level
driver (Hessians from forward hooks, layer-by-layer pruning with checkpoints and resume).
"""
from gradkit.obs.layout import ObsLayout, obs_layout  # noqa: F401

__all__ = ["ObsLayout", "obs_layout"]
