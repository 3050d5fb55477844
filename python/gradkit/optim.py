"""Optimizers on gradkit's fused kernels: ``MaskedAdamW``, AdamW with two learning rates chosen
per entry by a mask (issue 7)."""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from gradkit import ops
from gradkit._rules import FLOATS as _FLOATS, flag

__all__ = ["MaskedAdamW"]

NamedParams = Union[Mapping[str, torch.Tensor], Iterable[Tuple[str, torch.Tensor]]]


def _real(v: Any) -> bool:
    """A real scalar (Python or numpy: a schedule may write np.float32 rates), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _nonneg(v: Any, what: str) -> float:
    try:
        ok = _real(v) and math.isfinite(v) and v >= 0
    except OverflowError:  # an int past float's range
        ok = False
    if not ok:
        raise ValueError(f"{what}: expected a finite number >= 0, got {v!r}")
    return float(v)


def _check_hyper(masked_lr: Any, unmasked_lr: Any, betas: Any, eps: Any, weight_decay: Any,
                 maximize: Any, amsgrad: Any = False, lr: Any = 1.0) -> Dict[str, Any]:
    """The validated hyper-parameters of one parameter group (ValueError / TypeError naming the argument)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not _real(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}]: expected a number in [0, 1), got {b!r}")
    maximize, amsgrad = flag(maximize, "maximize"), flag(amsgrad, "amsgrad")
    return {"masked_lr": _nonneg(masked_lr, "masked_lr"), "unmasked_lr": _nonneg(unmasked_lr, "unmasked_lr"),
            "betas": (float(betas[0]), float(betas[1])), "eps": _nonneg(eps, "eps"),
            "weight_decay": _nonneg(weight_decay, "weight_decay"), "maximize": maximize, "amsgrad": amsgrad,
            "lr": _nonneg(lr, "param_groups[0]['lr'] (the schedule's factor of both rates)")}


def _named_list(named_params: NamedParams) -> List[Tuple[str, torch.Tensor]]:
    if isinstance(named_params, torch.Tensor):
        raise TypeError("named_params: expected (name, parameter) pairs, e.g. model.named_parameters(), "
                        "or a {name: parameter} dict, got a tensor")
    try:
        items = list(named_params.items() if isinstance(named_params, Mapping) else named_params)
    except TypeError:
        raise TypeError("named_params: expected (name, parameter) pairs, e.g. model.named_parameters(), "
                        f"or a {{name: parameter}} dict, got {type(named_params).__name__}") from None
    if not items:
        raise ValueError("named_params: no parameters to optimize")
    seen: Dict[str, torch.Tensor] = {}
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError("named_params: expected (name, parameter) pairs, e.g. model.named_parameters(), "
                            f"or a {{name: parameter}} dict, got an item of type {type(item).__name__}")
        name, p = item
        if name in seen:
            raise ValueError(f"named_params: duplicate name {name!r}")
        for other, q in seen.items():
            if q is p:
                raise ValueError(f"named_params: {name!r} is the same tensor as {other!r}")
        if p.dtype not in _FLOATS:
            raise TypeError(f"named_params[{name!r}]: expected a float32/float64/float16/bfloat16 parameter, "
                            f"got {p.dtype}")
        if p.layout != torch.strided:  # its gradient is sparse too, which step refuses: say so up front
            raise TypeError(f"named_params[{name!r}]: MaskedAdamW steps dense parameters, got a {p.layout} one")
        if p.layout == torch.strided and p.device.type != "meta" and torch._debug_has_internal_overlap(p) == 1:
            # session 42: the step wrote the other parameters, then failed writing this one back (several elements
            # share one memory location), leaving them stepped and no state recorded
            raise ValueError(f"named_params[{name!r}]: several elements share one memory location (an expanded "
                             "tensor); clone() it into a parameter of its own")
        if not p.is_leaf:  # torch.optim's own message names no parameter
            raise ValueError(f"named_params[{name!r}]: can't optimize a non-leaf tensor (a result of other "
                             f"tensors' operations); pass the parameter itself")
        seen[name] = p
    return items


