"""Model-level OBS pruning: Hessians from forward hooks, layer-by-layer pruning, checkpoints, resume.

``collect_hessians`` runs calibration batches through a model and returns, for every selected
``nn.Linear`` (or transformers' ``Conv1D``, GPT-2's transposed Linear), ``H = X^T X`` over the (non-padded) tokens that reached it: a plain sum in float32,
no ``1/n`` or ``2/n`` factor (SparseGPT scales by ``2/n``; every gradkit pruner and
``output_error`` is invariant to that scale and damping is relative, so ``X^T X`` is used
throughout; one exception: ``StructuredOBS.prune_true_obs(scoring="independent")`` on row-coupled
scopes keeps SparseKit's absolute ``1e-4`` ridge on each block of ``H^-1``, so its masks can
change with the scale of ``H``, as SparseKit's do). Under ``torch.distributed`` the sums and token counts are all-reduced, so each rank
can feed a different shard of the calibration data and every rank gets the Hessians of all of it.

``prune_model`` prunes the layers in execution order, SparseGPT-style: layers are grouped by
transformer block (``transformer.h.3.attn.c_attn`` -> ``transformer.h.3``), and each group's
Hessians are collected from a forward pass in which every earlier group is already pruned (the
group itself is still dense while its Hessians are gathered, as in SparseGPT). Each pruned layer is
checkpointed at once (safetensors + a JSON progress file, both written atomically), so an
interrupted run resumes where it stopped and ends with exactly the weights of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import hashlib
import json
import math
import numbers
import os
import re
import time
import types
import zlib
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
from torch import Tensor, nn

from gradkit import _dist as _distributed
from gradkit._io import NO_LIMIT, _fsync_dir, parse_json, read_regular
from gradkit._rules import all_finite, device_arg, flag
from gradkit.kernels.reference.scope import byte_span
from gradkit.obs import baselines, metrics
from gradkit.obs.layout import obs_layout
from gradkit.scope import BlockSpec, ScopeSpec

__all__ = ["collect_hessians", "prune_model", "Hessians", "LayerReport", "PruneReport", "CheckpointError",
           "METHODS"]

METHODS = ("sparsegpt", "true_obs", "obs_local", "obs_full", "magnitude", "obd", "resolve")
PROGRESS_FILE = "progress.json"
_FORMAT = "gradkit.obs.prune_model"
_VERSION = 2  # 2: "params", the digests of the model's parameters outside the pruned layers


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be resumed: another configuration, a model whose weights
    differ from the checkpointed run's, or missing / corrupt files."""


class _Stop(Exception):
    """Raised from a pre-hook to end a calibration forward pass early."""


# --------------------------------------------------------------------------- helpers


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and relatives): a Linear whose weight is stored transposed,
    ``(in_features, out_features)``; recognised by duck typing (transformers is not imported)."""
    w = getattr(m, "weight", None)
    return (type(m).__name__ == "Conv1D" and isinstance(getattr(m, "nf", None), int) and isinstance(w, Tensor)
            and w.dim() == 2 and w.shape[1] == m.nf)


def _prunable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def _in_features(m: nn.Module) -> int:
    return int(m.weight.shape[0]) if _is_conv1d(m) else int(m.in_features)


def _out_in(w: Tensor, mod: nn.Module) -> Tensor:
    """The weight in ``nn.Linear``'s ``(out, in)`` layout (a view for Conv1D)."""
    return w.T if _is_conv1d(mod) else w


