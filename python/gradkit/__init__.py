"""gradkit: fast kernels for gradient-based parameter selection, OBS pruning and gradient compression.

Public API: ``gradkit.ParamMap`` (param-map gather/scatter/prune/save/load),
``gradkit.scope`` (structured sparsity: View / BlockSpec / ScopeSpec / couplings),
``gradkit.ops`` (the functional op surface), ``gradkit.compat.gradiend.accelerate``,
``gradkit.compat.sparsekit`` (SparseKit's names over gradkit's kernels), ``gradkit.golden``
(golden / reverse-golden masks, packed mask algebra) and ``gradkit.optim.MaskedAdamW``.
"""
from gradkit import _ext, ops  # noqa: F401  (_ext loads the compiled ops)
from gradkit import golden, optim, scope  # noqa: F401
from gradkit.optim import MaskedAdamW
from gradkit.parammap import ParamMap

__version__ = "0.1.0"
__all__ = ["MaskedAdamW", "ParamMap", "golden", "ops", "optim", "scope", "__version__"]