def _bits_of(name: str, mask: Any, p: torch.Tensor, what: str) -> torch.Tensor:
    """The packed bitmask (a new tensor on p's device) of a bool mask or a packed uint8 bitmask of p."""
    nbytes = (p.numel() + 7) // 8
    if isinstance(mask, torch.Tensor) and mask.layout == torch.sparse_coo:
        # GoldenParams keeps its masks as COO: bool, or float32 ones from convert_masks_to_torch_sparse_coo (the form
        # its usage guide gives its MaskedAdamW; session 39: refused before); set where a stored value is non-zero.
        # As a Bitmask it takes the Bitmask path below (its shape checked there).
        from gradkit.golden import Bitmask

        mask = Bitmask.coerce(mask, what=what)
    if hasattr(mask, "bits") and hasattr(mask, "shape") and not isinstance(mask, torch.Tensor):  # golden.Bitmask
        if tuple(mask.shape) != tuple(p.shape):
            raise ValueError(f"{what}: shape {tuple(mask.shape)} differs from parameter {name!r}'s shape "
                             f"{tuple(p.shape)}")
        mask = mask.bits
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what}: expected a bool tensor of shape {tuple(p.shape)} or a packed uint8 bitmask, "
                        f"got {type(mask).__name__}")
    # session 42: a meta mask failed in its copy ("Cannot copy out of meta tensor"), a CSR one in pack_bitmask
    # ("Sparse CSR tensors do not have is_contiguous"), both naming nothing
    if mask.is_meta:
        raise ValueError(f"{what}: is a meta tensor (no data); pass the materialised mask")
    if mask.layout != torch.strided:
        raise TypeError(f"{what}: expected a dense (or sparse COO) mask, got a {mask.layout} tensor (convert it with "
                        ".to_dense())")
    if mask.dtype == torch.bool:
        if mask.shape != p.shape:
            raise ValueError(f"{what}: shape {tuple(mask.shape)} differs from parameter {name!r}'s shape "
                             f"{tuple(p.shape)}")
        return ops.pack_bitmask(mask.to(p.device).contiguous())
    if mask.dtype == torch.uint8 and mask.layout == torch.strided:
        if mask.shape != (nbytes,):
            raise ValueError(f"{what}: a packed bitmask of parameter {name!r} ({p.numel()} entries) has shape "
                             f"({nbytes},), got {tuple(mask.shape)}")
        bits = mask.to(p.device, copy=True).contiguous()
        if p.numel() % 8 and int(bits[-1]) >> (p.numel() % 8):
            raise ValueError(f"{what}: bits past entry {p.numel()} of the last byte must be 0")
        return bits
    raise TypeError(f"{what}: expected a bool tensor of shape {tuple(p.shape)} or a packed uint8 bitmask of shape "
                    f"({nbytes},), got a {mask.layout} {mask.dtype} tensor")


