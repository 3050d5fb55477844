"""The functional op surface of gradkit: typed wrappers over ``torch.ops.gradkit.*``.

Each op here has a schema in ``csrc/ops.cpp``, a reference in
``gradkit.kernels.reference``, a C++ CPU kernel, a GPU kernel (CUDA C++ when the
extension was built with CUDA, otherwise the Triton kernel registered below for
the CUDA dispatch key), a fake impl (so it traces under ``torch.compile``) and,
where it applies, autograd.

Backend override, read on every call (tests and benchmarks flip it):
``GRADKIT_BACKEND=auto`` (default), ``native`` (the dispatcher: C++ on CPU, CUDA C++ on
GPU), ``triton`` (the Triton launchers directly; CPU tensors need ``TRITON_INTERPRET=1``)
or ``reference``. ``auto`` is ``native`` except where a GPU measurement picked another
path for CUDA tensors (``gpu_auto``): Rademacher ``project_flat`` runs the Triton kernel,
``factored_project`` and ``score_topk`` the cuBLAS composites of
``gradkit.kernels.composite`` (benchmarks/results/h200/), except while torch lets cuBLAS
use TF32 for float32 products (``cublas_fp32_reduced``): they then run gradkit's CUDA C++
kernels, which are float32-exact whatever that setting.

Segments: ``src[s]`` with ``index[s]`` (a 1-D int32/int64 tensor of flat row-major
positions, or ``None`` for every element in order) contributes its selected
entries to one flat vector; segments are concatenated in list order.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
from typing import List, Optional, Sequence

import torch

from gradkit import _ext, _rules
from gradkit.kernels.reference import parammap as _ref
from gradkit.kernels.reference import scope as _ref_scope
from gradkit.ops.overlap import check_no_overlap as _check_no_overlap
from gradkit.ops.overlap import spans_meet as _spans_meet

_BACKENDS = ("auto", "native", "triton", "reference")


def _requested() -> str:
    b = os.environ.get("GRADKIT_BACKEND", "auto").strip().lower()
    if b not in _BACKENDS:
        raise ValueError(f"GRADKIT_BACKEND: expected one of {_BACKENDS}, got {b!r}")
    return b


def backend() -> str:
    """The active backend: ``GRADKIT_BACKEND`` if set, else native (``auto`` is native here; reference when
    the extension is missing). CUDA tensors under ``auto``: see ``gpu_auto``."""
    b = _requested()
    if b == "auto":
        b = "native"
    if b == "native" and not _ext.LOADED:
        return "reference"
    return b


def gpu_auto(t: torch.Tensor) -> bool:
    """True when ``t`` is a CUDA tensor and the backend is ``auto`` (the default) with the extension
    loaded: the ops that measured a faster GPU path than their CUDA C++ kernel then take it."""
    return t.is_cuda and _requested() == "auto" and _ext.LOADED


def cublas_fp32_reduced() -> bool:
    """True when torch lets cuBLAS round float32 matmul operands (TF32): ``allow_tf32 = True``,
    ``set_float32_matmul_precision("high" | "medium")`` or ``fp32_precision = "tf32"`` (CUDA's or the
    generic one). The cuBLAS composites (``gradkit.kernels.composite``) are then no longer float32-exact
    (about 1e-3 relative instead of 1e-6), so ``factored_project`` and ``score_topk`` keep to gradkit's
    own kernels, whose products ignore the setting (the CUDA C++ kernels' own cuBLAS fallbacks, p > 64,
    k > 64, run under ``at::NoTF32Guard``). In an extension built without CUDA C++ (Triton the only GPU
    kernels) two fallbacks do follow TF32: ``score_topk`` with k > 64 and the half-precision Schur
    extension past m = 256 (their ``torch`` products; Python has no thread-local TF32 guard). Read per
    call, without the legacy getters (they raise once a program has mixed the legacy and the new API); an
    unreadable setting counts as reduced."""
    try:
        prec = torch.backends.cuda.matmul.fp32_precision
        if prec == "none":  # CUDA's matmul inherits the generic setting
            prec = torch.backends.fp32_precision
        return prec not in ("none", "ieee")
    except Exception:  # noqa: BLE001 - an older torch: the legacy flag
        try:
            return bool(torch.backends.cuda.matmul.allow_tf32)
        except Exception:  # noqa: BLE001
            return True


def gpu_composite(t: torch.Tensor) -> bool:
    """gpu_auto(t) while cuBLAS float32 products are exact (cublas_fp32_reduced() is False): where the
    cuBLAS composites stand in for gradkit's kernels."""
    return gpu_auto(t) and not cublas_fp32_reduced()


_TRITON_FAMILIES: dict = {}


def triton_family(family: str):
    """``gradkit.kernels.triton.<family>``, or None where triton (or the module) does not import."""
    if family not in _TRITON_FAMILIES:
        try:
            import importlib

            _TRITON_FAMILIES[family] = importlib.import_module(f"gradkit.kernels.triton.{family}")
        except Exception:  # pragma: no cover - a CUDA torch without triton
            _TRITON_FAMILIES[family] = None
    return _TRITON_FAMILIES[family]


def _check_not_inference(tensors, what: str) -> None:
    """Outside inference mode, an inference tensor (made under ``torch.inference_mode()``) among ``tensors`` is
    refused, naming it (``what``, or ``what[i]`` for several), as torch's own in-place ops refuse it. Not while
    torch.compile traces (Dynamo cannot trace ``is_inference_mode_enabled`` / ``is_inference``: every in-place
    wrapper broke the graph, an error under ``fullgraph=True``; nor do its fake inputs keep the flag). A compiled
    call is still refused: by the op's ADInplaceOrView kernel (backend "eager", before any write), or by torch when
    the functionalised graph copies the result back into the inference tensor (aot_eager, inductor), which raises
    after writing, as torch's own in-place ops do on inference tensors."""
    if torch.compiler.is_dynamo_compiling() or torch.is_inference_mode_enabled():
        return
    for i, t in enumerate(tensors):
        if isinstance(t, torch.Tensor) and t.is_inference():
            name = what if len(tensors) == 1 else f"{what}[{i}]"
            raise RuntimeError(f"{name}: is an inference tensor (made under torch.inference_mode()), which cannot "
                               "be updated in place outside inference mode; clone it, or call this inside "
                               "torch.inference_mode()")


def _check_writable(tensors, what: str) -> None:
    """Before an in-place op: its targets must not need autograd to see the write. gradkit's in-place
    ops have no derivative, so writing a tensor that requires grad while grad mode is on would leave any
    graph through it silently wrong (torch refuses the same for its own in-place ops on leaves). An inference
    tensor (made under ``torch.inference_mode()``) is refused outside inference mode in any grad mode, as torch's
    own in-place ops refuse it (the compiled kernels would write it silently: it has no ADInplaceOrView key)."""
    _check_not_inference(tensors, what)
    if not torch.is_grad_enabled():
        return
    for i, t in enumerate(tensors):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            name = what if len(tensors) == 1 else f"{what}[{i}]"
            raise RuntimeError(f"{name}: requires grad and grad mode is on; gradkit's in-place ops are not "
                               "differentiable: call it under torch.no_grad() (or on .detach())")


def _check_read_no_grad(named, into: str, instead: str = "") -> None:
    """Before an op that writes into a tensor it was given: a source the written values are computed from must
    not need autograd either while grad mode is on. The write is not recorded in any graph, so ``into`` would
    hold values with the source's gradient silently dropped (torch refuses ``out=`` with an input that requires
    grad the same way). ``named``: (argument name, tensor or None) pairs; ``instead``: the differentiable call
    to suggest, if there is one."""
    if not torch.is_grad_enabled():
        return
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            alt = f", or use {instead}, which is differentiable" if instead else ""
            raise RuntimeError(f"{name}: requires grad and grad mode is on, but the values written into {into} "
                               "are not differentiable (its gradient would be silently dropped): call it under "
                               f"torch.no_grad() or pass {name}.detach(){alt}")