def _select_modules(model: nn.Module, modules) -> List[Tuple[str, nn.Linear]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    lin = [(n, m) for n, m in model.named_modules() if _prunable(m) and n]
    if modules is None:
        out = lin
    elif callable(modules):
        out = [(n, m) for n, m in lin if modules(n, m)]
    else:
        try:  # a non-iterable (modules=3) raised "'int' object is not iterable", naming no argument
            pats = [modules] if isinstance(modules, str) else list(modules)
        except TypeError:
            pats = []
        if not pats or not all(isinstance(p, str) for p in pats):
            raise TypeError("modules: expected None, fnmatch pattern(s) (str or list of str) or a callable(name, module)")
        out = [(n, m) for n, m in lin if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    if not out:
        raise ValueError(f"modules: no nn.Linear (or transformers Conv1D) of the model matches {modules!r}")
    seen = {}
    for n, m in out:
        if id(m) in seen:
            raise ValueError(f"modules: {n!r} and {seen[id(m)]!r} are the same module (shared weights are not supported)")
        seen[id(m)] = n
    return out


def _check_untied(layers: Sequence[Tuple[str, nn.Linear]]) -> None:
    """Refuses selected layers whose weights overlap in memory (tied weights): each would be pruned
    against its own Hessian and the last write would silently discard the others' pruning."""
    spans = []
    for n, m in layers:
        w = m.weight
        if w.device.type == "meta" or not w.numel():
            continue
        extent = sum((d - 1) * st for d, st in zip(w.shape, w.stride())) + 1
        spans.append((w.device, w.data_ptr(), w.data_ptr() + extent * w.element_size(), n))
    spans.sort(key=lambda t: (str(t[0]), t[1]))
    for a, b in zip(spans, spans[1:]):
        if a[0] == b[0] and b[1] < a[2]:
            raise ValueError(f"modules: {a[3]!r} and {b[3]!r} share their weight (tied weights); prune_model prunes "
                             "each layer against its own inputs, so select only one of them")


def _check_not_tied_elsewhere(model: nn.Module, layers: Sequence[Tuple[str, nn.Linear]]) -> None:
    """Refuses a selected layer whose weight is also (or overlaps in memory) a parameter of a module
    that is not a Linear / Conv1D, e.g. a language-model head tied to the token embedding: pruning it
    would silently prune the embedding too, under the earlier layers that were pruned on the dense
    embedding's outputs. (A weight shared with another, unselected Linear is the caller's choice.)"""
    def foreign(pname: str) -> bool:
        owner, _, leaf = pname.rpartition(".")
        try:
            mod = model.get_submodule(owner) if owner else model
        except AttributeError:
            return True
        return not (leaf == "weight" and _prunable(mod))

    sel = {id(m.weight): n for n, m in layers}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in sel and pname != f"{sel[id(p)]}.weight" and foreign(pname):
            raise ValueError(f"modules: the weight of {sel[id(p)]!r} is tied to the parameter {pname!r} (e.g. a head "
                             "tied to the embedding); pruning it would prune that parameter too, so leave it out of "
                             "modules")

    spans = [(byte_span(m.weight), n) for n, m in layers if m.weight.device.type != "meta" and m.weight.numel()]
    for pname, p in model.named_parameters():
        if id(p) in sel or p.device.type == "meta" or not p.numel() or not foreign(pname):
            continue
        dev, lo, hi = byte_span(p)
        for (wdev, wlo, whi), n in spans:
            if dev == wdev and lo < whi and wlo < hi:
                raise ValueError(f"modules: the weight of {n!r} shares memory with the parameter {pname!r} (tied "
                                 "weights); pruning it would prune that parameter too, so leave it out of modules")


def _batches(batches) -> list:
    if isinstance(batches, (str, bytes)):  # iterated as characters, each passed to the model (session 42)
        raise TypeError(f"batches: expected an iterable of batches, got a {type(batches).__name__}")
    if isinstance(batches, (Tensor, Mapping)):
        raise TypeError("batches: expected an iterable of batches (a list of dicts, tuples or tensors), got a single "
                        f"{type(batches).__name__}")
    try:
        out = list(batches)
    except TypeError:
        raise TypeError(f"batches: expected an iterable of batches, got {type(batches).__name__}") from None
    if not out:
        raise ValueError("batches: no calibration batches")
    return out


def _to(x, dev):
    if isinstance(x, Tensor):
        return x.to(dev)
    if isinstance(x, Mapping):
        return {k: _to(v, dev) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, dev) for v in x)
    return x


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _forward(model: nn.Module, batch, dev) -> None:
    b = _to(batch, dev)
    if isinstance(b, Mapping):
        model(**b)
    elif isinstance(b, (tuple, list)):
        model(*b)
    else:
        model(b)


def _token_mask(batch, dev, key: str = "attention_mask") -> Optional[Tensor]:
    if isinstance(batch, Mapping) and batch.get(key) is not None:
        am = batch[key]
        if isinstance(am, Tensor):
            return am.to(dev) != 0
    return None


def _encoder_of(model: nn.Module) -> Optional[nn.Module]:
    """An encoder-decoder model's encoder (transformers' ``config.is_encoder_decoder`` with ``get_encoder()``), else
    None: its ``attention_mask`` is the encoder's padding, which says nothing of the decoder's positions."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    get = getattr(model, "get_encoder", None)
    enc = get() if callable(get) else None
    return enc if isinstance(enc, nn.Module) else None


def _first_tensor(out) -> Optional[Tensor]:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    t = getattr(out, "last_hidden_state", None)
    return t if isinstance(t, Tensor) else None


_dist, _dist_device, _gather_ints = _distributed.group, _distributed.device, _distributed.gather_ints


class DistributedPruneError(RuntimeError):
    """Another rank of a distributed ``prune_model`` / ``collect_hessians`` failed (refused its arguments, or
    raised in a calibration forward, a checkpoint or a layer's pruning): raised on every rank that did not fail
    itself, naming the failing ranks (those raise their own error), instead of leaving them waiting in the next
    collective until the process group times out."""


@contextlib.contextmanager
def _synced(what: str, after: str):
    """Run the body; under torch.distributed, every rank then learns whether any rank's body raised (one
    all_gather), so that no rank goes on to a collective the failed one never calls: the failing rank raises its
    own error with a note, the others :class:`DistributedPruneError`. Without a process group: as the body."""
    err = None
    try:
        yield
    except GeneratorExit:  # pragma: no cover - the generator closed, not the body failing
        raise
    except BaseException as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
        # a KeyboardInterrupt (or SystemExit) too (session 43): raised on one rank alone, it skipped this collective
        # and left the other ranks waiting in it until the process group timed out; it is re-raised as it is
        err = e
    _distributed.share_outcome(_dist(), err, what=what, after=after, other_error=DistributedPruneError)


def _same_weights_on_every_rank(group: Sequence[Tuple[str, nn.Linear]]) -> None:
    """Under torch.distributed, after a group pruned on every rank (each rank ran ``_synced``, so all reach this
    collective): rank 0's weights into every rank's model, one broadcast per layer on the group's device. Each rank
    prunes from the same all-reduced Hessians, but the factorisations on the calling thread (Cholesky,
    ``cholesky_inverse``, triangular solves) sum in an order that follows the thread count and the BLAS/LAPACK build
    (session 42: true OBS on a tiny GPT gave other weights, within 5e-7 relative, at 1 and 2 threads), so ranks with
    other thread counts or devices held other models. Rank 0 also writes the checkpoints, so a resumed run matches.
    Without a process group: nothing."""
    dist = _dist()
    if dist is None:
        return
    ddev = _dist_device(dist)
    with torch.no_grad():
        for _, mod in group:
            w = mod.weight
            buf = w.detach() if w.device == ddev and w.is_contiguous() else w.detach().to(ddev).contiguous()
            dist.broadcast(buf, src=0)
            if buf.data_ptr() != w.data_ptr():
                w.copy_(buf)


def _same_checkpoint_on_every_rank(ckpt: Optional["_Checkpoint"]) -> None:
    """Under torch.distributed with a checkpoint, once every rank opened it: every rank must see the same finished
    layers (one all_gather of a digest of them). A rank whose ``checkpoint_dir`` is another directory, or one on a
    node-local file system, resumed from another state than rank 0 (which writes the checkpoint): it ran the
    calibration forwards and the Hessians' all-reduces of layers the others loaded, so the ranks' collectives fell
    out of step and both waited until the process group timed out (session 43). Refused on every rank, before any
    layer is pruned."""
    dist = _dist()
    if dist is None or ckpt is None:
        return
    got = _gather_ints(dist, [_distributed._digest(ckpt.layers), len(ckpt.layers)])
    if len({g[0] for g in got}) > 1:
        raise CheckpointError(
            f"checkpoint_dir: the ranks see different checkpoints (finished layers on ranks 0..{len(got) - 1}: "
            f"{[g[1] for g in got]}; this rank, {dist.get_rank()}, opened {ckpt.dir!r}): every rank must pass the "
            "same directory, on a file system every rank sees (rank 0 writes it); nothing was pruned")


_PRUNE_AGREED = ("method", "pattern", "nnz", "damp", "sequential", "groups", "early_stop", "method_kwargs",
                 "layers", "checkpoint_dir", "resume")


def _synced_after(in_model: Sequence[str], ckpt) -> str:
    """What a distributed run stopped by another rank's failure leaves (the groups done before stay pruned)."""
    done = f"{len(in_model)} layer(s) of the groups done before are pruned in the model" if in_model else \
        "no layer was pruned in the model"
    return done + ("" if ckpt is None else " (and checkpointed: resume=True continues)")


def _agree_arguments(err: Optional[BaseException], settings: Optional[Dict[str, Any]], what: str,
                     names: Sequence[str] = _PRUNE_AGREED) -> None:
    """Under torch.distributed, the first collective (before any forward): every rank learns whether every rank
    accepted its arguments (and has calibration batches), and the settings in ``names`` must be the same on every
    rank (a rank pruning to another pattern, or with other layers, would silently hold another model).
    Without a process group, ``err`` is raised as it is."""
    _distributed.agree(_dist(), err, names, settings, what=what, job=f"the distributed {what}",
                       after="nothing was done", other_error=DistributedPruneError)


_rank = _distributed.rank


class Hessians(dict):
    """``{layer name: H (K, K) float32}`` with ``tokens``: ``{layer name: tokens accumulated}``."""

    tokens: Dict[str, int]


class _Collector:
    """Forward hooks accumulating ``X^T X`` (float32) for a set of Linear layers."""

    def __init__(self, layers: Sequence[Tuple[str, nn.Linear]], device=None):
        self.layers = list(layers)
        self.device = device
        self.H: Dict[str, Tensor] = {}
        self.n: Dict[str, int] = {}
        self.mask: Optional[Tensor] = None
        # encoder-decoder models (session 39): the batch's attention_mask is the encoder's padding. It masks the
        # encoder's layers and the decoder layers that read the encoder's output (cross-attention keys / values: the
        # very tensor the encoder returned); the decoder's other layers take decoder_attention_mask, or count every
        # row without one. Before, the encoder's mask was applied to any input of its shape, so a decoder as long
        # as the encoder lost its tokens at the encoder's padded positions.
        self.dec_mask: Optional[Tensor] = None
        self.enc_out: Optional[Tensor] = None
        self.decoder_side: set = set()  # names of hooked layers outside the encoder of an encoder-decoder model
        self.seen: set = set()
        self.handles: list = []

    def _mask_for(self, name: str, x: Tensor) -> Optional[Tensor]:
        if name not in self.decoder_side:
            return self.mask
        e = self.enc_out
        if e is not None and x.shape == e.shape and x.data_ptr() == e.data_ptr() and x.stride() == e.stride():
            return self.mask  # the encoder's output, read by a cross-attention key / value projection
        return self.dec_mask

    def _hook(self, name: str, k: int):
        def hook(mod, args, kwargs, out):
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, Tensor) or x.shape[-1] != k:
                return
            m = self._mask_for(name, x)
            if m is not None:
                if tuple(x.shape[:-1]) == tuple(m.shape):
                    x = x[m]
                elif x.dim() == 2 and x.shape[0] == m.numel():
                    x = x[m.reshape(-1)]
            x = x.detach().reshape(-1, k)
            h = self.H.get(name)
            if h is None:
                dev = self.device if self.device is not None else mod.weight.device
                h = self.H[name] = torch.zeros(k, k, dtype=torch.float32, device=dev)
                self.n[name] = 0
            x = x.to(device=h.device, dtype=torch.float32)
            h.addmm_(x.T, x)
            self.n[name] += int(x.shape[0])
            self.seen.add(name)
        return hook

    def __enter__(self):
        for name, mod in self.layers:
            self.handles.append(mod.register_forward_hook(self._hook(name, _in_features(mod)), with_kwargs=True))
        return self

    def stop_before(self, later: Sequence[nn.Module]) -> None:
        """End each forward pass at the first ``later`` module once every hooked layer has run."""
        want = {n for n, _ in self.layers}

        def pre(mod, args):
            if self.seen >= want:
                raise _Stop()

        for mod in later:
            self.handles.append(mod.register_forward_pre_hook(pre))

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def run(self, model: nn.Module, batches: list, bar=None) -> None:
        dev = _model_device(model)
        enc = _encoder_of(model)
        handle = None
        if enc is not None:
            inside = {id(m) for m in enc.modules()}
            self.decoder_side = {n for n, m in self.layers if id(m) not in inside}

            def grab(mod, args, out):
                self.enc_out = _first_tensor(out)

            handle = enc.register_forward_hook(grab)
        try:
            for b in batches:
                self.mask = _token_mask(b, dev)
                self.dec_mask = _token_mask(b, dev, "decoder_attention_mask") if enc is not None else None
                self.seen = set()
                try:
                    _forward(model, b, dev)
                except _Stop:
                    pass
                finally:
                    self.mask = self.dec_mask = self.enc_out = None
                if bar is not None:
                    bar.update(1)
        finally:
            if handle is not None:
                handle.remove()

    def result(self) -> Hessians:
        out = Hessians()
        out.tokens = {}
        for name, mod in self.layers:  # layers never reached: zero Hessian, 0 tokens
            if name not in self.H:
                dev = self.device if self.device is not None else mod.weight.device
                k = _in_features(mod)
                self.H[name] = torch.zeros(k, k, dtype=torch.float32, device=dev)
                self.n[name] = 0
        dist = _dist()
        if dist is not None:
            ddev = _dist_device(dist)
            for name, _ in self.layers:
                h = self.H[name]
                buf = h if h.device == ddev else h.to(ddev)
                dist.all_reduce(buf)
                if buf is not h:
                    h.copy_(buf)
            counts = torch.tensor([self.n[n] for n, _ in self.layers], dtype=torch.int64, device=ddev)
            dist.all_reduce(counts)
            for (name, _), c in zip(self.layers, counts.tolist()):
                self.n[name] = int(c)
        for name, _ in self.layers:
            out[name] = self.H[name]
            out.tokens[name] = self.n[name]
        return out


