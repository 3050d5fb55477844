"""Make an existing GRADIEND ``ParamMappedGradiendModel`` run its param-map work on gradkit.

    from gradkit.compat.gradiend import accelerate
    model = accelerate(model)          # same object, same results, faster

Patched on the instance (the class and other instances are untouched):
``extract_gradients`` (flat path), ``flatten_gradient_dict``, ``forward`` and
``forward_encoder`` with dict input, and ``prune`` (selection with gradkit's exact
top-k, remapping with gradkit, weight slicing without first deep-copying the full
encoder/decoder). Everything else, and every argument combination not listed,
runs GRADIEND's own code. One documented difference: where importances tie at the
top-k cut, GRADIEND's ``torch.topk`` keeps an unspecified subset; gradkit keeps the
lowest input positions (deterministic); a NaN importance where the mask leaves a position is an
error (GRADIEND's threshold drops it silently, its topk ranks it first). Two GRADIEND behaviours are kept for drop-in
parity: ``prune(topk=1.0)`` returns the model unchanged (GRADIEND ignores ``mask`` and
``threshold`` then; ``ParamMap.prune`` applies them), and ``keep_idx=`` / lazily built models
run GRADIEND's own prune. Where GRADIEND would re-encode an unsorted index list as a mask
(reordering the input space), the accelerated model keeps the list. Integer importances are
accepted as GRADIEND accepts them (its ``>= float(threshold)`` test, exact ranking for topk).

Further deliberate differences, each an error where GRADIEND would go on with a doubtful input:
a gradient tensor (``flatten_gradient_dict`` / dict ``forward`` / ``forward_encoder``) whose shape
differs from its map entry's, or that is not floating point, raises ``ValueError`` / ``TypeError``
naming the entry (GRADIEND flattens whatever it gets, and a wrongly shaped tensor with enough
elements silently yields other entries); ``prune(threshold=True)`` raises (GRADIEND reads it as
1.0; it already refuses ``topk=True``), and a bool ``importance`` raises ``TypeError`` naming it (GRADIEND's
``>= threshold`` reads it as 0 / 1; a bool selection is a ``mask``). In the dict returned by ``forward``, the tensors of entries
that select nothing are zeros like GRADIEND's, but they are part of the autograd graph (their
gradient is zero). The accelerated methods are picklable: ``torch.save(model)`` / ``pickle`` /
``copy.deepcopy`` give an accelerated model.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, Optional

import torch

from gradkit.parammap import ParamMap

__all__ = ["accelerate", "param_map_of"]


def _bool_masks(param_map):
    """gradiend reads a ``"mask"`` entry with ``.bool()`` and saves masks as uint8: integer 0/1 masks become bool
    here (ParamMap itself takes bool masks only); other values are left for ParamMap to refuse by name."""
    out = {}
    for name, spec in param_map.items():
        m = spec.get("mask") if isinstance(spec, dict) and spec.get("repr") == "mask" else None
        if isinstance(m, torch.Tensor) and m.dtype != torch.bool and not m.dtype.is_floating_point \
                and not m.dtype.is_complex and bool(((m == 0) | (m == 1)).all()):
            spec = {**spec, "mask": m != 0}
        out[name] = spec
    return out


def param_map_of(model) -> ParamMap:
    """The gradkit ParamMap of ``model.param_map``, built once per mapping version."""
    key = (id(model.param_map), getattr(model, "_param_map_version", 0), int(model.input_dim))
    cached = getattr(model, "_gradkit_param_map", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    pm = ParamMap(_bool_masks(model.param_map))
    if pm.input_dim != int(model.input_dim):
        raise ValueError(f"model.param_map selects {pm.input_dim} entries but model.input_dim={model.input_dim}")
    model._gradkit_param_map = (key, pm)
    return pm


def _grad_lookup(model_base: torch.nn.Module, pm: ParamMap) -> Dict[str, torch.Tensor]:
    from gradiend.model.utils import _normalize_param_name

    base = model_base.module if hasattr(model_base, "module") else model_base
    lookup: Dict[str, torch.nn.Parameter] = {}
    for n, p in base.named_parameters():
        lookup[n] = p
        lookup.setdefault(_normalize_param_name(n), p)
    grads, missing = {}, []
    for name, count in zip(pm.names, pm.counts):
        if count == 0:
            continue
        p = None
        for key in (name, _normalize_param_name(name), f"module.{name}"):
            p = lookup.get(key)
            if p is not None:
                break
        if p is None:
            raise KeyError(f"Parameter '{name}' not found in model.named_parameters(). "
                           f"Examples: {list(lookup)[:10]}")
        if p.grad is None:
            missing.append(name)
        else:
            grads[name] = p.grad
    if missing:  # GRADIEND's contract: RuntimeError naming the parameters
        raise RuntimeError(f"Gradients are None for parameters: {missing}. This indicates a bug in gradient "
                           "computation (no backward, no_grad, requires_grad=False, ...).")
    return grads


def _normal_form(pm: ParamMap) -> ParamMap:
    """Every entry re-encoded as GRADIEND's prune (and from_pretrained) encodes the entries of a pruned map ("all" when
    complete; a mask when smaller than indices by its 0.8 margin, else indices), also those the prune left whole:
    ParamMap.prune keeps those as they were, so a sparse "mask" entry stayed a mask and ``param_map_hash`` differed
    from GRADIEND's pruned model and changed across save / load (session 39)."""
    from gradkit.parammap import _entry_from_positions

    entries = []
    for e in pm._entries:
        pos = e.positions()
        entries.append(e if pos is None else _entry_from_positions(e, pos))
    return ParamMap._from_entries(entries)