def _wrote(tensors, fn=None) -> None:
    """After an in-place op run by ``fn``: bump the targets' autograd version counters, as torch's own in-place
    ops do, so that a backward through a graph that saved one of them raises instead of silently using the new
    values (the Triton / reference kernels write through data pointers, which autograd cannot see). A
    ``torch.ops.gradkit`` op (the native backend) has bumped them already in its ADInplaceOrView kernel (below):
    nothing to do, so a call bumps each target once, as ``add_`` does."""
    if isinstance(fn, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        return
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if ts:
        torch.autograd.graph.increment_version(ts)


def _impl(name: str, family: str = "parammap"):
    b = backend()
    if b == "native":
        return getattr(torch.ops.gradkit, name)
    if b == "triton":
        return _triton_launcher(family, name)
    import importlib

    return getattr(importlib.import_module(f"gradkit.kernels.reference.{family}"), name)


@functools.lru_cache(maxsize=None)
def _triton_launcher(family: str, name: str):
    """``gradkit.kernels.triton.<family>.<name>``, run on its tensors' GPU (not the current one)."""
    import importlib

    try:
        from gradkit.kernels.triton import on_tensor_device

        mod = importlib.import_module(f"gradkit.kernels.triton.{family}")
    except ModuleNotFoundError as e:
        if e.name != "triton" and not str(e.name or "").startswith("triton."):
            raise
        raise ModuleNotFoundError(f"GRADKIT_BACKEND=triton: the Triton kernels need triton, which is not installed "
                                  f"(pip install triton, or gradkit's [triton] extra); unset GRADKIT_BACKEND for "
                                  f"the native kernels ({e})", name=e.name) from None
    return on_tensor_device(getattr(mod, name))


def transforms_active() -> bool:
    """True inside a torch.func transform (vmap, grad, vjp, jacrev, jacfwd, ...) or a forward-mode AD level
    (``torch.autograd.forward_ad.dual_level``), outside torch.compile's tracing.

    The differentiable ops' autograd (registered with ``torch.library.register_autograd``) is a generated
    autograd.Function without ``setup_context``, which torch.func refuses ("it must override the setup_context
    staticmethod", pytorch/pytorch#168393, #179652), and without a forward-mode rule: a dual input's tangent was
    dropped without a word (a zero Jacobian from ``jacfwd``). There the wrappers (``gather_segments``,
    ``scatter_segments``, ``project_flat``, ``factored_project``, ``score_topk``) apply their own Functions instead:
    the same forward and backward, a ``vmap`` running the op once per example, and a ``jvp`` for the linear ones
    (gather, scatter, project_flat; the others raise torch's NotImplementedError asking for one). A direct
    ``torch.ops.gradkit.*`` call still meets torch's limits there."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():
        # under torch.func.functionalize (alone or with other transforms: make_fx(functionalize(f)), vmap over it)
        # an autograd.Function has no rule ("NYI: Functionalize rule for custom_function_call"), where the op has
        # one: there the wrappers call the op as outside transforms (session 44 review)
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        return not any(i.key() == TransformType.Functionalize for i in retrieve_all_functorch_interpreters())
    return torch.autograd.forward_ad._current_level >= 0


def _fn_autograd(fn, tensors) -> bool:
    """Whether a differentiable op's wrapper runs through its own autograd.Function: inside a transform
    (:func:`transforms_active`), or with ``GRADKIT_BACKEND=triton`` while a gradient is wanted: the Triton launchers
    are plain Python calls that autograd cannot see through, so gather_segments', scatter_segments' and
    score_topk's results had no grad_fn there and their share of a gradient was silently dropped (session 44; the
    reference backend is plain torch, differentiable as it is)."""
    if transforms_active():
        return True
    return not _native(fn) and backend() == "triton" and torch.is_grad_enabled() and \
        any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


_FLOATS = _rules.FLOATS
PARAMMAP_OPS = ("gather_segments", "gather_segments_out", "scatter_segments", "scatter_segments_", "mask_to_indices",
                "bitmask_to_indices", "pack_bitmask", "topk_select", "topk_select_segments")
_INDEX = (torch.int32, torch.int64)


def _check_index_entry(ix, i: int) -> None:
    """One segment's positions: an int32 / int64 tensor (else TypeError) of one dimension (else ValueError), the C++
    kernels' rule (csrc/segments.h; session 42: a 2-D index was a TypeError here, a ValueError from the op)."""
    if not isinstance(ix, torch.Tensor) or ix.dtype not in _INDEX:
        raise TypeError(f"index[{i}]: expected a 1-D int32/int64 tensor or None")
    if ix.dim() != 1:
        raise ValueError(f"index[{i}]: expected a 1-D int32/int64 tensor or None, got shape {tuple(ix.shape)}")


def _check_segments(src: Sequence[torch.Tensor], index: Sequence[Optional[torch.Tensor]], what: str) -> None:
    if not isinstance(src, (list, tuple)):
        raise TypeError(f"{what}: expected a list of tensors, got {type(src).__name__}")
    if not isinstance(index, (list, tuple)) or len(index) != len(src):
        raise ValueError(f"index: expected a list of {len(src)} entries (tensor or None), got "
                         f"{len(index) if isinstance(index, (list, tuple)) else type(index).__name__}")
    dev = src[0].device if src else None
    for i, (t, ix) in enumerate(zip(src, index)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}]: expected a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{what}[{i}]: expected float32/float64/float16/bfloat16, got {t.dtype}")
        if t.device != dev:
            raise ValueError(f"{what}[{i}]: on {t.device} but {what}[0] is on {dev}")
        if ix is not None:
            _check_index_entry(ix, i)
            if ix.device != t.device:
                raise ValueError(f"index[{i}]: on {ix.device} but {what}[{i}] is on {t.device}")


def _count(t: torch.Tensor, ix: Optional[torch.Tensor]) -> int:
    return t.numel() if ix is None else ix.numel()


# --------------------------------------------------------------------------- gather / scatter


# The check_* functions take an op's schema arguments (csrc/ops.cpp): the op wrappers run them, and so do the
# Triton launchers where they are the ops' CUDA kernels (gradkit._ext.register_triton_for_cuda), so a direct
# torch.ops.gradkit call is refused there as by the C++ kernels' checks, before anything is launched.


def check_gather_segments(src, index, dtype) -> None:
    _check_segments(src, index, "src")
    if dtype is not None and dtype not in _FLOATS:
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}")


def check_gather_segments_out(src, index, out, accumulate, dtype=None) -> None:
    """``dtype``: the wrapper's requested dtype (not in the schema), which out must have."""
    _flag(accumulate, "accumulate")
    _check_segments(src, index, "src")
    total = sum(_count(t, ix) for t, ix in zip(src, index))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a tensor, got {type(out).__name__}")
    if out.dim() != 1 or out.numel() != total:
        raise ValueError(f"out: expected shape ({total},), got {tuple(out.shape)}")
    if dtype is not None and out.dtype != dtype:
        raise TypeError(f"out: dtype {out.dtype} differs from the requested dtype {dtype}")
    if out.dtype not in _FLOATS:
        raise TypeError(f"out: expected a floating dtype, got {out.dtype}")
    if src and out.device != src[0].device:
        raise ValueError(f"out: on {out.device} but src is on {src[0].device}")
    if not out.is_contiguous():
        raise ValueError("out: must be contiguous")
    if src:
        _check_writable([out], "out")
        _check_read_no_grad([(f"src[{i}]", t) for i, t in enumerate(src)], "out", "gather_segments without `out`")


def gather_segments(src: Sequence[torch.Tensor], index: Sequence[Optional[torch.Tensor]], *,
                    dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None,
                    accumulate: bool = False) -> torch.Tensor:
    """Gather the selected entries of many tensors into one flat vector.

    src: list of S tensors (any shape, strided views allowed); index: list of S
    entries, each a 1-D int tensor of flat positions or None (all, in order).
    Returns out: (sum_s count_s,) with out[off_s + j] = src[s].flatten()[index[s][j]].
    With ``out`` nothing is allocated; ``accumulate`` adds into ``out``.
    Values are not inspected (gather / scatter move data): NaN / Inf are copied as they are, and a
    value, sum or ``scale`` product past the destination dtype's range becomes +-inf, as torch's own
    casts and adds do, identically on every backend.
    """
    if out is None:
        if _flag(accumulate, "accumulate"):
            raise ValueError("accumulate: needs an `out` tensor to add into")
        check_gather_segments(src, index, dtype)
        if not src:  # no tensor to dispatch on: the empty result is known
            return torch.empty(0, dtype=dtype or torch.float32)
        fn = _impl("gather_segments")
        if _fn_autograd(fn, src):  # torch.func refuses the op's own autograd; a Triton launcher has none
            return _GatherFn.apply(fn, tuple(index), dtype, *src)
        return fn(list(src), list(index), dtype)
    check_gather_segments_out(src, index, out, accumulate, dtype)
    if not src:
        return out
    fn = _impl("gather_segments_out")
    fn(list(src), list(index), out, bool(accumulate))
    _wrote([out], fn)
    return out


def check_scatter_segments(flat, index, numel, scale) -> None:
    _finite(scale, "scale")
    _check_flat(flat)
    if len(numel) != len(index):
        raise ValueError(f"numel: expected {len(index)} entries, got {len(numel)}")
    for i, (ix, n) in enumerate(zip(index, numel)):
        if ix is not None:
            _check_index_entry(ix, i)
        if ix is not None and ix.device != flat.device:
            raise ValueError(f"index[{i}]: on {ix.device} but flat is on {flat.device}")
        if _int(n, f"numel[{i}]") < 0:  # an int (numpy's too): int() would take 2.5, True or "2"
            raise ValueError(f"numel[{i}]: must be non-negative")
    total = sum(int(n) if ix is None else ix.numel() for ix, n in zip(index, numel))
    if flat.numel() != total:
        raise ValueError(f"flat: expected {total} elements, got {flat.numel()}")