def _device_arg(device) -> Optional[torch.device]:
    """``device`` (None: each layer's weight device) as a torch.device, refused (ValueError naming it) before any
    forward pass: an unknown or unavailable device raised RuntimeError from inside the first forward hook, and
    ``"meta"`` accumulated Hessians holding no values (session 42)."""
    if device is None:
        return None
    dev = device_arg(device, desc="None or a torch device")
    if dev.type == "meta":
        raise ValueError("device: 'meta' tensors hold no values; expected None or a device with memory")
    return dev


def _bar(progress: bool, total: int, desc: str, unit: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


@torch.no_grad()
def collect_hessians(model: nn.Module, batches: Iterable, modules=None, device=None,
                     progress: bool = True) -> Hessians:
    """``H = X^T X`` (float32, summed over tokens, no scaling) of the inputs of every selected Linear.

    Args:
        model: called as ``model(**batch)`` for dict batches, ``model(*batch)`` for tuples/lists,
            else ``model(batch)``; batches are moved to the model's device.
        batches: calibration batches (iterated once). A dict batch with an ``attention_mask``
            (``(B, T)``, non-zero = real token) counts only real tokens, for layer inputs shaped
            ``(B, T, K)`` or ``(B*T, K)``; inputs of any other shape count all their rows. In an
            encoder-decoder model (transformers' ``config.is_encoder_decoder``) that mask is the
            encoder's: it applies to the encoder's layers and to the decoder layers that read the
            encoder's output (cross-attention keys / values); the decoder's other layers take the
            batch's ``decoder_attention_mask`` the same way, or count every row without one.
        modules: ``None`` (every ``nn.Linear`` and transformers ``Conv1D``), fnmatch pattern(s) on
            module names, or a ``callable(name, module) -> bool`` over those modules.
        device: where the Hessians are accumulated (default: each layer's weight device).
        progress: a tqdm bar over batches.

    Returns ``Hessians``, a dict ``{name: H}`` whose ``tokens`` attribute maps each name to the
    number of tokens accumulated (0, with a zero H, for a layer never called). Under an
    initialised ``torch.distributed`` process group, sums and counts are all-reduced over ranks.
    Hooks are removed on return, also on error. Activations are not inspected: a NaN / Inf one (or a
    product past float32's range) leaves NaN / Inf in that layer's H, which every pruner, and
    ``prune_model``'s report, refuses (ValueError naming H and the layer).
    """
    err, settings = None, None
    try:
        progress = flag(progress, "progress")  # "False" would draw a bar
        device = _device_arg(device)
        layers = _select_modules(model, modules)
        data = _batches(batches)
        settings = {"layers": [[n, list(m.weight.shape)] for n, m in layers]}
    except Exception as e:  # noqa: BLE001 - under torch.distributed, raised on every rank together
        err = e
    _agree_arguments(err, settings, "collect_hessians", ("layers",))
    bar = _bar(progress, len(data), "hessians", "batch")
    try:
        with _Collector(layers, device) as col:
            with _synced("collect_hessians: the calibration forward", "no Hessian was returned"):
                col.run(model, data, bar)
        return col.result()
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------- patterns and methods


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_UNSTR = re.compile(r"^\s*unstructured\s*:\s*([0-9.eE+-]+)\s*$")


def _check_pattern(pattern, nnz):
    if callable(pattern):
        if nnz is not None:
            _check_int(nnz, "nnz")
        return
    if not isinstance(pattern, str):
        raise TypeError("pattern: expected 'N:M', 'unstructured:<sparsity>' or a callable(name, weight) -> ScopeSpec")
    m = _NM.match(pattern)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if mm < 1 or n > mm:
            raise ValueError(f"pattern: {pattern!r}: need 0 <= N <= M, M >= 1")
        if nnz is not None and _check_int(nnz, "nnz") != n:
            raise ValueError(f"nnz: {nnz} contradicts pattern {pattern!r} (keeps {n} of {mm}); leave nnz=None")
        return
    u = _UNSTR.match(pattern)
    if u:
        try:
            s = float(u.group(1))
        except ValueError:
            s = -1.0
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"pattern: {pattern!r}: the sparsity must be in [0, 1]")
        if nnz is not None:
            raise ValueError(f"nnz: must be None with pattern {pattern!r} (the sparsity sets it)")
        return
    raise ValueError(f"pattern: expected 'N:M' (e.g. '2:4'), 'unstructured:<sparsity>' or a callable, got {pattern!r}")


