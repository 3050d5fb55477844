"""Projected per-example gradients of a model's Linear (and Hugging Face ``Conv1D``) layers.

:class:`GradientCollector` hooks the chosen modules and, from ONE backward pass over a batch,
returns for every example ``b`` and module the ``p x p`` factored random projection

    L G_b R^T,    G_b = sum_t g_bt a_bt^T   (O x I)

of that example's weight gradient, where ``a_bt`` is the module input at position ``t`` and
``g_bt`` the gradient of the loss with respect to the module output there
(:func:`gradkit.projection.factored_project` does the work; ``G_b`` is never formed). It is
re-exported as ``gradkit.projection.GradientCollector``.

Usage::

    from gradkit.projection import GradientCollector
    from gradkit.index import GradientIndex

    with GradientCollector(model, modules=["transformer.h.*"], p=16) as col:
        with GradientIndex.create(path, col.module_dims, projection=col.projection_config) as index:
            for batch in batches:
                col.set_mask(batch["attention_mask"])          # optional padding mask
                losses = per_example_loss(model(**batch), batch)  # (B,)
                col.backward(losses.sum())   # or losses.sum().backward()
                index.append(col.collect())  # {name: (B, p*p)}

or, equivalently, ``for grads in col.per_example_grads(batches, loss_fn): ...``.

Per-example correctness. The projected gradients are per-example gradients only when the
batch loss is a SUM of per-example losses and examples do not interact in the forward pass
(no BatchNorm, no in-batch negatives). With a loss averaged over the batch every row comes out
scaled by ``1/B``: use ``reduction="sum"`` over examples, or pass ``collect(scale="batch")`` (each
batch's rows times its own B; a fixed ``scale=B`` is wrong for a shorter last batch) to undo it.
Averaging over the tokens *of one example* is part of that example's loss and needs nothing.
Padding: set a ``(B, T)`` mask (``set_mask`` / :meth:`batch` / the ``attention_mask`` of a batch
dict in :meth:`per_example_grads`) before the forward pass; positions where it is 0 contribute
nothing (per-token rows there are 0). A module whose input is 2-D has the batch on its first axis, ``(B, I)``
(a pooled input: nothing in it is padding), or the batch's tokens flattened into it, ``(B * T, I)`` (OPT's ``fc1`` /
``fc2`` and Qwen2-MoE's ``shared_expert`` get ``hidden.reshape(-1, H)``; session 35, before refused): when the
batch's (B, T) is known, from the mask or from another hooked module's ``(B, T, I)`` input in the same batch (also
one that runs later in the forward), B * T rows are taken as the row-major flattening of ``(B, T, I)`` and collected
exactly as that input would be (per-token rows, the mask applied to them). Rows that are neither B nor B * T (tokens
routed to an expert) are refused by name; so are B * T rows for the model's ``(B, T)`` token ids (``input_ids=`` or
an integer first argument) when nothing else tells (B, T): set the mask (``torch.ones(B, T)`` without padding). A
sequence-first ``(T * B, I)`` flattening cannot be told from a batch-first one: use batch-first inputs.

What is collected. Each hooked module's own calls: for a weight also used elsewhere (an ``lm_head`` tied to
the embedding) only the Linear's share of that weight's gradient. A frozen module (``requires_grad=False``)
whose input requires grad still gives its true gradient; one whose output cannot require grad (nothing
upstream does) is refused by its forward pass rather than given zero rows. In-place ops on a hooked output
(``nn.ReLU(inplace=True)``) are fine. Each forward may be backpropagated once while its batch is pending: a
second backward through it (``retain_graph=True``, several losses) raises; backpropagate the losses' sum, or
``collect()`` first. Several forwards before one backward and ``collect()`` (gradient accumulation) give each
position the SUM of its rows over those forwards: right when row b of each forward is the same example (two
augmented views of it), but micro-batches of different examples mix example b of each; collect() after each
micro-batch's backward instead (a shorter micro-batch is refused by its shape). Gradient checkpointing: with
``use_reentrant=False`` either backward works; with ``use_reentrant=True``, and for layers a custom ``autograd.Function`` runs again in its backward (Reformer's reversible layers; session 40), use ``loss.backward()`` (:meth:`backward` refuses: ``torch.autograd.grad`` would skip the
recomputation), and the recomputed forward uses the mask the first forward ran under.

Refused rather than collected wrong (session 33): a hooked module whose output is not one tensor, or whose input /
output widths are not its weight's (I, O) (grouped or extended Linear subclasses); modules of one batch whose inputs
disagree on the batch size (a sequence-first ``(T, B, I)`` input, which would be taken as T examples), or whose
batch is not the batch of the model's own input (``input_ids`` / ``inputs_embeds`` / ``pixel_values`` /
``input_values`` / ``input_features``, else its first positional tensor: a multiple-choice model's B * choices rows,
window attention's B * windows; session 39; a model called by other keywords only, e.g. PatchTST's ``past_values=``, is checked against the first axes of its tensor keywords, session 40); in :meth:`per_example_grads`, an encoder-decoder's
``attention_mask`` (the encoder's, which would mark the decoder's positions: two collectors, one with the encoder's modules and the decoder's cross-attention
key / value projections under the encoder's mask, one with the other decoder modules under the decoder's, collect
such a model). Mixture-of-experts expert layers (Linears under an ``experts`` module) see the tokens routed to
them, not examples: the default selection leaves them out, and naming them is refused (session 34; before, an
expert that received exactly B tokens was taken as B examples). Hooked modules inside blocks compiled in place (``module.compile()``) and run before
the collector attached run code traced without its hooks: :meth:`collect` names them instead of returning zeros.
Session 39: a hooked module whose forward did not run while the model's output depends on its weight (the model
applies the weight itself: WavLM's ``F.multi_head_attention_forward``, MobileBERT's prediction head, Mamba's
``dt_proj``) is refused after the model's forward (its rows would have been zeros); an ``nn.Linear`` subclass with its
own forward is probed once (one example through it again): unless its weight gradient is ``g^T x`` for the input its
forward is given (muP's ``MuReadout`` scales that input, BitNet's layers quantise it) it is refused.

Sequence-first layers (session 39). The Linears of torch's ``nn.Transformer`` / ``nn.TransformerEncoderLayer`` /
``nn.TransformerDecoderLayer`` built with ``batch_first=False`` (torch's default), and of transformers' XLNet, FSMT
and Longformer / LED self-attention (``_HF_SEQUENCE_FIRST``), run on ``(T, B, ..., I)`` inputs: the collector reads
their batch on the second axis, so their rows are per example whatever T and B are (before, their T positions were
taken as T examples, silently when T == B). Shapes alone cannot tell such an input from a batch-first one: a
hand-written sequence-first block is caught only when its T differs from the batch another module or the model's
input shows.
The collector's hook runs before forward hooks registered earlier, so a hook that replaces the output (``out * s``)
does not change the weight gradient collected. A mask is copied by :meth:`set_mask`. When the model's forward raises
(an out-of-memory error caught to retry with a smaller batch), or :meth:`backward` does, the batch is dropped (not
by a forward run under ``torch.no_grad()``, which collects nothing).

Memory. The forward hook keeps a reference to each hooked module's input (the same storage
autograd already saves for the weight gradient, so no copy) only until that module's output
gradient arrives; it is projected and released there and then. :meth:`backward` asks autograd
for the gradients of the hooked module OUTPUTS only, so no ``.grad`` is accumulated and weight
gradients are not computed at all; a plain ``loss.backward()`` works too (it also fills ``.grad``).
A forward pass run with grad enabled while attached but never backpropagated keeps its graph
(and the hooked inputs) alive until :meth:`collect`, :meth:`reset` or leaving the ``with`` block:
run evaluation under ``torch.no_grad()`` (the hooks ignore it) or outside the collector.

Threads. A collector holds one batch at a time, not one per thread: forwards run with grad on other threads while a
batch is pending join that batch (as gradient accumulation would), so give each thread its own collector on its own
copy of the model (the same seed gives the same projection; collectors on separate copies run concurrently with the
bits they give alone). Forwards under ``torch.no_grad()`` / ``inference_mode`` on any thread are ignored (session 43:
before, one of another batch size refused itself and dropped the pending batch).
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import math
import numbers
import sys
import warnings
from collections import OrderedDict
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from gradkit._rules import dense, not_meta
from gradkit._unwrap import unwrap_model

__all__ = ["GradientCollector", "COLLECTOR_VERSION"]

COLLECTOR_VERSION = 1
"""Bumped whenever the meaning of the collected vectors changes (layout, scaling, seeding)."""

ModuleSelector = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]


def _projection():
    # Imported lazily: gradkit.projection re-exports GradientCollector from this module.
    from gradkit import projection

    return projection


def _module_kind(module: nn.Module) -> Optional[str]:
    """``"linear"`` for nn.Linear, ``"conv1d"`` for transformers' GPT-2 ``Conv1D``, else None.

    Conv1D is recognised by class (looked up only when transformers is already imported, so
    gradkit never imports it), falling back to its qualified name.
    """
    if isinstance(module, nn.Linear):
        return "linear"
    pu = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pu, "Conv1D", None) if pu is not None else None
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    cls = type(module)
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers."):
        return "conv1d"
    return None


def _unhookable(model: nn.Module) -> Dict[str, str]:
    """Names of Linear modules whose forward never runs, -> why: ``nn.MultiheadAttention`` passes its
    ``out_proj.weight`` / ``.bias`` to the functional attention and never calls ``out_proj``, so no hook
    sees its input or output (its per-example gradient would come back as zeros)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) and isinstance(getattr(m, "out_proj", None), nn.Linear):
            out[f"{n}.out_proj" if n else "out_proj"] = ("never run their forward (nn.MultiheadAttention uses its "
                                                         "weight without calling it), so no hook can see their "
                                                         "gradients")
        elif _module_kind(m) is not None and "experts" in n.split(".")[:-1]:
            # a mixture-of-experts expert (Switch / Mixtral-style `...experts.<i>.<linear>`) runs on the tokens routed
            # to it, an (N_e, I) input whose rows belong to examples it cannot tell: with N_e != B the batch-size
            # check refuses it, but with N_e == B its token rows would be taken as the examples' rows
            out[n] = ("are mixture-of-experts expert layers: they run on the tokens routed to them, whose examples "
                      "they cannot tell, so no per-example gradient can be formed")
    return out


