"""gradkit: fast kernels for gradient-based parameter selection, OBS pruning and gradient compression.

Public API: ``gradkit.ParamMap`` (param-map gather/scatter/prune/save/load),
``gradkit.ops`` (the functional op surface), ``gradkit.compat.gradiend.accelerate``.
"""
from gradkit import _ext, ops  # noqa: F401  (_ext loads the compiled ops)
from gradkit.parammap import ParamMap

__version__ = "0.1.0"
__all__ = ["ParamMap", "ops", "__version__"]