def scatter_segments(flat: torch.Tensor, index: Sequence[Optional[torch.Tensor]],
                     numel: Sequence[int], *, scale: float = 1.0) -> List[torch.Tensor]:
    """Inverse of gather: S new 1-D tensors of ``numel[s]`` elements, zero where unselected.

    flat: (sum_s count_s,); returns [t_s: (numel[s],)] with t_s[index[s][j]] = scale * flat[off_s + j].
    The positions of a segment must be distinct (IndexError out of range, ValueError for a repeat).
    """
    check_scatter_segments(flat, index, numel, scale)
    fn = _impl("scatter_segments")
    if _fn_autograd(fn, [flat]):  # torch.func refuses the op's own autograd; a Triton launcher has none
        return list(_ScatterFn.apply(fn, tuple(index), [int(n) for n in numel], float(scale), flat))
    return list(fn(flat, list(index), [int(n) for n in numel], float(scale)))


def check_scatter_segments_(flat, index, dst, scale, accumulate) -> None:
    _flag(accumulate, "accumulate")
    _finite(scale, "scale")
    _check_flat(flat)
    _check_segments(dst, index, "dst")
    total = sum(_count(t, ix) for t, ix in zip(dst, index))
    if flat.numel() != total:
        raise ValueError(f"flat: expected {total} elements, got {flat.numel()}")
    if dst and flat.device != dst[0].device:
        raise ValueError(f"flat: on {flat.device} but dst is on {dst[0].device}")
    _check_writable(list(dst), "dst")
    if dst:
        _check_read_no_grad([("flat", flat)], "dst", "scatter_segments")


def _native(fn) -> bool:
    """``fn`` is the dispatcher op (the native kernels, which run csrc/overlap.h's checks and copy aliased sources
    themselves): the Python copies of those rules below are for the other backends only (about 4 us a tensor)."""
    return isinstance(fn, (torch._ops.OpOverloadPacket, torch._ops.OpOverload))


def scatter_segments_(flat: torch.Tensor, index: Sequence[Optional[torch.Tensor]],
                      dst: Sequence[torch.Tensor], *, scale: float = 1.0, accumulate: bool = False) -> None:
    """In place: dst[s].flatten()[index[s][j]] = (or +=) scale * flat[off_s + j]. Allocates nothing.

    The positions of a segment must be distinct: a repeat is a ValueError (an out-of-range one an IndexError),
    raised before anything is written. Unsorted positions cost one more pass (a bitmap or a sort) on CPU, and
    on a GPU a sort per segment plus a second launch."""
    check_scatter_segments_(flat, index, dst, scale, accumulate)
    fn = _impl("scatter_segments_")
    if flat.numel() and not _native(fn):  # destinations sharing an element race: refused on every backend
        _check_no_overlap([(f"dst[{i}]", d, True) for i, d in enumerate(dst)])
    flat = _read_copy(flat, dst, fn)
    fn(flat, list(index), list(dst), float(scale), bool(accumulate))
    _wrote(dst, fn)


def _read_copy(t: torch.Tensor, written: Sequence[torch.Tensor], fn) -> torch.Tensor:
    """``t``, or a copy of it where it shares memory with a tensor the op writes and ``fn`` is a Python backend
    (the reference's loops write one tensor after another; the native kernels and the Triton launchers copy
    such a source themselves): every backend reads its sources as they were before the call."""
    if not _native(fn) and _spans_meet(t, written):
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _check_flat(flat) -> None:
    if not isinstance(flat, torch.Tensor):
        raise TypeError(f"flat: expected a tensor, got {type(flat).__name__}")
    if flat.dim() != 1:
        raise ValueError(f"flat: expected a 1-D tensor, got shape {tuple(flat.shape)}")
    if flat.dtype not in _FLOATS:
        raise TypeError(f"flat: expected a floating dtype, got {flat.dtype}")


# --------------------------------------------------------------------------- selection encodings


def check_mask_to_indices(mask, dtype) -> None:
    check_pack_bitmask(mask)
    _check_index_dtype(dtype, mask.numel())


def check_pack_bitmask(mask) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")