# transformers modules whose hooked Linears run on (T, B, features) inputs (they transpose batch-first inputs
# internally): (python module, class name), matched along the MRO
_HF_SEQUENCE_FIRST = {
    ("transformers.models.xlnet.modeling_xlnet", "XLNetModel"),
    ("transformers.models.fsmt.modeling_fsmt", "EncoderLayer"),
    ("transformers.models.fsmt.modeling_fsmt", "DecoderLayer"),
    ("transformers.models.longformer.modeling_longformer", "LongformerSelfAttention"),
    ("transformers.models.led.modeling_led", "LEDEncoderSelfAttention"),
}


# The keyword inputs whose first axis is the model's batch, first found first (transformers' names); else the
# forward's first positional tensor.
_MODEL_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")


def _sequence_first(model: nn.Module) -> Dict[str, str]:
    """Names of Linear / Conv1D modules that run on sequence-first ``(T, B, ..., features)`` inputs, -> the module
    that makes them so: the layers of torch's ``nn.Transformer`` / ``nn.TransformerEncoderLayer`` /
    ``nn.TransformerDecoderLayer`` built with ``batch_first=False`` (torch's default), and the transformers modules of
    ``_HF_SEQUENCE_FIRST`` (XLNet, FSMT, Longformer's and LED's self-attention). Their input's SECOND axis is the
    batch: the collector reads it there. By shape alone that cannot be told from a batch-first input (a batch as
    large as the sequence is long looks the same), so it is known by the module that runs them."""
    layers = (nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    out: Dict[str, str] = {}
    for n, m in model.named_modules():
        why = None
        if isinstance(m, layers):
            bf = getattr(m, "batch_first", None)
            if bf is None:  # the layers keep it on their attention
                bf = getattr(getattr(m, "self_attn", None), "batch_first", None)
            if bf is False:
                why = f"{n or '<model>'} ({type(m).__name__}, batch_first=False)"
        elif any((c.__module__, c.__name__) in _HF_SEQUENCE_FIRST for c in type(m).__mro__):
            why = f"{n or '<model>'} ({type(m).__name__})"
        if why is not None:
            for c, sub in m.named_modules():
                if c and _module_kind(sub) is not None:
                    out.setdefault(f"{n}.{c}" if n else c, why)
    return out


def _refuse_unhookable(selected, unhookable: Dict[str, str]) -> None:
    bad = [n for n, _, _ in selected if n in unhookable]
    if bad:
        raise ValueError(f"modules: {bad} {unhookable[bad[0]]}; leave them out")


def _readable_tensor(t: Tensor, what: str, meta_ok: bool = False) -> None:
    """A dense tensor holding values (a meta one only where ``meta_ok``), else an error naming ``what`` (session 42:
    torch's NotImplementedError / RuntimeError from inside the check that read it)."""
    dense(t, what)
    if not meta_ok:
        not_meta(t, what)


def _check_scale(scale) -> None:
    if scale is None or scale == "batch":
        return
    try:  # an int past float's range: OverflowError in isfinite
        finite = not isinstance(scale, bool) and isinstance(scale, numbers.Real) and math.isfinite(scale)
    except OverflowError:
        finite = False
    if not finite:
        raise ValueError(f"scale: expected a finite number, 'batch' or None, got {scale!r}")


def _in_reentrant_checkpoint() -> Optional[str]:
    """Inside the forward of a custom ``torch.autograd.Function`` (which runs with grad disabled): ``"checkpoint"``
    for ``torch.utils.checkpoint(..., use_reentrant=True)``, else the Function's class name (Reformer's reversible
    ``_ReversibleFunction``); None outside any. Such a Function's backward runs the hooked modules again (with grad)
    -- only inside that backward's own pass, which a ``torch.autograd.grad`` restricted to the hooked outputs never
    runs (session 40: Reformer's layers came back as zero rows from :meth:`GradientCollector.backward`)."""
    try:
        from torch.utils.checkpoint import CheckpointFunction

        code = CheckpointFunction.forward.__code__
    except Exception:  # pragma: no cover - torch without it
        code = None
    backward_cls = getattr(torch.autograd.function, "BackwardCFunction", None)
    f = sys._getframe(1)
    while f is not None:
        c = f.f_code
        if c is code:
            return "checkpoint"
        if backward_cls is not None and c.co_name == "forward" and c.co_argcount and c.co_varnames[0] == "ctx":
            ctx = f.f_locals.get("ctx")
            if isinstance(ctx, backward_cls):
                return getattr(getattr(ctx, "_forward_cls", None), "__name__", None) or type(ctx).__name__
        f = f.f_back
    return None


def _in_checkpoint_recomputation() -> bool:
    """True while non-reentrant ``torch.utils.checkpoint`` recomputes a forward inside the backward pass, only
    to refill the tensors its graph saved: those recomputed outputs never receive a gradient."""
    try:
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except Exception:  # pragma: no cover - private API moved
        return False
    pack = top[0] if top else None
    return getattr(pack, "__qualname__", "").startswith("_recomputation_hook.")


def _shape(module: nn.Module, kind: str) -> Tuple[int, int]:
    """(O, I) of the gradient in nn.Linear layout (Conv1D stores its weight as (I, O))."""
    w = module.weight
    if w.dim() != 2:
        raise TypeError(f"modules: {type(module).__name__} has a {w.dim()}-D weight, expected 2-D")
    if kind == "linear":
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])


class _Call:
    """State of one forward call of a hooked module, waiting for its output gradient."""

    __slots__ = ("a", "gen", "mask", "mask_all", "version", "shape", "bt", "pending", "seq_first")

    def __init__(self, a: Tensor, mask: Optional[Tensor], mask_all: bool, gen: int,
                 shape: Tuple[int, ...] = (), bt: Optional[Tuple[int, int]] = None, pending: bool = False,
                 seq_first: bool = False) -> None:
        self.a: Optional[Tensor] = a
        # a sequence-first module's call: ``a`` is its (T, B, ..., I) input with the first two axes swapped, and its
        # output gradient (shape ``shape``, (T, B, ..., O)) is swapped the same way when it arrives
        self.seq_first = seq_first
        self.shape = shape  # the module output's shape (the gradient may arrive in its un-viewed base's shape)
        # (B, T) whose row-major flattening a 2-D (B * T, I) input is: its rows (and its output gradient's) are
        # viewed as (B, T, .); None: the first axis is the batch
        self.bt = bt
        # a 2-D input seen before anything told the batch's (B, T): its rows are examples unless a later module
        # (or mask) of the batch shows they are B * T tokens
        self.pending = pending
        self.mask = mask
        self.mask_all = mask_all
        self.gen = gen
        # a.detach() shares the input's version counter: an in-place change after the forward shows here
        # (autograd's own check sits in the module's weight-gradient node, which backward() skips)
        self.version = a._version


def _inert_hook(*args, **kwargs) -> None:
    """What a collector's module hook becomes in a copy of the module (see :class:`_Hook`): nothing."""
    return None


def _inert() -> Callable:
    return _inert_hook


