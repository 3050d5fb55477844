"""Random-projection compression of gradients (``gradkit.projection``).

Projection matrices come from a counter-based generator: entry ``(row, col)`` of R (k x D) is a
pure function of ``(seed, row, col)`` (splitmix64 words; see
``gradkit.kernels.reference.projection`` for the exact definition), so R is never stored, and it
does not depend on batch size, tiling, chunking, matrix shape, thread count or device.
Rademacher entries ``+-1/sqrt(k)`` are bit-identical on every backend (reference, C++ CPU, Triton,
CUDA); Gaussian entries ``N(0,1)/sqrt(k)`` agree within 1 ulp of fp32.

* :func:`derive_seed` -- a per-module, per-side generator seed from a user seed (blake2b, stable
  across processes and Python versions), so adding a module changes nothing for the others.
* :func:`projection_matrix` -- the explicit matrix (or any sub-block of it).
* :func:`project` -- flat projection (B, D) -> (B, k), D up to ~1e9, streamed in column chunks
  from a tensor, a numpy array / memmap, or a callable yielding chunks; never a D x k matrix.
* :func:`factored_project` -- ``L G_b R^T`` for the per-example gradient ``G_b = sum_t g_bt a_bt^T``
  of a Linear layer, from its input activations and output gradients, projecting each side first
  (G is never formed, except with :class:`AdamNormalizer`, which needs it: chunked within a budget).

NaN / Inf policy: values are not inspected (that would cost a pass over the data); a NaN or Inf
in an input propagates to every output entry it touches. Masked (padding) tokens are excluded
with ``where``, so whatever they hold (NaN included) never reaches the output. A normaliser's
second moments (and its eps) are checked once when it is built: finite and >= 0 (ValueError naming
the field), since one bad entry would reach every projected entry of every example.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch

from gradkit import ops
from gradkit.ops import _flag, _int
from gradkit._rules import dense, device_arg
from gradkit.kernels.reference.projection import f64_row_scale
from gradkit.kernels.reference.scope import is_fake

__all__ = ["KINDS", "derive_seed", "projection_matrix", "project", "factored_project", "AdafactorNormalizer",
           "AdamNormalizer", "MATRIX_CACHE_BYTES", "clear_matrix_cache"]

KINDS = {"rademacher": 0, "gaussian": 1}
_SEED_MASK = (1 << 63) - 1
_DEFAULT_CHUNK_BYTES = 64 << 20
_F32_MAX = float(torch.finfo(torch.float32).max)
_F32_TINY = float(torch.finfo(torch.float32).tiny)  # 2**-126


def _kind(kind) -> int:
    if isinstance(kind, str) and kind.lower() in KINDS:
        return KINDS[kind.lower()]
    if isinstance(kind, numbers.Integral) and not isinstance(kind, bool) and kind in (0, 1):
        return int(kind)  # a numpy integer too, as every integer argument
    raise ValueError(f"kind: expected 'rademacher' or 'gaussian', got {kind!r}")


def _pos_int(v, what: str) -> int:
    v = _int(v, what)
    if v <= 0:
        raise ValueError(f"{what}: must be positive, got {v}")
    if v > _SEED_MASK:  # past int64: the ops' schemas (and torch's sizes) cannot take it
        raise ValueError(f"{what}: must be below 2^63, got {v}")
    return v


def _device(device) -> torch.device:
    """``device`` as a torch.device, or a ValueError naming it."""
    return device_arg(device)


def _check_moments_tensor(t: torch.Tensor, what: str) -> None:
    dense(t, what)
    if t.is_meta:
        raise ValueError(f"{what}: a meta tensor holds no second moments to normalise by")


def _seed(seed) -> int:
    seed = _int(seed, "seed")
    if not 0 <= seed <= _SEED_MASK:
        raise ValueError(f"seed: must be a non-negative 63-bit integer, got {seed} (use derive_seed for others)")
    return int(seed)


def derive_seed(seed: int, name: str = "", side: str = "") -> int:
    """A 63-bit non-negative generator seed for (user seed, module name, side).

    blake2b (8-byte digest) of ``"gradkit.projection/<seed>/<len(name)>:<name>/<side>"``:
    stable across processes, machines and Python versions (never Python's ``hash``), and
    independent for every (seed, name, side) triple. Any Python int seed is accepted.
    """
    seed = _int(seed, "seed")  # a numpy integer keys as the int it holds
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    if not isinstance(side, str):
        raise TypeError(f"side: expected a str, got {type(side).__name__}")
    # surrogatepass: a name holding a lone surrogate (from os.fsdecode of a non-UTF-8 byte) keys like any other;
    # every other str encodes as plain UTF-8, so existing seeds are unchanged
    msg = f"gradkit.projection/{seed}/{len(name)}:{name}/{side}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") & _SEED_MASK


def projection_matrix(rows: int, cols: int, seed: int = 0, kind: str = "rademacher", dtype: torch.dtype = torch.float32,
                      device="cpu", row0: int = 0, col0: int = 0, k: Optional[int] = None) -> torch.Tensor:
    """``R[row0:row0+rows, col0:col0+cols]`` of the (k x D) projection matrix keyed on ``seed``.

    Entries are ``+-1/sqrt(k)`` (Rademacher) or ``N(0,1)/sqrt(k)`` (Gaussian); the scale depends
    only on ``k``, the full output dimension (default ``rows``; required when ``row0 > 0``), so any
    sub-block is an exact slice of the full matrix.
    """
    # numpy integers are taken as ints (and checked like them: the row range against k below)
    rows, cols, row0, col0 = _int(rows, "rows"), _int(cols, "cols"), _int(row0, "row0"), _int(col0, "col0")
    if rows < 0:
        raise ValueError(f"rows: must be non-negative, got {rows}")
    if cols > _SEED_MASK:
        raise ValueError(f"cols: must be below 2^63, got {cols}")
    # session 42: a block past int64's byte count was torch's RuntimeError ("Storage size calculation overflowed")
    if rows * cols * (dtype.itemsize if isinstance(dtype, torch.dtype) else 1) > _SEED_MASK:
        raise ValueError(f"rows, cols: a {rows} x {cols} block holds more bytes than a tensor can (2^63)")
    device = _device(device)
    if k is None:
        if row0:
            raise ValueError("k: required when row0 > 0 (the scale 1/sqrt(k) is that of the full matrix)")
        if rows == 0:
            raise ValueError("rows: must be positive when k is not given (k defaults to rows)")
        k = rows
    k = _pos_int(k, "k")
    if row0 + rows > k:
        raise ValueError(f"rows: row0 + rows = {row0} + {rows} exceeds k = {k} (the matrix has k rows)")
    return ops.projection_matrix(rows, cols, _seed(seed), _kind(kind), k, row0, col0, dtype=dtype,
                                 device=device)


# --------------------------------------------------------------------------- flat projection


def _as_tensor(chunk, what: str) -> torch.Tensor:
    if isinstance(chunk, torch.Tensor):
        t = chunk
    else:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            np = None
        if np is None or not isinstance(chunk, np.ndarray):
            raise TypeError(f"{what}: expected a tensor or numpy array, got {type(chunk).__name__}")
        if chunk.dtype == np.float16 or chunk.dtype == np.float32 or chunk.dtype == np.float64:
            arr = np.ascontiguousarray(chunk)
            if not arr.flags.writeable:  # a read-only memmap slice: torch wants writable memory
                arr = arr.copy()
            t = torch.from_numpy(arr)
        else:
            raise TypeError(f"{what}: expected a float16/float32/float64 array, got {chunk.dtype}")
    dense(t, what)
    if t.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D (B, D) array, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{what}: expected float32/float16/bfloat16/float64, got {t.dtype}")
    return t


def _project_f64_chunk(t: torch.Tensor, k: int, seed: int, kd: int, c0: int) -> torch.Tensor:
    """One float64 column chunk's partial projection, in float64. A chunk's float32 partial could be +-inf where the
    whole row's projection is finite (+v in one chunk, -v in the next, past float32's range: inf - inf = NaN), or
    lose tiny values to subnormals: each row is divided by ``f64_row_scale``'s power of two (1 for rows within range,
    NaN / Inf rows and zero rows), projected, and multiplied back in float64. No data-dependent branch under
    torch.compile (it traces the divided form as is); outside it, a chunk none of whose rows needs a divisor is
    projected as it is (no divided copy)."""
    if t.shape[1] == 0:  # a chunk with no columns (a stream may yield one): nothing to add; aminmax refuses it
        return torch.zeros(t.shape[0], k, dtype=torch.float64, device=t.device)
    wide, up = f64_row_scale(t)
    if not torch.compiler.is_compiling() and not is_fake(t) and not bool(wide.any()):  # (fake: no data to branch on)
        # (session 43) every row within range (the usual case): t / up, a float64 copy of the whole chunk, divided
        # by ones; it doubled a float64 chunk's memory (a float64 memmap's default ~64 MiB chunk: 128 MiB). The
        # same bits: x / 1 is x, and the products by 1 are exact.
        return ops.project_flat(t, k, seed, kd, c0).to(torch.float64)
    return ops.project_flat(t / up, k, seed, kd, c0).to(torch.float64) * up


def project(x: Union[torch.Tensor, "object", Callable[[], Iterable], Iterable], k: int, seed: int = 0,
            kind: str = "rademacher", chunk: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flat projection ``x @ R^T``: (B, D) -> (B, k) fp32, ``R = projection_matrix(k, D, seed, kind)``.

    x: a (B, D) tensor (fp32/fp16/bf16/fp64), a 2-D numpy array or memmap, or a callable returning
    (or an iterable of) consecutive column chunks ``(B, d_i)``. ``chunk``: columns per step for
    tensors and arrays (default: the whole tensor -- the kernel tiles internally; ~64 MiB for
    arrays, so a memmap is read once, sequentially). ``out``: an optional (B, k) fp32 tensor that
    receives the result. ``seed`` is used as the generator key as is (pass
    ``derive_seed(seed, name, side)`` for per-module keys). Column ``c`` of x always meets
    column ``c`` of R whatever ``chunk`` is, so the result depends on ``chunk`` (and on the batch's
    rows around a row) only through the order of its float32 sums: within float32 summation error,
    not bitwise.
    """
    k = _pos_int(k, "k")
    seed = _seed(seed)
    kd = _kind(kind)
    if chunk is not None:
        chunk = _pos_int(chunk, "chunk")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.dim() != 2 or out.shape[1] != k:
            raise ValueError(f"out: expected a (B, {k}) float32 tensor")
        # before any projection: copy_ would refuse these only after the whole (B, D) pass
        if any(st == 0 and n > 1 for st, n in zip(out.stride(), out.shape)) or \
                getattr(torch, "_debug_has_internal_overlap", lambda t: 0)(out) == 1:
            raise ValueError("out: its elements overlap in memory (an expanded tensor); pass a tensor that owns "
                             "its storage")
        if out.requires_grad and out.is_leaf and torch.is_grad_enabled():
            raise ValueError("out: a leaf tensor that requires grad cannot be written in place (use "
                             "torch.no_grad(), or let project return a new tensor)")
        # session 43: both were torch's RuntimeError from out.copy_, after the whole projection (a stream consumed)
        root = out if out._base is None else out._base
        if root.requires_grad and root.is_leaf and torch.is_grad_enabled():
            raise ValueError("out: a view of a leaf tensor that requires grad cannot be written in place (use "
                             "torch.no_grad(), or let project return a new tensor)")
        if not torch.compiler.is_dynamo_compiling() and not torch.is_inference_mode_enabled() and out.is_inference():
            raise ValueError("out: an inference tensor (made under torch.inference_mode()) cannot be written in "
                             "place outside inference mode; clone it, or call project inside torch.inference_mode()")

    def check_out(rows: int, device: torch.device) -> None:
        """out's rows and device against the result's, before any projection (k was checked above)."""
        if out is not None and (out.shape[0] != rows or out.device != device):
            raise ValueError(f"out: expected shape ({rows}, {k}) on {device}, got {tuple(out.shape)} on {out.device}")

    def finish(res: torch.Tensor) -> torch.Tensor:
        return res if out is None else out.copy_(res)

    def chunks_of(arr, B: int, D: int, step: int):
        for c0 in range(0, D, step):
            yield c0, arr[:, c0:min(D, c0 + step)]

    is_array = False
    try:
        import numpy as np

        is_array = isinstance(x, np.ndarray)
    except ImportError:  # pragma: no cover
        pass

    if isinstance(x, torch.Tensor) or is_array:
        if x.ndim != 2:
            raise ValueError(f"x: expected a 2-D (B, D) array, got shape {tuple(x.shape)}")
        # B as the tensor has it: a symbolic batch size stays symbolic under torch.export / compile (int() made it a
        # constant: 'Constraints violated (B)' for a dynamic batch, session 44); D decides the chunking
        B, D = x.shape[0], int(x.shape[1])
        check_out(B, x.device if isinstance(x, torch.Tensor) else torch.device("cpu"))  # arrays project on CPU
        known_rows = B
        if isinstance(x, torch.Tensor):
            _as_tensor(x, "x")  # dtype / shape checks before any work
            if chunk is None or chunk >= D:
                return finish(ops.project_flat(x, k, seed, kd, 0))
            step = chunk
        else:
            if not (x.dtype == np.float16 or x.dtype == np.float32 or x.dtype == np.float64):  # before any work,
                raise TypeError(f"x: expected a float16/float32/float64 array, got {x.dtype}")  # D = 0 included
            step = chunk or max(64, (_DEFAULT_CHUNK_BYTES // max(1, B * x.itemsize)) // 64 * 64)
        it = chunks_of(x, B, D, step)
    else:
        src = x() if callable(x) else x
        try:
            src = iter(src)
        except TypeError:
            raise TypeError(f"x: expected a tensor, a numpy array, or a callable/iterable of (B, d) chunks, "
                            f"got {type(x).__name__}") from None

        def consecutive():
            c0 = 0
            for piece in src:
                t = _as_tensor(piece, "x chunk")
                yield c0, t
                c0 += t.shape[1]
                del piece, t  # (session 43) not alive while the source makes the next chunk: one chunk at a time

        it = consecutive()
        known_rows = None
    acc = None
    for c0, piece in it:
        t = _as_tensor(piece, "x chunk")
        if acc is not None and t.shape[0] != acc.shape[0]:
            raise ValueError(f"x chunk at column {c0}: {t.shape[0]} rows, expected {acc.shape[0]}")
        if acc is None and known_rows is None:  # a stream: out is checked on its first chunk, before projecting
            check_out(t.shape[0], t.device)
        part = _project_f64_chunk(t, k, seed, kd, c0) if t.dtype == torch.float64 else \
            ops.project_flat(t, k, seed, kd, c0)
        if acc is None:
            acc = part
        elif part.dtype == torch.float64 and acc.dtype != torch.float64:
            acc = acc.double().add_(part)
        else:
            acc = acc.add_(part)
        # (session 43) this chunk (an array's or a read-only memmap's copy) is dropped before the next one is made:
        # the loop's names held it while the next was read, so two chunks were resident at once (2 x ~64 MiB)
        del piece, t, part
    if acc is not None and acc.dtype == torch.float64:
        acc = acc.float()  # float64 chunks' partials are summed in float64 and rounded once
    if acc is None:
        if out is not None:
            return out.zero_()
        if known_rows is not None:  # an array with no columns: B is known, the projection is zero
            return torch.zeros(known_rows, k, dtype=torch.float32)
        raise ValueError("x: no columns to project (an empty iterable gives no batch size)")
    return finish(acc)


# --------------------------------------------------------------------------- normalizers


def _check_moments(t: torch.Tensor, what: str) -> None:
    """A normaliser's second moments: finite and >= 0 (a negative or NaN entry gives NaN factors, an infinite one
    NaN or inf through Adafactor's mean; either would silently spread to every projected entry). One reduction."""
    _check_moments_tensor(t, what)
    if t.numel():
        lo, hi = (float(v) for v in torch.aminmax(t.detach()))
        if not (lo >= 0 and hi < math.inf):  # NaN fails both
            raise ValueError(f"{what}: second-moment averages must be finite and non-negative, got a minimum of "
                             f"{lo:g} and a maximum of {hi:g}")


def _check_eps(v, what: str) -> float:
    # numbers.Real: numpy's float32 / int64 scalars too, as every numeric argument
    try:
        f = float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else math.nan
    except OverflowError:  # an int past float's range
        f = math.inf
    if not 0 < f < math.inf:
        raise ValueError(f"{what}: expected a positive finite number, got {v!r}")
    return f


@dataclass
class AdafactorNormalizer:
    """Adafactor's factored second-moment estimate for a Linear weight (O x I).

    ``row`` (O,) and ``col`` (I,) are the row and column means of the gradient second moments
    (Adafactor's ``exp_avg_sq_row`` / ``exp_avg_sq_col``). With ``r = row + eps``,
    ``c = col + eps`` the estimate is the rank-one ``V = outer(r, c) / mean(r)`` (Shazeer & Stern
    2018, the tensor2tensor form with eps added to the factors first); the normalised gradient is
    ``G / sqrt(V) = diag(sqrt(mean r) / sqrt(r)) G diag(1 / sqrt(c))``, applied by scaling the
    projection matrices' columns, so G is never formed. The bias column, when collected, is
    divided by ``sqrt(bias_avg_sq + bias_eps)`` if ``bias_avg_sq`` (O,) is given, else left as is.
    """

    row: torch.Tensor
    col: torch.Tensor
    bias_avg_sq: Optional[torch.Tensor] = None
    eps: float = 1e-30
    bias_eps: float = 1e-8

    def __post_init__(self):
        for nm in ("row", "col", "bias_avg_sq"):
            t = getattr(self, nm)
            if t is None and nm == "bias_avg_sq":
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.dtype.is_floating_point:
                raise ValueError(f"{nm}: expected a 1-D floating tensor")
            _check_moments(t, nm)
        for nm in ("eps", "bias_eps"):
            setattr(self, nm, _check_eps(getattr(self, nm), nm))
        self._check_factor_range()

    def _check_factor_range(self) -> None:
        """(session 44) The factors are applied in float32 (folded into L and R): one past float32's range is inf
        there, and a zero gradient row / column times inf is NaN, which reached every projected entry although the
        float64 result is finite (float64 moments spanning more than ~1e77, or an eps under ~1e-77 with a zero
        moment). Refused here, naming the field, before any projection. One pass over row / col (float64)."""
        for nm, t, e in (("row", self.row, self.eps), ("col", self.col, self.eps),
                         ("bias_avg_sq", self.bias_avg_sq, self.bias_eps)):
            if t is None or not t.numel():
                continue
            r = t.detach().double() + e
            f = r.mean().sqrt() * r.rsqrt() if nm == "row" else r.rsqrt()
            top = float(f.max())
            if not top <= _F32_MAX:  # inf and NaN (an overflowing float64 mean) too
                i = int(torch.argmax(torch.nan_to_num(f, nan=math.inf)))
                form = {"row": "sqrt(mean(row + eps) / (row + eps))", "col": "1 / sqrt(col + eps)",
                        "bias_avg_sq": "1 / sqrt(bias_avg_sq + bias_eps)"}[nm]
                raise ValueError(f"{nm}: the normalising factor {form} reaches {top:g} at entry {i} (value "
                                 f"{float(t.reshape(-1)[i]):g}, eps {e:g}), past float32's range (3.4e38) in which the "
                                 f"factors are applied: every projected entry would be inf or NaN; use a larger eps "
                                 f"or second moments of a narrower range")

    def factors(self):
        """(row factor (O,), column factor (I,)) with ``G / sqrt(V) = diag(row) G diag(col)``."""
        r = self.row.double() + self.eps
        c = self.col.double() + self.eps
        return (r.mean().sqrt() * r.rsqrt()).float(), c.rsqrt().float()

    def bias_factor(self) -> Optional[torch.Tensor]:
        if self.bias_avg_sq is None:
            return None
        return (self.bias_avg_sq.double() + self.bias_eps).rsqrt().float()


@dataclass
class AdamNormalizer:
    """Adam second moments ``v`` (O x I): the normalised gradient is ``G / (sqrt(v) + eps)``.

    Elementwise, so G must be formed; :func:`factored_project` does it one block of examples (or
    tokens) x rows (x columns, when a single row does not fit) at a time within its
    ``memory_budget``. The bias column, when collected, is divided by ``sqrt(bias_avg_sq) + eps``
    if ``bias_avg_sq`` (O,) is given, else left as is.
    """

    v: torch.Tensor
    bias_avg_sq: Optional[torch.Tensor] = None
    eps: float = 1e-8

    def __post_init__(self):
        if not isinstance(self.v, torch.Tensor) or self.v.dim() != 2 or not self.v.dtype.is_floating_point:
            raise ValueError("v: expected a 2-D (O, I) floating tensor")
        if self.bias_avg_sq is not None and (not isinstance(self.bias_avg_sq, torch.Tensor)
                                             or self.bias_avg_sq.dim() != 1 or not self.bias_avg_sq.is_floating_point()):
            raise ValueError("bias_avg_sq: expected a 1-D (O,) floating tensor")
        _check_moments(self.v, "v")
        if self.bias_avg_sq is not None:
            _check_moments(self.bias_avg_sq, "bias_avg_sq")
        self.eps = _check_eps(self.eps, "eps")
        if self.eps < _F32_TINY:
            # (session 44) the denominators sqrt(v) + eps (and the bias's reciprocals) are float32: an eps below
            # float32's normal range rounded to 0 (or its reciprocal overflowed), and a zero second moment next to a
            # zero gradient entry gave 0 / 0 = NaN in every projected entry, where the float64 result is finite
            raise ValueError(f"eps: {self.eps!r} is below 2**-126 (1.18e-38), float32's smallest normal number; the "
                             f"denominators sqrt(v) + eps are float32, where a zero second moment would divide by 0 "
                             f"(NaN in every projected entry)")

    def denominator(self) -> torch.Tensor:
        """``sqrt(v) + eps`` (O, I) float32, on v's device."""
        return self._denominator_block(slice(None), slice(None), self.v.device)

    def bias_factor(self) -> Optional[torch.Tensor]:
        """``1 / (sqrt(bias_avg_sq) + eps)`` (O,) float32, or None without ``bias_avg_sq``."""
        if self.bias_avg_sq is None:
            return None
        return self._bias_factor_block(slice(None), self.bias_avg_sq.device)

    # One block of each, on ``device``, with exactly the arithmetic of the whole (float32 value,
    # sqrt, + eps (, reciprocal)), so a blocked computation divides by the same numbers.
    def _denominator_block(self, rows: slice, cols: slice, device) -> torch.Tensor:
        v = self.v[rows, cols]
        d = torch.empty(v.shape, dtype=torch.float32, device=device)
        return d.copy_(v).sqrt_().add_(self.eps)

    def _bias_factor_block(self, rows: slice, device) -> torch.Tensor:
        b = self.bias_avg_sq[rows]
        f = torch.empty(b.shape, dtype=torch.float32, device=device)
        return f.copy_(b).sqrt_().add_(self.eps).reciprocal_()


# --------------------------------------------------------------------------- factored projection


def _check_normalizer_shapes(normalizer, O: int, I: int, bias: bool, what: str, hint: str = "") -> None:
    """An AdafactorNormalizer's / AdamNormalizer's sizes against a Linear gradient (O, I) (+ the bias column);
    ``what`` names the argument, ``hint`` is added to a wrong shape's message. :func:`factored_project` and
    :class:`GradientCollector` (at construction) check with it."""
    if isinstance(normalizer, AdafactorNormalizer):
        if normalizer.row.numel() != O or normalizer.col.numel() != I:
            raise ValueError(f"{what}: row/col must have {O}/{I} entries{hint}, got "
                             f"{normalizer.row.numel()}/{normalizer.col.numel()}")
    elif tuple(normalizer.v.shape) != (O, I):
        raise ValueError(f"{what}: v must have shape ({O}, {I}){hint}, got {tuple(normalizer.v.shape)}")
    if bias and normalizer.bias_avg_sq is not None and normalizer.bias_avg_sq.numel() != O:
        raise ValueError(f"{what}: bias_avg_sq must have {O} entries, got {normalizer.bias_avg_sq.numel()}")


class _MatrixCache:
    """Generated projection matrices, kept transposed ((n, p) float32, contiguous: the fused op's operand
    layout; ``L = lt.T`` is a view), keyed on (p, n, seed, kind, device).

    ``max_bytes``: least recently used entries are dropped past it (the newest one is always kept); None:
    unbounded; a callable: read at each call (the process-wide cache reads :data:`MATRIX_CACHE_BYTES`, so
    setting it takes effect at the next call). The process-wide cache behind :func:`factored_project` holds at most
    :data:`MATRIX_CACHE_BYTES`; a :class:`GradientCollector` keeps its own, unbounded (its modules' matrices
    are wanted every batch, whatever their number), kept across detach / attach until the collector goes or its
    ``clear_matrices()`` is called. Entries are made with
    autograd and inference mode off, so one made under ``torch.inference_mode()`` serves a later
    differentiable call. Thread-safe (a lock around insertions and evictions; two threads missing the same key
    both generate it, with the same bits)."""

    def __init__(self, max_bytes: Optional[int] = None) -> None:
        self.max_bytes = max_bytes
        self._table: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, p: int, n: int, seed: int, kind: int, device: torch.device) -> torch.Tensor:
        key = (p, n, seed, kind, device)
        limit = self.max_bytes() if callable(self.max_bytes) else self.max_bytes
        t = self._table.get(key)  # a hit takes no lock: one dict read and a reorder, each atomic
        if t is not None:
            if limit is not None:
                try:
                    self._table.move_to_end(key)
                except KeyError:  # dropped by another thread since the read: t is still the matrix
                    pass
                if self._bytes > limit:  # the limit was lowered since the last miss (session 42: the cache kept
                    # its old size for as long as every call hit, although a lowered limit takes effect at once)
                    with self._lock:
                        self._evict(limit)
            return t
        with torch.inference_mode(False), torch.no_grad():
            t = ops.projection_matrix(p, n, seed, kind, p, 0, 0, dtype=torch.float32, device=device).T.contiguous()
        with self._lock:
            old = self._table.get(key)
            if old is not None:  # another thread made it meanwhile: the same bits, one copy kept
                return old
            self._table[key] = t
            self._bytes += t.numel() * t.element_size()
            if limit is not None:
                # (session 43) a hit on another thread moves its key to the end without the lock, so the eviction
                # can drop this newest entry too: return the matrix made here (before: KeyError from the lookup)
                self._evict(limit)
            return t

    def _evict(self, limit: int) -> None:
        """Drop least recently used entries while past ``limit`` (the newest one is kept); under the lock."""
        while self._bytes > limit and len(self._table) > 1:
            _, old = self._table.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        with self._lock:
            self._table.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._table)