def mask_to_indices(mask: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Ascending flat positions of the True entries of a bool mask (any shape)."""
    check_mask_to_indices(mask, dtype)
    return _impl("mask_to_indices")(mask, dtype)


def check_bitmask_to_indices(bits, numel, dtype) -> int:
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8:
        raise TypeError(f"bits: expected a uint8 tensor, got {getattr(bits, 'dtype', type(bits).__name__)}")
    numel = _int(numel, "numel")
    if numel < 0:
        raise ValueError("numel: must be non-negative")
    if bits.dim() != 1 or bits.numel() != (numel + 7) // 8:
        raise ValueError(f"bits: expected shape ({(numel + 7) // 8},) for numel={numel}, got {tuple(bits.shape)}")
    _check_index_dtype(dtype, numel)
    return numel


def bitmask_to_indices(bits: torch.Tensor, numel: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Ascending positions of the set bits of a packed little-endian bitmask over ``numel`` elements."""
    numel = check_bitmask_to_indices(bits, numel, dtype)
    return _impl("bitmask_to_indices")(bits, numel, dtype)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask (flattened) into ceil(numel/8) bytes, bit j of byte i = element 8i+j."""
    check_pack_bitmask(mask)
    return _impl("pack_bitmask")(mask)


def _check_index_dtype(dtype, numel: int) -> None:
    if dtype not in _INDEX:
        raise TypeError(f"dtype: expected torch.int32 or torch.int64, got {dtype}")
    if dtype == torch.int32 and numel > 2**31 - 1:
        raise ValueError(f"dtype: int32 cannot address {numel} elements; use torch.int64")


def check_topk_select(scores, active, k) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dtype not in _FLOATS:
        raise TypeError(f"scores: expected a floating tensor, got {getattr(scores, 'dtype', type(scores).__name__)}")
    if scores.dim() != 1:
        raise ValueError(f"scores: expected a 1-D tensor, got shape {tuple(scores.shape)}")
    if active is not None:
        if not isinstance(active, torch.Tensor) or active.dtype != torch.bool or active.shape != scores.shape:
            raise ValueError(f"active: expected a bool tensor of shape {tuple(scores.shape)}")
        if active.device != scores.device:
            raise ValueError(f"active: on {active.device} but scores is on {scores.device}")
    _int(k, "k")  # numpy integers too, as every other family


def topk_select(scores: torch.Tensor, k: int, active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact top-k: ascending int64 positions of the k largest ``scores`` among ``active``.

    scores: (N,) floating; active: (N,) bool or None (all). Equal scores are taken
    lowest position first (deterministic on every backend); NaN raises ValueError.
    """
    check_topk_select(scores, active, k)
    return _impl("topk_select")(scores, active, _int(k, "k"))


def check_topk_select_segments(scores, active, k) -> list:
    """Returns active as a list (None: one None per tensor)."""
    if not isinstance(scores, (list, tuple)):
        raise TypeError(f"scores: expected a list of tensors, got {type(scores).__name__}")
    for i, s in enumerate(scores):
        if not isinstance(s, torch.Tensor) or s.dtype not in _FLOATS:
            raise TypeError(f"scores[{i}]: expected a floating tensor, got {getattr(s, 'dtype', type(s).__name__)}")
        if s.dtype != scores[0].dtype:
            raise TypeError(f"scores[{i}]: dtype {s.dtype} differs from scores[0]'s {scores[0].dtype}")
        if s.device != scores[0].device:
            raise ValueError(f"scores[{i}]: on {s.device} but scores[0] is on {scores[0].device}")
    if active is None:
        active = [None] * len(scores)
    if not isinstance(active, (list, tuple)) or len(active) != len(scores):
        raise ValueError(f"active: expected None or a list of {len(scores)} entries")
    for i, (s, a) in enumerate(zip(scores, active)):
        if a is not None and (not isinstance(a, torch.Tensor) or a.dtype != torch.bool or a.numel() != s.numel()
                              or a.device != s.device):
            raise ValueError(f"active[{i}]: expected None or a bool tensor of {s.numel()} elements on {s.device}")
    _int(k, "k")  # numpy integers too, as every other family
    return list(active)


def topk_select_segments(scores: Sequence[torch.Tensor], k: int,
                         active: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """Exact top-k over many tensors at once, without concatenating them.

    scores: list of float tensors (any shapes, one dtype); active: None or a list of the
    same length with a bool tensor (same numel) or None per entry. Returns the ascending int64
    positions, in the concatenation of the flattened scores (list order), of the k largest
    active scores; equal scores are taken lowest position first; NaN among active raises.
    """
    active = check_topk_select_segments(scores, active, k)
    k = _int(k, "k")
    if not scores:  # nothing to dispatch on
        return _ref.topk_select_segments([], [], k)
    return _impl("topk_select_segments")(list(scores), list(active), k)


# --------------------------------------------------------------------------- family 2: scope (block norms / masks)

MAX_DIMS = 8  # the kernels' limit on x.dim()
SCOPE_OPS = ("block_norms", "scope_kth", "scope_mask", "scope_hard_threshold_", "block_apply_mask_",
             "block_soft_threshold_")


def _int(v, what: str) -> int:
    """v as a Python int: an int or a numpy integer (any ``numbers.Integral`` but bool), else a TypeError naming
    ``what``. Every family's wrappers and the public functions share it, so an argument that one accepts the
    others accept too."""
    if type(v) is int:  # the common case, fast
        return v
    if isinstance(v, torch.SymInt):  # a symbolic size (torch.compile(dynamic=True), fake tensors): kept symbolic
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{what}: expected an int, got {type(v).__name__}")
    return int(v)


# A real-number argument: Python / numpy numbers, and torch's symbolic ones (under torch.compile(dynamic=True) a
# float argument, a default one included, is traced as a SymFloat, and a size-derived int as a SymInt).
_REAL = (numbers.Real, torch.SymInt, torch.SymFloat)


def _isfinite(v) -> bool:
    """math.isfinite for a real number, a SymFloat too (Dynamo cannot trace math.isfinite on a symbolic float:
    a graph break, an error under fullgraph=True). NaN fails both comparisons."""
    return -math.inf < v < math.inf


_flag = _rules.flag  # the bool counterpart of :func:`_int`


def _finite(v, what: str) -> float:
    """v as a finite Python float: a real number (numpy's too; not a bool, not a string), else a TypeError naming
    ``what``; NaN or +-inf is a ValueError (``float(v)`` would take "2", True, or a NaN that spreads silently)."""
    if isinstance(v, bool) or not isinstance(v, _REAL):
        raise TypeError(f"{what}: expected a real number, got {type(v).__name__} {v!r}")
    f = float(v)
    if not _isfinite(f):
        raise ValueError(f"{what}: expected a finite number, got {v!r}")
    return f


def _check_typed(named, dtype, device=None) -> None:
    """Each ``(name, t)`` must be a tensor of ``dtype`` (or of one of a tuple of dtypes), and (with
    ``device`` given) on ``device``; raises TypeError / ValueError naming the argument. The family
    wrappers' common first check."""
    ok = dtype if isinstance(dtype, tuple) else (dtype,)
    for nm, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{nm}: expected a tensor, got {type(t).__name__}")
        if t.dtype not in ok:
            want = " or ".join(str(d) for d in ok)
            raise TypeError(f"{nm}: expected a {want} tensor, got {t.dtype}")
        if device is not None and t.device != device[1]:
            raise ValueError(f"{nm}: on {t.device} but {device[0]} is on {device[1]}")


def _check_float_tensor(x, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        raise TypeError(f"{what}: expected a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")


def _check_layout(x: torch.Tensor, block_shape, scope_shape=None):
    """Validates x / block_shape / scope_shape; returns (grid, numblk_per_scope)."""
    _check_float_tensor(x, "x")
    if x.dim() < 1 or x.dim() > MAX_DIMS:
        raise ValueError(f"x: expected 1 to {MAX_DIMS} dims, got {x.dim()}")
    if not isinstance(block_shape, (list, tuple)) or len(block_shape) != x.dim():
        raise ValueError(f"block_shape: expected {x.dim()} entries (one per dim of x {tuple(x.shape)}), "
                         f"got {block_shape!r}")
    grid = []
    for i, (n, b) in enumerate(zip(x.shape, block_shape)):
        b = _int(b, f"block_shape[{i}]")
        if b < 1 or n % b:
            raise ValueError(f"block_shape[{i}]={b} does not divide x.shape[{i}]={n}")
        grid.append(n // b)
    nb = 1
    if scope_shape is not None:
        if not isinstance(scope_shape, (list, tuple)) or len(scope_shape) != x.dim():
            raise ValueError(f"scope_shape: expected {x.dim()} entries, got {scope_shape!r}")
        for i, (g, s) in enumerate(zip(grid, scope_shape)):
            s = _int(s, f"scope_shape[{i}]")
            if s < 1 or g % s:
                raise ValueError(f"scope_shape[{i}]={s} does not divide the block grid's dim {i} "
                                 f"(grid {tuple(grid)} from x {tuple(x.shape)} / block_shape {tuple(block_shape)})")
            nb *= s
    return grid, nb


def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, _REAL) or not (p > 0):  # numpy scalars too
        raise ValueError(f"p: expected a positive number or inf, got {p!r}")
    return float(p)


def _check_raw(raw, block_shape) -> bool:
    raw = _flag(raw, "raw")
    if raw and any(int(b) != 1 for b in block_shape):
        raise ValueError(f"raw: signed scores need single-element blocks, got block_shape {tuple(block_shape)}")
    return bool(raw)


def _check_companion(t, x: torch.Tensor, what: str, shape, dtypes=_FLOATS) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{what}: dtype {t.dtype} not supported")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{what}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{what}: on {t.device} but x is on {x.device}")


def check_block_norms(x, block_shape, p) -> float:
    _check_layout(x, block_shape)
    return _check_p(p)


def block_norms(x: torch.Tensor, block_shape: Sequence[int], p: float = 2.0) -> torch.Tensor:
    """Lp norm of every block of ``x``: (S0, S1, ...) -> grid (S0/b0, S1/b1, ...), x's dtype.

    x may be any strided view (no copy is made). p > 0 or inf. A NaN element gives NaN, an infinite one
    inf; the sum of ``|x|^p`` is float32 (float64 for float64 x), so a finite block whose sum overflows
    (fp32 entries past ~1.8e19 at p = 2) has norm inf too, and ranks (ties) with the infinite ones.
    """
    p = check_block_norms(x, block_shape, p)
    return _impl("block_norms", "scope")(x, list(block_shape), p)


def check_scope_kth(x, block_shape, scope_shape, k, p, raw, k_weight, mid) -> tuple:
    """Returns (p, raw) as float, bool."""
    _, nb = _check_layout(x, block_shape, scope_shape)
    p = _check_p(p)
    raw = _check_raw(raw, block_shape)
    k = _int(k, "k")
    hi = nb - 1 if _flag(mid, "mid") else nb
    if not 1 <= k <= hi:
        raise ValueError(f"k: expected 1 <= k <= {hi} ({nb} blocks per scope{', mid needs k+1' if mid else ''}), got {k}")
    if isinstance(k_weight, bool) or not isinstance(k_weight, (int, float, torch.SymInt, torch.SymFloat)) or \
            not (0 <= k_weight < float("inf")):
        raise ValueError(f"k_weight: expected a finite number >= 0, got {k_weight!r}")
    return p, raw


def scope_kth(x: torch.Tensor, block_shape: Sequence[int], scope_shape: Sequence[int], k: int, *,
              p: float = 2.0, raw: bool = False, k_weight: float = 1.0, mid: bool = False) -> torch.Tensor:
    """k-th largest block norm of every scope (scope-grid shaped, x's dtype).

    ``mid``: ``(v_k + k_weight * v_{k+1}) / (1 + k_weight)``. NaN scores are skipped; a scope
    with fewer than k valid scores gives -inf. ``mid`` never gives NaN: ``k_weight = 0`` gives ``v_k``, an
    infinite ``v_k`` or ``v_{k+1}`` gives that infinity (``v_k`` first), an overflowing formula the same
    weights as two products (``gradkit.kernels.reference.scope.MID_RULE``).
    """
    p, raw = check_scope_kth(x, block_shape, scope_shape, k, p, raw, k_weight, mid)
    return _impl("scope_kth", "scope")(x, list(block_shape), list(scope_shape), k, p, raw, float(k_weight), bool(mid))


def _check_nnz(nnz, nb: int) -> int:
    nnz = _int(nnz, "nnz")
    if not 0 <= nnz <= nb:
        raise ValueError(f"nnz: expected 0 <= nnz <= {nb} (blocks per scope), got {nnz}")
    return nnz


def check_scope_mask(x, block_shape, scope_shape, nnz, p, raw, keep_ties, expand) -> tuple:
    """Returns (p, raw) as float, bool."""
    _, nb = _check_layout(x, block_shape, scope_shape)
    p = _check_p(p)
    raw = _check_raw(raw, block_shape)
    _check_nnz(nnz, nb)
    _flag(keep_ties, "keep_ties")
    _flag(expand, "expand")
    return p, raw


def scope_mask(x: torch.Tensor, block_shape: Sequence[int], scope_shape: Sequence[int], nnz: int, *,
               p: float = 2.0, raw: bool = False, keep_ties: bool = False, expand: bool = True) -> torch.Tensor:
    """Bool keep-mask of the ``nnz`` best blocks of every scope, in one pass over x.

    Exactly nnz per scope (equal scores: lowest in-scope index) unless ``keep_ties``
    (every block scoring >= the nnz-th largest). NaN scores are never kept.
    ``expand``: element-shaped (x.shape, contiguous); else grid-shaped.
    """
    p, raw = check_scope_mask(x, block_shape, scope_shape, nnz, p, raw, keep_ties, expand)
    return _impl("scope_mask", "scope")(x, list(block_shape), list(scope_shape), nnz, p, raw, bool(keep_ties),
                                        bool(expand))


def check_scope_hard_threshold_(x, values, block_shape, scope_shape, nnz, p, keep_ties) -> float:
    """Returns p as a float."""
    _, nb = _check_layout(x, block_shape, scope_shape)
    p = _check_p(p)
    nnz = _check_nnz(nnz, nb)
    _flag(keep_ties, "keep_ties")
    if values is not None:
        _check_companion(values, x, "values", x.shape)
        if values.dtype != x.dtype:
            raise TypeError(f"values: dtype {values.dtype} differs from x's {x.dtype}")
    _check_writable([x], "x")
    return p


def scope_hard_threshold_(x: torch.Tensor, block_shape: Sequence[int], scope_shape: Sequence[int], nnz: int, *,
                          values: Optional[torch.Tensor] = None, p: float = 2.0,
                          keep_ties: bool = False) -> torch.Tensor:
    """Zero, in place, every block of x outside the nnz best of its scope (scored on ``values``
    when given, else on x). Returns the grid-shaped bool keep-mask. Validation happens before
    x is touched."""
    p = check_scope_hard_threshold_(x, values, block_shape, scope_shape, nnz, p, keep_ties)
    fn = _impl("scope_hard_threshold_", "scope")
    keep = fn(x, values, list(block_shape), list(scope_shape), nnz, p, bool(keep_ties))
    _wrote([x], fn)
    return keep


def check_block_apply_mask_(x, block_shape, block_mask) -> None:
    grid, _ = _check_layout(x, block_shape)
    _check_companion(block_mask, x, "block_mask", grid, (torch.bool,))
    _check_writable([x], "x")


def block_apply_mask_(x: torch.Tensor, block_shape: Sequence[int], block_mask: torch.Tensor) -> None:
    """Set every element of the blocks where ``block_mask`` (grid-shaped bool) is False to exactly 0."""
    check_block_apply_mask_(x, block_shape, block_mask)
    fn = _impl("block_apply_mask_", "scope")
    fn(x, list(block_shape), block_mask)
    _wrote([x], fn)


def check_soft_scalars(max_iter, atol, eps) -> int:
    """block_soft_threshold_'s scalar arguments: ``max_iter`` an int >= 0, ``atol`` and ``eps`` (None: not
    given) finite and >= 0; returns max_iter. Also used by gradkit.scope's couplings, whose steps check
    before their first write."""
    max_iter = _int(max_iter, "max_iter")
    if max_iter < 0:
        raise ValueError(f"max_iter: expected >= 0, got {max_iter}")
    for name, v in (("atol", atol), ("eps", eps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, _REAL) or not (0 <= v < float("inf"))):
            raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    return max_iter


def check_block_soft_threshold_(x, block_shape, thresholds, conditioner, max_iter, atol, eps) -> int:
    """Returns max_iter as an int."""
    grid, _ = _check_layout(x, block_shape)
    _check_companion(thresholds, x, "thresholds", grid)
    if conditioner is not None:
        _check_companion(conditioner, x, "conditioner", x.shape)
    max_iter = check_soft_scalars(max_iter, atol, eps)
    _check_writable([x], "x")
    _check_read_no_grad([("thresholds", thresholds), ("conditioner", conditioner)], "x")
    return max_iter


def block_soft_threshold_(x: torch.Tensor, block_shape: Sequence[int], thresholds: torch.Tensor, *,
                          conditioner: Optional[torch.Tensor] = None, max_iter: int = 20, atol: float = 1e-8,
                          eps: Optional[float] = None) -> None:
    """Group-lasso proximal step on every block, in place (see the reference for the maths).

    thresholds: grid-shaped, >= 0. conditioner: x-shaped positive diagonal metric (Adam's
    denominator), solved per block by bisection. eps defaults to the dtype's machine epsilon.
    Every backend refuses NaN or negative thresholds and a conditioner that is not finite and > 0
    everywhere (ValueError naming the argument) before x is written (one reduction over each; for CUDA
    tensors one device-to-host copy, i.e. a host sync: see ``kernels.reference.scope.check_soft_values``).
    Non-finite weights (``kernels.reference.scope.SOFT_RULE``): a block whose norm is NaN becomes 0, a
    threshold of +inf zeroes its block whatever it holds (signed zeros, never ``inf * 0``), a finite one
    leaves a block with an infinite element unchanged.
    """
    if eps is None and isinstance(x, torch.Tensor) and x.dtype in _FLOATS:
        eps = float(torch.finfo(x.dtype).eps)
    max_iter = check_block_soft_threshold_(x, block_shape, thresholds, conditioner, max_iter, atol, eps)
    fn = _impl("block_soft_threshold_", "scope")
    fn(x, list(block_shape), thresholds, conditioner, max_iter, float(atol), float(eps))
    _wrote([x], fn)


# --------------------------------------------------------------------------- family 3: golden masks, bitmask algebra

GOLDEN_OPS = ("golden_topk_and_", "bitmask_binary", "bitmask_not", "bitmask_count")
BITMASK_OPS = {"and": 0, "or": 1, "xor": 2, "andnot": 3}


def _check_bits(bits, numel: int, what: str, device=None) -> None:
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8:
        raise TypeError(f"{what}: expected a uint8 packed bitmask, got {getattr(bits, 'dtype', type(bits).__name__)}")
    if bits.dim() != 1 or bits.numel() != (numel + 7) // 8 or not bits.is_contiguous():
        raise ValueError(f"{what}: expected a contiguous uint8 tensor of shape ({(numel + 7) // 8},) for "
                         f"{numel} elements, got shape {tuple(bits.shape)}")
    if device is not None and bits.device != device:
        raise ValueError(f"{what}: on {bits.device} but expected {device}")


def check_golden_topk_and_(g, bits, counts, k, first=False) -> int:
    """golden_topk_and_'s checks (the op wrapper's and the Triton launcher's); returns k."""
    _flag(first, "first")  # bool("False") would overwrite bits instead of ANDing into them
    _check_float_tensor(g, "g")
    if not g.is_contiguous():
        raise ValueError("g: expected a contiguous tensor")
    _check_bits(bits, g.numel(), "bits", g.device)
    if counts is not None:
        if not isinstance(counts, torch.Tensor) or counts.dtype != torch.int32 or counts.numel() != g.numel() \
                or not counts.is_contiguous() or counts.device != g.device:
            raise ValueError(f"counts: expected a contiguous int32 tensor of {g.numel()} elements on {g.device}")
    k = _int(k, "k")
    if not 0 <= k <= g.numel():
        raise ValueError(f"k: must be in [0, {g.numel()}], got {k}")
    # here, not only in the wrapper: the registered Triton CUDA kernel runs this check alone (session 40)
    _check_writable([bits], "bits")
    _check_writable([counts], "counts")
    return k


def golden_topk_and_(g: torch.Tensor, bits: torch.Tensor, k: int, *, counts: Optional[torch.Tensor] = None,
                     first: bool = False) -> torch.Tensor:
    """One golden update of one tensor, in place: the k largest |g| (ties: lowest flat position
    first; NaN never selected) packed into ``bits`` (``first``) or ANDed into it; ``counts``
    (int32, g's numel) gets +1 per selected entry. Returns the new popcount (int64, 0-dim)."""
    k = check_golden_topk_and_(g, bits, counts, k, first)
    fn = _impl("golden_topk_and_", "golden")
    n = fn(g, bits, counts, k, bool(first))
    _wrote([bits, counts], fn)
    return n


def _check_bit_lists(a, what: str) -> None:
    if not isinstance(a, (list, tuple)):
        raise TypeError(f"{what}: expected a list of uint8 tensors, got {type(a).__name__}")
    for i, t in enumerate(a):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1 or not t.is_contiguous():
            raise TypeError(f"{what}[{i}]: expected a contiguous 1-D uint8 tensor")
        if t.device != a[0].device:
            raise ValueError(f"{what}[{i}]: on {t.device} but {what}[0] is on {a[0].device}")


def check_bitmask_binary(a, b, code) -> None:
    """bitmask_binary's checks on the op's arguments (``code``: the value of BITMASK_OPS the op takes)."""
    if isinstance(code, bool) or code not in BITMASK_OPS.values():
        raise ValueError(f"op: expected one of the codes {sorted(BITMASK_OPS.values())}, got {code!r}")
    _check_bit_lists(a, "a")
    _check_bit_lists(b, "b")
    if len(a) != len(b):
        raise ValueError(f"b: expected {len(a)} masks (one per mask of a), got {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.device != y.device:
            raise ValueError(f"b[{i}]: shape {tuple(y.shape)} on {y.device} differs from a[{i}]'s "
                             f"{tuple(x.shape)} on {x.device}")


def bitmask_binary(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], op: str) -> List[torch.Tensor]:
    """Elementwise and / or / xor / andnot (a & ~b) of packed bitmasks, list by list (new tensors)."""
    if not isinstance(op, str) or op not in BITMASK_OPS:  # a list was "unhashable type", naming nothing
        raise ValueError(f"op: expected one of {sorted(BITMASK_OPS)}, got {op!r}")
    check_bitmask_binary(a, b, BITMASK_OPS[op])
    if not a:
        return []
    return _impl("bitmask_binary", "golden")(list(a), list(b), BITMASK_OPS[op])


def check_bitmask_not(a, numel) -> List[int]:
    """bitmask_not's checks (the op wrapper's and the Triton launcher's); returns numel as ints."""
    _check_bit_lists(a, "a")
    if not isinstance(numel, (list, tuple)) or len(numel) != len(a):
        raise ValueError(f"numel: expected a list of {len(a)} ints")
    numel = [_int(n, f"numel[{i}]") for i, n in enumerate(numel)]
    for i, (t, n) in enumerate(zip(a, numel)):
        if n < 0 or t.numel() != (n + 7) // 8:
            raise ValueError(f"a[{i}]: {t.numel()} bytes cannot hold numel[{i}]={n} bits")
    return numel


def bitmask_not(a: Sequence[torch.Tensor], numel: Sequence[int]) -> List[torch.Tensor]:
    """Complement of packed bitmasks over ``numel[i]`` elements each (padding bits stay 0)."""
    numel = check_bitmask_not(a, numel)
    if not a:
        return []
    return _impl("bitmask_not", "golden")(list(a), numel)


def check_bitmask_count(bits) -> None:
    """bitmask_count's checks (the op wrapper's and the Triton launcher's)."""
    _check_bit_lists(bits, "bits")


def bitmask_count(bits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Set bits of each packed bitmask (int64 tensor, one entry per mask)."""
    check_bitmask_count(bits)
    if not bits:
        return torch.zeros(0, dtype=torch.int64)
    return _impl("bitmask_count", "golden")(list(bits))


# --------------------------------------------------------------------------- family 4: fused masked AdamW

ADAMW_OPS = ("masked_adamw_",)


def check_masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, bits, masked_lr, unmasked_lr, beta1, beta2, eps,
                        weight_decay, bias_correction1, bias_correction2_sqrt, maximize=False,
                        max_exp_avg_sqs=None) -> int:
    """masked_adamw_'s checks (the op wrapper's and the Triton launcher's; csrc/adamw_checks.h for the C++
    kernels), before any tensor is touched; returns the number of parameters."""
    _flag(maximize, "maximize")  # bool("False") is True: a string would silently step uphill (session 40)
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "bits": bits,
             "bias_correction1": bias_correction1, "bias_correction2_sqrt": bias_correction2_sqrt}
    if max_exp_avg_sqs is not None:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    n = len(params) if isinstance(params, (list, tuple)) else -1
    for name, v in lists.items():
        if not isinstance(v, (list, tuple)) or len(v) != n:
            raise ValueError(f"{name}: expected a list of {max(n, 0)} entries (one per parameter)")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or p.dtype not in _FLOATS:
            raise TypeError(f"params[{i}]: expected a floating tensor")
        if not p.is_contiguous():
            raise ValueError(f"params[{i}]: expected a contiguous tensor")
        if p.device != params[0].device:
            raise ValueError(f"params[{i}]: on {p.device} but params[0] is on {params[0].device}")
        if p.dtype != params[0].dtype:
            raise TypeError(f"params[{i}]: dtype {p.dtype} differs from params[0]'s {params[0].dtype} "
                            f"(one call per dtype)")
        for name in ("grads", "exp_avgs", "exp_avg_sqs") + (("max_exp_avg_sqs",) if max_exp_avg_sqs is not None
                                                              else ()):
            t = lists[name][i]
            if not isinstance(t, torch.Tensor) or t.shape != p.shape or t.device != p.device \
                    or not t.is_contiguous():
                raise ValueError(f"{name}[{i}]: expected a contiguous tensor of shape {tuple(p.shape)} on {p.device}")
            if t.dtype != p.dtype:
                raise TypeError(f"{name}[{i}]: dtype {t.dtype} differs from params[{i}]'s {p.dtype}")
        if bits[i] is not None:
            _check_bits(bits[i], p.numel(), f"bits[{i}]", p.device)
    for name, v in (("masked_lr", masked_lr), ("unmasked_lr", unmasked_lr), ("eps", eps),
                    ("weight_decay", weight_decay)):
        if isinstance(v, bool) or not isinstance(v, _REAL) or not _isfinite(v) or v < 0:
            raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    for name, v in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(v, bool) or not isinstance(v, _REAL) or not 0.0 <= v < 1.0:
            raise ValueError(f"{name}: expected a number in [0, 1), got {v!r}")
    for name in ("bias_correction1", "bias_correction2_sqrt"):
        for i, v in enumerate(lists[name]):
            if isinstance(v, bool) or not isinstance(v, _REAL) or not 0.0 < v <= 1.0:
                raise ValueError(f"{name}[{i}]: expected a number in (0, 1], got {v!r}")
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):  # every written list, as the native op's
        if name in lists:
            _check_writable(list(lists[name]), name)
    _check_read_no_grad([(f"grads[{i}]", g) for i, g in enumerate(grads)], "params")
    return n


def _check_adamw_overlap(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs) -> None:
    """A tensor written twice (a parameter listed twice, one state tensor in two roles) or a gradient that is also
    written: refused on every backend, naming both (csrc/adamw_checks.h's rule; the reference would step twice)."""
    lists = {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if max_exp_avg_sqs is not None:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    _check_no_overlap([(f"{name}[{i}]", t, True) for name, ts in lists.items() for i, t in enumerate(ts)]
                      + [(f"grads[{i}]", t, False) for i, t in enumerate(grads)])


def masked_adamw_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                  exp_avg_sqs: Sequence[torch.Tensor], bits: Sequence[Optional[torch.Tensor]], *, masked_lr: float,
                  unmasked_lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                  bias_correction1: Sequence[float], bias_correction2_sqrt: Sequence[float],
                  maximize: bool = False, max_exp_avg_sqs: Optional[Sequence[torch.Tensor]] = None) -> None:
    """One fused AdamW step over every tensor (see the schema in csrc/ops.cpp): per-entry rate
    ``masked_lr`` where the entry's bit is set, ``unmasked_lr`` elsewhere; weight decay scaled by
    the same rate; entries with rate 0 keep their exact value. Everything is checked before any
    tensor is touched. Gradients are not inspected: a NaN / Inf one (or ``g * g`` past float32's
    range, |g| > ~1.8e19) enters that entry's state and parameter as in ``torch.optim.AdamW``.
    ``max_exp_avg_sqs`` (AMSGrad, as ``torch.optim.AdamW(amsgrad=True)``): each entry's denominator uses
    ``maximum(max_exp_avg_sq, new exp_avg_sq)``, which is stored back; None: plain AdamW."""
    n = check_masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, bits, masked_lr, unmasked_lr, beta1, beta2, eps,
                            weight_decay, bias_correction1, bias_correction2_sqrt, maximize=maximize,
                            max_exp_avg_sqs=max_exp_avg_sqs)
    if n == 0:
        return
    fn = _impl("masked_adamw_", "adamw")
    if not _native(fn):  # the native kernels check it themselves
        _check_adamw_overlap(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
    fn(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(bits), float(masked_lr),
       float(unmasked_lr), float(beta1), float(beta2), float(eps), float(weight_decay),
       [float(v) for v in bias_correction1], [float(v) for v in bias_correction2_sqrt], bool(maximize),
       None if max_exp_avg_sqs is None else list(max_exp_avg_sqs))
    _wrote(list(params) + list(exp_avgs) + list(exp_avg_sqs) + list(max_exp_avg_sqs or []), fn)


# --------------------------------------------------------------------------- torch.func support


def _pick(a, d, b: int):
    """Example ``b`` of argument ``a`` batched at ``d`` (vmap's in_dims: None, an int, or a list for a tensor list)."""
    if isinstance(a, (list, tuple)):
        if isinstance(d, (list, tuple)):
            return [_pick(x, dx, b) for x, dx in zip(a, d)]
        return list(a)
    return a if d is None or not isinstance(a, torch.Tensor) else a.select(d, b)


def _loop_vmap(op, name: str):
    """A vmap rule (``torch.library.register_vmap``'s, or an autograd.Function's ``vmap`` staticmethod) running
    ``op`` once per example and stacking the results along dim 0 (a tensor, or each tensor of a list / tuple).
    Outputs whose sizes differ between examples cannot be stacked: torch.stack's error, as torch's own fallback
    gives for them."""
    def rule(info, in_dims, *args):
        B = info.batch_size
        if B == 0:  # no example to run the op on: the result's shape is unknown
            raise ValueError(f"{name}: vmap over an empty batch (size 0) is not supported")
        outs = [op(*[_pick(a, d, b) for a, d in zip(args, in_dims)]) for b in range(B)]
        if isinstance(outs[0], torch.Tensor):
            return torch.stack(outs), 0
        seq = type(outs[0])  # a list (tensor-list returns) or a tuple (several returns)
        n = len(outs[0])
        return seq(torch.stack([o[i] for o in outs]) for i in range(n)), seq([0] * n)
    return rule


def loop_vmap_staticmethod(cls, name: str):
    """The ``vmap`` staticmethod of an autograd.Function whose first argument (or last, for score_topk) is the
    function that runs the op (the dispatcher op, a Triton launcher, a GPU composite, a reference): ``cls.apply``
    once per example, so every backend runs on plain tensors (a Triton launcher cannot read a batched tensor's
    storage, and a composite's data-dependent branches are refused under vmap) and gives the bits of a loop."""
    return staticmethod(_loop_vmap(cls.apply, name))


def register_loop_vmap(names) -> None:
    """torch.func.vmap for functional ``torch.ops.gradkit`` ops: each example runs the op once (:func:`_loop_vmap`),
    so a vmapped call gives the bits of a Python loop over the batch, at any in_dims. torch's own per-example
    fallback covers only ops without tensor lists (the others were "Batching rule not implemented ... We could not
    generate a fallback"), and warns of "a performance drop" at every call, asking for an issue on torch's
    tracker; the in-place ops have no rule and stay refused under vmap (nothing written)."""
    for name in names:
        if _ext.has_op(name):
            torch.library.register_vmap(f"gradkit::{name}", _loop_vmap(getattr(torch.ops.gradkit, name).default, name))


class _GatherFn(torch.autograd.Function):
    """gather_segments inside a torch.func transform (see :func:`transforms_active`) and on the Triton backend
    (:func:`_fn_autograd`), whatever ``fn`` runs it.
    ``index`` is one argument (a tuple), the sources are the trailing ones; the backward is scatter_segments,
    through :class:`_ScatterFn`, so gradients of gradients go through torch.func too; vmap: one call per example."""

    @staticmethod
    def forward(fn, index, dtype, *src):
        return fn(list(src), list(index), dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, index, dtype, *src = inputs
        ctx.index, ctx.out_dtype = tuple(index), dtype
        ctx.shapes = [(s.shape, s.dtype) for s in src]
        ctx.device = src[0].device

    @staticmethod
    def backward(ctx, grad):
        numel = [int(torch.Size(shape).numel()) for shape, _ in ctx.shapes]
        full = _ScatterFn.apply(_impl("scatter_segments"), ctx.index, numel, 1.0, grad.contiguous())
        return (None, None, None, *[g.reshape(shape).to(dt) for g, (shape, dt) in zip(full, ctx.shapes)])

    @staticmethod
    def jvp(ctx, _fn, _index, _dtype, *tangents):  # linear: the tangent gathered
        ts = [torch.zeros(s, dtype=dt, device=ctx.device) if t is None else t
              for t, (s, dt) in zip(tangents, ctx.shapes)]
        return _GatherFn.apply(_impl("gather_segments"), ctx.index, ctx.out_dtype, *ts)


class _ScatterFn(torch.autograd.Function):
    """scatter_segments inside a torch.func transform and on the Triton backend; the backward is gather_segments
    (:class:`_GatherFn`)."""

    @staticmethod
    def forward(fn, index, numel, scale, flat):
        return tuple(fn(flat, list(index), list(numel), scale))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, index, numel, scale, flat = inputs
        ctx.index, ctx.numel, ctx.scale, ctx.dtype = tuple(index), list(numel), scale, flat.dtype

    @staticmethod
    def backward(ctx, *grads):
        g = _GatherFn.apply(_impl("gather_segments"), ctx.index, ctx.dtype, *[g.contiguous() for g in grads])
        return None, None, None, None, g * ctx.scale

    @staticmethod
    def jvp(ctx, _fn, _index, _numel, _scale, tangent):  # linear: the tangent scattered
        return _ScatterFn.apply(_impl("scatter_segments"), ctx.index, ctx.numel, ctx.scale, tangent)


_GatherFn.vmap = loop_vmap_staticmethod(_GatherFn, "gather_segments")
_ScatterFn.vmap = loop_vmap_staticmethod(_ScatterFn, "scatter_segments")


# --------------------------------------------------------------------------- fake impls + autograd

def _fake_check(check, *args, **kwargs):
    """A fake (meta) impl's argument checks: ``check`` (the op's ``check_*``, which the op wrappers and the Triton
    launchers run) with grad mode off, so only shapes, dtypes, devices and scalars are judged: the autograd-side
    refusals (a written tensor that requires grad) are the ADInplaceOrView kernels' (below), which run before any
    fake impl. Without it a direct ``torch.ops.gradkit`` call under FakeTensorMode / torch.compile returned an
    output of some shape for arguments the real op refuses (or failed later on a shape mismatch, a negative size
    or a ZeroDivisionError): the same TypeError / ValueError, naming the argument, is raised while tracing."""
    with torch.no_grad():
        return check(*args, **kwargs)


def _check_topk_k(k, n: int, exact: bool) -> None:
    """topk_select(_segments)'s k against the n scores (the C++ op's rule, "k: must be in [0, active]"); ``exact``:
    every score is active (otherwise the active count is data: only the bound by n is checked)."""
    if k < 0:
        raise ValueError(f"k: must be non-negative, got {k}")
    if k > n:
        raise ValueError(f"k: must be in [0, {n}] ({'active' if exact else 'the'} scores), got {k}")


if _ext.LOADED:

    @torch.library.register_fake("gradkit::gather_segments")
    def _gather_fake(src, index, dtype):
        _fake_check(check_gather_segments, src, index, dtype)
        if dtype is None:
            dtype = src[0].dtype if src else torch.float32
            for s in src[1:]:
                dtype = torch.promote_types(dtype, s.dtype)
        total = sum(s.numel() if ix is None else ix.numel() for s, ix in zip(src, index))
        dev = src[0].device if src else torch.device("cpu")
        return torch.empty(total, dtype=dtype, device=dev)

    @torch.library.register_fake("gradkit::gather_segments_out")
    def _gather_out_fake(src, index, out, accumulate):
        _fake_check(check_gather_segments_out, src, index, out, accumulate)
        return None

    @torch.library.register_fake("gradkit::scatter_segments")
    def _scatter_fake(flat, index, numel, scale):
        # the op takes any scale (the wrapper refuses a non-finite one): the fake keeps the op's rule
        _fake_check(check_scatter_segments, flat, index, numel, 1.0)
        return [flat.new_empty(n) for n in numel]

    @torch.library.register_fake("gradkit::scatter_segments_")
    def _scatter_inplace_fake(flat, index, dst, scale, accumulate):
        _fake_check(check_scatter_segments_, flat, index, dst, 1.0, accumulate)  # any scale, as the op
        return None

    @torch.library.register_fake("gradkit::mask_to_indices")
    def _mask_to_indices_fake(mask, dtype):
        _fake_check(check_mask_to_indices, mask, dtype)
        n = torch.library.get_ctx().new_dynamic_size()
        return mask.new_empty(n, dtype=dtype)

    @torch.library.register_fake("gradkit::bitmask_to_indices")
    def _bitmask_to_indices_fake(bits, numel, dtype):
        _fake_check(check_bitmask_to_indices, bits, numel, dtype)
        n = torch.library.get_ctx().new_dynamic_size()
        return bits.new_empty(n, dtype=dtype)

    @torch.library.register_fake("gradkit::pack_bitmask")
    def _pack_bitmask_fake(mask):
        _fake_check(check_pack_bitmask, mask)
        return mask.new_empty((mask.numel() + 7) // 8, dtype=torch.uint8)

    @torch.library.register_fake("gradkit::topk_select")
    def _topk_select_fake(scores, active, k):
        # the op's own rule (csrc/checks.h check_topk), not the wrapper's stricter one: any shape (flattened),
        # active of scores' numel
        _check_float_tensor(scores, "scores")
        if active is not None:
            if active.dtype != torch.bool:
                raise TypeError(f"active: expected a bool tensor, got {active.dtype}")
            if active.numel() != scores.numel():
                raise ValueError(f"active: expected {scores.numel()} elements, got {active.numel()}")
            if active.device != scores.device:
                raise ValueError(f"active: on {active.device} but scores is on {scores.device}")
        _check_topk_k(_int(k, "k"), scores.numel(), active is None)
        return scores.new_empty(k, dtype=torch.int64)

    @torch.library.register_fake("gradkit::topk_select_segments")
    def _topk_select_segments_fake(scores, active, k):
        if not scores:  # the real op has no tensor to dispatch on (NotImplementedError); the wrapper takes it
            raise ValueError("scores: expected at least one tensor (gradkit.ops.topk_select_segments takes none)")
        active = _fake_check(check_topk_select_segments, scores, active, k)
        _check_topk_k(k, sum(s.numel() for s in scores), all(a is None for a in active))
        return scores[0].new_empty(k, dtype=torch.int64)

    def _grid(x, block_shape):
        return [n // b for n, b in zip(x.shape, block_shape)]

    @torch.library.register_fake("gradkit::block_norms")
    def _block_norms_fake(x, block_shape, p):
        _fake_check(check_block_norms, x, block_shape, p)
        return x.new_empty(_grid(x, block_shape))

    @torch.library.register_fake("gradkit::scope_kth")
    def _scope_kth_fake(x, block_shape, scope_shape, k, p, raw, k_weight, mid):
        _fake_check(check_scope_kth, x, block_shape, scope_shape, k, p, raw, k_weight, mid)
        return x.new_empty([g // s for g, s in zip(_grid(x, block_shape), scope_shape)])

    @torch.library.register_fake("gradkit::scope_mask")
    def _scope_mask_fake(x, block_shape, scope_shape, nnz, p, raw, keep_ties, expand):
        _fake_check(check_scope_mask, x, block_shape, scope_shape, nnz, p, raw, keep_ties, expand)
        return x.new_empty(list(x.shape) if expand else _grid(x, block_shape), dtype=torch.bool)

    @torch.library.register_fake("gradkit::scope_hard_threshold_")
    def _scope_hard_threshold_fake(x, values, block_shape, scope_shape, nnz, p, keep_ties):
        _fake_check(check_scope_hard_threshold_, x, values, block_shape, scope_shape, nnz, p, keep_ties)
        return x.new_empty(_grid(x, block_shape), dtype=torch.bool)

    @torch.library.register_fake("gradkit::block_apply_mask_")
    def _block_apply_mask_fake(x, block_shape, block_mask):
        _fake_check(check_block_apply_mask_, x, block_shape, block_mask)
        return None

    @torch.library.register_fake("gradkit::block_soft_threshold_")
    def _block_soft_threshold_fake(x, block_shape, thresholds, conditioner, max_iter, atol, eps):
        # atol / eps as the op takes them (>= 0; the wrapper also wants them finite)
        _fake_check(check_block_soft_threshold_, x, block_shape, thresholds, conditioner, max_iter, None, None)
        if not (atol >= 0 and eps >= 0):
            raise ValueError(f"atol and eps must be >= 0, got {atol!r}, {eps!r}")
        return None

    # gather and scatter are linear maps and each other's adjoint.
    def _no_index_grad(index):
        # torch.library matches the backward's return to the inputs' structure: an index list of tensors
        # only is a list there (one None per entry), a list holding a None is a single leaf
        return [None] * len(index) if all(isinstance(ix, torch.Tensor) for ix in index) else None

    def _gather_setup(ctx, inputs, output):
        src, index, _ = inputs
        ctx.index = list(index)
        ctx.shapes = [(s.shape, s.dtype) for s in src]

    def _gather_backward(ctx, grad):
        numel = [int(torch.Size(shape).numel()) for shape, _ in ctx.shapes]
        full = torch.ops.gradkit.scatter_segments(grad.contiguous(), ctx.index, numel, 1.0)
        grads = [g.reshape(shape).to(dt) for g, (shape, dt) in zip(full, ctx.shapes)]
        return grads, _no_index_grad(ctx.index), None

    torch.library.register_autograd("gradkit::gather_segments", _gather_backward, setup_context=_gather_setup)

    def _scatter_setup(ctx, inputs, output):
        flat, index, numel, scale = inputs
        ctx.index, ctx.scale, ctx.dtype = list(index), scale, flat.dtype

    def _scatter_backward(ctx, grads):
        grads = [g.contiguous() for g in grads]
        g = torch.ops.gradkit.gather_segments(grads, ctx.index, ctx.dtype)
        return g * ctx.scale, _no_index_grad(ctx.index), None, None

    torch.library.register_autograd("gradkit::scatter_segments", _scatter_backward, setup_context=_scatter_setup)

    # torch.func.vmap: one op call per example (the in-place ops: none, refused)
    register_loop_vmap(("gather_segments", "scatter_segments", "mask_to_indices", "bitmask_to_indices",
                        "pack_bitmask", "topk_select", "topk_select_segments", "block_norms", "scope_kth",
                        "scope_mask", "bitmask_binary", "bitmask_not", "bitmask_count"))

    @torch.library.register_fake("gradkit::golden_topk_and_")
    def _golden_topk_and_fake(g, bits, counts, k, first):
        _fake_check(check_golden_topk_and_, g, bits, counts, k, first)
        return g.new_empty((), dtype=torch.int64)

    @torch.library.register_fake("gradkit::bitmask_binary")
    def _bitmask_binary_fake(a, b, op):
        _fake_check(check_bitmask_binary, a, b, op)
        return [torch.empty_like(t) for t in a]

    @torch.library.register_fake("gradkit::bitmask_not")
    def _bitmask_not_fake(a, numel):
        _fake_check(check_bitmask_not, a, numel)
        return [torch.empty_like(t) for t in a]

    @torch.library.register_fake("gradkit::bitmask_count")
    def _bitmask_count_fake(bits):
        if not bits:  # the real op has no tensor to dispatch on (NotImplementedError); the wrapper takes it
            raise ValueError("bits: expected at least one tensor (gradkit.ops.bitmask_count takes none)")
        _fake_check(check_bitmask_count, bits)
        return bits[0].new_empty((len(bits),), dtype=torch.int64)

    @torch.library.register_fake("gradkit::masked_adamw_")
    def _masked_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, bits, masked_lr, unmasked_lr, beta1, beta2, eps,
                           weight_decay, bias_correction1, bias_correction2_sqrt, maximize, max_exp_avg_sqs=None):
        _fake_check(check_masked_adamw_, params, grads, exp_avgs, exp_avg_sqs, bits, masked_lr, unmasked_lr, beta1,
                    beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt, maximize=maximize,
                    max_exp_avg_sqs=max_exp_avg_sqs)
        return None

    # Triton is the GPU kernel where the extension was built without CUDA C++.
    _ext.register_triton_for_cuda("parammap", PARAMMAP_OPS)
    _ext.register_triton_for_cuda("scope", SCOPE_OPS)
    _ext.register_triton_for_cuda("golden", GOLDEN_OPS)
    _ext.register_triton_for_cuda("adamw", ADAMW_OPS)


# Families with their own module (DESIGN: one module per family once ops grows too long).
from gradkit.ops.obs import *  # noqa: E402,F401,F403
from gradkit.ops.projection import *  # noqa: E402,F401,F403
from gradkit.ops.search import *  # noqa: E402,F401,F403

register_loop_vmap(("obs_select", "obs_shared_prune"))  # torch.func.vmap: one op call per example (as above)


# ADInplaceOrView kernels for the in-place ops: bump the version counters of the arguments the schema marks
# written (Tensor(a!)), as torch's own in-place ops do, also for direct torch.ops.gradkit.* calls that bypass
# the wrappers above (whose _wrote does the same for the Triton / reference paths that skip the dispatcher).
# The kernels' writes through data pointers are invisible to autograd otherwise. This is how
# torch.library.custom_op treats mutable ops; torch.compile traces through it. A written argument that requires
# grad while grad mode is on is refused here before the op runs, as the wrappers refuse it.
_INPLACE_LIB = None
# The in-place ops' arguments whose values flow into what they write (their derivative would be nonzero): refused
# while they require grad and grad mode is on (_check_read_no_grad). Bits, masks, counts and the ``values`` that
# only choose which entries to keep carry no gradient and are not listed. Each entry: (sources, what the error
# says is written, the differentiable call it suggests), the wrappers' own wording, so a direct call's refusal reads
# the same.
_VALUE_SOURCES = {"gather_segments_out": (("src",), "out", "gather_segments without `out`"),
                  "scatter_segments_": (("flat",), "dst", "scatter_segments"),
                  "block_soft_threshold_": (("thresholds", "conditioner"), "x", ""),
                  "masked_adamw_": (("grads",), "params", ""),
                  "obs_schur_extend_": (("xf", "up", "linv"), "ut", ""),
                  "obs_sweep_": (("u",), "w and err", "")}


def _register_version_bumps() -> None:
    global _INPLACE_LIB
    if not _ext.LOADED or _INPLACE_LIB is not None:
        return
    lib = torch.library.Library("gradkit", "IMPL")
    for name in ("gather_segments_out", "scatter_segments_", "scope_hard_threshold_", "block_apply_mask_",
                 "block_soft_threshold_", "golden_topk_and_", "masked_adamw_", "obs_schur_extend_",
                 "obs_sweep_", "projection_matrix_"):
        if not _ext.has_op(name):
            continue
        op = getattr(torch.ops.gradkit, name).default
        written = [i for i, a in enumerate(op._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
        argnames = [a.name for a in op._schema.arguments]
        sources, into, instead = _VALUE_SOURCES.get(name, ((), "", ""))
        read = [(argnames.index(r), r) for r in sources]

        def kernel(*args, _op=op, _written=tuple(written), _read=tuple(read), _into=into, _instead=instead):
            for i, rname in _read:  # the wrappers' read-side refusal, for direct calls too
                a = args[i] if i < len(args) else None
                _check_read_no_grad([(f"{rname}[{j}]", t) for j, t in enumerate(a)] if isinstance(a, (list, tuple))
                                    else [(rname, a)], _into, _instead)
            ts = []
            for i in _written:
                a = args[i] if i < len(args) else None
                if a is None:  # an optional written list left out (masked_adamw_'s max_exp_avg_sqs)
                    continue
                if isinstance(a, torch.Tensor):
                    ts.append(a)
                elif isinstance(a, (list, tuple)):
                    ts.extend(t for t in a if isinstance(t, torch.Tensor))
                # the wrappers' refusal, for direct calls too: before anything is written
                _check_writable(list(a) if isinstance(a, (list, tuple)) else [a], _op._schema.arguments[i].name)
            with torch._C._AutoDispatchBelowADInplaceOrView():
                out = _op(*args)
            if ts:
                torch.autograd.graph.increment_version(ts)
            return out

        lib.impl(name, kernel, "ADInplaceOrView")
    _INPLACE_LIB = lib


_register_version_bumps()