def _extract_gradients(self, model, return_dict: bool = False, target_device=None):
    if return_dict:
        return type(self).extract_gradients(self, model, return_dict=True, target_device=target_device)
    pm = param_map_of(self)
    grads = _grad_lookup(model, pm)
    if not grads:
        return torch.empty(0, dtype=self.torch_dtype, device=target_device or torch.device("cpu"))
    flat = pm.gather(grads)
    if target_device is not None and flat.device != torch.device(target_device):
        flat = flat.to(target_device)
    return flat


def _flatten_gradient_dict(self, grad_dict):
    pm = param_map_of(self)
    if pm.input_dim == 0:
        dev = next(iter(grad_dict.values())).device if grad_dict else torch.device("cpu")
        return torch.empty(0, dtype=self.torch_dtype, device=dev)
    return pm.gather({n: grad_dict[n] for n, c in zip(pm.names, pm.counts) if c > 0})


def _forward(self, x, return_encoded: bool = False):
    if not isinstance(x, dict):
        return type(self).forward(self, x, return_encoded=return_encoded)
    pm = param_map_of(self)
    flat = _flatten_gradient_dict(self, x)
    core = type(self).__mro__[1]  # GradiendModel
    decoded, encoded = core.forward(self, flat, return_encoded=True)
    out = pm.scatter(decoded)
    return (out, encoded) if return_encoded else out


def _forward_encoder(self, x):
    if isinstance(x, dict):
        x = _flatten_gradient_dict(self, x)
    return type(self).forward_encoder(self, x)


def _sliced(layer, keep: torch.Tensor, columns: bool, in_f: int, out_f: int, bias: bool, dtype, device):
    """A new LargeLinear holding rows/columns ``keep`` of ``layer`` (no random init)."""
    from gradiend.model.layers import LargeLinear

    new = torch.nn.utils.skip_init(LargeLinear, in_f, out_f, bias=bias, dtype=dtype, device=device)
    w, b = layer.linear.weight, layer.linear.bias
    k = keep.to(w.device)
    with torch.no_grad():
        new.linear.weight.copy_((w.index_select(1, k) if columns else w.index_select(0, k)).to(new.linear.weight.device))
        if new.linear.bias is not None:
            if b is None:
                new.linear.bias.zero_()
            elif columns:  # encoder bias is per latent unit: unchanged
                new.linear.bias.copy_(b.to(new.linear.bias.device))
            else:
                new.linear.bias.copy_(b.index_select(0, k).to(new.linear.bias.device))
    new.train(layer.training)
    return new