MATRIX_CACHE_BYTES = 64 << 20
_MATRICES = _MatrixCache(lambda: MATRIX_CACHE_BYTES)


def clear_matrix_cache() -> None:
    """Drop the projection matrices :func:`factored_project` keeps between calls (at most
    :data:`MATRIX_CACHE_BYTES`). A :class:`GradientCollector`'s own matrices go with it (or with its
    ``clear_matrices()``)."""
    _MATRICES.clear()


def factored_project(a: torch.Tensor, g: torch.Tensor, p: int, seed: int = 0, name: str = "",
                     kind: str = "rademacher", mask: Optional[torch.Tensor] = None, bias: bool = False,
                     per_token: bool = False, normalizer=None, memory_budget: int = 256 << 20) -> torch.Tensor:
    """Projected per-example gradient of a Linear layer: ``vec(L G_b R^T)``, (B, p*p) fp32.

    a: input activations (B, T, I) (or (B, I): T = 1); g: gradients w.r.t. the output (B, T, O).
    ``G_b = sum_t g_bt a_bt^T`` (O x I), with a column of ones appended to a when ``bias``
    (I + 1 columns: the bias gradient). ``L = projection_matrix(p, O, derive_seed(seed, name,
    "left"))``, ``R = projection_matrix(p, I(+1), derive_seed(seed, name, "right"))``; entry
    ``[b, i*p + j] = (L G_b R^T)[i, j]``. Computed as ``(g L^T)^T (a R^T)`` per example (two
    GEMMs and a batched p x T x p product), never forming G. ``per_token``: (B, T, p*p), one
    projected gradient per token. ``mask`` (B, T) bool: False tokens contribute nothing.
    ``normalizer``: None, :class:`AdafactorNormalizer` (folded into L and R, G never formed) or
    :class:`AdamNormalizer`, which must form G: it does so one block of examples (tokens with
    ``per_token``) x rows of G at a time (x columns too, when one row of one example does not
    fit), so that the blocks of G and every temporary of the computation together stay within
    ``memory_budget`` bytes (see :func:`_adam_plan` for what is counted; the inputs, their float32
    / masked copies and the result are not). A budget too small for a single entry (under
    ``4 * (p + 2)`` bytes; more when ``v`` is on another device than ``a``) raises ValueError
    naming ``memory_budget`` and the minimum, before any work. The result does not depend on the
    budget beyond float32 rounding.

    dtypes: float32 / bfloat16 / float16 inputs are computed in float32. A float64 ``a`` or ``g``
    is computed in float64 and the result rounded to float32 once (as :func:`project` does), so
    values past float32's range, or below its smallest normal, do not turn into inf / NaN / 0 on
    the way -- except with :class:`AdamNormalizer`, whose blocks are float32 (the budget counts
    float32 words): there float64 inputs are rounded to float32 first.
    """
    return _factored_project(a, g, p, seed, name, kind, mask, bias, per_token, normalizer, memory_budget, _MATRICES)