def _check_pattern_fits(pattern, layers: Sequence[Tuple[str, nn.Linear]], method: Optional[str] = None,
                        kw: Optional[Dict[str, Any]] = None) -> None:
    """What a string pattern and the method need of every selected layer, checked for all layers before any work,
    so a misfit layer late in the model cannot stop a run after earlier groups were already pruned into the model:
    an ``"N:M"`` pattern needs the input features to be a multiple of M, and the methods that enumerate prune
    subsets per scope (``obs_local`` / ``obs_full``, ``true_obs`` with ``scoring="joint"``) need at most
    ``MAX_SUBSETS`` of them (``"unstructured:s"`` on a row of K inputs: C(K, floor(s K)))."""
    if not isinstance(pattern, str):
        return
    m = _NM.match(pattern)
    if m:
        mm = int(m.group(2))
        for name, mod in layers:
            k = _in_features(mod)
            if k % mm:
                raise ValueError(f"pattern: {pattern!r}: layer {name!r} has {k} input features, not a multiple of "
                                 f"{mm}")
    joint = method in ("obs_local", "obs_full") or (method == "true_obs" and (kw or {}).get("scoring") == "joint")
    if not joint:
        return
    from gradkit.obs.structured import MAX_SUBSETS
    for name, mod in layers:
        k = _in_features(mod)
        if m:
            gs, keep = int(m.group(2)), int(m.group(1))
        else:  # unstructured: one scope per row of k single-entry blocks (_scope_for's rule, on a 1 x k stand-in)
            gs = k
            keep = ScopeSpec(BlockSpec(torch.empty(1, k), (1, 1)), (1, -1)).sparsity_to_nnz(
                float(_UNSTR.match(pattern).group(1)))
        n_sub = math.comb(gs, gs - keep) if 0 < gs - keep else 1
        if n_sub > MAX_SUBSETS:
            raise ValueError(f"pattern: {pattern!r} with method={method!r}: layer {name!r} would need {n_sub} prune "
                             f"subsets per scope (C({gs}, {gs - keep})), more than MAX_SUBSETS={MAX_SUBSETS}; use "
                             "method='true_obs' (scoring='independent') or 'sparsegpt', or a pattern with smaller "
                             "scopes")


def _check_int(v, what: str) -> int:
    # numpy integers too (session 42: np.int64(2) was refused, where ScopeSpec and every pruner take it), as a
    # Python int (the checkpoint's JSON configuration cannot hold a numpy one)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{what}: expected an int, got {type(v).__name__}")
    v = int(v)
    if v < 0:
        raise ValueError(f"{what}: expected >= 0, got {v}")
    return v


# the keyword arguments each method takes through method_kwargs (the rest of its signature is set by prune_model)
_SET_BY_PRUNE_MODEL = ("inplace", "return_mask", "damp", "compensate")


def _method_options(method: str):
    """The function checking ``method``'s options (its signature: the options and their defaults), or None for a
    method that takes none beyond what prune_model sets."""
    from gradkit.obs import structured

    return {"sparsegpt": baselines._sparsegpt_options, "resolve": baselines._sparsegpt_options,
            "true_obs": structured._true_obs_options, "obs_local": structured._prune_options,
            "obs_full": structured._prune_options}.get(method)


def _check_method_kwargs(method: str, kw: Dict[str, Any]) -> None:
    """Every ``method_kwargs`` entry checked before any work (session 42): an unknown key or a bad value (say
    ``blocksize=0``) was refused only when the first layer was pruned, after the calibration forward, with
    ``checkpoint_dir`` already holding a ``progress.json`` whose configuration then refused the corrected rerun
    (CheckpointError). The values are checked by the method's own option check, which the method runs too."""
    import inspect

    check = _method_options(method)
    accepted = [] if check is None else [n for n in inspect.signature(check).parameters
                                         if n not in _SET_BY_PRUNE_MODEL]
    for key in kw:
        if not isinstance(key, str) or key not in accepted:
            raise TypeError(f"method_kwargs: {key!r} is not an argument of method {method!r} (it takes "
                            f"{', '.join(accepted) if accepted else 'none'})")
    if check is not None:
        check(**kw)


def _scope_for(pattern, nnz, name: str, w: Tensor) -> Tuple[ScopeSpec, int]:
    k = w.shape[1]
    if callable(pattern):
        got = pattern(name, w)
        if isinstance(got, tuple):
            if len(got) != 2:
                raise ValueError(f"pattern: the callable returned a {len(got)}-tuple for layer {name!r}, expected a ScopeSpec or (ScopeSpec, nnz)")
            scope, n = got
            n = _check_int(n, f"pattern({name!r}) nnz")
            if nnz is not None and n != nnz:  # session 40: was silently ignored (a string pattern refuses this)
                raise ValueError(f"nnz: {nnz} contradicts the nnz {n} that pattern returned for layer {name!r}; "
                                 "leave nnz=None when the callable returns (ScopeSpec, nnz)")
        else:
            scope, n = got, nnz
            if n is None:
                raise ValueError("nnz: required (blocks kept per scope) when pattern is a callable returning a ScopeSpec")
        if not isinstance(scope, ScopeSpec):
            raise TypeError(f"pattern: the callable returned a {type(scope).__name__} for layer {name!r}, expected a gradkit.scope.ScopeSpec")
        if obs_layout(scope).weight is not w:
            raise ValueError(f"pattern: the ScopeSpec for layer {name!r} must be built on the weight tensor passed to the callable")
        return scope, n
    m = _NM.match(pattern)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if k % mm:
            raise ValueError(f"pattern: {pattern!r}: layer {name!r} has {k} input features, not a multiple of {mm}")
        return ScopeSpec(BlockSpec(w, (1, 1)), (1, mm)), n
    s = float(_UNSTR.match(pattern).group(1))
    scope = ScopeSpec(BlockSpec(w, (1, 1)), (1, -1))
    return scope, scope.sparsity_to_nnz(s)  # gradkit.scope's rule: K - floor(s K) (not round's half-to-even)


def _prune_layer(method: str, scope: ScopeSpec, w: Tensor, H: Tensor, nnz: int, damp: float,
                 kw: Dict[str, Any]) -> Tensor:
    """Prunes the weight ``w`` that ``scope`` is built on; returns the pruned weight (a new tensor
    or ``w`` itself for the in-place StructuredOBS methods)."""
    if method == "sparsegpt":
        return baselines.sparsegpt(scope, H, nnz, damp=damp, **kw)
    if method == "resolve":
        _, keep = baselines.sparsegpt(scope, H, nnz, damp=damp, return_mask=True, **kw)
        return metrics.resolve(w, H, keep, damp=damp)
    if method == "magnitude":
        return baselines.magnitude(scope, nnz, **kw)
    if method == "obd":
        return baselines.obd(scope, H, nnz, damp=damp, **kw)
    from gradkit.obs.structured import (
        StructuredOBS,  # lazily: the driver does not need it otherwise
    )

    obs = StructuredOBS(scope, H, damp=damp)
    if method == "true_obs":
        obs.prune_true_obs(nnz, **kw)
    else:
        obs.prune(nnz, compensate="local" if method == "obs_local" else "full", **kw)
    return w


def _check_pattern_holds(scope: ScopeSpec, w: Tensor, nnz: int, name: str, method: str) -> None:
    lay = obs_layout(scope)
    alive = (w.reshape(-1)[lay.elems] != 0).any(-1).sum(-1)
    if lay.S and int(alive.max()) > nnz:
        raise RuntimeError(f"{method} left a scope of layer {name!r} with {int(alive.max())} > nnz={nnz} non-zero "
                           "blocks (a pruner defect; the model was not modified)")


# --------------------------------------------------------------------------- report


