"""The model inside the wrappers that rename its modules: ``DistributedDataParallel`` / ``DataParallel``
(``.module``, names prefixed ``module.``) and ``torch.compile``'s ``OptimizedModule`` (``._orig_mod``, names
prefixed ``_orig_mod.``). Only those classes are looked through: a user module that merely has a child called
``module`` is a model of its own."""
from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` with every DDP / DataParallel / torch.compile wrapper around it removed (however nested)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
    return model
