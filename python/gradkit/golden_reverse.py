"""Reverse golden parameters (issue 7): the mask whose zeroing changes a model's outputs most.

``reverse_golden_masks`` accumulates ``|grad|`` over chunks of batches and, after each chunk,
scores a candidate mask (the top-p% of the accumulated importance of every tensor) by
``KL(P_original || P_masked)`` on a fixed set of evaluation batches, where the masked model has
the selected weights zeroed in place (and restored bit-exactly afterwards). The candidate
percentage ``p`` moves around the target by one of five fluctuation strategies; the best
candidate is finally reduced (or extended) to exactly the target percentage by importance.

Also here: numerically safe log-prob helpers (``full_logprobs``, ``logprobs_for_fixed_ids``),
``kl_divergence`` over full distributions, ``layer_filter`` (the last N% of transformer
blocks by parameter name) and ``zeroed_params`` / ``masked_kl`` to score any mask.

Models are anything whose ``forward(input_ids[, attention_mask=...])`` returns logits (B, T, V)
or an object with ``.logits`` (Hugging Face style). Batches are mappings with ``input_ids``
(B, T) and optionally ``attention_mask`` (B, T, 1 = real token).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gradkit._rules import as_written, flag, floor_count, not_meta

Batch = Mapping[str, torch.Tensor]

__all__ = [
    "full_logprobs", "logprobs_for_fixed_ids", "kl_divergence", "layer_filter",
    "FluctuationStrategy", "AdaptiveSinusoidal", "MomentumBased", "ExplorationDecay",
    "HarmonicOscillator", "ChaosDriven", "STRATEGIES",
    "zeroed_params", "masked_kl", "ReverseGoldenResult", "reverse_golden_masks",
]


def _golden():
    """``gradkit.golden`` (imported on use: it re-exports this module's names)."""
    from gradkit import golden
    return golden


def _check_percent(value: object, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 100:  # numpy scalars too
        raise ValueError(f"{arg}: expected a number in (0, 100], got {value!r}")
    return as_written(value)  # a numpy float32 percent as written, as golden.percent_to_k reads it


# ----------------------------------------------------------------------------- log-probs and KL

def _check_ids(input_ids: object, attention_mask: object, name: str = "input_ids") -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or \
            input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(f"{name}: expected an integer tensor (B, T), got "
                         f"{type(input_ids).__name__} {getattr(input_ids, 'shape', '')}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask: expected a tensor of shape {tuple(input_ids.shape)}, "
                         f"got {type(attention_mask).__name__} {getattr(attention_mask, 'shape', '')}")
    for what, t in ((name, input_ids), ("attention_mask", attention_mask)):
        not_meta(t, what)


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    out = model(input_ids) if attention_mask is None else model(input_ids, attention_mask=attention_mask)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise TypeError(f"model: forward must return logits (B, T, V) or an object with .logits for "
                        f"input_ids {tuple(input_ids.shape)}; got {type(out).__name__} "
                        f"{getattr(logits, 'shape', '')}")
    return logits


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


def full_logprobs(model: nn.Module, input_ids: torch.Tensor,
                  attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next-token log-distributions ``(B, T, V)``: row ``t`` is ``log P(token t+1 | tokens <= t)``.

    ``log_softmax`` runs in at least fp32: fp32 for fp16 / bf16 / fp32 logits, fp64 for fp64 logits
    (an fp64 model is not rounded to fp32, which would blur small KLs by ~1e-7 absolute).
    Gradients flow unless the caller disables them.
    """
    _check_ids(input_ids, attention_mask)
    logits = _logits(model, input_ids, attention_mask)
    return torch.log_softmax(logits.to(_at_least_fp32(logits.dtype)), dim=-1)


def logprobs_for_fixed_ids(model: nn.Module, input_ids: torch.Tensor,
                           attention_mask: Optional[torch.Tensor] = None,
                           labels_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Log-probs ``(B, T-1)`` (fp32, fp64 for fp64 logits) of the given next tokens: entry ``t`` is ``log P(input_ids[:, t+1])``
    under the logits at position ``t``.

    Excluded positions hold 0 (so ``.sum(-1)`` is a sequence log-likelihood): those whose
    position ``t`` or target ``t+1`` is padding (``attention_mask`` 0), and those whose target
    is not selected by ``labels_mask`` (B, T; e.g. 1 on response tokens only). Computed as
    ``logit[target] - logsumexp(logits)`` in fp32 (fp64 for fp64 logits), without a (B, T, V)
    log-softmax copy beyond the widened logits themselves.
    """
    _check_ids(input_ids, attention_mask)
    if labels_mask is not None and (not isinstance(labels_mask, torch.Tensor)
                                    or labels_mask.shape != input_ids.shape):
        raise ValueError(f"labels_mask: expected a tensor of shape {tuple(input_ids.shape)}, "
                         f"got {type(labels_mask).__name__} {getattr(labels_mask, 'shape', '')}")
    not_meta(labels_mask, "labels_mask")
    logits = _logits(model, input_ids, attention_mask)[:, :-1]
    logits = logits.to(_at_least_fp32(logits.dtype))
    targets = input_ids[:, 1:].to(device=logits.device, dtype=torch.long)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[-1]):
        raise ValueError(f"input_ids: token ids must lie in [0, {logits.shape[-1]}) (the logits' vocabulary)")
    lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    keep = torch.ones_like(lp, dtype=torch.bool)
    if attention_mask is not None:
        am = attention_mask.to(lp.device) != 0
        keep &= am[:, :-1] & am[:, 1:]
    if labels_mask is not None:
        keep &= labels_mask.to(lp.device)[:, 1:] != 0
    return lp.masked_fill(~keep, 0.0)


def kl_divergence(ref_logprobs: torch.Tensor, logprobs: torch.Tensor, mask: Optional[torch.Tensor] = None,
                  reduction: str = "mean") -> torch.Tensor:
    """``KL(P_ref || P) = sum_v P_ref(v) * (log P_ref(v) - log P(v))`` over the last dimension.

    ``ref_logprobs``, ``logprobs``: full log-distributions ``(..., V)`` (any float dtype; computed
    and accumulated in at least fp32). Vocabulary entries with ``P_ref = 0`` (``-inf`` or an
    underflowing log-prob) contribute 0, also where ``logprobs`` is ``-inf`` there; a ``-inf``
    of ``logprobs`` where ``P_ref > 0`` gives ``+inf`` (the true KL). Per-position values are
    clamped at 0 against rounding; a position with a NaN in either input (wherever it sits in V), or a
    ``+inf`` log-prob of ``logprobs`` where ``P_ref > 0`` (not a log-probability), is NaN.
    ``mask``: ``(...)`` bool or 0/1, the positions to include (default all).
    ``reduction``: ``"mean"`` over included positions (0-dim; an error if there are none),
    ``"sum"`` (0-dim), or ``"none"`` (``(...)``, 0 at excluded positions).
    """
    for arg, t in (("ref_logprobs", ref_logprobs), ("logprobs", logprobs)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 1:
            raise ValueError(f"{arg}: expected a floating tensor (..., V), got "
                             f"{type(t).__name__} {getattr(t, 'dtype', '')} {getattr(t, 'shape', '')}")
        not_meta(t, arg)
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs: shape {tuple(logprobs.shape)} differs from ref_logprobs' "
                         f"{tuple(ref_logprobs.shape)}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ref_logprobs.shape[:-1]):
        raise ValueError(f"mask: expected a tensor of shape {tuple(ref_logprobs.shape[:-1])}, got "
                         f"{type(mask).__name__} {getattr(mask, 'shape', '')}")
    if mask is not None:
        not_meta(mask, "mask")
        # session 42: any non-zero entry counted as included, so a 0.5, a NaN or a complex mask (scores passed as the
        # mask) was taken silently; the documented mask is bool or 0 / 1
        if mask.dtype != torch.bool and (mask.is_complex() or bool(((mask != 0) & (mask != 1)).any())):
            raise ValueError(f"mask: expected a bool or 0/1 mask, got a {mask.dtype} tensor with other values")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    dtype = torch.promote_types(torch.promote_types(ref_logprobs.dtype, logprobs.dtype), torch.float32)
    ref, other = ref_logprobs.to(dtype), logprobs.to(device=ref_logprobs.device, dtype=dtype)
    p = ref.exp()
    # a NaN of `other` where P_ref = 0 still reaches the sum (NaN - x, times 0: NaN)
    diff = torch.where((p > 0) | torch.isnan(other), ref - other, torch.zeros((), dtype=dtype, device=ref.device))
    per = (p * diff).sum(-1)
    # -inf only from a +inf log-prob of `other` where P_ref > 0: NaN, not clamped to 0 like rounding
    per = torch.where(per == -math.inf, math.nan, per.clamp_min(0.0))
    if mask is not None:
        keep = mask.to(ref.device) != 0
        per = per.masked_fill(~keep, 0.0)
        count = int(keep.sum())
    else:
        count = per.numel()
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if count == 0:
        raise ValueError("mask: no positions included, the mean KL is undefined")
    return per.sum() / count


# ----------------------------------------------------------------------------- layer filter

# the first (leftmost) match names the block: T5's "encoder.block.3.layer.1..." is block 3 (its sub-layer 1 is no block)
DEFAULT_LAYER_PATTERN = r"(?:^|\.)(h|layers|blocks|block|layer)\.(\d+)\."


def layer_filter(names: Iterable[str], last_percent: float,
                 pattern: Union[str, re.Pattern[str]] = DEFAULT_LAYER_PATTERN) -> List[str]:
    """The names (input order) that belong to the last ``last_percent``% of transformer blocks.

    A name's block index is the regex's group ``idx`` if it has one, else its last group
    of its first match (``transformer.h.3.attn...`` -> 3, T5's ``encoder.block.3.layer.1...`` -> 3).
    ``max(1, floor(n_blocks * last_percent / 100))`` blocks with the
    highest indices are kept (GoldenParams' ``filter_params_by_layer_range``). Names the pattern does
    not match (embeddings, final norm, head) are excluded. Blocks are identified by index alone: an encoder and a decoder
    stack with the same indices are treated as one stack.
    """
    last_percent = _check_percent(last_percent, "last_percent")
    if isinstance(pattern, str):
        try:
            rx = re.compile(pattern)
        except re.error as e:  # session 42: re.error (no ValueError) naming no argument
            raise ValueError(f"pattern: {pattern!r} is not a valid regular expression ({e})") from None
    elif isinstance(pattern, re.Pattern) and isinstance(pattern.pattern, str):
        rx = pattern
    else:  # session 42: None / an int raised AttributeError, a bytes pattern TypeError
        raise ValueError(f"pattern: expected a regular expression (a str or a compiled str pattern), got {pattern!r}")
    if rx.groups == 0:
        raise ValueError(f"pattern: needs a capturing group for the block index, got {rx.pattern!r}")
    group: Union[str, int] = "idx" if "idx" in rx.groupindex else rx.groups
    if isinstance(names, (str, bytes)):
        raise ValueError(f"names: expected an iterable of parameter names, got a single {type(names).__name__} "
                         f"{names!r}")
    try:
        names = list(names)
    except TypeError:  # session 42: "'int' object is not iterable", naming no argument
        raise ValueError(f"names: expected an iterable of parameter names, got {type(names).__name__}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ValueError(f"names: expected parameter names (str), got a {type(bad[0]).__name__} "
                         "(for named_parameters(), pass [n for n, _ in model.named_parameters()])")
    block_of: Dict[str, int] = {}
    for name in names:
        m = rx.search(name)
        if m is not None:
            try:
                block_of[name] = int(m.group(group))
            except (TypeError, ValueError):
                raise ValueError(f"pattern: block-index group of {rx.pattern!r} matched "
                                 f"{m.group(group)!r} in {name!r}, not an integer") from None
    blocks = sorted(set(block_of.values()))
    if not blocks:
        raise ValueError(f"names: no name matches the block pattern {rx.pattern!r}")
    # GoldenParams' filter_params_by_layer_range: max(1, int(layers * layer_pct / 100)), a floor (unlike its
    # top-k% count, which ceils: percent_to_k)
    keep = set(blocks[-max(1, min(len(blocks), floor_count(len(blocks), float(last_percent), 100))):])
    return [n for n in names if n in block_of and block_of[n] in keep]


# ----------------------------------------------------------------------------- fluctuation strategies

class FluctuationStrategy:
    """Moves the candidate percentage around ``target`` between iterations of the search.

    ``next_percent(iteration, improvement)`` takes the index of the iteration just scored and its
    KL improvement over the best KL before it, and returns the next candidate percentage, clipped
    to ``[min_percent, max_percent]`` (default ``[target/2, min(100, 2*target)]``); ``current``
    holds the last value (initially ``target``). ``amplitude`` is the typical excursion as a
    fraction of ``span = max_percent - min_percent``. Deterministic given ``seed`` (randomness,
    where used, comes from a private ``torch.Generator``). The subclasses' own numbers (``phase``,
    ``momentum`` in [0, 1], ``min_delta``, ``temperature`` >= 0, ``cooling`` >= 0, ``k`` >= 0, ``damping``,
    ``r`` in [0, 4]) must be finite (``ValueError`` naming the argument), and a NaN proposal is a
    ``ValueError``, not a silent ``min_percent``.
    """

    name: ClassVar[str] = ""

    def __init__(self, target: float, *, amplitude: float = 0.3, frequency: float = 0.1,
                 min_percent: Optional[float] = None, max_percent: Optional[float] = None, seed: int = 0) -> None:
        self.target = _check_percent(target, "target")
        for arg, v in (("min_percent", min_percent), ("max_percent", max_percent)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise ValueError(f"{arg}: expected None or a number, got {v!r}")
        lo = self.target * 0.5 if min_percent is None else float(min_percent)
        hi = min(100.0, self.target * 2.0) if max_percent is None else float(max_percent)
        if not 0 < lo <= self.target <= hi <= 100:
            raise ValueError(f"min_percent/max_percent: need 0 < min <= target <= max <= 100, "
                             f"got {lo}, {self.target}, {hi}")
        # numbers.Real: numpy scalars too (np.float32 is no float subclass; np.float64 is)
        if isinstance(amplitude, bool) or not isinstance(amplitude, numbers.Real) \
                or not math.isfinite(amplitude) or amplitude < 0:
            raise ValueError(f"amplitude: expected a finite number >= 0, got {amplitude!r}")
        if isinstance(frequency, bool) or not isinstance(frequency, numbers.Real) or not math.isfinite(frequency):
            raise ValueError(f"frequency: expected a finite number, got {frequency!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -2 ** 63 <= seed < 2 ** 64:
            # int(1.7) would have seeded with 1 silently
            raise ValueError(f"seed: expected an int in [-2**63, 2**64), got {seed!r}")
        self.min_percent, self.max_percent = lo, hi
        self.span = hi - lo
        self.amplitude, self.frequency = float(amplitude), float(frequency)
        self.current = self.target
        self._gen = torch.Generator().manual_seed(int(seed))

    def next_percent(self, iteration: int, improvement: float) -> float:
        # session 42: int(iteration) took 2.7 as 2 and "3" as 3, float(improvement) took "0.5"; None raised a TypeError
        # naming nothing. numpy numbers and a one-element real tensor (a KL difference) are taken.
        if isinstance(iteration, bool) or not isinstance(iteration, numbers.Integral):
            raise ValueError(f"iteration: expected an int, got {iteration!r}")
        if isinstance(improvement, torch.Tensor) and improvement.numel() == 1 and not improvement.is_meta \
                and not improvement.is_complex() and improvement.dtype != torch.bool:
            improvement = improvement.item()
        if isinstance(improvement, bool) or not isinstance(improvement, numbers.Real):
            raise ValueError(f"improvement: expected a number, got {improvement!r}")
        improvement = float(improvement)
        if math.isnan(improvement):
            raise ValueError("improvement: NaN")
        raw = self._propose(int(iteration), improvement)
        if math.isnan(raw):  # min/max below would silently turn a NaN into min_percent
            raise ValueError(f"{type(self).__name__}: proposed a NaN percentage at iteration {iteration} "
                             "(overflowing amplitude or state?)")
        self.current = min(self.max_percent, max(self.min_percent, raw))
        return self.current

    def _propose(self, iteration: int, improvement: float) -> float:
        raise NotImplementedError

    @staticmethod
    def _real(value: object, arg: str, lo: Optional[float] = None, hi: Optional[float] = None) -> float:
        """``value`` as a float: a finite real number in ``[lo, hi]`` (a NaN would otherwise pin every
        proposal to ``min_percent`` silently)."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                or (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f" in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]" \
                if lo is not None or hi is not None else ""
            raise ValueError(f"{arg}: expected a finite number{bounds}, got {value!r}")
        return float(value)

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self._gen, dtype=torch.float64))


class AdaptiveSinusoidal(FluctuationStrategy):
    """``target + a * sin(phase + 2*pi*frequency*iteration) * span`` with the amplitude adapted to
    progress, ``a = amplitude * (1 + tanh(10 * improvement))``."""

    name = "adaptive_sinusoidal"

    def __init__(self, target: float, *, phase: float = 0.0, **kw) -> None:
        super().__init__(target, **kw)
        self.phase = self._real(phase, "phase")

    def _propose(self, iteration: int, improvement: float) -> float:
        a = self.amplitude * (1.0 + math.tanh(10.0 * improvement))
        return self.target + a * math.sin(self.phase + 2 * math.pi * self.frequency * iteration) * self.span


class MomentumBased(FluctuationStrategy):
    """``velocity = momentum * velocity + (1 - momentum) * direction`` (direction +1 after an
    improvement above ``min_delta``, else -1); the percentage moves by
    ``velocity * amplitude * span * 0.1``."""

    name = "momentum_based"

    def __init__(self, target: float, *, momentum: float = 0.8, min_delta: float = 0.0, **kw) -> None:
        super().__init__(target, **kw)
        self.momentum, self.min_delta = self._real(momentum, "momentum", 0.0, 1.0), self._real(min_delta, "min_delta")
        self.velocity = 0.0

    def _propose(self, iteration: int, improvement: float) -> float:
        direction = 1.0 if improvement > self.min_delta else -1.0
        self.velocity = self.momentum * self.velocity + (1.0 - self.momentum) * direction
        return self.current + self.velocity * self.amplitude * self.span * 0.1


class ExplorationDecay(FluctuationStrategy):
    """Random excursions that shrink as the temperature cools (``T *= cooling`` each call) and as
    improvements grow: ``target + (2u - 1) * exp(-|improvement| / (T + 1e-8)) * amplitude * span``,
    ``u`` uniform in [0, 1) from the seeded generator."""

    name = "exploration_decay"

    def __init__(self, target: float, *, temperature: float = 1.0, cooling: float = 0.995, **kw) -> None:
        super().__init__(target, **kw)
        self.temperature = self._real(temperature, "temperature", 0.0)
        self.cooling = self._real(cooling, "cooling", 0.0)

    def _propose(self, iteration: int, improvement: float) -> float:
        self.temperature *= self.cooling
        exploration = math.exp(-abs(improvement) / (self.temperature + 1e-8))
        return self.target + (2.0 * self._uniform() - 1.0) * exploration * self.amplitude * self.span


class HarmonicOscillator(FluctuationStrategy):
    """A damped spring around the target: ``force = -k (x - target) - damping * v``, ``v += force``,
    ``x += v``. It starts at the target with velocity ``amplitude * span * sqrt(k)`` (an undamped
    excursion of ``amplitude * span``); deterministic, ``seed`` unused."""

    name = "harmonic_oscillator"

    def __init__(self, target: float, *, k: float = 0.1, damping: float = 0.05, **kw) -> None:
        super().__init__(target, **kw)
        self.k, self.damping = self._real(k, "k", 0.0), self._real(damping, "damping")
        self.velocity = self.amplitude * self.span * math.sqrt(self.k)

    def _propose(self, iteration: int, improvement: float) -> float:
        force = -self.k * (self.current - self.target) - self.damping * self.velocity
        self.velocity += force
        return self.current + self.velocity


class ChaosDriven(FluctuationStrategy):
    """Logistic map ``x <- r x (1 - x)`` (``r`` = 3.9, chaotic), ``x0`` drawn in [0.05, 0.95) from
    the seeded generator; the percentage is ``target + (2x - 1) * amplitude * span``."""

    name = "chaos_driven"

    def __init__(self, target: float, *, r: float = 3.9, **kw) -> None:
        super().__init__(target, **kw)
        self.r = self._real(r, "r", 0.0, 4.0)  # the logistic map stays in [0, 1] for r in [0, 4]
        self.state = 0.05 + 0.9 * self._uniform()

    def _propose(self, iteration: int, improvement: float) -> float:
        self.state = self.r * self.state * (1.0 - self.state)
        return self.target + (2.0 * self.state - 1.0) * self.amplitude * self.span


STRATEGIES: Dict[str, type] = {cls.name: cls for cls in (
    AdaptiveSinusoidal, MomentumBased, ExplorationDecay, HarmonicOscillator, ChaosDriven)}


# ----------------------------------------------------------------------------- masked scoring

@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every submodule's own training flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _restored_on_error(obj: object, active: bool = True) -> Iterator[None]:
    """Inside: ``obj``'s attributes are put back as they were if the block raises (with ``active``), so that
    a failed call leaves the caller's object as it found it. An object without a ``__dict__`` or with an
    attribute that cannot be deep-copied is left as it is."""
    saved = None
    if active:
        try:
            saved = copy.deepcopy(vars(obj))
        except Exception:  # noqa: BLE001 - see the docstring
            saved = None
    try:
        yield
    except BaseException:
        if saved is not None:
            vars(obj).clear()
            vars(obj).update(saved)
        raise


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def _aliases(model: nn.Module) -> Dict[str, str]:
    """{alias: name} for parameters registered under more than one name (tied weights): ``named_parameters()``
    lists such a tensor once, under its first name."""
    first: Dict[int, str] = {id(p): n for n, p in model.named_parameters()}
    return {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n}


def _check_masks(model: nn.Module, masks: Mapping[str, object]) -> List[Tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, dense bool mask on any device) per entry of ``masks``. A mask may be a bool tensor, a
    ``gradkit.golden.Bitmask`` (a ``MaskSet``'s entries) or a torch sparse COO tensor (GoldenParams' saved
    masks; stored non-zero values are set); a tied parameter may be named by any of its names."""
    _check_model(model)
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks: expected a mapping name -> bool tensor, got {type(masks).__name__}")
    named = dict(model.named_parameters(remove_duplicate=False))
    unknown = [n for n in masks if n not in named]
    if unknown:
        raise ValueError(f"masks: unknown parameter names {unknown[:5]}")
    Bitmask = _golden().Bitmask
    out = []
    for n, m in masks.items():
        shape = tuple(named[n].shape)
        not_meta(m, f"masks[{n!r}]")
        if isinstance(m, Bitmask) or (isinstance(m, torch.Tensor) and m.layout == torch.sparse_coo):
            try:
                m = Bitmask.coerce(m, shape, what=f"masks[{n!r}]").to_bool()
            except (TypeError, ValueError) as e:
                raise ValueError(str(e) if str(e).startswith("masks") else f"masks[{n!r}]: {e}") from None
        elif not isinstance(m, torch.Tensor) or m.layout != torch.strided or m.dtype != torch.bool \
                or tuple(m.shape) != shape:
            raise ValueError(f"masks: {n!r} needs a bool tensor (or a Bitmask / sparse COO mask) of shape {shape}, "
                             f"got {type(m).__name__} {getattr(m, 'dtype', '')} {getattr(m, 'shape', '')}")
        out.append((named[n], m))
    return out


@contextlib.contextmanager
def zeroed_params(model: nn.Module, masks: Mapping[str, object]) -> Iterator[None]:
    """Zero the masked entries of the named parameters in place (under ``no_grad``) inside the
    block; on exit (also on an exception) the saved values are written back, bit for bit.

    ``masks``: {name: mask of the parameter's shape}, a mask being a bool tensor, a
    ``gradkit.golden.Bitmask`` (so a ``MaskSet`` from ``golden_masks`` / ``load_goldenparams``) or a
    torch sparse COO tensor (GoldenParams' saved masks); a tied parameter may be named by any of its
    names. Every mask is checked before the first write."""
    checked = _check_masks(model, masks)
    saved: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for p, mask in checked:
                m = mask.to(p.device)
                saved.append((p, m, p[m]))  # advanced indexing copies
                p.masked_fill_(m, 0)
        yield
    finally:
        with torch.no_grad():
            for p, m, values in reversed(saved):
                p.masked_scatter_(m, values)


def _unpack(batch: object, device: torch.device, arg: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(f"{arg}: each batch must be a mapping with 'input_ids', got {type(batch).__name__}")
    ids, am = batch["input_ids"], batch.get("attention_mask")
    try:
        _check_ids(ids, am)
    except ValueError as e:
        raise ValueError(f"{arg}: {e}") from None
    return ids.to(device), (None if am is None else am.to(device))


def _iterable(batches: object, arg: str) -> Iterator[object]:
    """``iter(batches)``, a ValueError naming ``arg`` for a non-iterable (session 42: "'NoneType' object is not
    iterable", naming nothing)."""
    try:
        return iter(batches)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"{arg}: expected an iterable of batches, got {type(batches).__name__}") from None


def _kl_against(model: nn.Module, refs: Sequence[torch.Tensor],
                inputs: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor]]], arg: str = "eval_batches") -> float:
    """Mean KL(ref || model) over all included positions of all batches (no grad, caller's mode)."""
    total, count = 0.0, 0
    for ref, (ids, am) in zip(refs, inputs):
        lp = full_logprobs(model, ids, am)
        total += float(kl_divergence(ref, lp, mask=None if am is None else am != 0, reduction="sum"))
        count += ids.numel() if am is None else int((am != 0).sum())
    if count == 0:
        raise ValueError(f"{arg}: no real tokens (every attention_mask is 0)")
    return total / count


def masked_kl(model: nn.Module, masks: Mapping[str, object], batches: Iterable[Batch]) -> float:
    """``KL(P_original || P_masked)`` (mean over the real tokens of ``batches``) where the masked
    model has the ``masks`` entries zeroed (masks as :func:`zeroed_params` takes them); in eval mode,
    no autograd graph, weights restored bit-exactly and modes restored after. NaN when either model's
    logits hold a NaN at a real token, +inf when the masked model gives log-prob -inf to a token the
    original gives P > 0 (:func:`kl_divergence`'s rules)."""
    checked = _check_masks(model, masks)
    masks = {n: m for n, (_, m) in zip(masks, checked)}  # dense bool, converted once
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = [_unpack(b, device, "batches") for b in _iterable(batches, "batches")]
    if not inputs:
        raise ValueError("batches: empty")
    with _eval_mode(model), torch.no_grad():
        refs = [full_logprobs(model, ids, am) for ids, am in inputs]
        with zeroed_params(model, masks):
            return _kl_against(model, refs, inputs, "batches")


# ----------------------------------------------------------------------------- the search

@dataclass
class ReverseGoldenResult:
    """``masks``: {name: bool tensor of the parameter's shape}, exactly ``percent_to_k(numel, percent)``
    entries each; ``kl``: KL(original || masked) of those masks on the evaluation batches;
    ``history``: ``(iteration, candidate percent, candidate KL)`` per chunk;
    ``summary``: {name: {"numel", "active", "density"}};
    ``no_grad``: the selected parameters that no batch's loss reached (``torch.autograd.grad`` gave
    None every time): they have no importance to rank, so, as in GoldenParams, no mask and no summary."""

    masks: Dict[str, torch.Tensor]
    kl: float
    history: List[Tuple[int, float, float]]
    summary: Dict[str, Dict[str, float]]
    percent: float
    strategy: str
    no_grad: List[str] = field(default_factory=list)


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """The torch RNG of the CPU (and of ``device`` if it is a CUDA device) seeded with ``seed``
    inside, the caller's RNG states restored after."""
    if device.type != "cuda":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)  # this device only
        yield


def _next_token_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) over positions whose token and target are both real."""
    ids, am = batch["input_ids"], batch.get("attention_mask")
    logits = _logits(model, ids, am)[:, :-1].float()
    targets = ids[:, 1:].to(device=logits.device, dtype=torch.long)
    if am is not None:
        real = am.to(logits.device) != 0
        targets = targets.masked_fill(~(real[:, :-1] & real[:, 1:]), -100)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss / (targets != -100).sum().clamp_min(1)


def _exact_k(candidate: torch.Tensor, importance: torch.Tensor, k: int) -> torch.Tensor:
    """k entries: the candidate's entries by importance first, then the most important others
    (ties lowest flat position first)."""
    inside = candidate.reshape(-1)
    order = torch.sort(importance.reshape(-1), descending=True, stable=True).indices
    order = order[torch.sort(inside[order].to(torch.uint8), descending=True, stable=True).indices]
    out = torch.zeros_like(inside)
    out[order[:k]] = True
    return out.reshape(candidate.shape)


def _select(model: nn.Module, named: Mapping[str, nn.Parameter], params: Optional[Iterable[str]]) -> List[str]:
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
        if not names:
            raise ValueError("params: the model has no parameter that requires grad")
        return names
    names = [params] if isinstance(params, str) else list(params)
    if not names:
        raise ValueError("params: empty selection")
    unknown = [n for n in names if n not in named]
    if unknown:
        aliases = _aliases(model)
        tied = [f"{n!r} is tied to {aliases[n]!r}" for n in unknown if isinstance(n, str) and n in aliases]
        if tied:
            raise ValueError(f"params: {'; '.join(tied[:5])} (a parameter shared under several names is "
                             "selected, and its mask returned, under its first name)")
        raise ValueError(f"params: unknown parameter names {unknown[:5]}")
    frozen = [n for n in names if not named[n].requires_grad]
    if frozen:
        raise ValueError(f"params: parameters that do not require grad {frozen[:5]}")
    if len(set(names)) != len(names):
        raise ValueError("params: duplicate names")
    return names


def reverse_golden_masks(
    model: nn.Module,
    batches: Iterable[Batch],
    percent: float,
    strategy: Union[str, FluctuationStrategy] = "adaptive_sinusoidal",
    *,
    eval_batches: Optional[Iterable[Batch]] = None,
    chunk_size: int = 4,
    amplitude: float = 0.3,
    frequency: float = 0.1,
    params: Optional[Iterable[str]] = None,
    seed: int = 0,
    loss_fn: Optional[Callable[[nn.Module, Batch], torch.Tensor]] = None,
    progress: bool = True,
) -> ReverseGoldenResult:
    """Search for the ``percent``% mask per tensor whose zeroing maximises KL(original || masked).

    Per chunk of ``chunk_size`` batches: ``|grad|`` of ``loss_fn(model, batch)`` (default: mean
    next-token cross-entropy over real tokens) is added to fp32 accumulators of the selected
    parameters (``params``, default all that require grad; see ``layer_filter``) with
    ``torch.autograd.grad``, so no ``.grad`` is written or left behind and no graph outlives a
    batch. The candidate mask is ``gradkit.golden.topk_mask`` of the accumulated importance at
    the strategy's current percentage (the first at ``percent``), scored by ``KL(original ||
    masked)`` (mean over the real tokens of ``eval_batches``, default the first chunk, with the
    original log-distributions computed once and cached: B*T*V*4 bytes per eval batch). The best
    candidate is then cut to exactly ``percent_to_k(numel, percent)`` entries per tensor by
    final accumulated importance (its own entries first, then the most important others) and
    scored again (``result.kl``).

    ``strategy``: a name in ``STRATEGIES`` (built with ``amplitude``, ``frequency``, ``seed`` and
    the default bounds) or a ``FluctuationStrategy`` whose ``target`` is ``percent``. An instance
    is advanced in place (it holds the search's final state afterwards), so passing the same
    instance to a second call continues from there: pass a fresh one (or a ``copy.deepcopy``
    taken before) to repeat a search exactly.
    ``seed`` also seeds the torch RNG the gradient passes draw from (dropout in a model left in
    training mode), inside a forked RNG state: the same inputs and ``seed`` give the same masks,
    and the caller's global RNG state is left untouched.
    A selected parameter that receives no gradient in any batch (unused by ``loss_fn``) gets no mask
    (it is listed in ``result.no_grad``, with a ``RuntimeWarning``); none receiving one is a ``ValueError``.
    Tied parameters are selected once, under ``named_parameters()``'s (first) name.
    Gradient passes run in the model's own mode, scoring in eval mode; modes, ``requires_grad``
    and (bit-exactly) the weights are as before afterwards. Bad arguments raise ``ValueError``
    before the model is touched; NaN importance raises ``ValueError`` naming the parameter.
    """
    _check_model(model)
    percent = _check_percent(percent, "percent")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    chunk_size = int(chunk_size)  # numpy integers too, as seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if not -2 ** 63 <= seed < 2 ** 64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"seed: expected an int in [-2**63, 2**64), got {seed!r}")
    seed = int(seed)  # numpy integers too
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"loss_fn: expected None or a callable(model, batch) -> scalar loss, got {loss_fn!r}")
    try:  # this function's rule: every bad argument is a ValueError
        progress = flag(progress, "progress")
    except TypeError as e:
        raise ValueError(str(e)) from None
    if isinstance(strategy, FluctuationStrategy):
        if strategy.target != percent:
            raise ValueError(f"strategy: its target {strategy.target} differs from percent {percent}")
        strat, strategy_name = strategy, strategy.name or type(strategy).__name__
    elif isinstance(strategy, str) and strategy in STRATEGIES:
        strat = STRATEGIES[strategy](percent, amplitude=amplitude, frequency=frequency, seed=seed)
        strategy_name = strategy
    else:
        raise ValueError(f"strategy: expected one of {sorted(STRATEGIES)} or a FluctuationStrategy, "
                         f"got {strategy!r}")
    named = dict(model.named_parameters())
    selected = _select(model, named, params)
    device = named[selected[0]].device
    loss_fn = _next_token_loss if loss_fn is None else loss_fn

    try:
        total = math.ceil(len(batches) / chunk_size)  # type: ignore[arg-type]
    except TypeError:
        total = None
    stream = _iterable(batches, "batches")
    first = list(itertools.islice(stream, chunk_size))
    if not first:
        raise ValueError("batches: empty")
    for b in first:
        _unpack(b, device, "batches")
    evals = [_unpack(b, device, "eval_batches")
             for b in (first if eval_batches is None else _iterable(eval_batches, "eval_batches"))]
    if not evals:
        raise ValueError("eval_batches: empty")

    with _eval_mode(model), torch.no_grad():
        refs = [full_logprobs(model, ids, am) for ids, am in evals]

    def score(masks: Mapping[str, torch.Tensor]) -> float:
        with _eval_mode(model), torch.no_grad(), zeroed_params(model, masks):
            return _kl_against(model, refs, evals)

    topk_mask, percent_to_k = _golden().topk_mask, _golden().percent_to_k
    tensors = [named[n] for n in selected]
    acc = {n: torch.zeros(named[n].shape, dtype=torch.float32, device=named[n].device) for n in selected}
    history: List[Tuple[int, float, float]] = []
    got_grad: set = set()
    best_kl, best_masks = -math.inf, None
    current = percent
    chunks = itertools.chain([first], iter(lambda: list(itertools.islice(stream, chunk_size)), []))
    # a caller's strategy instance is advanced in place: a search that fails puts it back as it was
    with _restored_on_error(strat, strat is strategy):
        with _seeded_rng(seed, device), \
                tqdm(total=total, disable=not progress, desc="reverse golden", unit="chunk") as bar:
            for it, chunk in enumerate(chunks):
                for batch in chunk:
                    ids, am = _unpack(batch, device, "batches")
                    moved = {**batch, "input_ids": ids} if am is None else \
                        {**batch, "input_ids": ids, "attention_mask": am}
                    with torch.enable_grad():
                        loss = loss_fn(model, moved)
                        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                            raise ValueError("loss_fn: must return a scalar tensor that requires grad")
                        grads = torch.autograd.grad(loss.reshape(()), tensors, allow_unused=True)
                    for n, g in zip(selected, grads):
                        if g is not None:
                            acc[n].add_(g.detach().abs().float())
                            got_grad.add(n)
                    del loss, grads
                for n, a in acc.items():
                    if bool(torch.isnan(a).any()):
                        raise ValueError(f"params: NaN gradient importance for {n!r}")
                # a parameter no gradient has reached yet has no importance to rank: it is not masked
                candidate = {n: topk_mask(a, current) for n, a in acc.items() if n in got_grad}
                kl = score(candidate)
                if math.isnan(kl):
                    raise ValueError(f"model: the KL of the iteration-{it} candidate ({current:.6g}%) is NaN "
                                     "(non-finite logits with the selected weights zeroed?)")
                history.append((it, current, kl))
                # an infinite KL (the masked model gives log-prob -inf to a token the original gives
                # P > 0) equal to an infinite best is no improvement, not inf - inf = NaN
                improvement = 0.0 if kl == best_kl else kl - max(best_kl, 0.0)
                if kl > best_kl or best_masks is None:
                    best_kl, best_masks = kl, candidate
                current = strat.next_percent(it, improvement)
                bar.update(1)
                bar.set_postfix(percent=f"{history[-1][1]:.3g}", kl=f"{kl:.4g}", best=f"{best_kl:.4g}")

        no_grad = [n for n in selected if n not in got_grad]
        if len(no_grad) == len(selected):
            raise ValueError(f"loss_fn: no selected parameter received a gradient in any batch "
                             f"(params: {selected[:5]}{' ...' if len(selected) > 5 else ''})")
        final = {n: _exact_k(best_masks[n] if n in best_masks else torch.zeros_like(acc[n], dtype=torch.bool),
                             acc[n], percent_to_k(acc[n].numel(), percent))
                 for n in selected if n in got_grad}
        summary = {}
        for n, m in final.items():
            active = int(m.sum())
            summary[n] = {"numel": m.numel(), "active": active, "density": active / m.numel() if m.numel() else 0.0}
        kl = score(final)
    if no_grad:
        warnings.warn(f"reverse_golden_masks: {len(no_grad)} selected parameter(s) received no gradient from "
                      f"loss_fn in any batch and have no mask (result.no_grad): {no_grad[:5]}",
                      RuntimeWarning, stacklevel=2)
    return ReverseGoldenResult(masks=final, kl=kl, history=history, summary=summary,
                               percent=percent, strategy=strategy_name, no_grad=no_grad)