@dataclasses.dataclass
class LayerReport:
    """One pruned layer. ``error``: ``output_error(W_dense, W_pruned, H)`` on the calibration
    inputs the layer received (earlier groups already pruned); ``error_mask_only``: the same for
    the dense weights with the final mask applied and no update (what the compensation bought).
    ``density``: fraction of the weight's elements that are non-zero after pruning. All three read
    the weights as written into the model (cast to the layer's dtype, e.g. fp16 / bf16)."""

    name: str
    shape: Tuple[int, int]
    method: str
    pattern: str
    nnz: int
    blocks_per_scope: int
    density: float
    error: float
    error_mask_only: float
    tokens: int
    seconds: float
    resumed: bool = False

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerReport":
        if not isinstance(d, Mapping):  # session 42: None / an int raised "'NoneType' object is not iterable"
            raise CheckpointError(f"checkpoint: a layer report is not a dict, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - set(d) - {"resumed"}
        if missing:
            raise CheckpointError(f"checkpoint: a layer report lacks {sorted(missing)}")
        kw = {k: d[k] for k in fields if k in d}
        kw["shape"] = tuple(kw["shape"])
        return cls(**kw)


@dataclasses.dataclass
class PruneReport:
    """What ``prune_model`` did: one :class:`LayerReport` per layer, in pruning order."""

    method: str
    pattern: str
    layers: List[LayerReport] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    forward_seconds: float = 0.0
    skipped: List[str] = dataclasses.field(default_factory=list)  # selected layers that never ran

    def __getitem__(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def mean_error(self) -> float:
        return sum(r.error for r in self.layers) / len(self.layers) if self.layers else 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {"method": self.method, "pattern": self.pattern, "seconds": self.seconds,
                "forward_seconds": self.forward_seconds, "skipped": list(self.skipped),
                "layers": [r.to_dict() for r in self.layers]}

    def __str__(self) -> str:
        w = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{w}}  {'shape':>11}  {'density':>7}  {'error':>9}  {'mask-only':>9}  {'sec':>6}"]
        for r in self.layers:
            shp = f"{r.shape[0]}x{r.shape[1]}"
            lines.append(f"{r.name:<{w}}  {shp:>11}  {r.density:7.3f}  {r.error:9.3e}  {r.error_mask_only:9.3e}  "
                         f"{r.seconds:6.2f}{'  (resumed)' if r.resumed else ''}")
        lines.append(f"{self.method} {self.pattern}: {len(self.layers)} layers, mean error {self.mean_error:.4e}, "
                     f"{self.seconds:.1f} s ({self.forward_seconds:.1f} s in calibration forwards)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- checkpoints


def _digest(t: Tensor) -> str:
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _data_digest(batches: list) -> str:
    h = hashlib.sha256()

    def walk(x, key=""):
        if isinstance(x, Tensor):
            h.update(f"{key}:{_digest(x)};".encode())
        elif isinstance(x, Mapping):
            for k in sorted(x, key=str):
                walk(x[k], f"{key}.{k}")
        elif isinstance(x, (tuple, list)):
            for i, v in enumerate(x):
                walk(v, f"{key}[{i}]")
        else:
            h.update(f"{key}={x!r};".encode())

    for i, b in enumerate(batches):
        walk(b, f"#{i}")
    local = h.hexdigest()
    dist = _dist()
    if dist is None:
        return local
    parts = _gather_ints(dist, list(bytes.fromhex(local)), torch.uint8)
    return hashlib.sha256(b"".join(bytes(p) for p in parts)).hexdigest()


def _name_of(fn) -> str:
    return f"callable:{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _value_token(v, depth: int = 0) -> str:
    """A text that changes when ``v`` would make a pattern / groups callable behave differently, stable across
    processes: tensors by dtype, shape and a digest of their values; plain data by value (sets sorted);
    functions by their code, defaults and closure; other objects by type and their attributes, or by type
    alone when the only text torch / Python give is an address."""
    if depth > 8:
        return "..."
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        return repr(v)
    if isinstance(v, torch.Tensor):
        t = v.detach().to("cpu").contiguous()
        h = hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()[:16]
        return f"tensor({t.dtype},{tuple(t.shape)},{h})"
    if isinstance(v, (list, tuple)):
        return type(v).__name__ + "(" + ",".join(_value_token(x, depth + 1) for x in v) + ")"
    if isinstance(v, (set, frozenset)):
        return type(v).__name__ + "(" + ",".join(sorted(_value_token(x, depth + 1) for x in v)) + ")"
    if isinstance(v, dict):
        return "dict(" + ",".join(sorted(f"{_value_token(k, depth + 1)}:{_value_token(x, depth + 1)}"
                                         for k, x in v.items())) + ")"
    if isinstance(v, types.CodeType):
        return "code(" + v.co_code.hex() + "," + ",".join(v.co_names) + "," + \
            ",".join(_value_token(c, depth + 1) for c in v.co_consts) + ")"
    if isinstance(v, functools.partial):
        return "partial(" + ",".join(_value_token(x, depth + 1) for x in (v.func, v.args, v.keywords)) + ")"
    if isinstance(v, types.MethodType):
        return "method(" + _value_token(v.__func__, depth + 1) + "," + _value_token(v.__self__, depth + 1) + ")"
    if isinstance(v, types.FunctionType):
        cells = []
        for c in v.__closure__ or ():
            try:
                cells.append(c.cell_contents)
            except ValueError:  # an empty cell
                cells.append(None)
        return "fn(" + ",".join(_value_token(x, depth + 1) for x in
                                (v.__code__, v.__defaults__, v.__kwdefaults__, tuple(cells))) + ")"
    if isinstance(v, (types.BuiltinFunctionType, types.ModuleType, type)):
        return f"{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', getattr(v, '__name__', '?'))}"
    name = f"{type(v).__module__}.{type(v).__qualname__}"
    attrs = getattr(v, "__dict__", None)
    if isinstance(attrs, dict):
        return name + "(" + _value_token(attrs, depth + 1) + ")"
    r = repr(v)
    return name if " at 0x" in r else f"{name}({r})"


def _identity_of(fn) -> str:
    """How a checkpoint records a pattern / groups callable: its name (``_name_of``) and a digest of its code,
    defaults, closure and (for a callable object or a bound method) attributes, so that a resumed run with a
    different function under the same name (another lambda, a closure over other values, an edited body) is
    refused instead of mixing layers pruned two ways. The digest depends on the Python version (bytecode)."""
    try:
        token = _value_token(fn)
    except Exception:  # noqa: BLE001 - an object whose attributes cannot be read: its name alone
        return _name_of(fn)
    return f"{_name_of(fn)}#{hashlib.sha256(token.encode('utf-8', 'backslashreplace')).hexdigest()[:16]}"


_TMP_PREFIX = ".tmp-"


def _new_temp(d: str) -> str:
    """A new empty ``.tmp-*`` file in ``d`` with the mode ``open`` gives under the umask (``tempfile.mkstemp``'s
    0o600 made every checkpoint file private to its writer: a group-shared checkpoint could not be resumed by a
    colleague)."""
    import secrets

    for _ in range(1000):
        tmp = os.path.join(d, f"{_TMP_PREFIX}{secrets.token_hex(8)}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in {d}")  # pragma: no cover


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    d = os.path.dirname(path)
    tmp = _new_temp(d)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(d)  # make the rename itself durable (POSIX); not available everywhere


class _Checkpoint:
    def __init__(self, directory: str, config: Dict[str, Any], resume: bool, params: Dict[str, str]):
        self.dir = os.path.abspath(directory)
        self.config = config
        self.params = params  # digests of the model's parameters that pruning leaves alone
        self.saved_params: Any = None
        self.writer = _rank() == 0
        self.path = os.path.join(self.dir, PROGRESS_FILE)
        self.layers: Dict[str, Dict[str, Any]] = {}
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            raise CheckpointError(f"checkpoint_dir: {self.dir!r} exists and is not a directory")
        if resume and os.path.exists(self.path):
            self._load()
        if self.writer:
            os.makedirs(self.dir, exist_ok=True)
            self._remove_stale_temporaries()
            if not resume or not os.path.exists(self.path):
                self._flush()
        # (no barrier here: prune_model opens the checkpoint inside _synced, whose all_gather is one)

    def _remove_stale_temporaries(self) -> None:
        """Half-written ``.tmp-*`` files that a killed run (SIGKILL, power loss) left behind: never
        referenced by the progress file, removed so that they do not pile up."""
        for entry in os.listdir(self.dir):
            if entry.startswith(_TMP_PREFIX):
                try:
                    os.remove(os.path.join(self.dir, entry))
                except OSError:
                    pass

    def _load(self) -> None:
        try:  # a regular file (a FIFO blocks, a link to /dev/zero never ends) of at most 64 MiB, valid JSON
            state = parse_json(read_regular(self.path, 1 << 26, "checkpoint"), self.path, "checkpoint")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self.path!r} is unreadable or corrupt ({e}); delete the directory or "
                                  "pass resume=False to start over") from None
        if not isinstance(state, dict) or state.get("format") != _FORMAT or not isinstance(state.get("layers"), dict):
            raise CheckpointError(f"checkpoint {self.path!r} is not a gradkit prune_model progress file")
        if state.get("version") != _VERSION:
            raise CheckpointError(f"checkpoint {self.path!r}: unsupported version {state.get('version')!r}")
        old = state.get("config", {})
        if old != self.config:
            keys = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
            raise CheckpointError(f"checkpoint_dir {self.dir!r} holds a run with a different configuration (differs in: "
                                  f"{', '.join(keys)}); use another directory, or resume=False to start over")
        self.layers = state["layers"]
        self.saved_params = state.get("params")

    def _flush(self) -> None:
        state = {"format": _FORMAT, "version": _VERSION, "config": self.config, "layers": self.layers,
                 "params": self.params}
        text = json.dumps(state, indent=1, sort_keys=True)

        def write(p):
            with open(p, "w", encoding="utf-8") as f:
                f.write(text)

        _atomic_write(self.path, write)

    def save(self, index: int, name: str, w: Tensor, dense_digest: str, report: LayerReport) -> None:
        if not self.writer:
            return
        from gradkit._io import write_safetensors

        fname = f"layer_{index:04d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:120]}.safetensors"
        crc = {}
        _atomic_write(os.path.join(self.dir, fname), lambda p: crc.setdefault("v", write_safetensors(p, {"weight": w})))
        self.layers[name] = {"file": fname, "crc32": crc["v"], "dense": dense_digest, "pruned": _digest(w),
                             "report": report.to_dict()}
        self._flush()

    def load(self, name: str, like: Tensor) -> Tuple[Tensor, Dict[str, Any]]:
        e = self.layers[name]
        try:
            fname = e["file"]
            crc = int(e["crc32"])
            if not isinstance(fname, str) or os.path.basename(fname) != fname:
                raise ValueError("bad file name")
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: a crc32 of Infinity
            raise CheckpointError(f"checkpoint {self.path!r}: the entry of layer {name!r} is malformed") from None
        path = os.path.join(self.dir, fname)
        try:
            raw = read_regular(path, NO_LIMIT, "checkpoint", OSError)  # not a FIFO / device
        except OSError as err:
            raise CheckpointError(f"checkpoint: cannot read {path!r} for layer {name!r} ({err})") from None
        if zlib.crc32(raw) != crc:
            raise CheckpointError(f"checkpoint: {path!r} (layer {name!r}) is corrupt: its checksum does not match")
        from safetensors.torch import load as st_load

        try:
            t = st_load(raw).get("weight")
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint: {path!r} (layer {name!r}) is not valid safetensors ({err})") from None
        if t is None or tuple(t.shape) != tuple(like.shape) or t.dtype != like.dtype:
            raise CheckpointError(f"checkpoint: {path!r} holds no weight of shape {tuple(like.shape)} and dtype "
                                  f"{like.dtype} for layer {name!r}")
        if _digest(t) != e.get("pruned"):
            raise CheckpointError(f"checkpoint: {path!r} (layer {name!r}) does not match its recorded digest")
        return t, e