def _factored_project(a, g, p, seed, name, kind, mask, bias, per_token, normalizer, memory_budget,
                      matrices: _MatrixCache) -> torch.Tensor:
    """:func:`factored_project` with the projection matrices from ``matrices``."""
    p = _pos_int(p, "p")
    if p >= 1 << 31:  # (session 42) p * p entries per example: past it no result fits (as GradientCollector's p)
        raise ValueError(f"p: must be below 2**31, got {p}")
    seed = _int(seed, "seed")
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    kd = _kind(kind)
    bias, per_token = _flag(bias, "bias"), _flag(per_token, "per_token")
    for nm, t in (("a", a), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{nm}: expected a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{nm}: expected a floating tensor, got {t.dtype}")
        dense(t, nm)
        if t.dim() not in (2, 3):
            raise ValueError(f"{nm}: expected (B, T, features) or (B, features), got shape {tuple(t.shape)}")
    if a.dim() != g.dim() or a.shape[:-1] != g.shape[:-1]:
        raise ValueError(f"g: leading dims {tuple(g.shape[:-1])} differ from a's {tuple(a.shape[:-1])}")
    if a.device != g.device:
        raise ValueError(f"g: on {g.device} but a is on {a.device}")
    if a.dim() == 2:
        a, g = a[:, None, :], g[:, None, :]
        if isinstance(mask, torch.Tensor) and mask.dim() == 1:  # (a list mask: refused by name below, session 42)
            mask = mask[:, None]
    B, T, I = a.shape
    O = g.shape[-1]
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, T):
            raise ValueError(f"mask: expected a bool tensor of shape ({B}, {T})")
        dense(mask, "mask")
        if mask.device != a.device:
            raise ValueError(f"mask: on {mask.device} but a is on {a.device}")
    if normalizer is not None and not isinstance(normalizer, (AdafactorNormalizer, AdamNormalizer)):
        raise TypeError(f"normalizer: expected None, AdafactorNormalizer or AdamNormalizer, "
                        f"got {type(normalizer).__name__}")
    if normalizer is not None:
        _check_normalizer_shapes(normalizer, O, I, bias, "normalizer")
    memory_budget = _pos_int(memory_budget, "memory_budget")
    adam_plan = None
    if isinstance(normalizer, AdamNormalizer):  # the block sizes, or the error, before any work
        dw = 1  # words per denominator entry; more when a copy across devices stages it (see _adam_plan)
        for t in (normalizer.v, normalizer.bias_avg_sq if bias else None):
            if t is not None and t.device != a.device:
                dw = max(dw, 1 + 2 * -(-t.element_size() // 4))
        adam_plan = _adam_plan(B * T if per_token else B, O, I, p, memory_budget, dw)

    dev = a.device
    ls, rs = derive_seed(seed, name, "left"), derive_seed(seed, name, "right")
    lt = matrices.get(p, O, ls, kd, dev)  # L^T (O, p) and R^T (I(+1), p): the bias row is the last
    rtb = matrices.get(p, I + int(bias), rs, kd, dev)
    L, R = lt.T, rtb.T
    Rw = R[:, :I]
    Rb = R[:, I] if bias else None
    Lw, bias_L = L, None
    if isinstance(normalizer, AdafactorNormalizer):  # folded into L and R: G never formed
        rf, cf = normalizer.factors()
        Lw = L * rf.to(dev)[None, :]
        Rw = Rw * cf.to(dev)[None, :]
        if bias:
            bf = normalizer.bias_factor()
            bias_L = L if bf is None else L * bf.to(dev)[None, :]
    # float64 inputs (either of a, g) are projected in float64 and rounded to float32 once, as project does:
    # converting them first would turn values past float32's range into inf (NaN in the result where the product
    # is finite) and flush tiny ones. Not with AdamNormalizer: its blocks are float32 within memory_budget.
    wide = (a.dtype == torch.float64 or g.dtype == torch.float64) and not isinstance(normalizer, AdamNormalizer)
    if not per_token and not isinstance(normalizer, AdamNormalizer) and not wide:
        # the fused op: both sides projected per token and the outer products accumulated in one pass
        if T == 0:
            return torch.zeros(B, p * p, dtype=torch.float32, device=dev)
        if normalizer is None:  # the cached transposes as they are
            rt, Rb = rtb[:I], (rtb[I] if bias else None)
        else:
            lt, rt = Lw.T.contiguous(), Rw.T.contiguous()
        # float32 / bfloat16 / float16 go in as they are (the op widens half precision exactly as it reads
        # it: no float32 copy of the activations); other dtypes, or a and g differing, are converted first
        same = a.dtype == g.dtype and a.dtype in (torch.float32, torch.bfloat16, torch.float16)
        a2, g2 = a.reshape(B * T, I), g.reshape(B * T, O)
        if not same:
            a2, g2 = a2.float(), g2.float()
        m2 = None if mask is None else mask.reshape(B * T)
        if bias_L is None:
            return ops.factored_project(a2, g2, lt, rt, Rb, m2, T).reshape(B, p * p)
        # Adafactor with a bias column: the bias's left factor differs from the weight's, so the weight part and
        # the bias part (sum_t (L'' g_t) R_b^T: a zero input column and zero R, R_b as the op's bias row) are two fused
        # calls. Session 42: a torch product on the calling thread did the bias part, whose bits then depended
        # on the thread count and the batch (MKL split the inner dimension), against the README's promise.
        res = ops.factored_project(a2, g2, lt, rt, None, m2, T)
        zero_a = a2.new_zeros(B * T, 1)
        zero_rt = torch.zeros(1, p, dtype=torch.float32, device=dev)
        res = res + ops.factored_project(zero_a, g2, bias_L.T.contiguous(), zero_rt, Rb.contiguous(), m2, T)
        return res.reshape(B, p * p)
    cd = torch.float64 if wide else torch.float32
    af = a.to(cd)
    gf = g.to(cd)
    if wide:
        Lw, Rw = Lw.to(cd), Rw.to(cd)
        Rb = None if Rb is None else Rb.to(cd)
        bias_L = None if bias_L is None else bias_L.to(cd)
    if mask is not None:
        m3 = mask[..., None]
        af = torch.where(m3, af, 0.0)
        gf = torch.where(m3, gf, 0.0)

    if isinstance(normalizer, AdamNormalizer):
        return _adam_project(af, gf, L, Rw, Rb, normalizer, per_token, adam_plan)

    gl = torch.matmul(gf, Lw.T)  # (B, T, p)
    ar = torch.matmul(af, Rw.T)  # (B, T, p)
    if bias and bias_L is None:
        # G R^T with the ones column: a R_w^T + R_b on every (unmasked) token
        ar = ar + (Rb if mask is None else mask[..., None] * Rb)
    if per_token:
        res = gl[..., :, None] * ar[..., None, :]
        if bias_L is not None:
            u = torch.matmul(gf, bias_L.T)
            res = res + u[..., :, None] * Rb
        return res.reshape(B, T, p * p).to(torch.float32)
    res = torch.bmm(gl.transpose(1, 2), ar)  # (B, p, p)
    if bias_L is not None:
        u = torch.matmul(gf.sum(1), bias_L.T)  # (B, p): L'' sum_t g_t
        res = res + u[:, :, None] * Rb
    return res.reshape(B, p * p).to(torch.float32)


def _adam_plan(n: int, O: int, I: int, p: int, budget: int, dw: int = 1):
    """Block sizes ``(examples c, rows o, columns i)`` for :func:`_adam_project` within ``budget`` bytes.

    Counted (float32 words, 4 bytes each), everything that is alive at once while one block is done:

    * ``D``: the denominator block ``sqrt(v) + eps``, ``dw*o*i``: ``dw`` = 1 when ``v`` is on the
      activations' device; across devices ``copy_`` may stage a contiguous copy of the block on
      each side, so ``dw = 1 + 2 * ceil(itemsize / 4)`` (the caller's count);
    * ``G``: the per-example gradients of the block, ``c*o*i`` (one ``bmm``; divided by D in place);
    * ``Z = G R^T`` of the block's rows, ``c*o*p`` (accumulated over column blocks with ``addmm_``).

    ``L Z`` and the bias outer products go straight into the result (``baddbmm_`` with a stride-0
    batch of L, ``addr_``): no temporary. The bias step of a row block, done after its weight
    blocks, needs no more than they do: the bias factor ``dw*o``, the token sums
    ``c*o`` and their left projection ``c*p``. Operands are strided views that the CPU BLAS takes
    as they are (no hidden copies: checked with torch.profiler's memory records; not measured on
    CUDA, where cuBLAS's strided-batched GEMM takes such layouts). Not counted: the (n, p, p) result, the
    inputs and the float32 / masked copies :func:`factored_project` makes of them, and the
    cached projection matrices.

    Rows are split before columns: columns only when a single row of one example does not fit.
    The smallest workable budget is one entry of each: ``4 * (dw + 1 + p)`` bytes (``4 * (p + 2)``
    on one device); below it, ValueError naming ``memory_budget`` and that minimum.
    """
    words = budget // 4
    least = dw + 1 + p  # c = o = i = 1
    if words < least:
        raise ValueError(f"memory_budget: {budget} bytes cannot hold one entry of an Adam-normalised gradient "
                         f"block with p = {p}; at least {4 * least} bytes are needed")
    # with c = o = 1: dw*i + i + p <= words; then o rows: o*((dw+1)*i + p) <= words; then c examples:
    # dw*o*i + c*o*(i + p) <= words. Each is >= 1 given words >= least (I, O or n of 0: steps of 1, no blocks).
    i = max(1, min(I, (words - p) // (dw + 1)))
    o = max(1, min(O, words // ((dw + 1) * i + p)))
    c = max(1, min(n, (words - dw * o * i) // (o * (i + p))))
    return c, o, i


def _adam_project(af, gf, L, Rw, Rb, nz: AdamNormalizer, per_token: bool, plan) -> torch.Tensor:
    """``L (G_b / (sqrt(v) + eps)) R_w^T`` (+ the bias column) for every example (or token), one
    block of ``plan = (c, o, i)`` (:func:`_adam_plan`) at a time, summed into the result:
    ``sum over row blocks r, column blocks k of L[:, r] ((G_b[r, k] / D[r, k]) R_w[:, k]^T)``.
    Temporaries are dropped (``del``) as soon as they are used, so no two blocks of G are alive."""
    B, T, I = af.shape
    O = gf.shape[-1]
    p = L.shape[0]
    dev = af.device
    if per_token:
        a2, g2 = af.reshape(B * T, 1, I), gf.reshape(B * T, 1, O)
    else:
        a2, g2 = af, gf
    n = a2.shape[0]
    c, o, i = plan
    out = torch.zeros(n, p, p, dtype=torch.float32, device=dev)
    out_rows = out.view(n * p, p)  # (example, row of L) x column of R: the bias outer products
    whole = i >= I  # one column block: its denominator serves every example block of the row block
    for o0 in range(0, O, o):
        o1 = min(O, o0 + o)
        Lo = L[:, o0:o1]
        D = nz._denominator_block(slice(o0, o1), slice(None), dev) if whole else None
        for s in range(0, n, c):
            e = min(n, s + c)
            Z = None
            for i0 in range(0, I, i):
                i1 = min(I, i0 + i)
                if not whole:
                    D = nz._denominator_block(slice(o0, o1), slice(i0, i1), dev)
                G = torch.bmm(g2[s:e, :, o0:o1].transpose(1, 2), a2[s:e, :, i0:i1])  # (e-s, o1-o0, i1-i0)
                G.div_(D)
                if not whole:
                    D = None
                Gm = G.view((e - s) * (o1 - o0), i1 - i0)
                if Z is None:
                    Z = torch.mm(Gm, Rw[:, i0:i1].T)
                else:
                    Z.addmm_(Gm, Rw[:, i0:i1].T)
                del G, Gm
            if Z is not None:  # out_b += L[:, rows] Z_b
                out[s:e].baddbmm_(Lo.expand(e - s, p, o1 - o0), Z.view(e - s, o1 - o0, p))
                del Z
        D = None
        if Rb is not None:  # the bias column: (sum_t g_t) (scaled) projected by L, times R's bias column
            f = None if nz.bias_avg_sq is None else nz._bias_factor_block(slice(o0, o1), dev)
            for s in range(0, n, c):
                e = min(n, s + c)
                gs = g2[s:e, :, o0:o1].sum(1)  # (e-s, o1-o0)
                if f is not None:
                    gs.mul_(f)
                u = torch.mm(gs, Lo.T)  # (e-s, p)
                del gs
                out_rows[s * p:e * p].addr_(u.view(-1), Rb)
                del u
            del f
    return out.reshape(B, T, p * p) if per_token else out.reshape(B, p * p)


try:  # the collector lives in its own module (another worker's); optional until it exists
    from gradkit._collector import GradientCollector  # noqa: E402,F401

    __all__.append("GradientCollector")
except ImportError:  # pragma: no cover
    pass