def _check_buckets_disjoint(buckets: Iterable[Dict[str, list]], amsgrad: bool) -> None:
    """The fused op's memory-overlap rule (a written tensor sharing an element with another listed tensor is
    refused), applied to every bucket up front and naming the parameters. Tensors on distinct storages cannot
    overlap: the element-wise check runs only for a bucket where a storage repeats (views of one flat buffer)."""
    from gradkit.ops.overlap import check_no_overlap

    if torch.compiler.is_dynamo_compiling():  # fake tensors have no addresses (the kernels check)
        return
    for b in buckets:
        keys = ("p", "m", "v", "g") + (("vmax",) if amsgrad else ())
        seen, shared = set(), False
        for key in keys:
            for t in b[key]:
                if t.numel() and t.device.type != "meta":
                    ptr = t.untyped_storage().data_ptr()
                    if ptr in seen:
                        shared = True
                    seen.add(ptr)
        if not shared:
            continue
        what = {"p": "parameter {!r}", "m": "state['exp_avg'] of {!r}", "v": "state['exp_avg_sq'] of {!r}",
                "vmax": "state['max_exp_avg_sq'] of {!r}", "g": "grad of {!r}"}
        check_no_overlap([(what[key].format(n), t, key != "g") for key in keys for n, t in zip(b["n"], b[key])])


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def _bare(name: str) -> str:
    """``name`` without the leading ``module.`` / ``_orig_mod.`` segments a DDP / DataParallel / torch.compile wrapper
    puts in front of the wrapped model's parameter names."""
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _normal_tensors():
    """Outside inference mode where it is on (so tensors made inside are normal tensors); else nothing."""
    if not torch.compiler.is_dynamo_compiling() and torch.is_inference_mode_enabled():
        return torch.inference_mode(False)
    return contextlib.nullcontext()


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW with a per-entry learning rate: ``masked_lr`` where a parameter's mask is set,
    ``unmasked_lr`` elsewhere, in one fused pass per (device, dtype) per step.

    Args:
        named_params: ``model.named_parameters()`` (or a ``{name: parameter}`` dict).
        masks: ``{name: mask}``; a mask is a bool tensor of the parameter's shape (dense, or
            sparse COO as GoldenParams keeps them), or a packed uint8 bitmask of ``ceil(numel / 8)``
            bytes (bit ``j`` of byte ``i`` = flat entry ``8i + j``, see ``gradkit.ops.pack_bitmask``),
            or a ``gradkit.golden.Bitmask`` (so ``golden_masks(...).masks`` passes as is).
            Parameters without a mask (a missing name, a None mask, or ``masks=None``) use
            ``unmasked_lr`` everywhere. Masks are stored once, packed, on their parameter's device.
        masked_lr, unmasked_lr: the two rates (>= 0). A rate of 0 freezes its entries exactly.
        betas, eps, weight_decay, maximize, amsgrad: as in ``torch.optim.AdamW``; the decoupled weight
            decay of an entry is scaled by that entry's rate.

    Per entry, one step is torch.optim.AdamW's step with the entry's rate, so with
    ``masked_lr == unmasked_lr`` it matches ``torch.optim.AdamW`` to rounding. State per
    parameter uses torch's names (``step``: a float32 scalar tensor, ``exp_avg``,
    ``exp_avg_sq``, and with ``amsgrad=True`` ``max_exp_avg_sq``, the running maximum whose square root
    is the denominator, as in ``torch.optim.AdamW(amsgrad=True)``; turned on later, it starts at 0); a
    parameter whose ``.grad`` is None is skipped and its step does not advance.
    ``state_dict()`` also holds the masks (copies) and the parameters' names and shapes, and
    ``load_state_dict`` checks they match before changing anything. The rates live in the
    parameter group as ``masked_lr`` / ``unmasked_lr``; the group's ``lr`` (1.0 when built) is a factor
    that multiplies both, so torch's LR schedulers (``LambdaLR``, ``StepLR``, ``CosineAnnealingLR``,
    ``LinearLR``, ``OneCycleLR``, ``ReduceLROnPlateau``, ``SWALR``, transformers' ``get_scheduler``) scale
    both rates alike: entry rate = ``lr * masked_lr`` (or ``lr * unmasked_lr``). Rates a scheduler takes as
    absolute values (``SWALR``'s ``swa_lr``, ``OneCycleLR``'s ``max_lr``, ``eta_min``, ``min_lr``) are
    factors here. A schedule may also edit ``masked_lr`` / ``unmasked_lr`` themselves.

    Compared with GoldenParams' ``MaskedAdamW``: that optimizer runs two AdamW sub-steps on the
    same state per call (one with each rate, combined by the mask), so every call advances the
    step count (and the bias corrections) twice, applies weight decay twice, and moves entries
    whose rate is 0. Here each call is exactly one AdamW step per parameter, weight decay is
    applied once with the entry's own rate, and a zero rate leaves the entry bit for bit.

    Bad input raises ``ValueError`` / ``TypeError`` naming the argument or parameter, before any
    parameter or state changes: a mask whose shape differs from its parameter's, a mask for an
    unknown name, a mask that is neither bool nor a packed uint8 bitmask, rates / betas / eps /
    weight decay out of range, duplicate names or tensors, sparse parameters or gradients, and (in ``step``) a
    parameter moved or cast after its state was created, or whose data was replaced after its mask
    was given, rates / betas / eps / weight decay edited into the group, and a gradient or state tensor sharing
    memory with a tensor the step writes (every (device, dtype) group is checked): ``step`` checks the group
    and every parameter before the closure and the first fused call, and enters the state of
    parameters stepped for the first time only once every step ran, so an error never leaves some
    parameters stepped and others not, nor a state behind.
    """

    def __init__(self, named_params: NamedParams, masks: Optional[Mapping[str, torch.Tensor]], masked_lr: float,
                 unmasked_lr: float, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, maximize: bool = False, amsgrad: bool = False) -> None:
        defaults = _check_hyper(masked_lr, unmasked_lr, betas, eps, weight_decay, maximize, amsgrad)
        named = _named_list(named_params)
        params = dict(named)
        if masks is not None and not isinstance(masks, Mapping):
            raise TypeError(f"masks: expected a {{name: mask}} dict or None, got {type(masks).__name__}")
        bits: Dict[str, torch.Tensor] = {}
        for name, mask in (masks or {}).items():
            if name not in params:
                like = [n for n in params if n != name and _bare(n) == name]
                raise ValueError(f"masks: no parameter named {name!r}" + (
                    f" (the parameters are named like {like[0]!r}: the names of a DDP / DataParallel / torch.compile "
                    "wrapper; pass the wrapped model's named_parameters() (model.module / model._orig_mod) or key "
                    "the masks by the wrapper's names)" if like else ""))
            if mask is not None:
                bits[name] = _bits_of(name, mask, params[name], f"masks[{name!r}]")
        super().__init__(named, defaults)
        self._bits = bits

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Only the constructor's group: every parameter and its mask are given up front."""
        if self.param_groups:
            raise ValueError("param_group: MaskedAdamW holds one named parameter group; build a new MaskedAdamW "
                             "over every (name, parameter) with its mask")
        super().add_param_group(param_group)

    @property
    def masks(self) -> Dict[str, torch.Tensor]:
        """The packed bitmask of every masked parameter, by name (copies)."""
        return {name: b.detach().clone() for name, b in self._bits.items()}

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        group = self.param_groups[0]
        # the group's hyper-parameters (a schedule may have edited them) before anything runs or changes; 'lr' is
        # the factor torch's LR schedulers set (a group without one, from user code deleting it: factor 1)
        hp = _check_hyper(group["masked_lr"], group["unmasked_lr"], group["betas"], group["eps"],
                          group["weight_decay"], group["maximize"], group.get("amsgrad", False),
                          group.get("lr", 1.0))  # Python floats
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = []
        inference_outside = not torch.compiler.is_dynamo_compiling() and not torch.is_inference_mode_enabled()
        for name, p in zip(group["param_names"], group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.layout != torch.strided:
                raise TypeError(f"grad of {name!r}: MaskedAdamW does not support {g.layout} gradients")
            if g.shape != p.shape or g.device != p.device:
                raise ValueError(f"grad of {name!r}: shape {tuple(g.shape)} on {g.device}, expected "
                                 f"{tuple(p.shape)} on {p.device}")
            if g.dtype != p.dtype:
                raise TypeError(f"grad of {name!r}: dtype {g.dtype} differs from the parameter's {p.dtype}")
            st = self.state.get(p)
            if st:  # the kernels check these too, but per (device, dtype) call: an earlier call may have run
                keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp["amsgrad"] and "max_exp_avg_sq" in st
                                                    else ())
                for key in keys + ("step",):
                    t = st.get(key)
                    # a state tensor made under torch.inference_mode() (loaded, or entered by hand) cannot be updated
                    # in place outside it: the fused call of its bucket would refuse it after earlier buckets ran
                    if isinstance(t, torch.Tensor) and inference_outside and t.is_inference():
                        raise ValueError(f"state[{key!r}] of {name!r}: an inference tensor (made under "
                                         "torch.inference_mode()), which cannot be updated in place outside it; "
                                         "step inside torch.inference_mode(), or load a state made outside it")
                for key in keys:
                    t = st.get(key)
                    if not isinstance(t, torch.Tensor) or t.shape != p.shape or t.device != p.device \
                            or t.dtype != p.dtype or not t.is_contiguous():
                        raise ValueError(f"state[{key!r}] of {name!r}: expected a {p.dtype} tensor of shape "
                                         f"{tuple(p.shape)} on {p.device} (was the parameter moved or cast after "
                                         f"the optimizer's first step?), got {getattr(t, 'dtype', type(t).__name__)}"
                                         f" {tuple(getattr(t, 'shape', ()))} on {getattr(t, 'device', None)}")
                s = st.get("step")
                # bool / complex: the count could not be advanced after the parameters were stepped
                if not isinstance(s, torch.Tensor) or s.numel() != 1 or s.dtype == torch.bool or s.is_complex() \
                        or not math.isfinite(float(s)) or float(s) < 0:
                    raise ValueError(f"state['step'] of {name!r}: expected a one-element tensor >= 0, got {s!r}")
            bits = self._bits.get(name)
            if bits is not None and bits.device != p.device:
                raise ValueError(f"masks[{name!r}]: stored on {bits.device} but the parameter is now on {p.device} "
                                 f"(build the optimizer after moving the model)")
            if bits is not None and bits.numel() != (p.numel() + 7) // 8:  # checked here, not per fused call
                raise ValueError(f"masks[{name!r}]: {bits.numel()} bytes, but the parameter now has {p.numel()} "
                                 f"entries (its data was replaced after the optimizer was built)")
            todo.append((name, p, g))
        beta1, beta2 = hp["betas"]
        buckets: Dict[Tuple[torch.device, torch.dtype], Dict[str, list]] = {}
        writeback = []
        fresh = {}  # the state of first-stepped parameters, entered into self.state once the steps succeeded
        fresh_max = {}  # amsgrad turned on for a parameter with state: its maximum starts at 0 (torch's initial value)
        for name, p, g in todo:
            st = self.state.get(p)
            # state made under torch.inference_mode() is made as normal tensors (session 43: inference tensors there
            # made every later step outside inference mode fail, after other (device, dtype) buckets had stepped)
            with _normal_tensors():
                if not st:
                    st = fresh[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                     "exp_avg": torch.zeros_like(p, memory_format=torch.contiguous_format),
                                     "exp_avg_sq": torch.zeros_like(p, memory_format=torch.contiguous_format)}
                    if hp["amsgrad"]:
                        st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                elif hp["amsgrad"] and "max_exp_avg_sq" not in st:
                    fresh_max[p] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            step = float(st["step"].item()) + 1
            work = p if p.is_contiguous() else p.contiguous()
            if work is not p:
                writeback.append((p, work))
            b = buckets.setdefault((p.device, p.dtype), {k: [] for k in ("n", "p", "g", "m", "v", "vmax", "bits",
                                                                         "bc1", "bc2")})
            b["n"].append(name)
            b["p"].append(work)
            b["g"].append(g.contiguous())
            b["m"].append(st["exp_avg"])
            b["v"].append(st["exp_avg_sq"])
            if hp["amsgrad"]:
                b["vmax"].append(fresh_max[p] if p in fresh_max else st["max_exp_avg_sq"])
            b["bits"].append(self._bits.get(name))
            b["bc1"].append(1 - beta1 ** step)  # torch.optim.AdamW's expressions, to the last bit
            b["bc2"].append((1 - beta2 ** step) ** 0.5)
        if len(buckets) > 1:
            # one fused call per (device, dtype): a later call refusing its tensors (memory shared between a
            # parameter, its gradient or its state) would leave the earlier buckets stepped, so every bucket is
            # checked before the first call
            _check_buckets_disjoint(buckets.values(), hp["amsgrad"])
        for b in buckets.values():
            ops.masked_adamw_(b["p"], b["g"], b["m"], b["v"], b["bits"], masked_lr=hp["masked_lr"] * hp["lr"],
                              unmasked_lr=hp["unmasked_lr"] * hp["lr"], beta1=beta1, beta2=beta2, eps=hp["eps"],
                              weight_decay=hp["weight_decay"], bias_correction1=b["bc1"],
                              bias_correction2_sqrt=b["bc2"], maximize=hp["maximize"],
                              max_exp_avg_sqs=b["vmax"] if hp["amsgrad"] else None)
        for p, work in writeback:
            p.copy_(work)
        for p, st in fresh.items():
            self.state[p].update(st)
        for p, t in fresh_max.items():
            self.state[p]["max_exp_avg_sq"] = t
        if todo:
            # an int 1: an integer step count loaded from a state dict advances too (1.0 cannot be cast to it)
            torch._foreach_add_([self.state[p]["step"] for _, p, _ in todo], 1)
        return loss

    def state_dict(self) -> Dict[str, Any]:
        """torch's optimizer state dict plus ``masks`` ({name: packed bits}) and ``param_shapes``."""
        sd = super().state_dict()
        group = self.param_groups[0]
        # copies: the packed masks are the optimizer's configuration, validated once; an in-place edit of a state
        # dict (say, building another optimizer's) must not change this optimizer's masks unchecked
        sd["masks"] = {name: b.clone() for name, b in self._bits.items()}
        sd["param_shapes"] = {name: list(p.shape) for name, p in zip(group["param_names"], group["params"])}
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a ``state_dict()`` of a MaskedAdamW over the same names and shapes (checked first)."""
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups", "masks", "param_shapes"} <= set(
                state_dict):
            raise ValueError("state_dict: expected a MaskedAdamW.state_dict() (keys state, param_groups, masks, "
                             "param_shapes)")
        groups = state_dict["param_groups"]
        if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], Mapping) \
                or not {"param_names", "params", "masked_lr", "unmasked_lr", "betas", "eps", "weight_decay",
                        "maximize"} <= set(groups[0]) \
                or not isinstance(groups[0]["param_names"], (list, tuple)) \
                or not isinstance(groups[0]["params"], (list, tuple)):
            raise ValueError("state_dict: expected one named parameter group (with param_names, params and the "
                             "hyper-parameters)")
        for key in ("state", "masks", "param_shapes"):
            if not isinstance(state_dict[key], Mapping):
                raise ValueError(f"state_dict: {key!r} is not a dict, got {type(state_dict[key]).__name__}")
        group = self.param_groups[0]
        names, params = group["param_names"], group["params"]
        saved_names = list(groups[0]["param_names"])
        if saved_names != names:
            diff = sorted(set(saved_names) ^ set(names))
            prefix = ""
            if [_bare(n) for n in saved_names] == [_bare(n) for n in names]:  # one side a wrapper's names
                a, b = next((x, y) for x, y in zip(saved_names, names) if x != y)
                prefix = (f"; they differ only by a wrapper's prefix {(a[:-len(b)] or b[:-len(a)])!r} (DDP / "
                          "DataParallel: 'module.', torch.compile: '_orig_mod.'): build the optimizer over the "
                          "named_parameters() of the same wrapped or bare model the state was saved from")
            raise ValueError(f"state_dict: parameter names differ from this optimizer's "
                             f"({'e.g. ' + repr(diff[:3]) if diff else 'same names, other order'}{prefix})")
        saved = groups[0]
        try:
            distinct = len(set(saved["params"]))
        except TypeError:  # an unhashable id
            distinct = -1
        if len(saved["params"]) != len(names) or distinct != len(names):
            raise ValueError(f"state_dict: param_groups[0]['params'] holds {len(saved['params'])} ids "
                             f"({distinct} distinct), expected one per parameter name ({len(names)})")
        _check_hyper(saved["masked_lr"], saved["unmasked_lr"], saved["betas"], saved["eps"], saved["weight_decay"],
                     saved["maximize"], saved.get("amsgrad", False), saved.get("lr", 1.0))
        if "lr" not in saved:  # saved before the group had the schedule's factor (session 43): factor 1, as then
            groups = [{**saved, "lr": 1.0}]
        by_name = dict(zip(names, params))
        for name, p in by_name.items():
            shape = state_dict["param_shapes"].get(name)
            if shape is None or list(shape) != list(p.shape):
                raise ValueError(f"state_dict: parameter {name!r} has shape {shape}, this optimizer's has "
                                 f"{list(p.shape)}")
        for idx, st in state_dict["state"].items():
            if idx not in saved["params"]:
                raise ValueError(f"state_dict: state for parameter id {idx!r}, which is not in its param_groups")
            name = names[saved["params"].index(idx)]
            if not isinstance(st, Mapping):
                raise ValueError(f"state_dict: state of {name!r} is not a dict")
            if not st:
                continue  # an empty entry: opt.state[p] read before p's first step (a defaultdict); step() skips it
            step = st.get("step")
            # bool / complex: step() refuses them (the count could not be advanced), so loading refuses them too
            if not isinstance(step, torch.Tensor) or step.numel() != 1 or step.dtype == torch.bool or step.is_meta \
                    or step.is_complex() or not math.isfinite(float(step)) or float(step) < 0:
                raise ValueError(f"state_dict: state['step'] of {name!r} is not a one-element tensor >= 0")
            keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if "max_exp_avg_sq" in st else ())
            for key in keys:
                t = st.get(key)
                if not isinstance(t, torch.Tensor) or t.shape != by_name[name].shape:
                    raise ValueError(f"state_dict: state[{key!r}] of {name!r} is not a tensor of shape "
                                     f"{tuple(by_name[name].shape)}")
                # loading casts to the parameter's dtype: a complex moment would lose its imaginary part
                # silently, a meta one has no values
                if not t.is_floating_point() or t.is_meta:
                    raise ValueError(f"state_dict: state[{key!r}] of {name!r} is not a real floating tensor with "
                                     f"values, got a {t.dtype} tensor on {t.device}")
        bits = {}
        for name, b in state_dict["masks"].items():
            if name not in by_name:
                raise ValueError(f"state_dict: mask for unknown parameter {name!r}")
            p = by_name[name]
            if not isinstance(b, torch.Tensor) or b.dtype != torch.uint8:
                raise TypeError(f"state_dict: masks[{name!r}] is not a packed uint8 bitmask")
            bits[name] = _bits_of(name, b, p, f"state_dict: masks[{name!r}]")
        # the copies and casts made here are normal tensors also when loading under torch.inference_mode() (session 43
        # review: the 'step' clone below was an inference tensor there, and every later step outside it was refused)
        with _normal_tensors():
            super().load_state_dict({"state": state_dict["state"], "param_groups": groups})
            for st in self.state.values():
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if key in st:  # not in an empty entry
                        t = st[key].contiguous()
                        # a moment that is itself an inference tensor (a state dict loaded from disk under
                        # torch.inference_mode()) is copied: step() updates it in place
                        st[key] = t.clone() if t.is_inference() and not torch.is_inference_mode_enabled() else t
                if "step" in st:
                    # torch's load keeps the given 'step' tensor itself (never cast), and step() advances it in place:
                    # two optimizers loaded from one state dict (or one loaded twice: a rewind) counted each other's
                    # steps, even where the moments were cast to a half model's dtype and so copied (session 41); a
                    # scalar to copy
                    st["step"] = st["step"].clone()
        self._bits = bits

    def __getstate__(self) -> Dict[str, Any]:
        return {**super().__getstate__(), "_bits": self._bits}