# --------------------------------------------------------------------------- prune_model


def _param_digests(model: nn.Module, layers: Sequence[Tuple[str, nn.Module]]) -> Dict[str, str]:
    """``{name: sha256}`` of every parameter except the pruned layers' weights (which pruning changes)."""
    skip = {id(m.weight) for _, m in layers}
    return {name: _digest(p) for name, p in model.named_parameters() if id(p) not in skip}


def _check_resumed_weight(name: str, mod: nn.Module, entry: Mapping[str, Any]) -> None:
    cur = _digest(mod.weight)
    if cur not in (entry.get("dense"), entry.get("pruned")):
        raise CheckpointError(f"checkpoint: the model's weight of layer {name!r} is neither the dense weight the "
                              "checkpointed run started from nor its pruned result (another model?); use another "
                              "directory or resume=False")


def _resumed_report(ckpt: "_Checkpoint", name: str, mod: nn.Module, entry: Mapping[str, Any]) -> LayerReport:
    """The checkpointed report of layer ``name``, checked (session 40: a malformed one used to raise a bare
    TypeError / KeyError mid-run, after earlier groups were written into the model, or was taken under another
    layer's name) to be well-formed and to describe this layer."""
    try:
        rep = LayerReport.from_dict(entry["report"])
        ok = (rep.name == name and tuple(rep.shape) == tuple(_out_in(mod.weight, mod).shape)
              and all(isinstance(getattr(rep, f), (int, float)) and not isinstance(getattr(rep, f), bool)
                      for f in ("density", "error", "error_mask_only", "seconds", "tokens", "nnz")))
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise CheckpointError(f"checkpoint {ckpt.path!r}: the report of layer {name!r} is malformed or describes "
                              "another layer")
    rep.resumed = True
    return rep


def _verify_resumable(ckpt: "_Checkpoint", ordered: Sequence[Tuple[str, nn.Module]]) -> None:
    """Every checkpointed layer: known, its file intact, and the model's weight the dense one it was
    pruned from (or its pruned result). Run before any work, so a checkpoint that cannot be resumed
    is refused with the model untouched rather than after some groups were loaded into it."""
    by = dict(ordered)
    unknown = [n for n in ckpt.layers if n not in by]
    if unknown:
        raise CheckpointError(f"checkpoint {ckpt.path!r} lists layers the run does not prune: {unknown[:5]}")
    for name, mod in ordered:
        if name in ckpt.layers:
            _, entry = ckpt.load(name, mod.weight)
            _check_resumed_weight(name, mod, entry)
            _resumed_report(ckpt, name, mod, entry)
    old, cur = ckpt.saved_params, ckpt.params
    if not isinstance(old, dict):
        raise CheckpointError(f"checkpoint {ckpt.path!r} records no digest of the model's other parameters")
    if old != cur:
        diff = sorted(k for k in set(old) | set(cur) if old.get(k) != cur.get(k))
        raise CheckpointError(f"checkpoint: the model differs from the checkpointed run's outside the pruned layers "
                              f"(parameters {diff[:5]}{' ...' if len(diff) > 5 else ''} differ or are missing); "
                              "another model? use another directory or resume=False")


def _failure_note(name: str, method: str, pattern_s: str, in_model: List[str], ckpt) -> str:
    if in_model:
        held = (f"the model holds the {len(in_model)} pruned layer(s) of the groups finished before it "
                f"({in_model[0]!r} ... {in_model[-1]!r})")
    else:
        held = "no layer of the model was modified"
    note = f"prune_model: raised while pruning layer {name!r} ({method}, {pattern_s}); its group was not written " \
           f"into the model; {held}"
    if ckpt is not None and ckpt.writer:
        note += f"; the checkpoint holds {len(ckpt.layers)} finished layer(s), resumable from {ckpt.dir!r}"
    elif ckpt is not None:  # (session 43: a rank other than 0, which writes no checkpoint, said it held none)
        note += f"; the checkpoint (written by rank 0) is resumable from {ckpt.dir!r}"
    return note


def _default_group(name: str) -> str:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return name


def _execution_order(model, layers, data) -> List[Tuple[str, nn.Linear]]:
    """The selected layers in the order they first run: the first batch's order, and a layer that first runs in a
    later batch (a mixture-of-experts expert no token of the first batch was routed to) placed right after the
    layer that ran before it in that batch. Later batches are run only while some selected layer has not run."""
    order: List[str] = []
    handles = []
    for name, mod in layers:
        def pre(m, a, name=name):
            if name not in seen:
                seen.add(name)
                batch_order.append(name)
        handles.append(mod.register_forward_pre_hook(pre))
    seen: set = set()
    dev = _model_device(model)
    try:
        for batch in data:
            batch_order: List[str] = []
            seen = set()
            _forward(model, batch, dev)
            known = set(order)
            for j, n in enumerate(batch_order):
                if n in known:
                    continue
                prev = next((batch_order[i] for i in range(j - 1, -1, -1) if batch_order[i] in known), None)
                order.insert(order.index(prev) + 1 if prev is not None else 0, n)
                known.add(n)
            if len(order) == len(layers):
                break
    finally:
        for h in handles:
            h.remove()
    by = dict(layers)
    return [(n, by[n]) for n in order]