class _Hook:
    """A GradientCollector's hook on a module: calls ``fn``. A copy of the module (``copy.deepcopy``: an EMA teacher,
    ``torch.optim.swa_utils.AveragedModel``; ``pickle``: ``torch.save(model)``, a spawned worker) gets
    :func:`_inert_hook` in its place: the collector collects the model it was built on, not copies of it (session 41:
    the copy raised "cannot pickle '_thread.lock' object", since copying the hook copied the whole collector)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __reduce__(self):
        return _inert, ()

    def __deepcopy__(self, memo) -> Callable:
        return _inert_hook


class GradientCollector:
    """Hooks Linear / Conv1D modules and returns projected per-example gradients per batch.

    Args:
        model: the ``nn.Module`` to hook (left unchanged apart from the hooks while attached). A
            ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrapper is looked through:
            module names (hence seeds, index columns and ``modules`` patterns) are the wrapped model's,
            so rows collected under DDP match those of the bare model in one process.
        modules: which modules to hook. ``None``: every ``nn.Linear`` and Hugging Face
            ``transformers.pytorch_utils.Conv1D``. A string or a list of :mod:`fnmatch` name
            patterns (``"transformer.h.*.mlp.*"``, ``"lm_head"``): the Linear/Conv1D modules whose
            names match any of them; every pattern must match some module, and a pattern
            without wildcards must name a Linear/Conv1D. A callable ``(name, module) -> bool``:
            the modules it accepts, each of which must be a Linear/Conv1D.
        p: projection size per side; each module gives ``p * p`` numbers per example (or token).
        seed: user seed; each module's left/right matrices derive from (seed, module name, side),
            so adding or removing a module does not change the others' projections.
        kind: ``"rademacher"`` or ``"gaussian"`` projection entries.
        bias: append the bias gradient as an extra input column (modules that have a bias).
        per_token: one vector per position, ``(B, T, p*p)``, instead of summing over positions.
        normalizers: ``{module name: normalizer}`` (``gradkit.projection.AdafactorNormalizer``
            / ``AdamNormalizer``) applied to that module's gradient before projection, in
            ``nn.Linear`` layout (``module_shapes``: (O, I)); a Conv1D's weight and its optimizer
            state are (I, O), so pass their transpose. Types and shapes are checked here.
        dtype: dtype of the returned vectors (computed, summed over a module's calls and scaled in fp32; a
            value beyond a half-precision dtype's range becomes inf, with a RuntimeWarning).
        memory_budget: bytes an ``AdamNormalizer`` module may use for the blocks of its per-example
            gradient that it forms (``factored_project``'s ``memory_budget``; default 256 MiB).
            Checked here against every Adam-normalised module's shape, so a budget too small for
            one entry is refused before any forward pass.

    Attributes:
        module_dims: ``OrderedDict`` name -> ``p * p`` in model order (pass to
            ``GradientIndex.create``).
        module_shapes: ``OrderedDict`` name -> ``(O, I)`` of the weight gradient (Linear layout;
            for Conv1D the gradient of ``W^T``).
        projection_config: JSON-able dict describing the projection (pass as ``projection=``).
    """

    def __init__(self, model: nn.Module, modules: ModuleSelector = None, p: int = 16, seed: int = 0,
                 kind: str = "rademacher", bias: bool = False, per_token: bool = False,
                 normalizers: Optional[Mapping[str, object]] = None,
                 dtype: torch.dtype = torch.float32, memory_budget: int = 256 << 20) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        # ints or numpy integers (as gradkit.projection's functions take them), never bools
        def whole(v) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)  # numpy's bool_ is no Integral

        if not whole(p) or p <= 0:
            raise ValueError(f"p: expected a positive int, got {p!r}")
        if p >= 1 << 31:  # p * p numbers per example (and index columns) must fit int64
            raise ValueError(f"p: must be below 2**31, got {p!r}")
        if not whole(seed) or seed < 0 or seed >= 1 << 63:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        if not isinstance(kind, str) or kind.lower() not in ("rademacher", "gaussian"):
            raise ValueError(f"kind: expected 'rademacher' or 'gaussian', got {kind!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        if dtype.itemsize < 2:
            # session 42: float8 passed here, then collect() (after dropping the batch) raised torch's
            # NotImplementedError for isinf, or rounded silently (float8_e4m3fn saturates at 448)
            raise TypeError(f"dtype: expected torch.float32, float64, float16 or bfloat16, got {dtype!r} (a float8 "
                            "dtype has no inf to report values beyond its range)")
        if not whole(memory_budget) or memory_budget <= 0:
            raise ValueError(f"memory_budget: expected a positive int (bytes), got {memory_budget!r}")
        if memory_budget >= 1 << 63:  # session 42: accepted here, then refused by factored_project in every backward
            raise ValueError(f"memory_budget: must be below 2^63, got {memory_budget}")
        p, seed, memory_budget, kind = int(p), int(seed), int(memory_budget), kind.lower()
        self.memory_budget = memory_budget
        self.model = model  # what loss_fn is given, and whose forward hook sees a failed forward
        self._base = unwrap_model(model)  # names, patterns and config: the model inside a DDP / compile wrapper
        self.p = p
        self.seed = seed
        self.kind = kind
        self.bias = _projection()._flag(bias, "bias")  # bool("False") would be True
        self.per_token = _projection()._flag(per_token, "per_token")
        self.dtype = dtype

        selected = self._select(self._base, modules)
        self.module_shapes: "OrderedDict[str, Tuple[int, int]]" = OrderedDict()
        self._bias_of: Dict[str, bool] = {}
        self._modules: "OrderedDict[str, nn.Module]" = OrderedDict()
        selected_kinds = {name: kind_ for name, _, kind_ in selected}
        for name, mod, kind_ in selected:
            self.module_shapes[name] = _shape(mod, kind_)
            self._bias_of[name] = self.bias and getattr(mod, "bias", None) is not None
            self._modules[name] = mod
        self.module_dims: "OrderedDict[str, int]" = OrderedDict((n, p * p) for n in self._modules)
        # modules whose input's second axis is the batch: (T, B, ..., I), read as (B, T, ..., I) (session 39; before,
        # their T positions were taken as T examples, silently when T == B or when nothing else showed B)
        seqfirst = _sequence_first(self._base)
        self._seq_first: Dict[str, str] = {n: seqfirst[n] for n in self._modules if n in seqfirst}

        if normalizers is not None and not isinstance(normalizers, Mapping):
            raise TypeError(f"normalizers: expected None or a {{module name: normalizer}} mapping, got "
                            f"{type(normalizers).__name__}")
        normalizers = dict(normalizers or {})
        unknown = sorted(set(normalizers) - set(self._modules))
        if unknown:
            raise ValueError(f"normalizers: names {unknown} are not among the hooked modules "
                             f"{list(self._modules)}")
        for name, norm in normalizers.items():
            self._check_normalizer(name, norm, selected_kinds[name])
        self.normalizers = normalizers
        for name, norm in normalizers.items():  # the Adam path's smallest block must fit the budget
            if isinstance(norm, _projection().AdamNormalizer):
                O, I = self.module_shapes[name]
                _projection()._adam_plan(1, O, I + int(self._bias_of[name]), p, memory_budget)
        # this collector's projection matrices (L^T, R^T of every hooked module), made on first use and kept for the
        # collector's life, across detach / attach (`with col:` around each batch must not regenerate them every
        # batch: 13.6 of 130 ms per batch on a 12-layer GPT-2 of width 64, session 39): the process-wide cache of
        # factored_project is bounded, and a model with many hooked modules would make it regenerate every matrix
        # every batch. p * (O + I) float32 per module; they go with the collector (or clear_matrices())
        self._matrices = _projection()._MatrixCache()

        self._handles: list = []
        self._gen = 0  # bumped on detach/reset: hooks of older forwards become no-ops
        self._mask: Optional[Tensor] = None
        self._mask_all = False
        self._grads: Dict[str, Tensor] = {}
        self._forward_shapes: Dict[str, Tuple[int, ...]] = {}
        self._edges: Dict[int, object] = {}  # id(call) -> autograd edge of its output, until its gradient arrives
        self._nograd_calls = 0  # hooked forwards skipped since the last collect/reset: grad was disabled
        self._ran: set = set()  # hooked modules whose forward ran during the model's current forward
        self._cleared: set = set()  # Linear subclasses with their own forward whose weight gradient was probed
        self._probing = False  # the probe's own forward call: the hooks stand aside
        # mask of the hooked forwards run (grad disabled) inside torch.utils.checkpoint(use_reentrant=True) since
        # the last collect/reset, for their recomputation in the backward pass; None: there were none
        self._ckpt_mask: Optional[Tuple[Optional[Tensor], bool]] = None
        self._ckpt_why: Optional[str] = None  # "checkpoint", or the custom autograd.Function's name (session 40)
        self._dropped = False  # detach() dropped collected gradients nobody collected
        self._raised = False  # the model's forward raised and dropped the batch (no hooked forward since)
        # The batch's (B, T), to tell a 2-D input's rows apart: examples (B rows) or the tokens flattened into the
        # first axis (B * T rows, as OPT's fc1 / fc2 and Qwen2-MoE's shared expert get them).
        self._rows: Optional[Tuple[int, str]] = None  # (B, where it came from), once the mask or a module fixed it
        self._tokens: Dict[int, str] = {}  # T -> where it came from (the modules with a (B, T, I) input)
        self._pending: List[Tuple[str, _Call, int]] = []  # (name, call, rows) of 2-D calls made before B was known
        # (B, T or None, description, every batch size of its inputs) of the model forward's own input
        # (see _model_pre_hook)
        self._model_bt: Optional[Tuple[int, Optional[int], str, frozenset]] = None

    def __reduce_ex__(self, protocol):
        # (session 41) copy.copy / copy.deepcopy / pickle (torch.save, multiprocessing) come through here: before, a
        # TypeError about a '_thread.lock' (the matrix cache's)
        raise TypeError("GradientCollector: cannot be copied or pickled: it hooks one live model and holds that "
                        "model's pending activations; build a new GradientCollector on the copy, or in each process, "
                        "with the same arguments (the same seed gives the same projection: projection_config)")

    def _compiled_ancestor(self, name: str) -> Optional[str]:
        """The name of a module holding ``name`` (or itself) compiled in place (``module.compile()``), or None."""
        parts = name.split(".")
        for i in range(len(parts), -1, -1):
            anc = ".".join(parts[:i])
            try:
                m = self._base.get_submodule(anc)
            except AttributeError:  # pragma: no cover - names come from named_modules
                continue
            if getattr(m, "_compiled_call_impl", None) is not None:
                return anc or "<model>"
        return None

    def _compiled_note(self) -> str:
        comp = sorted({c for c in map(self._compiled_ancestor, self._modules) if c is not None})
        return f" (compiled in place: {comp})" if comp else ""

    def _check_normalizer(self, name: str, norm, kind: str) -> None:
        """A normaliser's type and shapes against its module, here rather than in the backward pass."""
        P = _projection()
        what = f"normalizers[{name!r}]"
        if not isinstance(norm, (P.AdafactorNormalizer, P.AdamNormalizer)):
            raise TypeError(f"{what}: expected an AdafactorNormalizer or AdamNormalizer, got {type(norm).__name__}")
        O, I = self.module_shapes[name]
        hint = (" (nn.Linear layout (out, in); this module is a Conv1D, whose weight and optimizer state are "
                "(in, out): pass the transpose)") if kind != "linear" else ""
        P._check_normalizer_shapes(norm, O, I, self._bias_of[name], what, hint)

    # ------------------------------------------------------------------ selection
    @staticmethod
    def _select(model: nn.Module, modules: ModuleSelector) -> List[Tuple[str, nn.Module, str]]:
        named = [(n, m) for n, m in model.named_modules() if n]
        out: List[Tuple[str, nn.Module, str]] = []
        unhookable = _unhookable(model)
        if modules is None:  # every Linear / Conv1D that runs as a module
            out = [(n, m, k) for n, m in named if (k := _module_kind(m)) is not None and n not in unhookable]
            if not out:
                if _module_kind(model) is not None:
                    raise ValueError(f"model: is itself a {type(model).__name__}, which has no name to key its "
                                     "projection seeds and index columns; wrap it, e.g. nn.Sequential(model)")
                raise ValueError("modules: the model has no nn.Linear or transformers Conv1D module to hook")
            return out
        if callable(modules) and not isinstance(modules, str):
            for n, m in named:
                if modules(n, m):
                    k = _module_kind(m)
                    if k is None:
                        raise TypeError(f"modules: selected module {n!r} is a {type(m).__name__}; only "
                                        "nn.Linear and transformers Conv1D are supported")
                    out.append((n, m, k))
            if not out:
                raise ValueError("modules: the callable selected no module")
            _refuse_unhookable(out, unhookable)
            return out
        if isinstance(modules, Tensor) or not isinstance(modules, (str, Iterable)):
            raise TypeError(f"modules: expected None, a callable, a name pattern or a list of them, got "
                            f"{type(modules).__name__}")
        pats = [modules] if isinstance(modules, str) else list(modules)
        if not pats or not all(isinstance(x, str) and x for x in pats):
            raise ValueError(f"modules: expected None, a callable, or non-empty name patterns, got {modules!r}")
        names = [n for n, _ in named]
        for pat in pats:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise ValueError(f"modules: pattern {pat!r} matches no module of the model")
            if not any(c in pat for c in "*?["):
                m = dict(named)[pat]
                if _module_kind(m) is None:
                    raise TypeError(f"modules: {pat!r} is a {type(m).__name__}; only nn.Linear and "
                                    "transformers Conv1D are supported")
        for n, m in named:
            if any(fnmatch.fnmatchcase(n, pat) for pat in pats) and (k := _module_kind(m)) is not None:
                out.append((n, m, k))
        # a module named exactly is refused if it never runs; wildcard matches of such modules are left out
        _refuse_unhookable([t for t in out if t[0] in pats], unhookable)
        dropped = [t[0] for t in out if t[0] in unhookable]
        out = [t for t in out if t[0] not in unhookable]
        if not out:
            raise ValueError(f"modules: patterns {pats} match no nn.Linear / Conv1D module"
                             + (f" that can be collected ({dropped} {unhookable[dropped[0]]})" if dropped else ""))
        return out

    # ------------------------------------------------------------------ config
    @property
    def projection_config(self) -> Dict[str, object]:
        """JSON-able description of the projection; an index built from these vectors must match it."""
        try:
            gen_version = int(getattr(_projection(), "PROJECTION_VERSION", 1))
        except ImportError:  # pragma: no cover - the projection module is part of the package
            gen_version = 1
        return {
            "method": "factored",
            "version": COLLECTOR_VERSION,
            "generator_version": gen_version,
            "p": self.p,
            "seed": self.seed,
            "kind": self.kind,
            "bias": self.bias,
            "per_token": self.per_token,
            "modules": dict(self.module_dims),
            "shapes": {n: list(s) for n, s in self.module_shapes.items()},
            "bias_modules": [n for n in self._modules if self._bias_of[n]],
            "normalizers": {n: type(v).__name__ for n, v in sorted(self.normalizers.items())},
        }

    @property
    def dim(self) -> int:
        """Total width D of :meth:`flatten` (sum of module_dims)."""
        return sum(self.module_dims.values())

    # ------------------------------------------------------------------ hooks
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "GradientCollector":
        """Register the forward hooks (idempotent)."""
        if not self._handles:
            self._dropped = False
            for name, mod in self._modules.items():
                # prepend: the module's own output, before any forward hook registered earlier replaces it
                # (a gating / scaling hook's `out * s` is downstream of the weight, as autograd sees it)
                self._handles.append(mod.register_forward_hook(
                    _Hook(functools.partial(self._forward_hook, name)), with_kwargs=True, prepend=True))
            # the model's forward raising after some hooked modules ran (an out-of-memory error caught to retry
            # with a smaller batch): that forward's pending calls are dropped, so the retry starts clean
            self._handles.append(self.model.register_forward_hook(_Hook(self._model_hook), always_call=True))
            self._handles.append(self.model.register_forward_pre_hook(_Hook(self._model_pre_hook), with_kwargs=True))
        return self

    def detach(self) -> None:
        """Remove every hook and drop all collected state (pending activations included). The projection matrices
        are kept for the next attach (:meth:`clear_matrices` frees them)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        dropped = bool(self._grads)
        self.reset()
        self._dropped = dropped

    def clear_matrices(self) -> None:
        """Free this collector's cached projection matrices (``p * (O + I)`` float32 per hooked module); the next batch
        makes them again, with the same bits."""
        self._matrices.clear()

    def __enter__(self) -> "GradientCollector":
        return self.attach()

    def __exit__(self, *exc) -> bool:
        self.detach()
        return False

    def reset(self) -> None:
        """Forget the current batch: collected gradients, pending activations, mask."""
        self._drop_batch()
        self._mask, self._mask_all = None, False
        self._dropped = self._raised = False

    def _drop_batch(self) -> None:
        """Forget the per-batch state (collected gradients, pending activations and edges, forward
        shapes, no-grad count) and turn the tensor hooks of earlier forwards into no-ops. The mask
        is kept: it is the caller's setting for the next forward, not state built by the hooks."""
        self._gen += 1
        self._grads.clear()
        self._forward_shapes.clear()
        self._edges.clear()
        self._nograd_calls = 0
        self._ckpt_mask = None
        self._rows, self._tokens, self._pending, self._model_bt = None, {}, [], None

    def set_mask(self, mask: Optional[Tensor]) -> None:
        """Padding mask ``(B, T)`` (0/1 or bool) for the NEXT forward pass; ``None`` clears it."""
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dim() != 2:
                raise ValueError(f"mask: expected a (B, T) tensor, got "
                                 f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
            _readable_tensor(mask, "mask")
            if mask.dtype != torch.bool:
                if not bool(((mask == 0) | (mask == 1)).all()):  # integer masks too: a 2 is no padding flag
                    raise ValueError("mask: expected 0/1 values")
                mask = mask != 0
            else:
                mask = mask.clone()  # the caller's buffer may change before the backward pass reads it
        self._mask = mask
        self._mask_all = mask is not None and bool(mask.all())  # once per batch, not per module

    @contextlib.contextmanager
    def batch(self, mask: Optional[Tensor] = None) -> Iterator["GradientCollector"]:
        """``with col.batch(mask): forward; backward`` -- sets the mask, clears it afterwards."""
        self.set_mask(mask)
        try:
            yield self
        finally:
            self._mask, self._mask_all = None, False

    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # The batch of the model's own input: B, and T when it is (B, T) token ids or (B, T, H) input embeddings.
        # Every hooked module's first axis must be that B (session 39: a multiple-choice model flattening (B, C, T)
        # ids into B * C rows, window attention on B * windows rows, were collected as that many examples); a 2-D
        # input of B * T rows that nothing else in the batch interprets is refused (see _check_pending).
        if not torch.is_grad_enabled():
            # (session 43) a forward under torch.no_grad / inference_mode collects nothing, and the docstring says the
            # hooks ignore it (evaluation between a batch's forward and its backward, or on another thread while a
            # batch is pending): before, its input replaced the pending batch's (B, T) here, and _model_hook then
            # refused the evaluation forward by a batch-size mismatch and dropped the pending batch
            return
        self._ran = set()
        x, src = None, None
        for key in _MODEL_INPUTS:
            if isinstance(kwargs.get(key), Tensor):
                x, src = kwargs[key], key
                break
        else:
            if args and isinstance(args[0], Tensor):
                x, src = args[0], "its first argument"
            else:  # (session 40) all by other keywords (PatchTST's `past_values=`, Perceiver's `inputs=`): the first
                # tensor keyword stands for the batch, and a module's rows must be the first axis of SOME tensor keyword
                for key, v in kwargs.items():
                    if isinstance(v, Tensor) and v.dim() > 0:
                        x, src = v, key
                        break
        self._model_bt = None
        if x is None or x.dim() == 0:
            return
        integer = not x.dtype.is_floating_point and not x.dtype.is_complex and x.dtype != torch.bool
        if integer and x.dim() == 2:
            T: Optional[int] = int(x.shape[1])  # token ids
        elif src == "inputs_embeds" and x.dim() == 3:
            T = int(x.shape[1])
        else:
            T = None
        # every batch the model's inputs show (a CLIP-like model given 10 text prompts and 4 images: a module of
        # either tower has its own input's batch)
        keys = _MODEL_INPUTS if src in _MODEL_INPUTS or src == "its first argument" else tuple(kwargs)
        sizes = {int(v.shape[0]) for k in keys if isinstance(v := kwargs.get(k), Tensor) and v.dim() > 0}
        if self._seq_first and x.dim() >= 3 and not integer:
            # (session 40) a model with sequence-first layers (torch's nn.Transformer called on (S, B, E) inputs) has
            # its batch on the inputs' second axis: before, the model nn.Transformer itself was refused
            ins = [x] + [v for k in keys if isinstance(v := kwargs.get(k), Tensor)] + \
                [v for v in args if isinstance(v, Tensor)]
            sizes |= {int(v.shape[1]) for v in ins if v.dim() >= 3}
        self._model_bt = (int(x.shape[0]), T, f"the model's {src} of shape {tuple(x.shape)}",
                          frozenset(sizes | {int(x.shape[0])}))

    def _model_hook(self, module: nn.Module, args: tuple, output) -> None:
        if not torch.is_grad_enabled():  # a no-grad forward is ignored (see _model_pre_hook), also when it raised
            return
        if output is None and sys.exc_info()[0] is not None:  # always_call: the model's forward raised
            self._drop_batch()
            self._raised = True  # for collect()'s message, until a hooked module runs forward again
            return
        try:
            for name, call, rows in self._pending:
                self._check_pending(name, rows)
            self._check_model_batch()
            self._check_unseen_weights(output)
        except BaseException:
            self._drop_batch()
            raise

    def _check_unseen_weights(self, output) -> None:
        """After the model's forward with grad enabled: a hooked module whose forward did not run, but whose weight
        the output depends on, applies that weight some other way (``F.multi_head_attention_forward`` with
        ``q_proj.weight``, ``hidden @ decoder.weight.t()``, ``dt_proj.weight @ x``): no hook sees its input or output
        gradient, and its rows would be zeros. Found by walking the output's autograd graph, only when some hooked
        module did not run (session 39)."""
        if not torch.is_grad_enabled():
            return
        # (a module inside a block compiled before the collector attached runs traced code without the hooks:
        # collect() names those, with what to do about it)
        # (a weight shared with a hooked module that did run is that module's: its use is seen)
        ran = {id(getattr(m, "weight", None)) for n, m in self._modules.items() if n in self._ran}
        unseen = {id(w): n for n, m in self._modules.items() if n not in self._ran
                  and isinstance(w := getattr(m, "weight", None), Tensor) and w.requires_grad and id(w) not in ran
                  and self._compiled_ancestor(n) is None}
        if not unseen:
            return
        roots, stack = [], [output]
        while stack and len(roots) < 64:  # the output's tensors: a tensor, a tuple / list, a dict / ModelOutput
            o = stack.pop()
            if isinstance(o, Tensor):
                if o.grad_fn is not None:
                    roots.append(o.grad_fn)
            elif isinstance(o, (tuple, list)):
                stack.extend(o)
            elif isinstance(o, Mapping):
                stack.extend(o.values())
        found, seen, nodes = set(), set(), roots
        while nodes:
            node = nodes.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            var = getattr(node, "variable", None)  # AccumulateGrad: a leaf the graph reads
            if var is not None:
                if id(var) in unseen:
                    found.add(unseen[id(var)])
                continue
            nodes.extend(nxt for nxt, _ in node.next_functions)
        if found:
            names = [n for n in self._modules if n in found]
            raise ValueError(f"modules: {names[:8]}{' ...' if len(names) > 8 else ''} never ran their forward, but the "
                             "model's output depends on their weights: the model applies those weights without "
                             "calling the module (e.g. F.multi_head_attention_forward, or a matmul with "
                             "module.weight), so no hook can see their inputs and their rows would be zeros; leave "
                             "them out of `modules`. (Or the model was compiled with torch.compile and run before "
                             "the collector attached: its traced code runs without the hooks; attach before its "
                             "first compiled call, or call torch._dynamo.reset() first.) The batch has been dropped")

    def _probe_subclass(self, name: str, module: nn.Module, x: Tensor, args: tuple, kwargs: dict) -> None:
        """A Linear subclass with its own forward (once per module): its weight gradient must be ``g^T x`` for the
        input ``x`` the hook sees, what the collector computes. One example's rows are run through the module again
        and the weight gradient of a random output gradient compared (session 39: muP's MuReadout, which applies its
        weight to ``x * output_mult / width_mult``, and BitNet's quantising AutoBitLinear came out silently wrong; a
        LoRA-style subclass adding ``B(A(x))`` passes)."""
        self._cleared.add(name)
        w = getattr(module, "weight", None)
        if not isinstance(w, Tensor) or not w.requires_grad:
            return
        xs = x[:1].detach()
        if args:
            args, kwargs = (xs,) + tuple(args[1:]), kwargs
        else:  # the input passed by keyword (the hook found it as the first keyword value)
            k0 = next(iter(kwargs))
            args, kwargs = (), {**kwargs, k0: xs}
        self._probing = True
        try:  # the RNG state kept: a dropout inside the module's forward must not shift the model's own draws
            with torch.random.fork_rng(devices=[xs.device] if xs.device.type == "cuda" else []), torch.enable_grad():
                y = module(*args, **kwargs)
                if not isinstance(y, Tensor) or y.shape[:-1] != xs.shape[:-1]:
                    return  # refused by the caller's own checks
                g = torch.randn(y.shape, generator=torch.Generator(device="cpu").manual_seed(0)).to(y)
                (dw,) = torch.autograd.grad(y, w, g, allow_unused=True)
        finally:
            self._probing = False
        g2 = g.reshape(-1, g.shape[-1]).double()
        want = g2.T @ xs.reshape(-1, xs.shape[-1]).double()
        got = torch.zeros_like(want) if dw is None else dw.double()
        tol = 1e-2 if w.dtype in (torch.float16, torch.bfloat16) or x.dtype in (torch.float16, torch.bfloat16) else 1e-4
        if got.shape != want.shape or float((got - want).abs().max()) > tol * max(float(want.abs().max()), 1e-30):
            raise ValueError(f"modules: {name!r} ({type(module).__name__}, an nn.Linear subclass with its own "
                             "forward) does not apply its weight to the input its forward is given as a Linear does "
                             "(its weight gradient is not g^T x: it scales, quantises or otherwise transforms the "
                             "input or the weight first), so the collected rows would be wrong; leave it out of "
                             "`modules`")

    def _check_model_batch(self) -> None:
        """After the model's forward: the batch the hooked modules (or the mask) gave is the model input's."""
        mb = self._model_bt
        if mb is None or self._rows is None or self._rows[0] in mb[3]:
            return
        raise ValueError(
            f"modules: {self._rows[1]} gave the batch {self._rows[0]} rows, but {mb[2]} holds {mb[0]} examples. The "
            "first axis of every hooked module's input must be the model's batch: a model that folds another axis "
            "into it (a multiple-choice head's B * choices rows, window attention's B * windows, a sequence-first "
            "(T, B, I) layer) gives per-row, not per-example, gradients. Leave those modules out (the batch has "
            "been dropped)")

    def _check_pending(self, name: str, rows: int) -> None:
        """A 2-D input of ``rows`` rows that nothing in its batch interpreted (no mask, no module with a (B, T, I)
        input) is taken as ``rows`` examples: the model's input must show that many examples; its B * T tokens (token
        ids or input embeddings) are refused, since nothing tells their (B, T) for sure."""
        mb = self._model_bt
        if mb is None or rows in mb[3]:
            return
        B, T, src, _ = mb
        if T is not None and T > 1 and rows == B * T:
            raise ValueError(
                f"modules: {name!r} got a 2-D input of {rows} rows, the B * T = {B} * {T} tokens of {src} flattened "
                "into its first axis, but nothing in the batch tells (B, T) for sure (no padding mask is set and no "
                "hooked module has a (B, T, I) input), so its rows cannot be matched to examples. Set the (B, T) "
                "padding mask before the forward pass (col.set_mask / col.batch(mask); torch.ones(B, T) when "
                "nothing is padded), or also hook a module that sees (B, T, I) (e.g. an attention projection), or "
                "leave the module out (the batch has been dropped)")
        raise ValueError(
            f"modules: {name!r} got a 2-D input of {rows} rows, but {src} holds {B} examples: its rows are neither "
            "the examples nor (with nothing else in the batch telling its (B, T)) their tokens, so they cannot be "
            "matched to examples (rows routed to a mixture-of-experts expert, or a folded axis); leave the module "
            "out (the batch has been dropped)")

    def _forward_hook(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        try:
            self._on_forward(name, args, kwargs, output)
        except BaseException:
            # Never leave a half-built batch behind: the next batch must work without reset().
            self._drop_batch()
            raise

    def _on_forward(self, name: str, args: tuple, kwargs: dict, output) -> None:
        if self._probing:
            return
        self._ran.add(name)
        if not torch.is_grad_enabled():
            self._nograd_calls += 1
            inside = _in_reentrant_checkpoint()
            if inside:  # runs again in the backward pass, with grad: remember the mask
                self._ckpt_mask = (self._mask, self._mask_all)
                self._ckpt_why = inside
            return
        if not isinstance(output, Tensor):
            raise TypeError(f"modules: {name!r} ({type(self._modules[name]).__name__}) returned a "
                            f"{type(output).__name__}, not a tensor, so its output gradient cannot be matched to its "
                            "weight (a Linear subclass with its own forward, e.g. a router returning scores and "
                            "logits); leave it out of `modules`")
        if _in_checkpoint_recomputation():
            return  # non-reentrant checkpointing refilling saved tensors: this output never gets a gradient
        if not output.requires_grad:
            raise ValueError(f"modules: {name!r} ran forward with grad enabled, but its output does not require "
                             "grad (its weight is frozen, requires_grad=False, and so is everything its input "
                             "depends on), so no gradient can reach it and its rows would be zeros; unfreeze its "
                             "weight or leave it out of `modules`")
        if name in self._grads and torch._C._current_autograd_node() is None:
            # (inside a backward pass this is reentrant checkpointing recomputing a layer used several times:
            # each recomputed call's gradient adds to the module's sum)
            raise RuntimeError(f"GradientCollector: module {name!r} ran forward again after its gradient "
                               "was collected; call collect() (or reset()) after each backward pass "
                               "(the uncollected batch has been dropped)")
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, Tensor):
            raise TypeError(f"GradientCollector: cannot find the input tensor of module {name!r}")
        if x.dim() < 2:
            raise ValueError(f"GradientCollector: module {name!r} got an unbatched input of shape "
                             f"{tuple(x.shape)}; expected (B, ..., I)")
        O, I = self.module_shapes[name]
        if int(x.shape[-1]) != I or output.dim() < 1 or int(output.shape[-1]) != O or \
                tuple(output.shape[:-1]) != tuple(x.shape[:-1]):
            raise ValueError(f"modules: {name!r} ({type(self._modules[name]).__name__}) mapped an input of shape "
                             f"{tuple(x.shape)} to an output of shape {tuple(output.shape)}, but its weight gradient "
                             f"is (O, I) = ({O}, {I}): it does not apply its weight as a Linear does (a grouped or "
                             "extended Linear subclass), so its gradient is not sum_t g_t a_t^T; leave it out of "
                             "`modules`")
        mod = self._modules[name]
        if (name not in self._cleared and isinstance(mod, nn.Linear)
                and type(mod).forward is not nn.Linear.forward and not _in_checkpoint_recomputation()):
            self._probe_subclass(name, mod, x, args, kwargs)
        seq_first = name in self._seq_first
        if seq_first:
            if x.dim() < 3:
                raise ValueError(f"modules: {name!r} runs on sequence-first (T, B, features) inputs (inside "
                                 f"{self._seq_first[name]}), but got a 2-D input of shape {tuple(x.shape)}, whose "
                                 "rows cannot be matched to examples; leave it out of `modules`")
            x = x.transpose(0, 1)  # (B, T, ..., I): read as any batch-first input from here on
        mask, mask_all = self._mask, self._mask_all
        if self._ckpt_mask is not None and torch._C._current_autograd_node() is not None:
            # reentrant checkpointing recomputing its forward in the backward pass, maybe after `with col.batch(mask):`
            # ended: use the mask its first (grad-disabled) forward ran under
            mask, mask_all = self._ckpt_mask
        # Validate everything before any tensor hook is registered or anything is stored.
        rows = int(x.shape[0])
        # What tells this batch's (B, T): the mask, else the modules with a (B, T, I) input that ran before.
        if mask is not None:
            known: Optional[Tuple[int, str]] = (int(mask.shape[0]), "the mask")
            tokens: Dict[int, str] = {int(mask.shape[1]): "the mask"}
        else:
            known, tokens = self._rows, self._tokens
        bt: Optional[Tuple[int, int]] = None  # set: a (B * T, I) input, viewed as (B, T, I)
        pending = False
        if x.dim() > 2:
            # (B, T) as _project sees it: every axis between batch and features is a token axis.
            shape = (rows, int(math.prod(x.shape[1:-1])))
            if mask is not None and tuple(mask.shape) != shape:
                raise ValueError(f"mask: expected shape (batch, tokens) = {shape} to match the input "
                                 f"{tuple(x.shape)} of module {name!r}, got {tuple(mask.shape)}")
        elif known is not None:
            B, src = known
            if rows == B:  # the batch on the first axis ((B, I): a pooled or per-example input; no token to mask)
                shape = (rows, 1)
            elif B and rows % B == 0 and rows // B in tokens:  # (B = 0: an empty mask; session 43, ZeroDivisionError)
                # the batch's tokens flattened into the first axis (OPT's fc1 / fc2 get hidden.reshape(-1, H)): the
                # rows of example b are b*T .. b*T+T-1, so it is collected as the same module fed (B, T, I) would be
                bt = shape = (B, rows // B)
            else:
                ts = sorted(tokens)
                raise ValueError(
                    f"modules: {name!r} got a 2-D input of shape {tuple(x.shape)}: {rows} rows, neither the batch's "
                    f"B = {B} examples ({src}) nor its B * T = {' or '.join(str(B * t) for t in ts)} tokens "
                    f"(T = {', '.join(f'{t} from {tokens[t]}' for t in ts)}) flattened into the first axis. The first "
                    "axis of every hooked module's input must be the batch, or, for a 2-D input, the batch's tokens "
                    "flattened in row-major (B, T) order (x.reshape(-1, I) of a (B, T, I) x); rows routed to a "
                    "mixture-of-experts expert, or a sequence-first (T, B, I) input, cannot be matched to "
                    "examples: leave the module out")
        else:
            # nothing has told the batch's (B, T) yet: the rows are examples unless a module with a (B, T, I) input
            # later in this batch (or the model's token ids, checked after its forward) shows they are B * T tokens
            shape, pending = (rows, 1), True
            if self._pending and self._pending[0][2] != rows:
                other, _, orows = self._pending[0]
                raise ValueError(
                    f"modules: {name!r} got a 2-D input of shape {tuple(x.shape)} ({rows} rows) but {other!r} got "
                    f"{orows} rows in the same batch, and nothing tells the batch's (B, T) to say which are examples "
                    "and which the B * T tokens flattened into the first axis (the first axis of every hooked "
                    "module's input must be the batch, or its tokens flattened in row-major (B, T) order). Set the "
                    "(B, T) padding mask before the forward pass (col.set_mask / col.batch(mask); torch.ones(B, T) "
                    "when nothing is padded), or leave one of them out")
        prev = self._forward_shapes.get(name)
        if prev is not None and prev != shape and (self.per_token or prev[0] != shape[0]):
            raise RuntimeError(f"GradientCollector: module {name!r} was called with inputs of shapes "
                               f"(B, T) = {prev} and {shape} in one batch")
        resolved: List[Tuple[str, _Call, Tuple[int, int]]] = []
        if not pending:
            B = shape[0]
            if self._rows is not None and self._rows[0] != B:
                raise ValueError(
                    f"modules: {name!r} got an input of shape {tuple(x.shape)}, {B} examples on its first axis, but "
                    f"{self._rows[1]} gave the batch {self._rows[0]} rows in the same batch; the first axis of every "
                    "hooked module's input must be the batch (or, for a 2-D input, the batch's tokens flattened "
                    "into it). A sequence-first (T, B, I) input (e.g. nn.TransformerEncoderLayer with "
                    "batch_first=False) would be taken as T examples, and mixture-of-experts expert layers see the "
                    "tokens routed to them, not examples: use batch_first=True, or leave those modules out")
            # the first (B, T) of the batch: the 2-D calls made before it are its examples or its flattened tokens
            T = shape[1] if x.dim() > 2 else (int(mask.shape[1]) if mask is not None else None)
            for pname, pcall, prows in self._pending:
                if prows == B:
                    continue
                if T is not None and T > 1 and prows == B * T:
                    if pcall.a is None or pcall.gen != self._gen or pname in self._grads:
                        raise ValueError(
                            f"modules: {pname!r} got a 2-D input of {prows} rows, the B * T = {B} * {T} tokens of "
                            f"{name!r}'s input {tuple(x.shape)} flattened into the first axis, but its gradient was "
                            f"already taken as that of {prows} examples (nothing had told the batch's (B, T) before "
                            "its backward pass). Set the (B, T) padding mask before the forward pass "
                            "(col.set_mask / col.batch(mask); torch.ones(B, T) when nothing is padded)")
                    resolved.append((pname, pcall, (B, T)))
                    continue
                raise ValueError(
                    f"modules: {pname!r} got a 2-D input of {prows} rows, but {name!r} got an input of shape "
                    f"{tuple(x.shape)}, (B, T) = ({B}, {T}), in the same batch: {prows} rows are neither its B "
                    "examples nor its B * T tokens flattened into the first axis. The first axis of every hooked "
                    "module's input must be the batch, or, for a 2-D input, the batch's tokens flattened in "
                    "row-major (B, T) order; rows routed to a mixture-of-experts expert, or a sequence-first (T, B, I) "
                    "input, cannot be matched to examples: leave the module out")
        self._raised = False
        if not pending:
            for pname, pcall, pbt in resolved:
                pcall.bt = pbt
                self._forward_shapes[pname] = pbt
            for _, pcall, _ in self._pending:
                pcall.pending = False
            self._pending = []
            if self._rows is None:
                self._rows = (shape[0], "the mask" if mask is not None else f"module {name!r}")
            if mask is not None:
                self._tokens.setdefault(int(mask.shape[1]), "the mask")
            if x.dim() > 2:
                self._tokens.setdefault(shape[1], f"module {name!r}")
        call = _Call(x.detach(), mask, mask_all, self._gen, tuple(output.shape), bt, pending, seq_first)
        target = output
        base = output._base
        if (base is not None and base.requires_grad and base.grad_fn is not None and base.numel() == output.numel()
                and base.is_contiguous() and output.is_contiguous() and base.data_ptr() == output.data_ptr()):
            # Linear / Conv1D on (B, T, I) return a view of a (B*T, O) matmul result. An in-place op on that view
            # (nn.ReLU(inplace=True), y.mul_(s)) rebases its history and a hook on the view would never fire; the
            # base's node stays in the graph and receives the same gradient (in the base's shape).
            target = base
        target.register_hook(functools.partial(self._grad_hook, name, call))
        self._edges[id(call)] = torch.autograd.graph.get_gradient_edge(target)
        self._forward_shapes[name] = shape
        if pending:
            self._pending.append((name, call, rows))

    def _grad_hook(self, name: str, call: _Call, grad: Tensor) -> None:
        a = call.a
        self._edges.pop(id(call), None)
        if call.gen != self._gen:
            call.a = None
            return None
        if a is None:  # its gradient already arrived: a second backward pass through this forward
            self._drop_batch()
            raise RuntimeError(
                f"GradientCollector: module {name!r} received a second output gradient for the same forward pass "
                "(backward ran twice through it, with retain_graph=True, or a double backward); its activation "
                "was released after the first, so the second cannot be added. Backpropagate the sum of the "
                "losses once, or call collect() before backpropagating again (the batch has been dropped)")
        call.a = None  # release the activation as soon as it is used
        if call.shape and tuple(grad.shape) != call.shape:
            grad = grad.reshape(call.shape)  # it arrived in the shape of the output's un-viewed base
        if call.seq_first:
            grad = grad.transpose(0, 1)
        try:
            if a._version != call.version:
                raise RuntimeError(
                    f"GradientCollector: the input of module {name!r} was modified by an in-place operation "
                    f"after its forward pass (version {call.version} -> {a._version}), so its gradient cannot be "
                    "computed from it; avoid the in-place op (or clone the input) (the batch has been dropped)")
            if call.pending:  # (a forward recomputed in the backward pass: the model's hook has not seen it)
                self._check_pending(name, int(a.shape[0]))
            out = self._project(name, a, grad, call.mask, call.mask_all, call.bt)
            acc = self._grads.get(name)
            self._grads[name] = out if acc is None else acc.add_(out)
        except BaseException:
            # Gradients of modules that already fired would otherwise stay half-collected.
            self._drop_batch()
            raise
        return None

    def _project(self, name: str, a: Tensor, g: Tensor, mask: Optional[Tensor], mask_all: bool = False,
                 bt: Optional[Tuple[int, int]] = None) -> Tensor:
        b, i, o = (a.shape[0] if bt is None else bt[0]), a.shape[-1], g.shape[-1]
        # a (B * T, I) input (bt set) is the row-major flattening of (B, T, I): the same rows as that input would give.
        # T spelled out, not -1 (session 43: an empty batch, B = 0, was torch's "cannot reshape tensor of 0
        # elements" RuntimeError in the backward pass, where project / factored_project give (0, p*p) rows)
        t = bt[1] if bt is not None else math.prod(a.shape[1:-1])
        a3 = a.reshape(b, t, i)
        g3 = g.reshape(b, t, o)
        if mask is not None:  # its shape was checked against the input's (B, T) in the forward hook
            if a.dim() == 2 and bt is None:
                mask = None  # no token axis in this module's input: nothing is padding
            elif mask_all:
                mask = None  # nothing to exclude: skip the masking copies
            else:
                mask = mask.to(a.device)
        out = _projection()._factored_project(
            a3, g3, self.p, self.seed, name, self.kind, mask, self._bias_of[name], self.per_token,
            self.normalizers.get(name), self.memory_budget, self._matrices)
        return out  # float32: calls of one module are summed, and scaled, in float32; collect() casts to dtype

    # ------------------------------------------------------------------ driving
    def backward(self, loss: Tensor, retain_graph: bool = False) -> None:
        """Backpropagate ``loss`` (summed if not a scalar) to the hooked module outputs only.

        No ``.grad`` is written and weight gradients are not computed; the hooks project the
        output gradients as they arrive. Use ``loss.backward()`` instead if you also want ``.grad``.
        """
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss: expected a tensor, got {type(loss).__name__}")
        if not loss.requires_grad:
            raise ValueError("loss: does not require grad (was the forward pass run under no_grad?)")
        if self._ckpt_mask is not None:
            if self._ckpt_why == "checkpoint":
                raise RuntimeError("GradientCollector.backward: hooked modules ran inside torch.utils.checkpoint with "
                                   "use_reentrant=True, whose recomputation torch.autograd.grad restricted to the "
                                   "hooked outputs skips (their rows would be zeros); call loss.backward() instead, "
                                   "or checkpoint with use_reentrant=False")
            raise RuntimeError(f"GradientCollector.backward: hooked modules ran with grad disabled inside the forward "
                               f"of the custom torch.autograd.Function {self._ckpt_why!r} (e.g. Reformer's reversible "
                               "layers), whose backward runs them again: torch.autograd.grad restricted to the "
                               "hooked outputs skips that (their rows would be zeros); call loss.backward() instead")
        if not self._edges:
            raise RuntimeError("GradientCollector.backward: no hooked module ran forward with grad enabled "
                               "since the last collect(); is the collector attached (`with col:`)? A model (or "
                               "its blocks) compiled with torch.compile and run before the collector attached "
                               "runs code traced without the hooks: attach before its first compiled call, or "
                               "call torch._dynamo.reset() first" + self._compiled_note())
        if loss.dim():
            loss = loss.sum()
        try:
            torch.autograd.grad(loss, list(self._edges.values()), retain_graph=retain_graph, allow_unused=True)
        except BaseException:
            # interrupted part-way (an error in another backward function, out of memory): the modules reached so
            # far must not be collected as a batch beside zeros for the others
            self._drop_batch()
            raise

    def collect(self, flat: bool = False, scale: Union[float, str, None] = None,
                missing: str = "zeros") -> Union[Dict[str, Tensor], Tensor]:
        """The projected per-example gradients of the last batch, and reset for the next one.

        Returns ``{name: (B, p*p)}`` (``(B, T, p*p)`` with ``per_token``) in model order, or with
        ``flat=True`` the ``(B, D)`` (``(B, T, D)``) concatenation in that order. ``scale``
        multiplies every vector; ``scale="batch"`` multiplies by this batch's B, which undoes a
        batch-mean loss (also for a shorter last batch, where a fixed ``scale=B`` would not). A module that ran forward
        but got no gradient (its output did not reach the loss) or did not run at all has a zero
        gradient: zeros with ``missing="zeros"``, an error with ``missing="error"``.
        """
        if missing not in ("zeros", "error"):
            raise ValueError(f"missing: expected 'zeros' or 'error', got {missing!r}")
        _check_scale(scale)
        flat = _projection()._flag(flat, "flat")  # bool("False") would be True
        if not self._grads:
            ran, nograd, dropped, raised = bool(self._forward_shapes), self._nograd_calls, self._dropped, self._raised
            self.reset()
            if raised:
                why = ("the model's forward raised an exception, which dropped the batch's pending calls (forwards "
                       "run before it in this batch included); run the batch's forward and backward again")
            elif dropped:
                why = ("the collector was detached (the `with col:` block ended) before collect(); leaving "
                       "the block drops the batch, so call collect() inside it")
            elif ran:
                why = "run loss.backward() or col.backward(loss) after the forward pass"
            elif nograd:
                why = (f"hooked modules ran forward {nograd} time(s) with grad disabled (torch.no_grad / "
                       "inference_mode); run the forward pass with grad enabled")
            else:
                why = ("no hooked module ran forward while the collector was attached (use `with col:` "
                       "around the forward and backward passes)")
            raise RuntimeError("GradientCollector.collect: no gradients were collected; " + why)
        unseen = [n for n in self._modules if n not in self._forward_shapes and self._compiled_ancestor(n)]
        if unseen:
            self.reset()
            raise RuntimeError(f"GradientCollector.collect: modules {unseen} sit inside modules compiled with "
                               "torch.compile and none of their hooks ran: compiled code traced before the "
                               "collector attached skips hooks added later, and their rows would be zeros. Attach "
                               "before the first compiled call, or call torch._dynamo.reset() before attaching")
        any_out = next(iter(self._grads.values()))
        out: "OrderedDict[str, Tensor]" = OrderedDict()
        absent = []
        for name in self._modules:
            v = self._grads.get(name)
            if v is None:
                absent.append(name)
                shape = self._forward_shapes.get(name)
                if self.per_token:
                    lead = shape if shape is not None else tuple(any_out.shape[:2])
                else:
                    lead = (shape[0] if shape is not None else any_out.shape[0],)
                v = any_out.new_zeros(*lead, self.p * self.p)
            out[name] = v
        if absent and missing == "error":
            self.reset()
            raise RuntimeError(f"GradientCollector.collect: no gradient reached modules {absent}")
        self.reset()
        if scale is not None:
            factor = any_out.shape[0] if scale == "batch" else scale
            for name in out:
                out[name].mul_(factor)
        if self.dtype != torch.float32:
            over = []
            for name in out:
                v = out[name].to(self.dtype)
                if bool((torch.isinf(v) & torch.isfinite(out[name])).any()):
                    over.append(name)
                out[name] = v
            if over:
                warnings.warn(f"GradientCollector.collect: projected gradients of modules {over} are beyond "
                              f"{self.dtype}'s range and became inf (an index refuses such rows); use "
                              "dtype=torch.float32 or torch.bfloat16, or a smaller scale", RuntimeWarning,
                              stacklevel=2)
        return self.flatten(out) if flat else out

    def flatten(self, grads: Mapping[str, Tensor]) -> Tensor:
        """Concatenate ``{name: (B, [T,] p*p)}`` along the last axis in module order -> ``(B, [T,] D)``."""
        if not isinstance(grads, Mapping):  # session 42: None was Python's TypeError, a list "missing modules"
            raise TypeError(f"grads: expected a mapping {{module name: (B, [T,] p*p) tensor}}, got "
                            f"{type(grads).__name__}")
        missing = [n for n in self._modules if n not in grads]
        if missing:
            raise ValueError(f"grads: missing modules {missing}")
        parts = [grads[n] for n in self._modules]
        for n, x in zip(self._modules, parts):
            if not isinstance(x, Tensor) or x.dim() < 1:
                raise TypeError(f"grads[{n!r}]: expected a (B, [T,] p*p) tensor, got "
                                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        lead = {tuple(x.shape[:-1]) for x in parts}
        if len(lead) != 1:
            raise ValueError(f"grads: modules have different leading shapes {sorted(lead)}; cannot flatten")
        return torch.cat(parts, dim=-1)

    def split(self, flat: Tensor) -> "OrderedDict[str, Tensor]":
        """Inverse of :meth:`flatten`: ``(..., D)`` -> ``{name: (..., p*p)}`` views."""
        if not isinstance(flat, Tensor) or flat.dim() == 0 or flat.shape[-1] != self.dim:  # (0-d: IndexError before)
            raise ValueError(f"flat: expected last dimension {self.dim}, got "
                             f"{tuple(flat.shape) if isinstance(flat, Tensor) else type(flat).__name__}")
        _readable_tensor(flat, "flat", meta_ok=True)
        return OrderedDict(zip(self._modules, flat.split(list(self.module_dims.values()), dim=-1)))

    @staticmethod
    def pack_tokens(x: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Per-token output ``(B, T, D)`` -> ``(rows (N, D), num_tokens (B,))`` keeping the positions
        where ``mask`` (B, T) is set (all if None), example by example -- the form a per-token
        ``GradientIndex.append(rows, num_tokens)`` takes."""
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x: expected a (B, T, D) per-token tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        _readable_tensor(x, "x", meta_ok=mask is None)  # a mask selects by value: a meta x has none
        if mask is None:
            return x.reshape(-1, x.shape[-1]), torch.full((x.shape[0],), x.shape[1], dtype=torch.int64)
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"mask: expected shape {tuple(x.shape[:2])}, got "
                             f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
        _readable_tensor(mask, "mask")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask: expected 0/1 values or a bool tensor (as set_mask takes), got other values")
        keep = (mask != 0).to(x.device)
        return x[keep], keep.sum(1).to(torch.int64).cpu()

    def per_example_grads(self, batches: Iterable, loss_fn: Callable[[nn.Module, object], Tensor],
                          mask_key: Optional[str] = "attention_mask", flat: bool = False,
                          scale: Union[float, str, None] = None) -> Iterator[Union[Dict[str, Tensor], Tensor]]:
        """For each batch: ``loss_fn(model, batch)`` (per-example losses ``(B,)`` or their sum),
        :meth:`backward`, :meth:`collect`; yields the result. When a batch is a mapping holding
        ``mask_key``, that is used as the padding mask. Hooks are attached for the duration if
        they were not already. ``scale``: as in :meth:`collect`; for a batch-mean loss pass
        ``"batch"``. A number is applied to every batch alike, so when batch sizes differ it warns
        once (a fixed ``scale=B`` mis-scales the shorter batches of a batch-mean loss).
        """
        _check_scale(scale)
        flat = _projection()._flag(flat, "flat")
        # session 42: a batches that is not iterable, or a loss_fn that is not callable, was Python's TypeError
        # naming neither, raised with the hooks attached
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable (model, batch) -> loss, got {type(loss_fn).__name__}")
        try:
            batches = iter(batches)
        except TypeError:
            raise TypeError(f"batches: expected an iterable of batches, got {type(batches).__name__}") from None
        sizes = set()
        owned = not self.attached
        self.attach()
        try:
            for batch in batches:
                mask = batch.get(mask_key) if (mask_key and isinstance(batch, Mapping)) else None
                if mask is not None and getattr(getattr(self._base, "config", None), "is_encoder_decoder", False):
                    raise ValueError(f"per_example_grads: the model is an encoder-decoder, and batch[{mask_key!r}] is "
                                     "its encoder's padding mask: applied to the decoder's modules it would mark "
                                     "other positions. Pass mask_key=None (padded positions get no gradient when "
                                     "the loss ignores them), or use two collectors, each with its own mask: the "
                                     "encoder's modules and the decoder's cross-attention key / value projections "
                                     "(which read the encoder's positions, e.g. T5's "
                                     "'decoder.*.EncDecAttention.[kv]') under the encoder's attention_mask, the "
                                     "other decoder modules under the decoder's")
                with self.batch(mask):
                    loss = loss_fn(self.model, batch)
                    self.backward(loss)
                got = self.collect(flat=flat, scale=scale)
                sizes.add(int((got if flat else next(iter(got.values()))).shape[0]))
                if len(sizes) == 2 and scale is not None and scale != "batch":
                    warnings.warn(f"per_example_grads: scale={scale!r} multiplies every batch alike, but batch "
                                  f"sizes differ ({sorted(sizes)}); with a batch-mean loss pass scale='batch' "
                                  "(each batch's rows times its own size) or sum the per-example losses",
                                  UserWarning, stacklevel=2)
                yield got
        finally:
            if owned:
                self.detach()
            else:
                self.reset()

    def __repr__(self) -> str:
        return (f"GradientCollector({len(self._modules)} modules, p={self.p}, seed={self.seed}, kind={self.kind!r}, "
                f"bias={self.bias}, per_token={self.per_token}, D={self.dim}, attached={self.attached})")