def _prune(self, *, topk=None, threshold=None, mask=None, part: str = "decoder-weight",
           importance: Optional[torch.Tensor] = None, keep_idx=None, keep_idx_sorted_unique: bool = False,
           inplace: bool = False, return_mask: bool = False):
    cls = type(self)
    if isinstance(topk, float) and topk == 1.0 and keep_idx is None:
        # GRADIEND returns the model unchanged here (mask and threshold are ignored), but first
        # re-encodes its param map, which reorders unsorted index lists; keep the order instead.
        m = self if inplace else copy.deepcopy(self)
        if m is not self:
            accelerate(m)
        return (m, torch.ones(int(self.input_dim), dtype=torch.bool)) if return_mask else m
    if keep_idx is not None or self.encoder is None:
        return cls.prune(self, topk=topk, threshold=threshold, mask=mask, part=part, importance=importance,
                         keep_idx=keep_idx, keep_idx_sorted_unique=keep_idx_sorted_unique, inplace=inplace,
                         return_mask=return_mask)
    if topk is None and threshold is None and mask is None:
        raise ValueError("At least one of topk, threshold, mask must be provided.")
    n = int(self.input_dim)
    if mask is not None and (not torch.is_tensor(mask) or mask.dtype != torch.bool or mask.shape != (n,)):
        raise ValueError(f"mask must be bool tensor with shape ({n},)")
    if threshold is not None and (not isinstance(threshold, (int, float)) or threshold < 0):
        raise ValueError("threshold must be a non-negative float/int")
    if isinstance(topk, bool):
        raise TypeError("topk must be int or float, not bool")
    imp = None
    if threshold is not None or topk is not None:
        imp = importance.detach() if importance is not None else self.get_weight_importance(part=part).detach()
        if imp.dim() != 1 or imp.numel() != n:
            raise ValueError(f"importance must be 1D tensor of length {n}, got shape {imp.shape}")
        if threshold is not None and not (imp.is_complex() or imp.dtype == torch.bool):
            # GRADIEND's ParamMappedGradiendModel compares `importance >= float(threshold)` with torch's promotion:
            # the threshold rounded to a float16 / bfloat16 / float32 importance's dtype (float16 0.09998 passes
            # 0.1), float32 for an integer tensor (2**60 + 3 passes 2**60 + 60), where ParamMap.prune compares
            # exactly; fold GRADIEND's test into the mask. ParamMap.prune ranks them for topk.
            if isinstance(threshold, bool) or math.isnan(threshold):
                raise ValueError(f"threshold: expected a number, got {threshold!r}")
            above = imp.to("cpu") >= float(threshold)
            mask = above if mask is None else (mask.detach().to("cpu") & above)
            threshold = None
    pm = param_map_of(self)
    new_pm, keep = pm.prune(mask=mask, threshold=threshold, topk=topk, importance=imp)
    new_pm = _normal_form(new_pm)
    new_in = int(keep.numel())
    enc, dec = self.encoder[0], self.decoder[0]
    new_enc = _sliced(enc, keep, True, new_in, self.latent_dim, True, self.torch_dtype, self.device_encoder)
    new_dec = _sliced(dec, keep, False, self.latent_dim, new_in, self.bias_decoder, self.torch_dtype,
                      self.device_decoder)
    new_map = new_pm.to_spec(bitmask_as_mask=True)
    if inplace:
        m = self
    else:  # deep-copy everything except the layers being replaced and the old mapping
        memo: Dict[int, Any] = {id(enc): new_enc, id(dec): new_dec, id(self.param_map): new_map}
        cached = getattr(self, "_gradkit_param_map", None)
        if cached is not None:
            memo[id(cached)] = None
        for attr in ("_base_global_index_map", "_compiled_param_selectors"):
            v = getattr(self, attr, None)
            if v is not None:
                memo[id(v)] = None
        m = copy.deepcopy(self, memo)
    m.encoder[0] = new_enc
    m.decoder[0] = new_dec
    m.input_dim = new_in
    m.param_map = new_map
    m._param_map_version = getattr(self, "_param_map_version", 0) + 1
    m._base_global_index_map = None
    if hasattr(m, "_invalidate_runtime_param_map_cache"):
        m._invalidate_runtime_param_map_cache()
    m._gradkit_param_map = ((id(new_map), m._param_map_version, new_in), new_pm)
    if m is not self:
        accelerate(m)
    if return_mask:
        combined = torch.zeros(n, dtype=torch.bool)
        combined[keep] = True
        return m, combined
    return m


def _invalidate_runtime_param_map_cache(self):
    # GRADIEND calls this whenever the mapping may have changed (also after an in-place edit of
    # param_map, whose id then stays the same): drop gradkit's compiled map with its own selectors
    type(self)._invalidate_runtime_param_map_cache(self)
    self._gradkit_param_map = None


_PATCHES = {
    "extract_gradients": _extract_gradients,
    "flatten_gradient_dict": _flatten_gradient_dict,
    "forward": _forward,
    "forward_encoder": _forward_encoder,
    "prune": _prune,
    "_invalidate_runtime_param_map_cache": _invalidate_runtime_param_map_cache,
}


class _Bound:
    """One of gradkit's methods bound to one model. Unlike ``types.MethodType`` it pickles (and
    deep-copies) by name, so ``torch.save(model)`` / ``pickle`` / multiprocessing of an accelerated
    model round-trip to an accelerated model."""

    __slots__ = ("__self__", "_name")

    def __init__(self, model, name: str):
        self.__self__, self._name = model, name

    @property
    def __func__(self):
        return _PATCHES[self._name]

    @property
    def __name__(self) -> str:
        return self._name

    def __call__(self, *args, **kwargs):
        return _PATCHES[self._name](self.__self__, *args, **kwargs)

    def __reduce__(self):
        return _Bound, (self.__self__, self._name)

    def __repr__(self) -> str:
        return f"<gradkit-accelerated method {self._name} of {type(self.__self__).__name__}>"


def accelerate(model):
    """Patch ``model`` (a gradiend ``ParamMappedGradiendModel``) in place to use gradkit; returns it."""
    try:
        from gradiend.model.param_mapped import ParamMappedGradiendModel
    except ImportError as exc:  # pragma: no cover
        raise ImportError("gradkit.compat.gradiend needs the gradiend package") from exc
    if not isinstance(model, ParamMappedGradiendModel):
        raise TypeError(f"model: expected a gradiend ParamMappedGradiendModel, got {type(model).__name__}")
    param_map_of(model)  # validate the mapping once, up front
    for name in _PATCHES:
        setattr(model, name, _Bound(model, name))
    model._gradkit_accelerated = True
    return model