def _agreed_order(layers, ordered) -> List[Tuple[str, nn.Linear]]:
    """Under torch.distributed, one execution order on every rank: each rank saw the layers its own batches
    ran (a data-dependent model, e.g. mixture-of-experts routing, may skip some on one rank), and every later
    collective (the Hessians' all_reduce, one per layer of a group) goes in group order, so ranks that disagreed
    would pair different layers' sums and then fall out of step. One all_gather of each layer's position (-1: did
    not run); the order is rank 0's, then the layers that ran only on other ranks (rank by rank, in their order)."""
    dist = _dist()
    if dist is None:
        return ordered
    names = [n for n, _ in layers]
    pos = {n: i for i, (n, _) in enumerate(ordered)}
    by, out, seen = dict(layers), [], set()
    for g in _gather_ints(dist, [pos.get(n, -1) for n in names]):
        for i in sorted((i for i in range(len(names)) if g[i] >= 0), key=lambda i: g[i]):
            if names[i] not in seen:
                seen.add(names[i])
                out.append((names[i], by[names[i]]))
    return out


@torch.no_grad()
def prune_model(model: nn.Module, batches: Iterable, pattern: Union[str, Callable] = "2:4", nnz: Optional[int] = None,
                method: str = "sparsegpt", damp: float = 0.01, modules=None, sequential: bool = True,
                checkpoint_dir: Optional[str] = None, resume: bool = True, progress: bool = True,
                method_kwargs: Optional[Dict[str, Any]] = None, groups: Union[str, Callable[[str], str]] = "block",
                callback: Optional[Callable[[LayerReport], None]] = None, early_stop: bool = True,
                device=None) -> PruneReport:
    """Prune a model's Linear layers to a structured pattern, layer by layer, with checkpoints.

    Args:
        model: the model (modified in place: each Linear's weight is replaced by its pruned version).
        batches: calibration batches, as for :func:`collect_hessians` (iterated once per group).
        pattern: ``"N:M"`` (N kept of every M consecutive inputs of each row, e.g. ``"2:4"``),
            ``"unstructured:<sparsity>"`` (each row keeps ``K - floor(sparsity K)`` weights, as
            ``ScopeSpec.sparsity_to_nnz``), or
            ``callable(name, weight) -> ScopeSpec`` (with ``nnz``) or ``-> (ScopeSpec, nnz)``,
            building the scope on the ``weight`` tensor it is given (a float copy of the layer's).
        nnz: blocks kept per scope; implied by a string pattern. With a callable returning
            ``(ScopeSpec, nnz)``, leave it None (a different value is refused, ValueError).
        method: ``"sparsegpt"``, ``"magnitude"``, ``"obd"``, ``"resolve"`` (SparseGPT's mask then
            the exact least-squares re-solve of :func:`gradkit.obs.metrics.resolve`, same ``damp``),
            or ``"true_obs"`` / ``"obs_local"`` / ``"obs_full"`` (``StructuredOBS.prune_true_obs`` /
            ``.prune(compensate="local" | "full")``).
        damp: damping passed to the method (relative below 1, absolute from 1).
        modules: which Linear layers (None: all; fnmatch patterns; or ``callable(name, module)``).
            transformers' ``Conv1D`` (GPT-2) counts as a Linear: it is pruned in the ``(out, in)``
            layout (N:M runs along its inputs) and written back transposed. Refused before any work:
            two selected layers sharing a weight, and a selected weight tied to a parameter of a
            module that is not a Linear (e.g. a head tied to the embedding).
        sequential: True: SparseGPT's order (each group's Hessians from a model whose earlier groups
            are pruned); False: every Hessian from the dense model in one pass, then all layers pruned.
        checkpoint_dir: directory for per-layer checkpoints and ``progress.json``; None: none.
        resume: continue a run found in ``checkpoint_dir`` (its configuration, the calibration data
            and the dense weights of done layers must match; else :class:`CheckpointError`; a
            ``pattern`` / ``groups`` callable counts as the same when its name and a digest of its
            code, defaults, closure values and attributes are: another lambda, a closure over other
            values or an edited body is refused). False: start over, overwriting it.
        progress: a tqdm bar over layers.
        method_kwargs: extra keyword arguments of the method (e.g. ``{"blocksize": 64}``).
        groups: ``"block"`` (layers grouped by the name prefix ending at the first numeric part,
            e.g. ``transformer.h.3``), ``"layer"`` (every layer alone: fully sequential), or
            ``callable(name) -> key``. Groups run in the order their first layer executes.
        callback: called with each layer's :class:`LayerReport` once it is done and checkpointed.
            An exception it raises stops the run (the checkpoint keeps that layer).
        early_stop: end each calibration forward once the group's layers have all run (at the
            first later selected layer), saving the rest of the model's forward. Turn off for
            models that call a layer again after a later one.
        device: where Hessians are accumulated and layers pruned (default: each weight's device).

    Arguments are checked before any work (an ``"N:M"`` pattern against every selected layer's
    input features too). On resume, every checkpointed layer (its file, and the model's weight being
    the dense weight it was pruned from or its pruned result) and the model's other parameters
    (embeddings, norms, biases: recorded by digest) are checked before any work, so a checkpoint that
    does not belong to the model is refused with the model untouched. Stale ``.tmp-*`` files of a
    killed run are removed.

    The layers of a group are written into the model together, after the whole group is pruned,
    so an interrupted group leaves its layers dense and a resumed run sees exactly the inputs of an
    uninterrupted one; groups finished before an error stay pruned in the model (and in the
    checkpoint). Calibration forwards run with the model in eval mode (no dropout); its mode is
    restored on return. Under ``torch.distributed`` every rank runs the same pruning on the
    all-reduced Hessians (each rank may hold a different shard of the calibration data) and only
    rank 0 writes checkpoints, so ``checkpoint_dir`` must be on a file system every rank sees. Returns a :class:`PruneReport`.
    """
    err, settings = None, None
    try:
        if method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
        _check_pattern(pattern, nnz)
        damp = metrics._check_damp(damp)
        if not isinstance(method_kwargs, (Mapping, type(None))):
            raise TypeError(f"method_kwargs: expected a dict, got {type(method_kwargs).__name__}")
        kw = dict(method_kwargs or {})
        for key in _SET_BY_PRUNE_MODEL:
            if key in kw:
                raise ValueError(f"method_kwargs: {key!r} is set by prune_model")
        _check_method_kwargs(method, kw)
        if nnz is not None:
            nnz = _check_int(nnz, "nnz")  # a Python int (a numpy one is taken too)
        if groups not in ("block", "layer") and not callable(groups):
            raise ValueError(f"groups: expected 'block', 'layer' or a callable(name) -> key, got {groups!r}")
        if callback is not None and not callable(callback):
            raise TypeError("callback: expected a callable(LayerReport)")
        sequential, resume = flag(sequential, "sequential"), flag(resume, "resume")
        progress, early_stop = flag(progress, "progress"), flag(early_stop, "early_stop")
        device = _device_arg(device)
        if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir: expected None or a path, got {type(checkpoint_dir).__name__}")
        if checkpoint_dir is not None and os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
            # before the calibration forward and the hashing of every batch (the checkpoint opens after them)
            raise CheckpointError(f"checkpoint_dir: {os.path.abspath(checkpoint_dir)!r} exists and is not a "
                                  "directory")
        layers = _select_modules(model, modules)
        _check_untied(layers)
        _check_not_tied_elsewhere(model, layers)
        _check_pattern_fits(pattern, layers, method, kw)
        data = _batches(batches)
        settings = {
            "method": method, "pattern": pattern if isinstance(pattern, str) else _identity_of(pattern), "nnz": nnz,
            "damp": damp, "sequential": sequential,
            "groups": groups if isinstance(groups, str) else _identity_of(groups), "early_stop": early_stop,
            "method_kwargs": json.loads(json.dumps(kw, sort_keys=True, default=repr)),
            "layers": [[n, list(m.weight.shape), str(m.weight.dtype)] for n, m in layers],
            "checkpoint_dir": checkpoint_dir is not None, "resume": resume}
    except Exception as e:  # noqa: BLE001 - under torch.distributed, raised on every rank together
        err = e
    _agree_arguments(err, settings, "prune_model")
    t_start = time.perf_counter()
    modes = [(m, m.training) for m in model.modules()]  # each module's own mode (a frozen BatchNorm in eval, a
    model.eval()                                        # Monte Carlo dropout in train) comes back as it was
    try:
        return _prune_model(model, data, layers, pattern, nnz, method, damp, sequential, checkpoint_dir, resume,
                            progress, kw, groups, callback, early_stop, device, t_start, settings)
    finally:
        for m, mode in modes:
            m.training = mode


def _prune_model(model, data, layers, pattern, nnz, method, damp, sequential, checkpoint_dir, resume, progress, kw,
                 groups, callback, early_stop, device, t_start, settings) -> PruneReport:
    with _synced("prune_model: the calibration forward", "nothing was pruned"):
        seen = _execution_order(model, layers, data)
    ordered = _agreed_order(layers, seen)
    never = [n for n, _ in layers if n not in {m for m, _ in ordered}]
    if not ordered:
        raise ValueError("modules: none of the selected layers ran during a forward pass of the calibration batches")
    keyf = _default_group if groups == "block" else ((lambda n: n) if groups == "layer" else groups)
    group_list: List[List[Tuple[str, nn.Linear]]] = []
    index: Dict[Any, int] = {}
    for name, mod in ordered:
        key = keyf(name)
        if key not in index:
            index[key] = len(group_list)
            group_list.append([])
        group_list[index[key]].append((name, mod))
    if not sequential:
        group_list = [ordered]

    pattern_s = pattern if isinstance(pattern, str) else _name_of(pattern)
    # the checkpoint's configuration: prune_model's agreed settings (computed once there: the callables' identities,
    # the method's keyword arguments as JSON; early_stop shapes the Hessians too, a layer called again after a later
    # one losing those calls), then the layers in execution order and the calibration data
    config = {k: settings[k] for k in ("method", "pattern", "nnz", "damp", "sequential", "groups", "early_stop",
                                       "method_kwargs")}
    config.update({
        "layers": [[n, list(m.weight.shape), str(m.weight.dtype)] for n, m in ordered],
        "calibration": _data_digest(data),
        "gradkit_obs_driver": _VERSION,
    })
    ckpt = None
    with _synced("prune_model: opening checkpoint_dir", "nothing was pruned"):
        if checkpoint_dir is not None:
            # everything pruning leaves alone (embeddings, norms, biases, unselected layers) shapes the
            # calibration inputs: a model that differs there is another model, even with equal weights
            ckpt = _Checkpoint(checkpoint_dir, config, resume, _param_digests(model, ordered))
        if ckpt is not None and ckpt.layers:
            _verify_resumable(ckpt, ordered)  # before any work: a bad checkpoint leaves the model untouched
    _same_checkpoint_on_every_rank(ckpt)
    report = PruneReport(method=method, pattern=pattern_s)
    position = {n: i for i, (n, _) in enumerate(ordered)}
    in_model: List[str] = []  # layers written (pruned) into the model by this call
    bar = _bar(progress, len(ordered), f"prune {method} {pattern_s}", "layer")
    try:
        for gi, group in enumerate(group_list):
            todo = [(n, m) for n, m in group if ckpt is None or n not in ckpt.layers]
            hs: Optional[Hessians] = None
            if todo:
                t0 = time.perf_counter()
                if bar is not None:
                    bar.set_postfix_str(f"calibrating {keyf(todo[0][0]) if sequential else 'all'}")
                with _Collector(todo, device) as col:
                    if early_stop and sequential:
                        col.stop_before([m for g in group_list[gi + 1:] for _, m in g])
                    with _synced("prune_model: a calibration forward", _synced_after(in_model, ckpt)):
                        col.run(model, data)
                hs = col.result()
                report.forward_seconds += time.perf_counter() - t0
            pending: List[Tuple[nn.Linear, Tensor]] = []
            with _synced("prune_model: pruning a group", _synced_after(in_model, ckpt)):
                for name, mod in group:
                    if ckpt is not None and name in ckpt.layers:
                        w, entry = ckpt.load(name, mod.weight)
                        _check_resumed_weight(name, mod, entry)
                        rep = _resumed_report(ckpt, name, mod, entry)
                        pending.append((mod, w))
                        report.layers.append(rep)
                        if bar is not None:
                            bar.update(1)
                        continue
                    if bar is not None:
                        bar.set_postfix_str(name)
                    H = hs[name]
                    dense = mod.weight.detach()
                    dense_digest = _digest(dense) if ckpt is not None else ""
                    dense_oi = _out_in(dense, mod)  # (out, in), as the pruners expect
                    wdev = device if device is not None else dense.device
                    wdt = torch.float64 if dense.dtype == torch.float64 else torch.float32
                    w = dense_oi.to(device=wdev, dtype=wdt, copy=True).contiguous()
                    t0 = time.perf_counter()
                    try:
                        scope, n_keep = _scope_for(pattern, nnz, name, w)
                        out = _prune_layer(method, scope, w, H.to(wdev), n_keep, damp, kw)
                        seconds = time.perf_counter() - t0
                        if not all_finite(out):
                            raise RuntimeError(f"{method} produced non-finite weights for layer {name!r}")
                        _check_pattern_holds(scope, out, n_keep, name, method)
                        final = metrics.cast_finite(out, dense.dtype, f"{method}: the pruned weights of layer {name!r} "
                                                    "overflow the layer's dtype", device=dense.device)
                        # the report's errors read H too (a NaN activation makes it NaN; "magnitude" never reads it
                        # before): inside the try, so that this error names the layer as well
                        wd = dense_oi.to(device=wdev, dtype=wdt)
                        # session 40: the report describes the weights written into the model (cast to the layer's
                        # dtype), not the float32 result before the cast: in fp16 / bf16 a compensated weight can round
                        # to zero (fp16 subnormals), so density, error and the mask of error_mask_only read `final`
                        wp = final.to(device=wdev, dtype=wdt)
                        rep = LayerReport(
                            name=name, shape=tuple(dense_oi.shape), method=method, pattern=pattern_s, nnz=n_keep,
                            blocks_per_scope=obs_layout(scope).gs, density=float((wp != 0).float().mean()),
                            error=metrics.output_error(wd, wp, H=H.to(wdev)),
                            error_mask_only=metrics.output_error(wd, wd.masked_fill(wp == 0, 0), H=H.to(wdev)),
                            tokens=int(hs.tokens[name]), seconds=seconds)
                    except Exception as err:  # say which layer and what the model holds
                        if hasattr(err, "add_note"):  # Python >= 3.11 (requires-python is 3.10)
                            err.add_note(_failure_note(name, method, pattern_s, in_model, ckpt))
                        raise
                    final = _out_in(final, mod).contiguous()  # back to the module's layout
                    if ckpt is not None:
                        ckpt.save(position[name], name, final, dense_digest, rep)
                    pending.append((mod, final))
                    report.layers.append(rep)
                    if bar is not None:
                        bar.update(1)
                    if callback is not None:
                        callback(rep)
            # the group's layers enter the model together, once every rank pruned the group (session 43: inside
            # the synced step, a rank whose own pruning worked wrote the group into its model although another rank
            # failed in it, so the ranks held different models, and its error said it held only the groups before).
            # An interrupt between two copies (a KeyboardInterrupt is raised between bytecodes, so after a whole
            # copy) left part of the group pruned and the rest dense (session 43); the group is pruned and
            # checkpointed already, so its remaining copies are made before the interrupt propagates: the model
            # holds all of a group or none of it
            i = 0
            try:
                for i, (mod, w) in enumerate(pending):
                    mod.weight.copy_(w)
            except BaseException:
                for mod, w in pending[i:]:
                    mod.weight.copy_(w)
                raise
            in_model.extend(n for n, _ in group)
            del hs
            _same_weights_on_every_rank(group)
    finally:
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - t_start
    report.skipped = never
    return report
