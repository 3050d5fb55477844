"""An on-disk index of (projected) per-example gradients, and exact top-k search over it.

Build::

    with GradientIndex.create("run/index", {"h.0.mlp": 256, "h.1.mlp": 256}, dtype=torch.float16,
                              projection={"kind": "rademacher", "seed": 0, "p": 16}) as index:
        for grads in batches:          # (n, 512) tensors or {name: (n, d_m)} dicts
            index.append(grads)        # each append is one committed chunk
    # close() (the end of the `with`) marks the index complete

Search::

    index = GradientIndex.open("run/index")          # gradkit's layout or bergson's
    scores, rows = index.search(queries, k=10, unit_norm=True)

Layout on disk (gradkit)
------------------------
A directory holding ``index.json`` (the header: format and version, the ordered modules and
their sizes, dtype, projection config, row count, per-token settings, shard list, whether the
build completed) and ``shards/``: raw little-endian row-major arrays ``r<rank>-<seq>.bin`` of
``rows x dim`` elements (fp16, bf16 or fp32), plus ``r<rank>.tokens.bin`` (int64 token count per
example) for per-token indexes. Rows of rank 0's shards come first, then rank 1's, and so on.

Crash safety: rows are appended past the committed end of a shard (an area no reader looks
at); a commit fsyncs the data and then atomically replaces the header (write to a temporary
file, fsync, ``os.replace``, fsync the directory). A crash therefore leaves the last committed
header, whose rows are all on disk. A header whose build did not complete (``complete: false``)
is refused by :meth:`GradientIndex.open`; ``create(..., resume=True)`` continues it after its
last committed row (uncommitted bytes are cut off), ``create(..., overwrite=True)`` discards it.
A directory without a header never opens as an index. A shard shorter than its header says is
refused on open, and so is a header that contradicts itself (a ``complete`` or ``per_token`` that is not a
bool, a ``dim`` other than the modules' sum, an ``examples`` other than the rows or token counts, shards not
named and listed in gradkit's order ``r<rank>-000000, -000001, ...`` of ranks below ``world_size``). A failed
write (e.g. disk full) rolls the files back to the last commit and raises ``OSError`` naming the index
directory and the state it was left in.

One writer at a time: ``create`` takes an exclusive advisory lock (``flock``) on ``.lock`` in the
index directory before it changes anything there, and holds it until ``close()``, an aborted build
(an exception inside ``with``) or the writer being garbage collected; a second ``create`` of the
same index meanwhile (``resume=True`` or ``overwrite=True`` included, in this process or another)
is refused with a ``RuntimeError`` naming the directory. Readers take no lock. In a multi-process
build rank 0 holds ``.lock`` and every other rank its own (``.lock-r00001`` for rank 1, ...; a rank
writes only its own files). The lock files stay in the directory and are never part of an index.
Where ``fcntl`` is unavailable (not POSIX) or the file system does not support ``flock``, builds
are not locked.

Multi-process builds (``torch.distributed`` initialised): every rank writes its own shards and
commits its own ``shards/rank-<r>.json``; ``close()`` gathers every rank's outcome and row
counts (all_gather), and rank 0 writes the final header after every rank has committed. ``create`` first
combines every rank's argument checks and settings in one all_gather: a rank refusing its arguments raises
its own error and the others :class:`DistributedBuildError`, and settings that differ between the ranks
(modules, dtype, projection, per_token, shard_rows, resume, overwrite) raise ``ValueError`` naming them on
every rank, all before anything is written. If any rank fails (its commit in ``close()``, or loading
its committed state in ``create()``), every rank learns it from that same collective and raises (the
failing rank its own error, the others :class:`DistributedBuildError` naming the failing ranks) instead
of waiting for the failed rank until the process group times out; the index is then not marked complete (after a failed
``close()`` rank 0 records the rows every rank had committed in an incomplete header, which
``open(..., allow_incomplete=True)`` reads and ``create(..., resume=True)`` continues). Every
rank makes the same collective calls in the same order on every path.

bergson's layout (``gradients.bin`` + ``info.json`` with ``num_grads``, ``grad_sizes`` and
``base_dtype`` or the older structured ``dtype``; ``offsets.npy`` for per-token indexes; or a
directory of ``*shard*`` sub-directories in that layout) opens read-only with the same search.
bergson marks a finished build only by renaming ``<run>.part`` to ``<run>``, so a bergson index
under a ``*.part`` directory is refused unless ``open(..., allow_incomplete=True)``. ``base_dtype`` may
also be older bergson's ``np.dtype(...).str`` (``"<f2"``, ``"<f4"``, ``"<V2"`` for bfloat16). An index of
0 rows (whose ``gradients.bin`` numpy leaves 1 byte long) opens empty; a ``gradients.bin`` of any
other size than ``info.json`` says is refused (bergson would read a prefix of a longer file).

bergson parity (what ``bergson.Attributor`` computes on the same index, and where gradkit differs)
---------------------------------------------------------------------------------------------------
Same top-k, module order (``grad_sizes`` order), per-token rows (row numbers index token rows;
``example_of`` maps them to ``offsets.npy``'s examples), module subsets (cosine norms always over
all modules, as bergson's) and reverse search. Intentional differences:

* bergson's ``Attributor(unit_norm=True, hessian_path=...)`` is two-sided: it is
  ``Precondition(H, mode="both")`` here. ``search(precondition=H, unit_norm=True)`` is
  ``cos(H^-1 q, x)``, which bergson has no equivalent of.
* gradkit takes the matrices H, not bergson's Hessian files (``hessian_path``); ``damping`` is absolute:
  bergson's ``InversionConfig(inversion="absolute_damped_inverse", damping_factor=c)`` is
  ``damping=c``; its default ``"damped_inverse"`` damps by ``c * mean(eigenvalues of H)`` (with
  negative eigenvalues clamped to 0 first), i.e. ``damping=c * H.trace() / d`` for one PSD H (per-module
  matrices each get their own mean: pass ``H_m + c * H_m.trace() / d_m * I`` with ``damping=0``).
* Cosine divides by the exact query norm; bergson divides by ``norm + eps`` (fp32 eps), which
  lowers the scores of queries of tiny norm (ranks are the same), and divides the caller's query
  tensors in place.
* ``k`` larger than the index is refused (``k: ...``); bergson returns every row instead.
  Ties go to the lowest row (``torch.topk``'s tie order is unspecified).
* ``modules=`` naming a module the index lacks, an empty selection, or a query dict with extra
  keys are refused by name; bergson drops unknown names, reads an empty set as "all modules" and
  ignores extra query keys.
* A row holding NaN / Inf under ``unit_norm``: bergson zeroes the whole row (score 0, ranked among
  the others); gradkit scores it NaN and ranks it last (reported as -inf, +inf with ``reverse``).
* A precondition matrix that is not positive semi-definite: bergson clamps negative eigenvalues to 0
  before damping; gradkit adds the damping to the eigenvalues as they are and refuses a result <= 0.
* ``projection=`` on a bergson index: a dict with ``projection_dim`` or a bergson
  ``GradientProcessor`` is compared as bergson compares processors (its projection settings only,
  with bergson's defaults for those an older ``processor_config.yaml`` leaves out; nothing else
  when neither side projects). A gradkit collector's config never equals a bergson projection and
  is refused.

Search
------
Exact: the queries are scored against every row by inner product (cosine with ``unit_norm``),
streaming the memory-mapped rows in blocks of ``batch_rows`` and merging each block's best into
a running top-k (``gradkit.ops.score_topk``: C++ GEMM + selection on CPU, Triton / CUDA C++ on
GPU), so the index never has to fit in memory. Ties go to the lowest row.

Scores are float32, computed over float32 queries; float64 inputs are brought into float32's range
first by exact powers of two (a query row below 2**-64 or at least 2**64, with its inner-product
scores scaled back after ranking; a float64 bergson row under cosine). Preconditioning (``Precondition``)
is applied in float64 and rounded once to float32, with H^p kept as a float32 matrix times a power of
two so that cosines do not depend on H's scale. A float32 BLAS product rounds a one-row block
differently from a larger one; the float64 products give the same float32 values for a row (or query)
whatever block (or batch) it is in, the thread count included, except where the float64 result lies within
its last bits of a float32 rounding boundary: MKL's float64 sums differ in their last bits between block sizes
and thread counts (session 42: a (1, 3000) x (3000, 16) product against the same row in a (3, 3000) block, and
(8, 5000) x (5000, 32) at 1 and 2 threads), and no rounded float32 value differed in the tests. Weights outside
float32's range are refused.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import math
import numbers
import os
import functools
import re
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, NoReturn, Optional, Tuple

import numpy as np
import torch

from gradkit import _dist as _distributed
from gradkit import ops
from gradkit._io import _fsync_dir, open_regular, parse_json, read_regular
from gradkit._rules import check_symmetric, dense, flag, not_meta

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: builds are not locked
    fcntl = None

__all__ = ["GradientIndex", "Precondition", "IndexFormatError", "NonFiniteGradientError",
           "UncheckedProjectionWarning", "DistributedBuildError", "FORMAT", "VERSION"]

FORMAT = "gradkit-index"
VERSION = 1
HEADER = "index.json"
_BUILD_TOKEN = ".gradkit-build-token.json"  # a distributed create's same-directory check (removed once read)
SHARD_DIR = "shards"
_SHARD_RE = re.compile(r"^r(\d{5})-(\d{6})\.bin$")
_TOKENS_RE = re.compile(r"^r(\d{5})\.tokens\.bin$")
_RANK_RE = re.compile(r"^rank-(\d{5})\.json(\.tmp)?$")
LOCK = ".lock"  # rank 0's (a single-process build's) writer lock; rank r > 0: LOCK + "-r<r:05d>"
_MAX_HEADER_BYTES = 1 << 25  # 32 MiB: ~10^5 shards or modules; json.loads needs ~24x the text (was 256 MiB: ~6 GB)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "f16": "float16", "float16": "float16",
                  "bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "f32": "float32",
                  "float": "float32", "float32": "float32"}
# raw numpy element type each storage dtype is mapped as (bf16: its 16 raw bits)
_NP_RAW = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32, "float64": np.float64}
_TORCH_OF = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
             "float64": torch.float64}
_POLICIES = ("skip", "error")
_F32_MAX = float(torch.finfo(torch.float32).max)
_F32_TINY = float(torch.finfo(torch.float32).tiny)  # 2**-126, float32's smallest normal
_BACKENDS = ("auto", "torch", "faiss")
_MODES = ("query", "both")


class IndexFormatError(ValueError):
    """A directory that is not a valid, complete index (missing/partial header, truncated shard...)."""


class NonFiniteGradientError(ValueError):
    """Rows with NaN or Inf were appended under ``on_nonfinite="error"``."""


class DistributedBuildError(RuntimeError):
    """Another rank of a multi-process build failed (in ``create`` or ``close``); raised on every rank
    that did not fail itself (the failing ranks raise their own error), naming the failing ranks."""


class UncheckedProjectionWarning(UserWarning):
    """:meth:`GradientIndex.search` on an index that records a projection was given no ``projection=``,
    so the queries' projection could not be compared with the index's (warned once per index object)."""


# --------------------------------------------------------------------------- small helpers


def _write_all(fd: int, data) -> None:
    """Write every byte of ``data`` at the descriptor's current position."""
    mv = memoryview(data).cast("B")
    while len(mv):
        n = os.write(fd, mv)
        if n <= 0:  # pragma: no cover - os.write raises instead on Linux
            raise OSError(errno.EIO, "short write")
        mv = mv[n:]


def _fsync_file(path: Path) -> None:
    """fsync the file ``path`` through a descriptor of its own (opened read-only, closed again); raises OSError."""
    fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_json(path: Path, obj) -> None:
    """Replace ``path`` by ``obj`` as JSON: temp file, fsync, os.replace, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(obj, indent=1).encode()
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        # (one handler from the write to the replace: an interrupt right after the close left the .tmp behind)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _read_json(path: Path, what: str):
    """A header (index.json, info.json, a rank's state): a regular file of at most _MAX_HEADER_BYTES, valid JSON."""
    return parse_json(read_regular(path, _MAX_HEADER_BYTES, what, IndexFormatError), path, what, IndexFormatError)


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for name, dt in _DTYPES.items():
            if dt == dtype:
                return name
        raise TypeError(f"dtype: expected torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[dtype.lower()]
    raise TypeError(f"dtype: expected torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")


def _check_modules(modules) -> "OrderedDict[str, int]":
    if isinstance(modules, Mapping):
        items = list(modules.items())
    elif isinstance(modules, (list, tuple)):
        items = list(modules)
    else:
        raise TypeError(f"modules: expected an ordered dict name -> dim, got {type(modules).__name__}")
    if not items:
        raise ValueError("modules: expected at least one module")
    out: "OrderedDict[str, int]" = OrderedDict()
    for i, it in enumerate(items):
        if not isinstance(it, (list, tuple)) or len(it) != 2:
            raise TypeError(f"modules[{i}]: expected a (name, dim) pair, got {it!r}")
        name, dim = it
        if not isinstance(name, str) or not name:
            raise TypeError(f"modules[{i}]: name must be a non-empty string, got {name!r}")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or int(dim) < 1:
            raise ValueError(f"modules[{name!r}]: dim must be a positive int, got {dim!r}")
        if name in out:
            raise ValueError(f"modules: duplicate module name {name!r}")
        out[name] = int(dim)
    if sum(out.values()) > 1 << 40:  # a row of 4 TiB: past it, row offsets (rows x dim x itemsize) leave int64
        raise ValueError(f"modules: the dims sum to {sum(out.values())}, more than a row can hold (2^40)")
    return out


def _projection_dict(projection, what: str = "projection"):
    """A projection config as a JSON-normalised dict (None stays None)."""
    if projection is None:
        return None
    if not isinstance(projection, Mapping) and not hasattr(projection, "projection_config") \
            and all(hasattr(projection, k) for k in ("projection_dim", "projection_seed")):
        # a bergson GradientProcessor: only its projection settings (its normalizers and Hessians hold tensors
        # and say nothing about the projection)
        projection = {k: getattr(projection, k) for k in _BERGSON_PROJ_KEYS if hasattr(projection, k)}
    if not isinstance(projection, Mapping) and hasattr(projection, "projection_config"):
        # a GradientCollector (or anything else exposing its config the same way): use its config
        projection = projection.projection_config
        if callable(projection):
            projection = projection()
    if dataclasses.is_dataclass(projection) and not isinstance(projection, type):
        projection = dataclasses.asdict(projection)
    elif not isinstance(projection, Mapping):
        for attr in ("to_dict", "config"):
            fn = getattr(projection, attr, None)
            if callable(fn):
                projection = fn()
                break
    if not isinstance(projection, Mapping):
        raise TypeError(f"{what}: expected a dict (projection config incl. seed and kind), a GradientCollector "
                        f"(its projection_config is used) or None, got {type(projection).__name__}")
    try:
        # keys in the order given (not sorted, session 39): a collector's "modules" are in its flat rows' column order
        return json.loads(json.dumps(dict(projection)))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what}: must be JSON-serialisable (str keys; numbers, strings, lists): {e}") from None


# bergson's PROJECTION_SETTINGS (the settings that must match between gradients projected separately) and the
# values bergson gives those an older processor_config.yaml leaves out: GradientProcessor._read_config fills four,
# and cls(**cfg) the GradientProcessor fields' defaults for the rest
_BERGSON_PROJ_KEYS = ("projection_dim", "projection_type", "projection_scale", "projection_seed", "projection_target",
                      "include_bias", "projection_version")
_BERGSON_PROJ_DEFAULTS = {"projection_type": "normal", "include_bias": False, "projection_scale": "row_norm",
                          "projection_version": 1,  # _read_config's
                          "projection_target": "per_module", "projection_seed": None}  # the dataclass's own


# Collector settings that do not change the projection: one vector per example or per token is made with the
# same matrices (a per-example vector is the sum of its tokens'), and a normaliser rescales the gradient before
# it is projected (LESS scores Adam-normalised training gradients against plain query gradients; bergson's
# PROJECTION_SETTINGS leave its normalizers out too). Query and index may differ in them.
_NOT_PROJECTION = ("per_token", "normalizers")


def _round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` once (to nearest, ties to even). torch converts float64 to float16 / bfloat16 through
    float32, rounding twice: 1 + 2^-11 + 2^-30 became 1.0 in float16 instead of 1 + 2^-10, and 65519.99999999999
    overflowed to inf instead of rounding to 65504. For float64 input the float32 step here rounds to odd (truncate,
    then set the last bit when inexact), which float32's 13+ spare bits make exact for the second rounding."""
    if x.dtype != torch.float64 or dtype not in (torch.float16, torch.bfloat16):
        return x.to(dtype)
    f = x.to(torch.float32)
    back = f.to(torch.float64)
    inexact = (back != x) & torch.isfinite(f) & torch.isfinite(x)
    if not bool(inexact.any()):
        return f.to(dtype)
    # toward zero where float32 rounded away from it, then the last bit set: the round-to-odd float32 value
    away = inexact & (back.abs() > x.abs())
    bits = f.view(torch.int32)
    bits = torch.where(away, bits - 1, bits)  # one ulp toward zero (same sign: the magnitude's bits count down)
    bits = torch.where(inexact, bits | 1, bits)
    return bits.view(torch.float32).to(dtype)


def _module_order_mismatch(cfg, order: List[str]) -> Optional[List[str]]:
    """The module order of a projection config's ``"modules"`` mapping (a collector's: its flat rows' columns) when it
    holds the same modules as ``order`` in another order, else None."""
    mods = cfg.get("modules") if isinstance(cfg, Mapping) else None
    if not isinstance(mods, Mapping) or set(mods) != set(order) or list(mods) == list(order):
        return None
    return list(mods)


def _projection_only(cfg):
    """A projection config less the settings that do not change the projection (_NOT_PROJECTION)."""
    return {k: v for k, v in cfg.items() if k not in _NOT_PROJECTION} if isinstance(cfg, dict) else cfg


def _bergson_settings(cfg: Mapping):
    """A bergson projection config (processor_config.yaml, a GradientProcessor's fields) reduced to what bergson
    compares: its PROJECTION_SETTINGS, with bergson's defaults for settings an older config leaves out; None when
    it projects nothing (projection_dim 0 or None: bergson then compares nothing else)."""
    if not cfg.get("projection_dim"):
        return None
    out = {k: cfg[k] for k in _BERGSON_PROJ_KEYS if k in cfg}
    for k, v in out.items():  # bergson's settings are scalars: a YAML alias tree here would expand in json.dumps
        if v is not None and not isinstance(v, (str, int, float, bool)):
            raise ValueError(f"{k}: expected a scalar, got a {type(v).__name__}")
    for k, v in _BERGSON_PROJ_DEFAULTS.items():
        out.setdefault(k, v)
    return _projection_dict(out)


def _bergson_base_dtype(v, f: Path) -> str:
    """bergson's ``base_dtype`` as a storage dtype name. bergson 2.x writes numpy's name (``"float16"``,
    ``"bfloat16"``, ``"float32"``); older bergson wrote ``np.dtype(dtype).str`` (``"<f2"``, ``"<f4"``, and
    ``"<V2"`` for ml_dtypes' bfloat16), which bergson's own reader still accepts."""
    if isinstance(v, str) and v in _NP_RAW:
        return v
    try:
        dt = np.dtype(v) if isinstance(v, str) else None
    except TypeError:
        dt = None
    if dt is not None and dt.fields is None and dt.subdtype is None:
        if dt.kind == "V" and dt.itemsize == 2 or dt.name == "bfloat16":
            return "bfloat16"
        for name in ("float16", "float32", "float64"):
            if dt == np.dtype(name).newbyteorder("<"):
                return name
    raise IndexFormatError(f"open: unsupported bergson dtype {v!r} in {f} (expected float16, bfloat16, float32 or "
                           "float64, little-endian)")


class _RowIndexError(IndexError, ValueError):
    """A row number out of range, or a boolean mask of another length: an IndexError (as Python and numpy raise
    for an index out of range) that is also the ValueError gradkit raises for every bad argument."""


def _no_meta(t: torch.Tensor, what: str) -> None:
    not_meta(t, what)
    dense(t, what)  # session 40: a sparse tensor failed later in torch ("reshape is not implemented")


def _int_arg(v, what: str, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{what}: expected an int, got {type(v).__name__}")
    v = int(v)
    if v < lo:
        raise ValueError(f"{what}: must be >= {lo}, got {v}")
    return v


def _from_raw(arr: np.ndarray, name: str) -> torch.Tensor:
    """A torch view of a (read-only) memmap of raw elements of storage dtype ``name``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # memmaps opened read-only: torch warns it cannot write them
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if name == "bfloat16" else t


def _open_sized(f: Path, what: str):
    """(file object, size): ``f`` opened as a regular file (:func:`gradkit._io.open_regular`: a FIFO or device put in
    its place cannot block or never end the open) and its size read from that open descriptor, so the size checks
    and the reads that follow are about the same file."""
    fh = open_regular(f, what, IndexFormatError)
    return fh, os.fstat(fh.fileno()).st_size


def _holds_maps(fn):
    """A read (``get``, ``search``) of an index: counted while it runs, so that a reader's ``close()`` on another
    thread meanwhile releases the maps after it (session 42 review: the read failed midway with AttributeError or
    IndexError naming nothing). A read that starts after ``close()`` raises RuntimeError (``_check_readable``)."""
    @functools.wraps(fn)
    def read(self, *args, **kwargs):
        with self._reads_lock:
            self._check_readable(fn.__name__)
            self._reads += 1
        try:
            return fn(self, *args, **kwargs)
        finally:
            with self._reads_lock:
                self._reads -= 1
                if not self._reads and self._release_pending:
                    self._shards, self._maps, self._offsets = [], [], None
                    self._release_pending = False
    return read


def _serialised(fn):
    """A writer's state change (``append``, ``commit``, ``close``, an abort): one at a time per index object, so that
    a writer shared by threads (a loader thread per data source appending to one index) appends whole chunks one after
    another. Session 43: two threads appending to one writer interleaved their seeks and writes on the shared shard
    descriptor and their shard bookkeeping (rows written over each other, a commit failing with FileNotFoundError for
    a shard the other thread's rollback had removed, close() then listing a shard file that did not exist)."""
    @functools.wraps(fn)
    def run(self, *args, **kwargs):
        with self._write_lock:
            return fn(self, *args, **kwargs)
    return run


_LIBC_MAP = None  # (mmap, munmap, madvise) of the C library, False where unavailable (looked up once)


def _libc_map():
    global _LIBC_MAP
    if _LIBC_MAP is None:
        _LIBC_MAP = False
        try:
            import ctypes

            if ctypes.sizeof(ctypes.c_void_p) == 8 and sys.platform.startswith(("linux", "darwin")):
                libc = ctypes.CDLL(None, use_errno=True)
                mm, unmap, advise = libc.mmap, libc.munmap, libc.madvise
                mm.restype, mm.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                            ctypes.c_int, ctypes.c_int, ctypes.c_int64]
                unmap.restype, unmap.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]
                advise.restype, advise.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _LIBC_MAP = (mm, unmap, advise)
        except (OSError, AttributeError, ImportError):  # pragma: no cover - no C library to call
            pass
    return _LIBC_MAP


class _FileMap:
    """A read-only shared memory map of the first ``nbytes`` of an open file, made with the C library's ``mmap`` so
    that no descriptor stays open with it. Python's ``mmap.mmap`` keeps a duplicate of the file's descriptor for
    each map (session 42: an open index held one descriptor per shard until it was garbage collected, and an index
    of more shards than the process may open files, 1024 by default on Linux, failed to open with EMFILE). numpy
    views it through ``__array_interface__`` (an array made from it holds it as its base), and it is unmapped when
    the last array viewing it goes."""

    def __init__(self, fd: int, nbytes: int) -> None:
        import ctypes
        import mmap as _mmap

        mm, self._unmap, self._advise = _libc_map()
        addr = mm(None, nbytes, _mmap.PROT_READ, _mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self._addr, self._len = addr, nbytes
        self.__array_interface__ = {"version": 3, "shape": (nbytes,), "typestr": "|u1", "data": (addr, True)}

    def __len__(self) -> int:
        return self._len

    def madvise(self, advice: int, start: int, length: int) -> None:
        import ctypes

        if self._advise(self._addr + start, length, advice) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def __del__(self) -> None:
        addr, self._addr = getattr(self, "_addr", None), None
        if addr is not None:
            self._unmap(addr, self._len)


def _map_rows(fh, dname: str, rows: int, width: int, maps: list) -> torch.Tensor:
    """Read-only memory map of a (rows, width) little-endian array in the open file ``fh``; the map is kept in
    ``maps`` (for madvise). No descriptor is kept with it where the C library's mmap can be called (:class:`_FileMap`);
    elsewhere Python's mmap, which keeps one."""
    import mmap as _mmap

    dt = np.dtype(_NP_RAW[dname]).newbyteorder("<")
    nbytes = rows * width * dt.itemsize
    if _libc_map():
        mm = _FileMap(fh.fileno(), nbytes)
        arr = np.asarray(mm).view(dt)  # read-only (the interface says so), its base the map
    else:  # pragma: no cover - no C library mmap to call
        mm = _mmap.mmap(fh.fileno(), nbytes, access=_mmap.ACCESS_READ)
        arr = np.frombuffer(mm, dtype=dt, count=rows * width)
    maps.append(mm)
    return _from_raw(arr.reshape(rows, width), dname)


def _read_npy_ints(op: Path, count: int) -> np.ndarray:
    """The 1-D integer array in the .npy file ``op`` expected to hold ``count`` entries: read whole through
    :func:`gradkit._io.read_regular` (bounded by what ``count`` entries and a header can take) and parsed here, header
    then data, so a header claiming a huge shape is compared with the bytes present rather than allocated, and no
    pickle is ever loaded."""
    import io as _io_mod

    data = read_regular(op, count * 8 + (1 << 16), "open", IndexFormatError)
    bad = f"open: {op} is not a plain numpy array"
    bio = _io_mod.BytesIO(data)
    try:
        major, _minor = np.lib.format.read_magic(bio)
        # format 3 is format 2 with a UTF-8 header (ASCII for any integer array)
        read_header = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0,
                       3: np.lib.format.read_array_header_2_0}.get(major)
        if read_header is None:
            raise ValueError(f"format version {major}")
        shape, fortran, dtype = read_header(bio)
    except (ValueError, TypeError, SyntaxError, OverflowError) as e:
        raise IndexFormatError(f"{bad} ({e})") from None
    if dtype.hasobject:
        raise IndexFormatError(f"{bad} (it holds Python objects, which gradkit never unpickles)")
    n = math.prod(shape)
    if n * dtype.itemsize != len(data) - bio.tell():
        raise IndexFormatError(f"{bad} (its header claims {n} entries of {dtype.itemsize} bytes but "
                               f"{len(data) - bio.tell()} bytes of data follow)")
    return np.frombuffer(data, dtype=dtype, count=n, offset=bio.tell()).reshape(shape, order="F" if fortran else "C")


def _release(view: torch.Tensor, mm, lo_row: int, hi_row: int) -> None:
    """Drop the pages of rows [lo_row, hi_row) from this process (MADV_DONTNEED on a read-only
    file mapping: the page cache keeps them while memory allows; the next read faults them in)."""
    import mmap as _mmap

    if not hasattr(mm, "madvise") or not hasattr(_mmap, "MADV_DONTNEED"):
        return
    rb = view.shape[1] * view.element_size()
    page = _mmap.PAGESIZE
    start = (lo_row * rb) // page * page
    end = min(len(mm), hi_row * rb)
    if end > start:
        try:
            mm.madvise(_mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass


def _raise_rank_failure(own: Optional[BaseException], failed: List[int], msg: str) -> NoReturn:
    """After the ranks combined their outcomes: the failing rank re-raises its own error (its cause
    chain kept, ``msg`` added as a note), the others raise DistributedBuildError(msg)."""
    _distributed.raise_rank_failure(own, failed, msg, DistributedBuildError)


_AGREED = ("modules", "dtype", "projection", "per_token", "shard_rows", "resume", "overwrite")


def _agree_on_arguments(d, err: Optional[BaseException], settings: Optional[dict], path) -> None:
    """create's first collective (every rank, before anything is written): :func:`gradkit._dist.agree` on
    whether the rank's arguments were valid and on each setting that must be the same on every rank. A rank
    that refused its arguments raises its own error (with a note), the others DistributedBuildError;
    settings that differ between the ranks raise ValueError naming them on every rank."""
    _distributed.agree(d, err, _AGREED, settings, what="GradientIndex.create", job="the distributed build",
                       after=f"nothing was written to {path}", other_error=DistributedBuildError)


_dist = _distributed.group


class _WriterLock:
    """An exclusive advisory lock (``flock``) on ``path / name``, held by one index writer.

    Released by :meth:`release` or when the object is garbage collected; a copy inherited by a forked
    child only closes its descriptor there (the lock stays with the process that took it). The lock
    file itself is never removed (removing it would let two writers lock two different files)."""

    def __init__(self, path: Path, name: str, whose: str = "") -> None:
        self.fd: Optional[int] = None
        self.pid = os.getpid()
        if fcntl is None:  # pragma: no cover - not POSIX
            return
        fd = os.open(str(path / name), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RuntimeError(f"path: {path} is being written by another writer (the lock {path / name}{whose} "
                                   "is held by a GradientIndex.create not closed yet, in this process or another); "
                                   "close() that writer before creating, resuming or overwriting this index") from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return  # a file system without flock: the build goes on unlocked
            raise
        self.fd = fd

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        if os.getpid() == self.pid:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:  # pragma: no cover
                pass
        try:
            os.close(fd)
        except OSError:  # pragma: no cover
            pass

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _bergson_dirs(p: Path) -> List[Path]:
    """The directories of a bergson index at ``p``: ``[p]`` (its own info.json), its ``*shard*``
    sub-directories holding an info.json (a sharded index), or none."""
    if (p / "info.json").exists():
        return [p]
    if not p.is_dir():
        return []
    return sorted(c for c in p.iterdir() if c.is_dir() and "shard" in c.name and (c / "info.json").exists())


def _check_header_fields(h, f: Path, what: str) -> None:
    """Refuse (IndexFormatError naming the field) a gradkit header or rank header whose fields have the
    wrong JSON types, or that lists one shard or token file twice (fields left out are checked by the caller)."""
    if not isinstance(h, dict):
        raise IndexFormatError(f"{what}: {f} is not a gradkit index header (a JSON object)")

    def bad(field: str, want: str, v) -> NoReturn:
        raise IndexFormatError(f"{what}: {f} field {field} must be {want}, got {v!r}")

    def count(field: str, v) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            bad(field, "an int >= 0", v)

    for k in ("count", "examples", "nonfinite_rows", "rank"):
        if k in h:
            count(k, h[k])
    if "per_token" in h and not isinstance(h["per_token"], bool):
        bad("per_token", "a bool", h["per_token"])
    if "modules" in h:
        mods = h["modules"]
        if not isinstance(mods, list) or not all(isinstance(m, list) and len(m) == 2 for m in mods):
            bad("modules", "a list of [name, dim] pairs", mods)
    for key, n_key in (("shards", "rows"), ("token_files", "examples")):
        if key not in h:
            continue
        items = h[key]
        if not isinstance(items, list):
            bad(key, "a list", items)
        seen = set()
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                bad(f"{key}[{i}]", "an object", it)
            if not isinstance(it.get("file"), str):
                bad(f"{key}[{i}].file", "a string", it.get("file"))
            count(f"{key}[{i}].{n_key}", it.get(n_key))
            if "rank" in it:
                count(f"{key}[{i}].rank", it["rank"])
            name = Path(it["file"]).name
            if name in seen:
                raise IndexFormatError(f"{what}: {f} lists the file {name!r} more than once in {key}")
            seen.add(name)
    if "complete" in h and not isinstance(h["complete"], bool):
        bad("complete", "a bool", h["complete"])  # "false" (a string) read as a complete index
    if "byteorder" in h and h["byteorder"] != "little":
        bad("byteorder", "'little'", h["byteorder"])
    world = h.get("world_size", 1)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        bad("world_size", "an int >= 1", world)
    # gradkit names rank r's shards r<r>-000000, r<r>-000001, ... in the order it fills them, and lists them
    # so (rank 0's, then rank 1's, ...): anything else is a damaged header (resume would start its next shard
    # under a name the header already uses, truncating that shard)
    nxt: Dict[int, int] = {}
    last = 0
    for it in h.get("shards", []):
        name = Path(it["file"]).name
        m = _SHARD_RE.match(name)
        if m is None:
            continue  # refused by the caller, which names the file
        r, seq = int(m.group(1)), int(m.group(2))
        if r != it.get("rank", 0):
            raise IndexFormatError(f"{what}: {f} lists shard file {name!r} with rank {it.get('rank', 0)} (its name "
                                   f"says rank {r})")
        if r >= world:
            raise IndexFormatError(f"{what}: {f} lists shard file {name!r} of rank {r} but world_size is {world}")
        if r < last:
            raise IndexFormatError(f"{what}: {f} lists the shards of rank {r} after those of rank {last}")
        want = nxt.get(r, 0)
        if seq != want:
            raise IndexFormatError(f"{what}: {f} lists the shards of rank {r} out of order: {name!r} where "
                                   f"'r{r:05d}-{want:06d}.bin' belongs")
        nxt[r], last = want + 1, r
    # one token file per rank, listed in rank order: open() joins their counts in the listed order, so a
    # reordered list would map every per-token row to the wrong example
    last = -1
    for it in h.get("token_files", []):
        name = Path(it["file"]).name
        m = _TOKENS_RE.match(name)
        if m is None:
            continue  # refused by the caller, which names the file
        r = int(m.group(1))
        if r != it.get("rank", r):
            raise IndexFormatError(f"{what}: {f} lists token file {name!r} with rank {it['rank']} (its name "
                                   f"says rank {r})")
        if r >= world:
            raise IndexFormatError(f"{what}: {f} lists token file {name!r} of rank {r} but world_size is {world}")
        if r <= last:
            raise IndexFormatError(f"{what}: {f} lists the token file of rank {r} after that of rank {last}")
        last = r


# --------------------------------------------------------------------------- preconditioning


# guards every Precondition's cache of powers (a module-level lock: Precondition objects stay copyable / picklable)
_PRECONDITION_LOCK = threading.Lock()


class Precondition:
    """Preconditioning for :meth:`GradientIndex.search`.

    ``matrix``: a symmetric positive-definite (D, D) tensor over the index's modules in order,
    or a dict module name -> (d_m, d_m) (block diagonal; modules left out use the identity).
    ``mode``:

    * ``"query"`` — score ``q H^-1 . x`` (H^-1 applied to the queries only; influence-function
      style, like bergson's one-sided preconditioning).
    * ``"both"`` — score ``cos(H^-1/2 q, H^-1/2 x)``: H^-1/2 is applied to both sides and both are
      unit-normalised (bergson's two-sided preconditioning). The index rows are transformed block
      by block while streaming; nothing is written back.

    ``damping`` is added to every eigenvalue before the power is taken (a matrix whose smallest
    eigenvalue is then not positive is refused). A bare tensor or dict passed as ``precondition=``
    means ``Precondition(matrix, mode="query")``. The powers are computed once per damping (float64
    eigh) and cached on this object, so reuse it across searches; assigning ``damping`` or ``matrix``
    validates the value and drops the cached powers, assigning ``mode`` validates it, and a matrix
    edited in place (its tensor's version counter moves) has its powers computed again. Each power
    is kept as a float32 matrix whose largest entry is in [0.5, 1) and a power of two (H^p = M * 2**e), so any H float64 can hold gives the same cosines
    as H scaled by a positive constant; search applies M in float64 and carries 2**e exactly.
    """

    def __init__(self, matrix, mode: str = "query", damping: float = 0.0) -> None:
        self._cache: Dict[tuple, Tuple[torch.Tensor, int]] = {}
        self.mode = mode
        self._damping = self._check_damping(damping)
        self.matrix = matrix

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
        self._mode = mode

    @property
    def matrix(self):
        return self._matrix

    @matrix.setter
    def matrix(self, matrix) -> None:
        """Assigning a new matrix (or dict) validates it and drops the cached powers of the old one."""
        if isinstance(matrix, torch.Tensor):
            self._check_square(matrix, "matrix")
        elif isinstance(matrix, Mapping):
            if not matrix:
                raise ValueError("matrix: the dict of per-module matrices is empty")
            for name, h in matrix.items():
                if not isinstance(name, str):
                    raise TypeError(f"matrix: module names must be strings, got {name!r}")
                self._check_square(h, f"matrix[{name!r}]")
        else:
            raise TypeError(f"matrix: expected a (D, D) tensor or a dict name -> (d, d) tensor, "
                            f"got {type(matrix).__name__}")
        self._matrix = matrix
        # (module key, p, damping, the matrix's identity and version) -> (M float32, e): (H + damping I)^p = M * 2**e
        self._cache.clear()

    @staticmethod
    def _check_damping(damping) -> float:
        # numbers.Real: numpy's float32 / int64 scalars too, as every numeric argument
        try:
            ok = not isinstance(damping, (bool, np.bool_)) and isinstance(damping, numbers.Real) \
                and math.isfinite(damping) and damping >= 0
        except OverflowError:  # an int past float's range
            ok = False
        if not ok:
            raise ValueError(f"damping: expected a finite number >= 0, got {damping!r}")
        return float(damping)

    @property
    def damping(self) -> float:
        return self._damping

    @damping.setter
    def damping(self, value) -> None:
        value = self._check_damping(value)
        if value != self._damping:
            self._cache.clear()  # powers of the old damping are never used again
        self._damping = value

    @staticmethod
    def _check_square(h, what: str) -> None:
        if not isinstance(h, torch.Tensor) or not h.is_floating_point():
            raise TypeError(f"{what}: expected a floating tensor, got {getattr(h, 'dtype', type(h).__name__)}")
        if h.dim() != 2 or h.shape[0] != h.shape[1] or h.shape[0] == 0:
            raise ValueError(f"{what}: expected a square (d, d) matrix, got shape {tuple(h.shape)}")
        _no_meta(h, what)
        if not torch.isfinite(h).all():
            raise ValueError(f"{what}: contains NaN or Inf")

    def _power(self, key: str, h: torch.Tensor, p: float) -> Tuple[torch.Tensor, int]:
        """(M, e) with (h + damping I)^p = M * 2**e: M float32 with its largest |entry| in [0.5, 1) (the power is
        computed in float64; only its rounding to float32 is inexact, so H's scale never over- or underflows)."""
        # the tensor's identity and version counter: a matrix replaced in a dict, or edited in place (h.mul_(2),
        # h.copy_(h2)), is not served the powers of what it held before (session 39)
        # The cache entry holds the tensor itself (session 40): while it is cached its id cannot be given to a new
        # tensor, so a dict entry replaced by a new matrix (the old one freed) never matches the old entry's key.
        ck = (key, str(p), self._damping, id(h), h._version)
        hit = self._cache.get(ck)
        if hit is None or hit[2] is not h:
            # the matrix as it is now (a dict's entries can be replaced after construction): validated by name
            self._check_square(h, f"precondition: matrix[{key[7:]}]" if key.startswith("module ") else
                               "precondition: matrix")
            h64 = h.detach().to("cpu", torch.float64)
            # gradkit's one symmetry rule (as for OBS Hessians): round-off asymmetry (an fp32 Gram a @ a.T from
            # BLAS is rarely bitwise symmetric) is not an error, and the symmetric part is used
            check_symmetric(h64, f"precondition: matrix for {key}", max(1e-3, 16 * torch.finfo(h.dtype).eps))
            ev, vec = torch.linalg.eigh((h64 + h64.T) / 2)
            ev = ev + self._damping
            if float(ev.min()) <= 0:
                raise ValueError(f"precondition: matrix for {key} is not positive definite (smallest eigenvalue "
                                 f"{float(ev.min()):.3g} after damping={self._damping}); pass damping > 0")
            pw = (vec * ev.pow(p)) @ vec.T
            amax = float(pw.abs().max())
            if not (math.isfinite(amax) and amax > 0):
                raise ValueError(f"precondition: matrix for {key}: its power {p} is not finite in float64 (eigenvalues "
                                 f"{float(ev.min()):.3g} .. {float(ev.max()):.3g}); rescale the matrix")
            e = math.frexp(amax)[1]
            hit = (GradientIndex._ldexp64(pw, -e).to(torch.float32), e, h)
            # Session 43: one Precondition shared by searches on several threads (reused, as above) raised
            # "RuntimeError: dictionary changed size during iteration" here (another thread inserting its entry
            # while this one listed the old ones), or KeyError on a ``del`` / the final lookup of an entry another
            # thread had dropped. The cache is changed under a lock, and this call returns what it computed.
            with _PRECONDITION_LOCK:
                for old in [c for c in self._cache if c[:3] == ck[:3]]:  # what this module's matrix held before
                    self._cache.pop(old, None)
                self._cache[ck] = hit
        return hit[:2]

    def blocks(self, modules: "OrderedDict[str, int]", p: float) -> List[Tuple[int, int, torch.Tensor, int]]:
        """[(lo, hi, M, e)] over dense module coordinates (module order, no padding): the block's
        (H + damping I)^p is the float32 M times 2**e."""
        dims = list(modules.values())
        total = sum(dims)
        if isinstance(self.matrix, torch.Tensor):
            if self.matrix.shape[0] != total:
                raise ValueError(f"precondition: matrix is {self.matrix.shape[0]} x {self.matrix.shape[0]} but the "
                                 f"index has {total} dims")
            return [(0, total) + self._power("the full matrix", self.matrix, p)]
        unknown = [n for n in self.matrix if n not in modules]
        if unknown:
            raise ValueError(f"precondition: matrices for modules the index does not have: {unknown}")
        out, lo = [], 0
        for name, d in modules.items():
            if name in self.matrix:
                h = self.matrix[name]
                if not isinstance(h, torch.Tensor) or h.dim() != 2:  # an entry replaced after construction
                    self._check_square(h, f"precondition: matrix[{name!r}]")
                if h.shape[0] != d:
                    raise ValueError(f"precondition: matrix[{name!r}] is {h.shape[0]} x {h.shape[0]} but module "
                                     f"{name!r} has {d} dims")
                out.append((lo, lo + d) + self._power(f"module {name!r}", h, p))
            lo += d
        return out


# --------------------------------------------------------------------------- the index


class GradientIndex:
    """A gradient index directory: build with :meth:`create`, read with :meth:`open`.

    Attributes: ``path``, ``modules`` (ordered name -> dim), ``dim``, ``dtype``, ``projection``
    (dict or None), ``per_token``, ``layout`` (``"gradkit"`` or ``"bergson"``), ``nonfinite_rows``
    (rows refused for NaN/Inf), ``offsets`` (per-token: int64 array of ``num_examples + 1`` row
    offsets; example i owns rows ``offsets[i]:offsets[i+1]``). ``len(index)`` is the number of
    stored rows (one per example, or one per token for per-token indexes).
    """

    def __init__(self, *args, **kwargs) -> None:  # pragma: no cover - guard against direct use
        raise TypeError("GradientIndex: use GradientIndex.create(path, ...) or GradientIndex.open(path)")

    # ------------------------------------------------------------------ construction

    @classmethod
    def _blank(cls) -> "GradientIndex":
        self = object.__new__(cls)
        self._writable = False
        self._closed = False
        self._opened = False  # made by open(): its close() releases the memory maps
        self._released = False  # a reader closed: its maps released, reads refused
        self._reads = 0  # reads in flight (get / search): a close() meanwhile releases the maps after the last
        self._release_pending = False
        self._reads_lock = threading.Lock()
        self._write_lock = threading.RLock()  # a writer's appends / commits / close, one at a time (_serialised)
        self._shards: List[Tuple[int, torch.Tensor]] = []  # (first row, (rows, width) view)
        self._offsets = None
        self.nonfinite_rows = 0
        self._upcast = False
        self._maps: list = []
        self.low_memory = False
        self._projection_warned = False
        self._lock: Optional[_WriterLock] = None
        self.row_offset = 0
        self.example_offset = 0
        self._resumed_complete: Optional[dict] = None  # resume of a complete index: its header (see _abort)
        self._resumed_state: Optional[dict] = None
        return self

    @classmethod
    def create(cls, path, modules, dtype=torch.float16, projection=None, per_token: bool = False,
               shard_rows: Optional[int] = None, resume: bool = False, *, overwrite: bool = False,
               on_nonfinite: str = "skip", distributed: Optional[bool] = None) -> "GradientIndex":
        """Start (or with ``resume=True`` continue) building an index at ``path``.

        modules: ordered dict name -> dim (the row layout: modules concatenated in this order).
        dtype: storage dtype (float16, bfloat16 or float32). projection: the projection config
        (a JSON-able dict incl. seed and kind, or None), stored in the header and compared on
        search. per_token: rows are tokens; ``append`` then takes per-example token counts.
        shard_rows: rows per shard file (None: one growing shard per rank). resume: continue the
        (interrupted or complete) build at ``path`` after its last committed row; its modules,
        dtype, projection, per_token and shard_rows must equal the arguments. overwrite: replace an index
        already at ``path`` (a bergson index, flat or sharded, is never replaced). on_nonfinite:
        default policy for rows with NaN/Inf ("skip": refuse the row, count it and warn; in a
        per-token index only that token's row, see :meth:`append`; "error": raise before writing
        anything of the chunk). The writer holds an exclusive lock on the index directory until
        ``close()`` (or an aborted build, or its garbage collection): a second ``create`` of the
        same index meanwhile raises ``RuntimeError`` (see the module docstring). distributed:
        build across the ranks of the initialised default process group (default:
        when torch.distributed is initialised); ``create`` is then a collective call, every rank must pass
        the same settings (all but path and on_nonfinite; checked before anything is written), and if any
        rank refuses its arguments or fails to prepare or load its state, every rank raises (that rank its
        own error, the others :class:`DistributedBuildError`) and none is left with a writer.
        """
        # distributed: decided first, so that a rank refusing its arguments still makes the collective call
        # the other ranks make (an argument error on one rank alone left them waiting for the process group's
        # timeout); an invalid value is refused, on every rank when the process group is initialised
        dist_err = None
        if distributed is not None:
            try:
                distributed = flag(distributed, "distributed")
            except TypeError:
                dist_err = TypeError(f"distributed: expected a bool or None, got {type(distributed).__name__}")
        d = _dist() if distributed is not False else None
        if distributed is True and d is None:
            raise ValueError("distributed: torch.distributed is not initialised")
        err: Optional[BaseException] = None
        try:
            if dist_err is not None:
                raise dist_err
            mods = _check_modules(modules)
            dname = _dtype_name(dtype)
            proj = _projection_dict(projection)
            try:  # session 42: NaN / Infinity were written as is, a header strict JSON readers refuse
                json.dumps(proj, allow_nan=False)
            except ValueError:
                raise ValueError("projection: holds NaN or Infinity, which JSON (the index header) cannot hold; "
                                 "pass finite numbers") from None
            other = _module_order_mismatch(proj, list(mods))
            if other is not None:  # a collector's flat rows appended here would land in other modules' columns
                raise ValueError(f"modules: given in the order {list(mods)}, but the projection's modules (its "
                                 f"collector's flat rows) are in the order {other}; create the index with the "
                                 "projection's order (modules=col.module_dims with projection=col)")
            per_token = flag(per_token, "per_token")
            if shard_rows is not None:
                shard_rows = _int_arg(shard_rows, "shard_rows", 1)
            resume, overwrite = flag(resume, "resume"), flag(overwrite, "overwrite")
            if resume and overwrite:
                raise ValueError("resume, overwrite: choose one (resume continues the index, overwrite replaces it)")
            if on_nonfinite not in _POLICIES:
                raise ValueError(f"on_nonfinite: expected one of {_POLICIES}, got {on_nonfinite!r}")
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"path: expected a str or path, got {type(path).__name__}")
            if not os.fspath(path):
                raise ValueError("path: is empty (an empty path would be the current directory)")
        except BaseException as e:  # noqa: BLE001 - re-raised below (after the collective)
            if d is None:
                raise
            err = e
        if d is not None:
            settings = None if err is not None else {
                "modules": [[n, dm] for n, dm in mods.items()], "dtype": dname, "projection": proj,
                "per_token": per_token, "shard_rows": shard_rows, "resume": resume, "overwrite": overwrite}
            _agree_on_arguments(d, err, settings, path)
        rank, world = (d.get_rank(), d.get_world_size()) if d is not None else (0, 1)

        self = cls._blank()
        self.path = Path(path)
        self.modules = mods
        self.dim = sum(mods.values())
        self._width = self.dim
        self._cols = {}
        lo = 0
        for n, dm in mods.items():
            self._cols[n] = (lo, lo + dm)
            lo += dm
        self._dname = dname
        self.dtype = _DTYPES[dname]
        self.projection = proj
        self.per_token = per_token
        self.layout = "gradkit"
        self._shard_rows = shard_rows
        self._policy = on_nonfinite
        self._rank, self._world, self._dist = rank, world, d
        self._row_bytes = self.dim * self.dtype.itemsize

        try:
            self._start(resume, overwrite)
        except BaseException as e:
            state = self._undo_start(resume)
            self._unlock()
            if isinstance(e, OSError) and e.errno is not None and not isinstance(
                    e, (FileExistsError, NotADirectoryError, IsADirectoryError)):  # (those name the path already)
                # (a disk-full / file-size-limit failure) named with the index and what it left; the errno is kept
                raise OSError(e.errno, f"gradkit.index: {'resuming' if resume else 'creating'} {self.path} failed "
                              f"({e.strerror or e}); {state}") from e
            raise
        self._writable = True
        if self._resumed_complete is not None:  # the committed state the resume started from, as _abort compares it
            self._resumed_state = self._state_header(complete=False)
        return self

    def _start(self, resume: bool, overwrite: bool) -> None:
        """create's collective part: prepare the directory (rank 0), then every rank its own state."""
        d, rank, world = self._dist, self._rank, self._world
        # rank 0 prepares the directory; every rank learns whether that worked
        err: Optional[BaseException] = None
        if rank == 0:
            try:
                self._prepare_dir(resume, overwrite)
            except BaseException as e:  # noqa: BLE001 - re-raised below on every rank
                err = e
        if d is not None:
            if _distributed.broadcast_flag(d, err is not None) and err is None:
                raise DistributedBuildError("GradientIndex.create: rank 0 failed to prepare the index directory "
                                            f"{self.path} (see rank 0's error)")
        if err is not None:
            raise err
        if d is not None and world > 1:
            self._check_same_directory()
        # every rank loads (resume) or starts its own state; a failure on any rank (e.g. a damaged
        # shard of rank 1 on resume) is combined in one all_gather, so that no rank goes on to a
        # build whose close() would wait for the failed rank until the process group times out
        try:
            self._load_rank_state(resume)
        except BaseException as e:  # noqa: BLE001 - re-raised below (after the collective)
            err = e
        if d is not None:
            failed = [r for r, (bad,) in enumerate(_distributed.gather_ints(d, [0 if err is None else 1])) if bad]
            if failed:
                _raise_rank_failure(err, failed, (
                    f"GradientIndex.create: rank(s) {failed} of {world} failed to "
                    f"{'load their committed state of' if resume else 'start their shards in'} {self.path} "
                    "(see those ranks' errors); no rank opened it for writing and it is not marked complete"))
        if err is not None:
            raise err

    def _check_same_directory(self) -> None:
        """Every rank's ``path`` names the directory rank 0 prepared (the ranks compare paths by content, not by
        name: one directory may have other names on other nodes). Rank 0 writes a random token into it, every
        other rank reads the token at its own path; ranks given different directories appended all their rows
        and failed only in close(), when rank 0 found no shard of theirs. The token file is removed once read."""
        import secrets

        d, rank = self._dist, self._rank
        tok_path = self.path / _BUILD_TOKEN
        err: Optional[BaseException] = None
        token = -1
        if rank == 0:
            token = secrets.randbits(62)
            try:
                _atomic_write_json(tok_path, {"token": token})
            except BaseException as e:  # noqa: BLE001 - shared below
                err, token = e, -1
        token = _distributed.gather_ints(d, [token])[0][0]
        if rank != 0 and token >= 0:
            try:
                seen = parse_json(read_regular(tok_path, 1 << 10, "path", ValueError), tok_path, "path")
            except (OSError, ValueError):
                seen = None
            if not isinstance(seen, dict) or seen.get("token") != token:
                err = ValueError(f"path: {self.path} on rank {rank} is not the directory rank 0 prepared (rank 0's "
                                 "build token is not there): every rank must pass the same directory, on a file "
                                 "system every rank sees; nothing was written to it")
        try:
            _distributed.share_outcome(d, err, what="GradientIndex.create", after=(
                "no rank opened the index for writing"), other_error=DistributedBuildError)
        finally:
            if rank == 0:
                try:
                    tok_path.unlink(missing_ok=True)
                except OSError:
                    pass

    def _undo_start(self, resume: bool) -> str:
        """After a failed create(): no writer exists, so nothing it began may look like an index. A new build's first
        header (0 rows, incomplete) is removed; a resumed complete index gets its complete header back (a resume only
        cuts uncommitted bytes, so its committed rows are as they were). Returns what was left, for the error."""
        hdr = self.path / HEADER
        if not resume:
            if self._rank == 0 and getattr(self, "_wrote_first_header", False):
                try:
                    hdr.unlink(missing_ok=True)
                except OSError:
                    return f"its empty header {hdr} could not be removed either; delete {self.path} and create it again"
            return f"no index was created (nothing at {self.path} opens as one); create it again once the cause is fixed"
        if self._rank == 0 and self._resumed_complete is not None:
            try:
                _atomic_write_json(hdr, self._resumed_complete)
                return "the index is as it was: its committed rows, marked complete"
            except OSError:
                pass
        return ("its committed rows are as they were and it is not marked complete; create(..., resume=True) again "
                "once the cause is fixed")

    def _unlock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def _base_header(self, complete: bool) -> dict:
        return {"format": FORMAT, "version": VERSION, "complete": complete, "world_size": self._world,
                "modules": [[n, dm] for n, dm in self.modules.items()], "dim": self.dim, "dtype": self._dname,
                "byteorder": "little", "projection": self.projection, "per_token": self.per_token,
                "shard_rows": self._shard_rows}

    def _check_same(self, h: dict, where: str) -> None:
        mods = [[n, dm] for n, dm in self.modules.items()]
        diffs = []
        if [list(m) for m in h.get("modules", [])] != mods:
            diffs.append(f"modules {h.get('modules')} != {mods}")
        if h.get("dtype") != self._dname:
            diffs.append(f"dtype {h.get('dtype')} != {self._dname}")
        if h.get("projection") != self.projection:
            diffs.append(f"projection {h.get('projection')} != {self.projection}")
        if h.get("per_token") != self.per_token:
            diffs.append(f"per_token {h.get('per_token')} != {self.per_token}")
        if h.get("world_size") != self._world:
            diffs.append(f"world_size {h.get('world_size')} != {self._world}")
        if "shard_rows" in h and h["shard_rows"] != self._shard_rows:
            # the shards already written have the old size: a build of two shard sizes would misdescribe its
            # files (the header records one shard_rows)
            diffs.append(f"shard_rows {h['shard_rows']} != {self._shard_rows}")
        if diffs:
            raise ValueError(f"resume: the index at {where} was built with different settings: " + "; ".join(diffs))

    def _own_files(self) -> List[Path]:
        """The files of a gradkit index (by gradkit's own name patterns only: anything else a user keeps
        in the directory, or in shards/, is left alone)."""
        sd = self.path / SHARD_DIR
        out = []
        if sd.is_dir():
            for f in sd.iterdir():
                if _SHARD_RE.match(f.name) or _TOKENS_RE.match(f.name) or _RANK_RE.match(f.name):
                    out.append(f)
        for extra in (HEADER, HEADER + ".tmp"):
            if (self.path / extra).exists():
                out.append(self.path / extra)
        return out

    def _prepare_dir(self, resume: bool, overwrite: bool) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise NotADirectoryError(f"path: {p} exists and is not a directory")
        hdr = p / HEADER
        if resume:
            if not hdr.exists():
                raise IndexFormatError(f"resume: {p} has no committed header ({HEADER}); there is nothing to resume "
                                       "(start a new build without resume=True)")
            self._lock = _WriterLock(p, LOCK)  # before anything on disk changes
            h = _read_json(hdr, "resume")
            if not isinstance(h, dict) or h.get("format") != FORMAT:
                raise IndexFormatError(f"resume: {hdr} is not a gradkit index header")
            _check_header_fields(h, hdr, "resume")
            self._check_same(h, str(p))
            if h.get("complete") is True:
                # restored when the resumed build adds nothing: by _abort (one process), by close() (several: rank 0,
                # once the ranks' gathered totals show nothing new was committed)
                self._resumed_complete = dict(h)
            h["complete"] = False
            _atomic_write_json(hdr, h)
            return
        self._refuse_existing(overwrite)  # before the lock file is made: nothing is added to a refused directory
        made = not p.exists()
        try:
            p.mkdir(parents=True, exist_ok=True)
        except (NotADirectoryError, FileExistsError) as e:  # session 42: "[Errno 20] Not a directory", unnamed
            bad = next((q for q in (p, *p.parents) if q.exists() and not q.is_dir()), p)
            raise NotADirectoryError(f"path: {p} cannot be made a directory: {bad} is not a directory "
                                     f"({e.strerror or e})") from None
        if made:  # the directory's own name durable, so a power loss cannot make a finished index disappear
            _fsync_dir(p.parent)
        self._lock = _WriterLock(p, LOCK)  # before anything of an old index changes
        self._refuse_existing(overwrite)  # again under the lock (another writer may have finished meanwhile)
        # discard an old index (overwrite) or the leftovers of a build that never committed
        for f in self._own_files():
            f.unlink()
        (p / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        h = self._base_header(False)
        h.update({"count": 0, "examples": 0, "nonfinite_rows": 0, "shards": [], "token_files": []})
        _atomic_write_json(hdr, h)
        self._wrote_first_header = True  # a create() that fails after this removes it (_undo_start)

    def _refuse_existing(self, overwrite: bool) -> None:
        p = self.path
        berg = _bergson_dirs(p)
        if berg:
            what = "info.json" if berg == [p] else f"{len(berg)} shard directories with info.json, e.g. {berg[0].name}"
            raise FileExistsError(f"path: {p} holds a bergson index ({what}); choose another directory")
        if (p / HEADER).exists() and not overwrite:
            raise FileExistsError(f"path: {p} already holds a gradkit index; pass resume=True to continue it or "
                                  "overwrite=True to replace it")

    def _rank_header_path(self) -> Path:
        return self.path / SHARD_DIR / f"rank-{self._rank:05d}.json"

    def _load_rank_state(self, resume: bool) -> None:
        """This rank's committed state (empty for a new build) and the files trimmed to it."""
        if self._rank != 0:  # rank 0 took LOCK in _prepare_dir; every other rank locks its own files
            self._lock = _WriterLock(self.path, f"{LOCK}-r{self._rank:05d}", f" of rank {self._rank}")
        shards: List[dict] = []
        tokens_examples = 0
        nonfinite = 0
        if resume:
            h = _read_json(self.path / HEADER, "resume")
            _check_header_fields(h, self.path / HEADER, "resume")
            self._check_same(h, str(self.path))
            src, own = h, False
            if self._world > 1 and self._rank_header_path().exists():
                src, own = _read_json(self._rank_header_path(), "resume"), True
                _check_header_fields(src, self._rank_header_path(), "resume")
            shards = [dict(s) for s in src.get("shards", []) if int(s.get("rank", 0)) == self._rank]
            for tf in src.get("token_files", []):
                if int(tf.get("rank", 0)) == self._rank:
                    tokens_examples = int(tf["examples"])
            # the refused rows counted once: in a multi-process build each rank's own header holds its own count (every
            # rank that committed has one; the merged header's total already holds them all: session 39, rank 0
            # without a header of its own took that total and close() added the other ranks' counts again)
            if self._world == 1 or own:
                nonfinite = int(src.get("nonfinite_rows", 0))
        sd = self.path / SHARD_DIR
        sd.mkdir(parents=True, exist_ok=True)
        # cut uncommitted bytes, remove uncommitted shard files of this rank
        keep = set()
        for s in shards:
            f = self.path / s["file"]
            if not _SHARD_RE.match(f.name) or f.parent != sd:
                raise IndexFormatError(f"resume: unexpected shard file name {s['file']!r} in the header")
            need = int(s["rows"]) * self._row_bytes
            if not f.exists() or f.stat().st_size < need:
                raise IndexFormatError(f"resume: shard {f} is shorter than its {s['rows']} committed rows")
            os.truncate(f, need)
            keep.add(f.name)
        for f in sd.iterdir():
            m = _SHARD_RE.match(f.name)
            if m and int(m.group(1)) == self._rank and f.name not in keep:
                f.unlink()
        self._tokens_file = sd / f"r{self._rank:05d}.tokens.bin"
        if self.per_token:
            need = tokens_examples * 8
            if self._tokens_file.exists():
                if self._tokens_file.stat().st_size < need:
                    raise IndexFormatError(f"resume: {self._tokens_file} is shorter than its committed examples")
                os.truncate(self._tokens_file, need)
            elif need:
                raise IndexFormatError(f"resume: {self._tokens_file} is missing")
            else:
                self._tokens_file.touch()
        self._w_shards = shards                      # working state
        self._w_examples = tokens_examples
        self._w_nonfinite = nonfinite
        self._commit_snapshot()
        self._fds: Dict[str, int] = {}
        self._dirty: set = set()
        self._new_names = True  # shards/ (made, trimmed or given a tokens file) is fsynced by the next commit

    def _commit_snapshot(self) -> None:
        self._c_shards = [dict(s) for s in self._w_shards]
        self._c_examples = self._w_examples
        self._c_nonfinite = self._w_nonfinite
        self.nonfinite_rows = self._w_nonfinite

    # ------------------------------------------------------------------ writing

    def __enter__(self) -> "GradientIndex":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or not getattr(self, "_writable", False):
            self.close()  # (a reader's close() releases its maps, whatever ended the with-block)
            return
        # any exception, a KeyboardInterrupt included (session 43: one rank's Ctrl-C left the others waiting in close()
        # until the process group timed out)
        if getattr(self, "_writable", False) and self._world > 1 and isinstance(exc, BaseException):
            # the other ranks are in (or on their way to) close()'s collective: join it as a failed rank, so that
            # they raise DistributedBuildError naming this one instead of waiting for it until the process group
            # times out. The error raised here propagates as it is. A DistributedBuildError joins too: raised in
            # this with-block while this writer is open, it came from another index (this one's collectives are
            # create's and close()'s), and a rank that failed there joins this close() as a failed rank.
            try:
                self._close_ranks(failure=exc)
            except BaseException:  # noqa: BLE001 - exc with a note, or the collective's own failure
                pass
        self._abort()

    def __del__(self) -> None:
        # a writer dropped without close(): its lock goes with it (_WriterLock.__del__), and so must its open
        # shard descriptors; on disk it is an interrupted build (resume=True continues after the last commit)
        try:
            if getattr(self, "_writable", False):
                self._close_fds()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __len__(self) -> int:
        if self._writable:
            return sum(int(s["rows"]) for s in self._w_shards)
        return self._count

    @property
    def num_examples(self) -> int:
        """Examples in the index (== len(index) unless per_token)."""
        if self._writable:
            return self._w_examples if self.per_token else len(self)
        return self._examples

    def _fd(self, rel: str) -> int:
        if rel not in self._fds:
            self._fds[rel] = os.open(str(self.path / rel), os.O_WRONLY | os.O_CREAT, 0o644)
        return self._fds[rel]

    def _flatten(self, grads, what: str) -> torch.Tensor:
        """(n, D) float tensor (CPU) from a tensor or a dict of per-module tensors, validated."""
        if isinstance(grads, torch.Tensor):
            if not grads.is_floating_point():
                raise TypeError(f"{what}: expected a floating tensor, got {grads.dtype}")
            _no_meta(grads, what)
            if grads.dim() != 2 or grads.shape[1] != self.dim:
                raise ValueError(f"{what}: expected shape (n, {self.dim}) (the sum of the module dims), got "
                                 f"{tuple(grads.shape)}")
            return grads.detach()
        if isinstance(grads, Mapping):
            missing = [n for n in self.modules if n not in grads]
            extra = [n for n in grads if n not in self.modules]
            if missing or extra:
                raise ValueError(f"{what}: module set differs from the index's: missing {missing}, unknown {extra}")
            parts, n0 = [], None
            for name, dm in self.modules.items():
                g = grads[name]
                if not isinstance(g, torch.Tensor) or not g.is_floating_point():
                    raise TypeError(f"{what}[{name!r}]: expected a floating tensor")
                _no_meta(g, f"{what}[{name!r}]")
                if g.dim() < 1:
                    raise ValueError(f"{what}[{name!r}]: expected shape (n, {dm})")
                g = g.detach().reshape(g.shape[0], math.prod(g.shape[1:])) if g.dim() != 2 else g.detach()
                if g.shape[1] != dm:
                    raise ValueError(f"{what}[{name!r}]: expected {dm} values per row, got {g.shape[1]}")
                if n0 is None:
                    n0 = g.shape[0]
                elif g.shape[0] != n0:
                    raise ValueError(f"{what}[{name!r}]: {g.shape[0]} rows but the first module has {n0}")
                parts.append(g.to("cpu"))
            dt = parts[0].dtype
            for p_ in parts[1:]:
                dt = torch.promote_types(dt, p_.dtype)
            return torch.cat([p_.to(dt) for p_ in parts], dim=1)
        raise TypeError(f"{what}: expected a (n, {self.dim}) tensor or a dict module -> (n, d) tensor, "
                        f"got {type(grads).__name__}")

    @_serialised
    def append(self, grads, num_tokens=None, *, on_nonfinite: Optional[str] = None,
               commit: bool = True) -> torch.Tensor:
        """Append rows; returns the int64 row number given to each input row (-1: refused). In a
        distributed build the numbers count this rank's rows only: after ``close()``, row ``r`` of
        this rank is row ``r + row_offset`` of the index (``row_offset``: the rows of the ranks
        before this one; ``example_offset`` likewise for examples; both 0 in one process).

        grads: (n, D) tensor (modules concatenated in order) or dict name -> (n, d_m).
        num_tokens (per-token indexes only, required there): per-example token counts summing
        to n; example boundaries are stored as offsets. Rows holding NaN/Inf (also after
        casting to the storage dtype, e.g. fp16 overflow) are never stored: with
        ``on_nonfinite="skip"`` (default of create) they are refused, counted in
        ``nonfinite_rows`` and reported with a warning (later rows then take the next row
        numbers: use the returned numbers); ``"error"`` raises NonFiniteGradientError before
        anything of this chunk is written. In a per-token index "skip" refuses single token rows,
        not whole examples: every example of the chunk is kept, in order (example numbers do not
        shift), and its stored token count is ``num_tokens[i]`` less its refused tokens, so
        ``offsets`` and ``example_of`` describe the rows actually stored. An example all of whose
        tokens are refused is kept with 0 tokens (``offsets[i] == offsets[i + 1]``; no row maps to
        it) and still counts in ``num_examples``. ``commit=False`` defers the commit (see commit()).
        An append that fails or is interrupted (disk full, KeyboardInterrupt) goes back to the last
        commit: rows appended with ``commit=False`` since then are discarded too.
        One writer shared by several threads appends their chunks one at a time (each chunk's rows
        contiguous, in the order the calls got the writer; the returned numbers say where); ``close()``
        on another thread waits for a running append, and later appends raise RuntimeError.
        """
        self._check_writable("append")
        commit = flag(commit, "commit")  # commit="no" or None would be taken as True / False
        policy = self._policy if on_nonfinite is None else on_nonfinite
        if policy not in _POLICIES:
            raise ValueError(f"on_nonfinite: expected one of {_POLICIES}, got {policy!r}")
        x = self._flatten(grads, "grads").to("cpu")
        n = x.shape[0]
        counts = None
        if self.per_token:
            if num_tokens is None:
                raise ValueError("num_tokens: required for a per-token index (token count of each example)")
            if isinstance(num_tokens, torch.Tensor):
                _no_meta(num_tokens, "num_tokens")  # (session 42: torch's NotImplementedError before)
                counts = num_tokens.detach().cpu().resolve_neg()  # a negative-bit view: numpy() refuses it
            else:
                try:  # (session 42) strings, None or ints past uint64 in a list: torch's TypeError naming nothing
                    counts = torch.as_tensor(np.asarray(num_tokens))
                except (TypeError, ValueError, OverflowError, RuntimeError):
                    raise TypeError("num_tokens: expected a 1-D sequence of ints") from None
            if counts.dim() == 1 and counts.numel() == 0 and not counts.dtype.is_complex:
                counts = counts.to(torch.int64)  # [] (a float array to numpy and torch): a chunk of no example
            if counts.dim() != 1 or counts.dtype.is_floating_point or counts.dtype.is_complex \
                    or counts.dtype == torch.bool:  # complex: its imaginary part was dropped silently (session 42)
                raise TypeError("num_tokens: expected a 1-D sequence of ints")
            if counts.dtype == getattr(torch, "uint64", None) and counts.numel() \
                    and int(counts.numpy().max()) > n:  # past int64 it would wrap to a negative count
                raise ValueError(f"num_tokens: counts sum to {sum(int(c) for c in counts.numpy())} but grads has "
                                 f"{n} rows")
            counts = counts.to(torch.int64)
            if (counts < 0).any():
                raise ValueError("num_tokens: counts must be non-negative")
            # the exact sum: int64's wrapped (4 counts of 2^62 summed to 0: session 42, such counts were written, and
            # close() then marked complete an index that open() refuses)
            total = sum(counts.tolist()) if counts.numel() and int(counts.max()) > n else int(counts.sum())
            if total != n:
                raise ValueError(f"num_tokens: counts sum to {total} but grads has {n} rows")
        elif num_tokens is not None:
            raise ValueError("num_tokens: only for per-token indexes (create(..., per_token=True))")
        stored = _round_once(x, self.dtype)
        finite = torch.isfinite(x).all(dim=1) & torch.isfinite(stored).all(dim=1)
        nbad = int(n - int(finite.sum()))
        if nbad:
            bad = (~finite).nonzero().flatten().tolist()
            shown = bad[:10]
            overflow = int((torch.isfinite(x).all(dim=1) & ~finite).sum())
            msg = (f"grads: {nbad} of {n} rows hold NaN or Inf" +
                   (f" ({overflow} only after casting to {self._dname})" if overflow else "") +
                   f" (input rows {shown}{'...' if len(bad) > 10 else ''})")
            if policy == "error":
                raise NonFiniteGradientError(msg + "; nothing of this chunk was written")
            warnings.warn(msg + "; these rows were refused (not stored) and counted in nonfinite_rows",
                          RuntimeWarning, stacklevel=2)
            stored = stored[finite]
            if counts is not None:
                ex = torch.repeat_interleave(torch.arange(counts.numel()), counts)
                counts = torch.bincount(ex[finite], minlength=counts.numel()).to(torch.int64)
        first = len(self)
        row_ids = torch.full((n,), -1, dtype=torch.int64)
        row_ids[finite] = torch.arange(first, first + stored.shape[0], dtype=torch.int64)
        # resolve_neg: a float32 view with torch's negative bit set (z.conj().imag, torch._neg_view) reached numpy()
        # unconverted (same dtype, already contiguous), which raised torch's RuntimeError (session 43)
        raw = stored.resolve_neg().contiguous()
        if self._dname == "bfloat16":
            raw = raw.view(torch.int16)
        buf = raw.numpy()
        try:
            self._write_rows(buf)
            if counts is not None:
                fd = self._fd(str(self._tokens_file.relative_to(self.path)))
                os.lseek(fd, self._w_examples * 8, os.SEEK_SET)
                _write_all(fd, counts.numpy().astype("<i8"))
                self._dirty.add(str(self._tokens_file.relative_to(self.path)))
                self._w_examples += int(counts.numel())
            self._w_nonfinite += nbad
            self.nonfinite_rows = self._w_nonfinite  # as len() counts pending rows (a rollback resets both)
        except BaseException as e:
            # any interruption (not only a failed write: KeyboardInterrupt between the rows and their token
            # counts) goes back to the last commit, so that rows are never counted without their counts
            self._rollback()
            if not isinstance(e, OSError):
                raise
            raise OSError(e.errno, f"gradkit.index: writing to {self.path} failed ({e.strerror or e}); "
                          f"{self._failed_state()}") from e
        if commit:
            self.commit()  # raises its own single OSError (already rolled back) on failure
        return row_ids

    def _failed_state(self) -> str:
        """After a rollback: what a failed write or commit left on disk and how to go on."""
        return (f"nothing of this chunk or of the rows appended since the last commit was kept; the index still "
                f"holds its {len(self)} committed rows and is not marked complete (free space, then append again "
                "with this writer, or create(..., resume=True) to continue)")

    def _write_rows(self, buf: np.ndarray) -> None:
        n = buf.shape[0]
        pos = 0
        while pos < n:
            if not self._w_shards or (self._shard_rows is not None and self._w_shards[-1]["rows"] >= self._shard_rows):
                if self._w_shards:  # the full shard is sealed: its descriptor closed now (commit fsyncs it by name),
                    # so that an append spanning many shards holds two descriptors, not one per shard (session 42:
                    # one append of 100 one-row shards failed with EMFILE under a limit of 64 open files)
                    sealed = self._fds.pop(self._w_shards[-1]["file"], None)
                    if sealed is not None:
                        os.close(sealed)
                seq = len(self._w_shards)
                rel = f"{SHARD_DIR}/r{self._rank:05d}-{seq:06d}.bin"
                self._w_shards.append({"file": rel, "rank": self._rank, "rows": 0})
                self._new_names = True
                fd = self._fd(rel)
                os.ftruncate(fd, 0)
            s = self._w_shards[-1]
            take = n - pos if self._shard_rows is None else min(n - pos, self._shard_rows - s["rows"])
            fd = self._fd(s["file"])
            os.lseek(fd, s["rows"] * self._row_bytes, os.SEEK_SET)
            _write_all(fd, buf[pos:pos + take])
            self._dirty.add(s["file"])
            s["rows"] += take
            pos += take

    @_serialised
    def commit(self) -> None:
        """Make every appended row durable: fsync the data, then atomically replace the header. A commit that fails
        or is interrupted (KeyboardInterrupt) before the header is replaced goes back to the last commit (the rows
        appended since are discarded); once it is replaced, the rows stay committed."""
        self._check_writable("commit")
        state = None
        try:
            for rel in sorted(self._dirty):
                if rel in self._fds:
                    os.fsync(self._fds[rel])
                else:  # a shard sealed (and its descriptor closed) since the last commit
                    _fsync_file(self.path / rel)
            # sealed shards need no open descriptor any more
            last = self._w_shards[-1]["file"] if self._w_shards else None
            for rel in list(self._fds):
                if _SHARD_RE.match(Path(rel).name) and rel != last:
                    os.close(self._fds.pop(rel))
            self._dirty.clear()
            if self._new_names:  # the names of new shard files must be durable before a header lists them
                _fsync_dir(self.path / SHARD_DIR)
            state = self._state_header(complete=False)
            _atomic_write_json(self._state_path(), state)
            self._new_names = False
        except OSError as e:
            self._rollback()
            raise OSError(e.errno, f"gradkit.index: committing {self.path} failed ({e.strerror or e}); "
                          f"{self._failed_state()}") from e
        except BaseException:
            # interrupted (KeyboardInterrupt, or any other non-OSError): if the header was replaced already, these
            # rows are committed on disk, and a later rollback to the old snapshot would truncate rows the header
            # lists. If it was not (session 43: the writer went on counting the rows, so an append retried after
            # the interrupt stored them twice), back to the last commit, as a failed commit does; a header that
            # could not be read leaves the writer as it was (it may list the rows).
            published = None
            try:
                published = state is not None and \
                    _read_json(self._state_path(), "commit") == json.loads(json.dumps(state))
            except BaseException:  # noqa: BLE001 - unreadable: which rows it lists is unknown
                pass
            if published:
                self._commit_snapshot()
            elif published is False:
                self._rollback()
            raise
        self._commit_snapshot()

    def _state_path(self) -> Path:
        return self.path / HEADER if self._world == 1 else self._rank_header_path()

    def _state_header(self, complete: bool) -> dict:
        h = self._base_header(complete)
        h.update({"count": sum(int(s["rows"]) for s in self._w_shards),
                  "examples": self._w_examples if self.per_token else sum(int(s["rows"]) for s in self._w_shards),
                  "nonfinite_rows": self._w_nonfinite, "shards": [dict(s) for s in self._w_shards],
                  "token_files": ([{"file": str(self._tokens_file.relative_to(self.path)), "rank": self._rank,
                                    "examples": self._w_examples}] if self.per_token else [])})
        if self._world > 1:
            h["rank"] = self._rank
        return h

    def _rollback(self) -> None:
        """Return the files and the working state to the last commit (best effort)."""
        committed = {s["file"]: int(s["rows"]) for s in self._c_shards}
        for s in self._w_shards:
            f = self.path / s["file"]
            try:
                if s["file"] in committed:
                    os.truncate(f, committed[s["file"]] * self._row_bytes)
                else:
                    fd = self._fds.pop(s["file"], None)
                    if fd is not None:
                        os.close(fd)
                    f.unlink(missing_ok=True)
            except OSError:
                pass
        if self.per_token:
            try:
                os.truncate(self._tokens_file, self._c_examples * 8)
            except OSError:
                pass
        self._w_shards = [dict(s) for s in self._c_shards]
        self._w_examples = self._c_examples
        self._w_nonfinite = self._c_nonfinite
        self.nonfinite_rows = self._c_nonfinite
        self._dirty.clear()

    def _close_fds(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    @_serialised
    def _abort(self) -> None:
        """Leave the build interrupted: committed rows stay (resume=True continues), pending ones go.
        The object then reports the committed state (len, num_examples, repr) and refuses reads.
        A resumed build of a complete index (one process) that committed nothing new since is the index it
        resumed: its header is marked complete again, so an error before any append loses nothing."""
        if self._writable:
            self._rollback()
            self._close_fds()
            if self._world == 1 and self._resumed_complete is not None \
                    and self._state_header(complete=False) == self._resumed_state:
                try:
                    _atomic_write_json(self.path / HEADER, self._resumed_complete)
                except OSError:  # best effort: the index stays incomplete, as before this rule
                    pass
            self._writable = False
            self._closed = True
            self._count = sum(int(s["rows"]) for s in self._c_shards)
            self._examples = self._c_examples if self.per_token else self._count
            self._unlock()

    @_serialised
    def close(self) -> None:
        """Commit pending rows and mark the index complete (all ranks: a collective call).

        Afterwards the object is a read-only, searchable index. Multi-process: if any rank's
        commit fails, every rank raises (that rank its own error, e.g. ``OSError`` ENOSPC, with a
        note naming the failing ranks; the others :class:`DistributedBuildError`), nothing is
        marked complete, and the writers are left as after an interrupted build (each rank's
        committed rows stay; ``create(..., resume=True)`` continues).

        On an index made by :meth:`open` (a reader), ``close()`` (or leaving its ``with`` block, also by an
        exception) releases its memory maps at once; later reads raise ``RuntimeError``. A reader holds no open
        file descriptor (its maps need none); its maps otherwise go with the object. On a writer's index once
        closed, ``close()`` does nothing."""
        if not self._writable:
            if self._opened and not self._released:
                # a reader (made by open()): its memory maps go now, not when the object is garbage collected
                # (each is unmapped once no array views it: gradkit's reads copy, so none does after a search or
                # get); reads already running on other threads finish first (the last one releases them)
                with self._reads_lock:
                    self._released = True
                    if self._reads:
                        self._release_pending = True
                    else:
                        self._shards, self._maps, self._offsets = [], [], None
            return
        if self._world == 1:
            self.commit()
            self._close_fds()
            try:
                _atomic_write_json(self.path / HEADER, self._state_header(complete=True))
            except OSError as e:  # the committed header stays (every row committed): close() can be retried
                raise OSError(e.errno, f"gradkit.index: marking {self.path} complete failed ({e.strerror or e}); its "
                              f"{len(self)} committed rows are kept but the index is not marked complete (free "
                              "space, then close() this writer again; or drop this writer, which releases its lock, then "
                              "create(..., resume=True) and close())") from e
            self._unlock()
        else:
            self._close_ranks()
        self._writable = False
        self._load_gradkit(allow_incomplete=False)

    def _close_ranks(self, failure: Optional[BaseException] = None) -> None:
        """close() of a multi-process build; ``failure``: this rank's with-block raised it (nothing more is
        committed: the rank takes part as a failed one, and every rank raises)."""
        # Collectives, the same on every rank: one all_gather of (failed, rows, examples,
        # nonfinite), then, only when no rank failed (every rank sees the same gathered
        # flags, so all take the same branch), one broadcast of rank 0's header outcome.
        d, world = self._dist, self._world
        own = failure
        if own is None:
            try:
                self.commit()  # a failure has rolled back to the last commit
            except BaseException as e:  # noqa: BLE001 - re-raised below (after the collective)
                own = e
        else:
            self._rollback()
        outcome = 0 if own is None else (2 if failure is not None else 1)  # 2: its with-block raised
        try:
            got = _distributed.gather_ints(d, [outcome, len(self), self._w_examples,
                                          self._w_nonfinite])  # also the barrier: every rank is done committing
        except BaseException:
            # the collective itself failed (the group timed out: a rank never came to close()): this writer is left
            # as a failed close() leaves it, aborted (session 43: it stayed open, holding its lock, and took appends)
            self._abort()
            raise
        failed = [r for r, g in enumerate(got) if g[0]]
        raised = [r for r, g in enumerate(got) if g[0] == 2]
        if failed:
            if self._rank == 0:  # best effort: publish what every rank committed (not complete)
                try:
                    rc = self._resumed_complete
                    # rows, examples (per-token indexes count them apart from rows), refused rows
                    totals = [sum(g[i] for g in got) for i in ((1, 2, 3) if self.per_token else (1, 1, 3))]
                    if rc is not None and totals == [int(rc.get("count", -1)), int(rc.get("examples", -1)),
                                                     int(rc.get("nonfinite_rows", 0))]:
                        # a resumed complete index to which no rank committed anything: it is the index it was
                        # (rows and refused rows only grow with commits), so it stays complete (session 39)
                        _atomic_write_json(self.path / HEADER, rc)
                    else:
                        self._write_merged_header([g[1:] for g in got], complete=False)
                except Exception:  # noqa: BLE001 - the header then stays as it was (incomplete)
                    pass
            self._abort()
            _raise_rank_failure(own, failed, (
                f"GradientIndex.close: rank(s) {failed} of {world} failed to commit their rows of {self.path} "
                + (f"(rank(s) {raised} raised an error in their with-block before close()) " if raised else "")
                + "(see those ranks' errors); the index was not marked complete. The rows each rank had "
                "committed are kept: open(..., allow_incomplete=True) reads them, create(..., resume=True) on "
                f"{world} ranks continues the build"))
        self._close_fds()
        err = None
        if self._rank == 0:
            try:
                self._write_merged_header([g[1:] for g in got], complete=True)
            except BaseException as e:  # noqa: BLE001 - re-raised below (after the collective)
                err = e
        if _distributed.broadcast_flag(d, err is not None):
            self._abort()
            _raise_rank_failure(err, [0], (
                f"GradientIndex.close: rank 0 failed to write the header of {self.path} (see rank 0's "
                "error); the index was not marked complete (every rank's rows are committed: "
                f"create(..., resume=True) on {world} ranks and close() again)"))
        self._unlock()
        # where this rank's rows and examples start in the merged index (rank 0's first, then rank 1's, ...)
        self.row_offset = sum(g[1] for g in got[:self._rank])
        self.example_offset = sum(g[2] for g in got[:self._rank]) if self.per_token else self.row_offset

    def _write_merged_header(self, counts: List[List[int]], complete: bool) -> None:
        """Rank 0: the header listing every rank's committed shards (``counts``: each rank's gathered
        [rows, examples, nonfinite], checked against its committed ``rank-<r>.json``)."""
        h = self._base_header(complete)
        shards, tfiles, total, examples, nonfinite = [], [], 0, 0, 0
        for r in range(self._world):
            rf = self.path / SHARD_DIR / f"rank-{r:05d}.json"
            if not complete and counts[r][0] == 0 and not rf.exists():
                continue  # a rank that never committed (possible only when the build failed)
            rh = _read_json(rf, "close")
            rows = sum(int(s["rows"]) for s in rh["shards"])
            if rows != counts[r][0]:
                raise IndexFormatError(f"close: rank {r} reports {counts[r][0]} rows but committed {rows}")
            shards += rh["shards"]
            tfiles += rh.get("token_files", [])
            total += rows
            examples += int(rh["examples"])
            nonfinite += int(rh.get("nonfinite_rows", 0))
        h.update({"count": total, "examples": examples, "nonfinite_rows": nonfinite, "shards": shards,
                  "token_files": tfiles})
        _atomic_write_json(self.path / HEADER, h)

    def _check_writable(self, what: str) -> None:
        if not self._writable:
            raise RuntimeError(f"{what}: the index is not open for writing (use GradientIndex.create)")

    # ------------------------------------------------------------------ reading

    @classmethod
    def open(cls, path, *, allow_incomplete: bool = False, low_memory: bool = False) -> "GradientIndex":
        """Open an index read-only (memory-mapped): gradkit's layout or bergson's (detected).

        Refuses (IndexFormatError) a directory without a committed header, an index whose
        build did not complete (unless ``allow_incomplete``: its committed rows only), and
        shard files shorter than the header says. A bergson index is refused while its build
        has not finished: bergson builds into ``<run>.part`` (``gradients.bin`` is sized for every
        row and ``info.json`` written before any row is, so unwritten rows read as zeros) and
        renames it to ``<run>`` when done, so a bergson index with a path component ending in
        ``.part`` is refused unless ``allow_incomplete=True`` (its rows are then read as they are
        on disk, zeros included). ``low_memory``: search drops each block's
        pages from the process once scored (madvise DONTNEED), so the resident set stays about
        one block (``batch_rows`` rows) however large the index; repeated searches then fault
        the pages in again from the page cache (or disk).
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a str or path, got {type(path).__name__}")
        if not os.fspath(path):
            raise ValueError("path: is empty (an empty path would be the current directory)")
        low_memory, allow_incomplete = flag(low_memory, "low_memory"), flag(allow_incomplete, "allow_incomplete")
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"path: {p} does not exist")
        if not p.is_dir():
            raise IndexFormatError(f"path: {p} is not a directory")
        self = cls._blank()
        self.path = p
        self.low_memory = low_memory
        self._opened = True
        try:
            if (p / HEADER).exists():
                self._load_gradkit(allow_incomplete=allow_incomplete)
            else:
                dirs = _bergson_dirs(p)
                if dirs:
                    self._check_bergson_finished(p, dirs, allow_incomplete)
                    self._load_bergson(dirs)
                else:
                    hint = " (it holds gradkit shard files: a build that never committed)" \
                        if (p / SHARD_DIR).is_dir() else ""
                    raise IndexFormatError(f"path: {p} holds no committed index header ({HEADER} for gradkit, "
                                           f"info.json for bergson){hint}")
        except (OSError, RuntimeError, RecursionError, MemoryError) as e:
            # the file system's oddities (a symlink loop, a directory where a file belongs, an unreadable file)
            # and files too large to load: a damaged index, named, rather than the OS's error
            raise IndexFormatError(f"open: {p} cannot be read as an index ({type(e).__name__}: {e})") from None
        return self

    @staticmethod
    def _check_bergson_finished(p: Path, dirs: List[Path], allow_incomplete: bool) -> None:
        """Refuse a bergson index inside a ``*.part`` directory (a build that has not finished).

        bergson writes a run into ``<run>.part`` (the index there or in a sub-directory of it) and
        renames it to ``<run>`` only once every row is written; info.json and a full-size
        gradients.bin exist from the start, so nothing else tells a finished index from one whose
        later rows are still zeros."""
        if allow_incomplete:
            return
        for d in dirs:
            for q in (d.absolute(), d.resolve()):
                hit = next((c for c in q.parts if c.endswith(".part")), None)
                if hit is not None:
                    raise IndexFormatError(
                        f"path: {str(p)!r} is a bergson index whose build did not finish (it lies in {hit!r}: bergson "
                        f"builds into '<run>.part' and renames it to '<run>' only when every row is written; rows "
                        "not written yet read as zeros). Open the finished run directory; if the build did finish "
                        "without the rename (bergson's collect_gradients called directly does not rename), rename it "
                        "the way bergson's CLI does, or pass allow_incomplete=True to read it as it is on disk")

    def _load_gradkit(self, allow_incomplete: bool) -> None:
        p = self.path
        h = _read_json(p / HEADER, "open")
        if not isinstance(h, dict) or h.get("format") != FORMAT:
            raise IndexFormatError(f"open: {p / HEADER} is not a gradkit index header")
        if h.get("version") != VERSION:
            raise IndexFormatError(f"open: {p} has format version {h.get('version')}, this gradkit reads {VERSION}")
        _check_header_fields(h, p / HEADER, "open")
        if not h.get("complete") and not allow_incomplete:
            raise IndexFormatError(f"open: the build of {p} did not complete ({h.get('count', 0)} rows committed by "
                                   f"rank 0's header); continue it with GradientIndex.create(..., resume=True), "
                                   f"replace it with overwrite=True, or open(..., allow_incomplete=True)")
        try:
            self.modules = _check_modules([tuple(m) for m in h["modules"]])
            dname = h["dtype"]
            if dname not in _DTYPES:
                raise IndexFormatError(f"open: unsupported dtype {dname!r} in {p / HEADER}")
            count = int(h["count"])
            shards = h["shards"]
            per_token = bool(h["per_token"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, IndexFormatError):
                raise
            raise IndexFormatError(f"open: {p / HEADER} is missing or has malformed fields ({e})") from None
        self.dim = sum(self.modules.values())
        if "dim" in h and h["dim"] != self.dim:
            raise IndexFormatError(f"open: {p / HEADER} field dim is {h['dim']!r} but the modules add up to "
                                   f"{self.dim}")
        self._width = self.dim
        self._cols, lo = {}, 0
        for n, dm in self.modules.items():
            self._cols[n] = (lo, lo + dm)
            lo += dm
        self._dname = dname
        self.dtype = _DTYPES[dname]
        self.projection = h.get("projection")
        self.per_token = per_token
        self.layout = "gradkit"
        self.nonfinite_rows = int(h.get("nonfinite_rows", 0))
        row_bytes = self.dim * self.dtype.itemsize
        sd = (p / SHARD_DIR).resolve()
        views, first = [], 0
        rank_rows: Dict[int, int] = {}
        for s in shards:
            f = p / str(s["file"])
            m = _SHARD_RE.match(f.name)
            if not m or f.parent.resolve() != sd or f.resolve().parent != sd:  # a link out of shards/ is refused
                raise IndexFormatError(f"open: unexpected shard file name {s['file']!r} in {p / HEADER} (shard "
                                       f"files must be files in {sd}, not links elsewhere)")
            rows = _int_arg(s["rows"], f"shard {s['file']} rows")
            rank_rows[int(m.group(1))] = rank_rows.get(int(m.group(1)), 0) + rows
            need = rows * row_bytes
            if not f.exists():
                raise IndexFormatError(f"open: shard {f} listed in the header is missing")
            fh, size = _open_sized(f, "open")
            with fh:
                if size < need:
                    raise IndexFormatError(f"open: shard {f} is truncated: {size} bytes, the header says {rows} rows "
                                           f"= {need} bytes")
                if size != need and h.get("complete"):
                    raise IndexFormatError(f"open: shard {f} has {size} bytes, the header says {rows} rows = {need} "
                                           "bytes")
                if rows:
                    views.append((first, _map_rows(fh, dname, rows, self.dim, self._maps)))
            first += rows
        if first != count:
            raise IndexFormatError(f"open: the shards of {p} hold {first} rows but the header says {count}")
        self._shards = views
        self._count = count
        if per_token:
            parts = []
            for tf in h.get("token_files", []):
                f = p / str(tf["file"])
                if not _TOKENS_RE.match(f.name) or f.parent.resolve() != sd or f.resolve().parent != sd:
                    raise IndexFormatError(f"open: unexpected token file name {tf['file']!r}")
                e = _int_arg(tf["examples"], "token file examples")
                if not f.exists():
                    raise IndexFormatError(f"open: token count file {f} is missing or truncated")
                fh, size = _open_sized(f, "open")
                with fh:
                    if size != e * 8 and (size < e * 8 or h.get("complete")):  # as for the shards
                        raise IndexFormatError(f"open: token count file {f} is missing or truncated: it has {size} "
                                               f"bytes, the header says {e} examples = {e * 8} bytes")
                    try:
                        data = fh.read(e * 8)
                    except OSError as err:
                        raise IndexFormatError(f"open: cannot read {f}: {err.strerror or err}") from None
                if len(data) != e * 8:  # cut after the size check
                    raise IndexFormatError(f"open: token count file {f} is truncated: {len(data)} of {e * 8} bytes")
                parts.append(np.frombuffer(data, dtype="<i8").astype(np.int64))
                r = int(_TOKENS_RE.match(f.name).group(1))
                if parts[-1].size and (int(parts[-1].min()) < 0 or int(parts[-1].max()) > rank_rows.get(r, 0)):
                    # checked before the sum, which would wrap in int64 for counts near 2^63
                    raise IndexFormatError(f"open: token count file {f} holds counts outside [0, {rank_rows.get(r, 0)}] "
                                           f"(rank {r}'s rows)")
                if int(parts[-1].sum()) != rank_rows.get(r, 0):  # each rank's tokens are its own rows
                    raise IndexFormatError(f"open: token count file {f} counts {int(parts[-1].sum())} tokens but "
                                           f"rank {r}'s shards hold {rank_rows.get(r, 0)} rows")
            counts = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            self._set_offsets(counts, "open")
        else:
            self._examples = count
        if "examples" in h and h["examples"] != self._examples:
            raise IndexFormatError(f"open: {p / HEADER} field examples is {h['examples']} but the index holds "
                                   f"{self._examples} examples")

    def _set_offsets(self, counts: np.ndarray, what: str) -> None:
        if (counts < 0).any():
            raise IndexFormatError(f"{what}: negative token counts in {self.path}")
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        if int(offsets[-1]) != self._count:
            raise IndexFormatError(f"{what}: token counts of {self.path} sum to {int(offsets[-1])} but it holds "
                                   f"{self._count} rows")
        offsets.setflags(write=False)
        self._offsets = offsets
        self._examples = len(counts)

    def _load_bergson(self, dirs: List[Path]) -> None:
        self.layout = "bergson"
        views, first = [], 0
        counts_all = []
        grad_sizes0 = layout0 = None
        for dd in dirs:
            info = _read_json(dd / "info.json", "open")
            if not isinstance(info, dict) or "num_grads" not in info or "grad_sizes" not in info:
                raise IndexFormatError(f"open: {dd / 'info.json'} is not a bergson gradient index header")
            gs = info["grad_sizes"]
            if not isinstance(gs, dict):
                raise IndexFormatError(f"open: grad_sizes in {dd / 'info.json'} is not a dict")
            try:
                mods = _check_modules(gs)
            except (TypeError, ValueError) as e:
                raise IndexFormatError(f"open: grad_sizes in {dd / 'info.json'}: {e}") from None
            if grad_sizes0 is None:
                grad_sizes0 = mods
            elif list(mods.items()) != list(grad_sizes0.items()):
                raise IndexFormatError(f"open: shard {dd} has modules {list(mods)} unlike the first shard's")
            num = _int_arg(info["num_grads"], f"{dd / 'info.json'} num_grads")
            # element dtype and each module's columns in a row of `width` elements
            if "base_dtype" in info:
                dname = _bergson_base_dtype(info["base_dtype"], dd / "info.json")
                width = sum(mods.values())
                cols, lo = {}, 0
                for n, dm in mods.items():
                    cols[n] = (lo, lo + dm)
                    lo += dm
            elif isinstance(info.get("dtype"), dict):
                dname, width, cols = self._bergson_struct(info["dtype"], mods, dd)
            else:
                raise IndexFormatError(f"open: {dd / 'info.json'} has neither base_dtype nor a structured dtype")
            if dname not in _NP_RAW:
                raise IndexFormatError(f"open: unsupported bergson dtype {dname!r} in {dd / 'info.json'}")
            f = dd / "gradients.bin"
            if not f.exists():
                raise IndexFormatError(f"open: {f} is missing")
            itemsize = np.dtype(_NP_RAW[dname]).itemsize
            need = num * width * itemsize
            if layout0 is None:
                layout0 = (dname, width, cols)
            elif (dname, width, cols) != layout0:  # cols too: structured shards may place the fields differently
                raise IndexFormatError(f"open: shard {dd} has a different dtype or row layout than the first shard")
            fh, size = _open_sized(f, "open")
            with fh:
                if size < need:
                    raise IndexFormatError(f"open: {f} is truncated: {size} bytes, info.json says {num} rows = {need} "
                                           "bytes")
                if size != need and not (need == 0 and size == 1):  # numpy's memmap of 0 rows writes one byte
                    raise IndexFormatError(f"open: {f} has {size} bytes, info.json says {num} rows = {need} bytes")
                if num:
                    views.append((first, _map_rows(fh, dname, num, width, self._maps)))
            self._dname, self._width, self._cols = dname, width, cols
            if info.get("attribute_tokens"):
                op = dd / "offsets.npy"
                if not op.exists():
                    raise IndexFormatError(f"open: per-token bergson index {dd} lacks offsets.npy")
                offs = _read_npy_ints(op, num + 1)
                # the differences in int64: unsigned ones wrapped (uint64 [0, 5, 3] passed as increasing, session 43,
                # and was refused later as "negative token counts"); an entry past int64 wraps negative, so it is refused
                if offs.ndim != 1 or offs.dtype.kind not in "iu" or len(offs) < 1 or offs[0] != 0 \
                        or int(offs[-1]) != num or (np.diff(offs.astype(np.int64)) < 0).any():
                    raise IndexFormatError(f"open: {op} is not a valid offsets array for {num} rows")
                counts_all.append(np.diff(offs).astype(np.int64))
            elif counts_all:
                raise IndexFormatError(f"open: shard {dd} is not per-token unlike the others")
            first += num
        self.modules = grad_sizes0
        self.dim = sum(self.modules.values())
        self.dtype = _TORCH_OF[self._dname]
        self._upcast = self._dname == "float64"
        self._shards = views
        self._count = first
        self.per_token = bool(counts_all)
        self.projection = self._bergson_projection_of(self.path, dirs)
        if self.per_token:
            if len(counts_all) != len(dirs):
                raise IndexFormatError(f"open: some shards of {self.path} are per-token and some are not")
            self._set_offsets(np.concatenate(counts_all), "open")
        else:
            self._examples = first

    @staticmethod
    def _bergson_struct(spec: dict, mods: "OrderedDict[str, int]", dd: Path):
        """Older bergson stores: one structured record per row, a field per module."""
        try:
            names, formats = list(spec["names"]), list(spec["formats"])
            dt = np.dtype({"names": names, "formats": formats,
                           **({"offsets": list(spec["offsets"])} if "offsets" in spec else {}),
                           **({"itemsize": int(spec["itemsize"])} if "itemsize" in spec else {})})
        except (KeyError, TypeError, ValueError) as e:
            raise IndexFormatError(f"open: structured dtype in {dd / 'info.json'} is malformed ({e})") from None
        bases = {dt.fields[n][0].base for n in names}
        if len(bases) != 1:
            raise IndexFormatError(f"open: {dd} mixes element dtypes across modules")
        base = bases.pop()
        names_by_kind = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32",
                         np.dtype(np.float64): "float64"}
        if base in names_by_kind:
            dname = names_by_kind[base]
        elif base.kind == "V" and base.itemsize == 2:
            dname = "bfloat16"
        elif base.name == "bfloat16":
            dname = "bfloat16"
        else:
            raise IndexFormatError(f"open: unsupported element dtype {base} in {dd / 'info.json'}")
        es = base.itemsize
        if dt.itemsize % es:
            raise IndexFormatError(f"open: record size {dt.itemsize} of {dd} is not a multiple of {es}")
        cols = {}
        for n, dm in mods.items():
            if n not in dt.fields:
                raise IndexFormatError(f"open: module {n!r} has no field in the structured dtype of {dd}")
            fdt, off = dt.fields[n][0], dt.fields[n][1]
            if off % es or fdt.itemsize != dm * es:
                raise IndexFormatError(f"open: field {n!r} of {dd} does not hold {dm} aligned elements")
            cols[n] = (off // es, off // es + dm)
        return dname, dt.itemsize // es, cols

    @classmethod
    def _bergson_projection_of(cls, root: Path, dirs: List[Path]):
        """The projection config of a bergson index: that of every ``processor_config.yaml`` in its directory and
        its shards' (a sharded export may keep one at the top, one per shard, or both). Shards built with different
        projections cannot be searched as one index, so configs that disagree are refused, naming the two files."""
        seen = []
        for dd in ([root] if root not in dirs else []) + list(dirs):
            if (dd / "processor_config.yaml").exists():
                seen.append((dd / "processor_config.yaml", cls._bergson_projection(dd)))
        for f, cfg in seen[1:]:
            if cfg != seen[0][1]:
                raise IndexFormatError(f"open: {f} has projection {cfg}, but {seen[0][0]} has {seen[0][1]}: shards "
                                       f"projected differently cannot be searched as one index")
        return seen[0][1] if seen else None

    @staticmethod
    def _bergson_projection(dd: Path):
        f = dd / "processor_config.yaml"
        if not f.exists():
            return None
        try:
            import yaml
        except ImportError:  # a declared dependency; without it the projection check would be skipped silently
            raise ImportError(f"open: reading {f} (the index's projection config, checked against every query) "
                              "needs pyyaml, a gradkit dependency: pip install pyyaml") from None
        # a FIFO / device in its place is refused, not read (and not swallowed by the except below)
        data = read_regular(f, 1 << 20, "open", IndexFormatError)
        try:
            cfg = yaml.safe_load(data)
            if not isinstance(cfg, dict):
                return None
            return _bergson_settings(cfg)
        except Exception:  # noqa: BLE001 - a damaged config only loses the projection check
            return None

    # ------------------------------------------------------------------ row access

    @property
    def offsets(self) -> Optional[np.ndarray]:
        """Per-token indexes: read-only int64 array of ``num_examples + 1`` row offsets (example i owns rows
        ``offsets[i]:offsets[i+1]``; an example with no stored token has ``offsets[i] == offsets[i+1]``);
        None for an index with one row per example. Refused (RuntimeError) while the index is being built
        or after an aborted build or a reader's close(), like every read."""
        self._check_readable("offsets")
        return self._offsets

    def example_of(self, rows) -> torch.Tensor:
        """Example number owning each row (per-token indexes; rows are examples otherwise).

        rows: as for :meth:`get` (row numbers, negative ones counting from the end, or a boolean mask with
        one entry per row); the result has the shape of integer input (1-D for a mask). Row numbers out of
        range raise IndexError. An example with no stored token owns no row, so no row maps to it."""
        self._check_readable("example_of")
        r = self._row_numbers(rows)
        if self._offsets is None:
            return r
        ex = np.searchsorted(self._offsets, r.numpy().reshape(-1), side="right") - 1
        return torch.from_numpy(ex.astype(np.int64)).reshape(r.shape)

    def _row_numbers(self, rows) -> torch.Tensor:
        """``rows`` as int64 row numbers in [0, len(index)) (CPU; the shape of integer input kept):
        ints (negative ones count from the end), or a 1-D boolean mask with one entry per row (the rows
        where it is True, as in numpy). Fractional (float or complex) row numbers are refused, not truncated."""
        n = self._count
        if isinstance(rows, torch.Tensor):  # session 42: torch's NotImplementedError
            dense(rows, "rows")
        try:
            r = torch.as_tensor(rows.detach().cpu() if isinstance(rows, torch.Tensor) else rows)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise TypeError(f"rows: expected row numbers (an int, or a sequence, array or tensor of ints) or a "
                            f"boolean mask, got {type(rows).__name__}") from None
        if r.dtype == torch.bool:
            if r.dim() != 1 or r.shape[0] != n:
                raise _RowIndexError(f"rows: a boolean mask must be 1-D with one entry per row ({n}), got shape "
                                 f"{tuple(r.shape)}")
            return r.nonzero().flatten()
        if r.numel() == 0:  # e.g. [] (float to torch): no row number to be wrong
            return torch.empty(r.shape, dtype=torch.int64)
        if r.dtype.is_floating_point or r.dtype.is_complex:
            raise TypeError(f"rows: expected integer row numbers or a boolean mask, got {r.dtype} values")
        big = r.dtype == getattr(torch, "uint64", None) and int(r.numpy().max()) >= n  # would wrap in int64
        r = r.to(torch.int64)
        if big or int(r.min()) < -n or int(r.max()) >= n:
            raise _RowIndexError(f"rows: out of range for an index of {n} rows (valid: {-n} .. {n - 1})")
        return torch.where(r < 0, r + n, r)

    def _check_readable(self, what: str) -> None:
        if self._writable:
            raise RuntimeError(f"{what}: the index is still being built; close() it first")
        if self._released:
            raise RuntimeError(f"{what}: the index was closed (close() released its memory maps); open it again "
                               "with GradientIndex.open")
        if self._closed:
            raise RuntimeError(f"{what}: the build was aborted; reopen with GradientIndex.open "
                               "(allow_incomplete=True) or resume it")

    @_holds_maps
    def get(self, rows) -> torch.Tensor:
        """Rows as a float32 (len(rows), D) tensor (modules concatenated in order); negative row numbers count
        from the end, as in Python and numpy. rows: an int, a sequence / array / tensor of ints, or a 1-D boolean
        mask with one entry per row (selects the rows where it is True, as in numpy; a mask of another length
        raises IndexError). Float row numbers raise TypeError (they are not truncated)."""
        self._check_readable("get")
        r = self._row_numbers(rows).reshape(-1)
        out = torch.empty(r.numel(), self.dim, dtype=torch.float32)
        starts = [s for s, _ in self._shards]
        for j, row in enumerate(r.tolist()):
            si = int(np.searchsorted(starts, row, side="right")) - 1
            s0, view = self._shards[si]
            out[j] = self._dense(view[row - s0:row - s0 + 1].float())[0]
        return out

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """Storage-layout columns (width W) -> module columns in order (D)."""
        if self._plain_layout():
            return x
        return torch.cat([x[:, lo:hi] for lo, hi in (self._cols[n] for n in self.modules)], dim=1)

    def _dense_cols(self) -> Dict[str, Tuple[int, int]]:
        out, lo = {}, 0
        for n, dm in self.modules.items():
            out[n] = (lo, lo + dm)
            lo += dm
        return out

    def _blocks(self, batch_rows: int) -> Iterator[Tuple[int, torch.Tensor]]:
        """(first row, block) in storage layout and dtype (float64 for a float64 bergson index: search converts)."""
        for si, (first, view) in enumerate(self._shards):
            n = view.shape[0]
            for i in range(0, n, batch_rows):
                blk = view[i:i + batch_rows]
                yield first + i, blk
                if self.low_memory and si < len(self._maps):
                    _release(view, self._maps[si], i, min(n, i + batch_rows))

    # ------------------------------------------------------------------ search

    @classmethod
    def _query_f32(cls, t: torch.Tensor, what: str, exp: Optional[torch.Tensor] = None) -> torch.Tensor:
        """t as (rows, features) float32, each row first multiplied by 2**-exp[row] (exact, in float64) where exp is
        given; finite float64 rows that float32 cannot hold are refused here, by their own name (search's later
        check would call them NaN / Inf)."""
        src = t.detach().reshape(-1, t.shape[-1])
        if exp is not None:
            src = cls._ldexp64(src.to(torch.float64), -exp.to(src.device)[:, None])
        out = src.to(torch.float32)
        if src.dtype == torch.float64:
            over = (torch.isfinite(src).all(dim=1) & ~torch.isfinite(out).all(dim=1)).nonzero().flatten()
            if over.numel():
                raise ValueError(f"{what}: rows {over[:10].tolist()} are finite but overflow float32 (an entry beyond "
                                 "3.4e38), the dtype scores are computed in; scale them down first")
        return out

    @staticmethod
    def _tiny_rows(srcs: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """For (rows, d) query parts of which some are float64: the frexp exponent of each row's largest |entry|
        (over all parts) where that is nonzero and below 2**-64 (0 elsewhere), or None when no row is that small.
        float32 holds such a row only as zeros or subnormals; scaled by 2**-exponent first it keeps every bit."""
        if not any(t.dtype == torch.float64 for t in srcs):
            return None
        dev = srcs[0].device
        amax = torch.zeros(srcs[0].shape[0], dtype=torch.float64, device=dev)
        for t in srcs:
            if t.shape[1]:
                amax = torch.maximum(amax, t.abs().amax(dim=1).to(dev, torch.float64))  # NaN propagates
        tiny = (amax > 0) & (amax < 2.0 ** -64)
        if not bool(tiny.any()):
            return None
        return torch.where(tiny, torch.frexp(amax)[1], 0).to(torch.int64)

    def _query_matrix(self, queries, device=None) -> Tuple[torch.Tensor, Tuple[int, ...], Optional[torch.Tensor]]:
        """(Q, W) float32 in storage layout (padding columns 0), the leading batch shape, and None or (Q,) int64
        exponents e: a float64 query row whose largest |entry| is below 2**-64 is returned times 2**-e (exact), so
        that float32 holds it (search scales inner-product scores back)."""
        if isinstance(queries, torch.Tensor):
            if not queries.is_floating_point():
                raise TypeError(f"queries: expected a floating tensor, got {queries.dtype}")
            _no_meta(queries, "queries")
            if queries.dim() < 1 or queries.shape[-1] != self.dim:
                raise ValueError(f"queries: expected shape (..., {self.dim}) (the index's dim: every module "
                                 f"{list(self.modules)} in that order, also when modules= selects some), got "
                                 f"{tuple(queries.shape)}")
            lead = tuple(queries.shape[:-1])
            qexp = self._tiny_rows([queries.detach().reshape(-1, self.dim)])
            dense = self._query_f32(queries, "queries", qexp)
            parts = {n: dense[:, lo:hi] for n, (lo, hi) in self._dense_cols().items()}
        elif isinstance(queries, Mapping):
            missing = [n for n in self.modules if n not in queries]
            extra = [n for n in queries if n not in self.modules]
            if missing or extra:
                raise ValueError(f"queries: module set differs from the index's: missing {missing}, unknown {extra}")
            parts, lead = {}, None
            for n, dm in self.modules.items():
                g = queries[n]
                if not isinstance(g, torch.Tensor) or not g.is_floating_point():
                    raise TypeError(f"queries[{n!r}]: expected a floating tensor")
                _no_meta(g, f"queries[{n!r}]")
                if g.dim() < 1 or g.shape[-1] != dm:
                    raise ValueError(f"queries[{n!r}]: expected shape (..., {dm}), got {tuple(g.shape)}")
                if lead is None:
                    lead = tuple(g.shape[:-1])
                elif tuple(g.shape[:-1]) != lead:
                    raise ValueError(f"queries[{n!r}]: batch shape {tuple(g.shape[:-1])} differs from {lead}")
            srcs = {n: queries[n].detach().reshape(-1, dm) for n, dm in self.modules.items()}
            qexp = self._tiny_rows(list(srcs.values()))
            for n, g in srcs.items():
                parts[n] = self._query_f32(g, f"queries[{n!r}]", qexp)
            dev = next(iter(parts.values())).device
            parts = {n: t.to(dev) for n, t in parts.items()}
        else:
            raise TypeError(f"queries: expected a (Q, {self.dim}) tensor or a dict module -> (Q, d) tensor, "
                            f"got {type(queries).__name__}")
        first = next(iter(parts.values()))
        q = torch.zeros(first.shape[0], self._width, dtype=torch.float32, device=first.device)
        for n, (lo, hi) in self._cols.items():
            q[:, lo:hi] = parts[n]
        return q, lead, (qexp.to(q.device) if qexp is not None else None)

    @_holds_maps
    def search(self, queries, k: int, unit_norm: bool = False, reverse: bool = False, modules=None, weights=None,
               precondition=None, projection=None, batch_rows: Optional[int] = None,
               backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k rows by inner product (cosine with ``unit_norm``).

        queries: (..., D) tensor (modules concatenated in the index's order) or dict name ->
        (..., d_m) holding every module of the index. k: 1 <= k <= len(index).
        unit_norm: cosine similarity — queries and rows are unit-normalised over all modules
        (rows of norm 0 score 0), as bergson does; norms are exact over fp32's whole range and
        leave out any padding between the modules of a bergson record. reverse: the k lowest
        scores instead.
        modules: the module names to score (default all); weights: dict name -> float scaling
        each module's contribution (applied in float32: a weight whose magnitude float32 cannot hold,
        above 3.4e38 or nonzero below 2**-126, is refused with a ValueError naming it). precondition:
        a (D, D) / per-module dict matrix H (H^-1 on the queries) or a :class:`Precondition`
        (``mode="both"``: H^-1/2 on both sides plus unit normalisation). The preconditioner is applied
        in float64 (products and sums) and rounded once to float32, on the queries and, with
        ``mode="both"``, on the rows: a row's or a query's transformed values do not depend on the
        other rows in its block or the other queries in the call (see the module docstring), so
        identical rows score identically and tie to the lowest row. Cosines do not depend on the
        scale of H (H^p is kept as a float32 matrix times a power of two, see :class:`Precondition`);
        inner products carry that power of two exactly. projection: the queries' projection config
        (a dict) or the
        ``GradientCollector`` that made them (its ``projection_config`` is used); refused unless it
        equals the index's (on a bergson index: compared as bergson compares processors, see the
        module docstring). Left out while the index records a projection, the queries cannot be
        checked: an :class:`UncheckedProjectionWarning` (a ``UserWarning``) says so, once per
        index object. batch_rows: rows scored per block (bounds memory; default about 256 MiB of
        fp32 per block). backend: "auto"/"torch" (gradkit's kernels) or "faiss" (faiss.knn per
        block, CPU; faiss's tie order).

        Returns (scores, indices): float32 and int64 of shape (..., k), best first, ties lowest
        row first (an empty batch of queries gives empty results). Row numbers index the stored rows
        (``example_of`` maps per-token rows).

        Non-finite values: queries holding NaN / Inf are refused (ValueError). Stored rows are not
        inspected (gradkit's own appends refuse them; a bergson index can hold them): a NaN score ranks
        last (as -inf, +inf with ``reverse``) and is reported as that value; a row holding Inf scores
        +-inf (NaN, so last, where the query is 0 on that column or with ``unit_norm``). A query row whose
        largest entry (after the weights, applied in float64) is 2**64 or more, or nonzero and below 2**-64, is
        scaled by a power of two before scoring and its inner-product scores back after, so that no partial sum over- or underflows; the
        ranking is that of the scaled scores, and a score past float32's range is then reported as +-inf,
        one below it as 0 or a float32 subnormal. For a float64 query that scaling is done in float64 before
        the cast to float32, so rows below float32's range (which the cast would make 0) keep every bit;
        float64 rows above 3.4e38 are refused (ValueError). Rows near float32's limit can still overflow a
        partial sum, and scores that overflow rank as +-inf, ties by row. A float64 bergson index is scored in
        float32: with ``unit_norm`` (or ``mode="both"``) each row is first scaled by a power of two in float64,
        so rows outside float32's range keep their cosines; plain inner products of such rows over- or
        underflow as float32 does.
        """
        self._check_readable("search")
        n = len(self)
        k = _int_arg(k, "k", 1)
        if k > n:
            raise ValueError(f"k: {k} is larger than the index ({n} rows)")
        unit_norm, reverse = flag(unit_norm, "unit_norm"), flag(reverse, "reverse")
        if backend not in _BACKENDS:
            raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
        if backend == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError:
                raise ImportError("backend: 'faiss' needs the faiss package (pip install faiss-cpu)") from None
        qproj = _projection_dict(projection)
        checked = qproj is not None
        if checked and self.layout == "bergson" and "projection_dim" in qproj:
            qproj = _bergson_settings(qproj)  # bergson's own comparison: its projection settings only
        if checked and _projection_only(qproj) != _projection_only(self.projection):
            raise ValueError(f"projection: the queries were projected with {qproj} but the index with "
                             f"{self.projection}; scores across different projections are meaningless")
        other = _module_order_mismatch(qproj, list(self.modules)) if isinstance(queries, torch.Tensor) else None
        if other is not None:
            raise ValueError(f"queries: flat rows of the projection's collector have their columns in its module order "
                             f"{other}, but this index's columns are in the order {list(self.modules)}; pass the "
                             "queries as a dict {module: (..., d)} (collect() without flat=True) or reorder them")
        if batch_rows is None:
            batch_rows = max(1024, (256 << 20) // (4 * max(1, self._width)))
        batch_rows = _int_arg(batch_rows, "batch_rows", 1)
        # module selection and weights
        if modules is None:
            sel = list(self.modules)
        else:
            if isinstance(modules, (str, bytes, Mapping)) or not isinstance(modules, Iterable):
                raise TypeError(f"modules: expected a list/set of module names or None, got {type(modules).__name__}")
            modules = list(modules)  # also dict keys, generators
            # (a non-str entry is unknown; an unhashable one raised Python's TypeError naming nothing: session 42)
            unknown = [m for m in modules if not isinstance(m, str) or m not in self.modules]
            if unknown:
                raise ValueError(f"modules: the index has no modules {unknown} (it has {list(self.modules)})")
            if not modules:
                raise ValueError("modules: empty selection")
            sel = [m for m in self.modules if m in set(modules)]
        wts = {}
        if weights is not None:
            if not isinstance(weights, Mapping):
                raise TypeError("weights: expected a dict module name -> float")
            for m, w in weights.items():
                if m not in self.modules:
                    raise ValueError(f"weights: the index has no module {m!r}")
                if m not in sel:
                    raise ValueError(f"weights: module {m!r} is not among the selected modules")
                if isinstance(w, torch.Tensor) and w.numel() == 1 and not w.dtype.is_complex and w.dtype != torch.bool \
                        and not w.is_meta:  # (a meta one: torch's RuntimeError from item() before, session 42)
                    w = w.item()  # a 0-d (or one-element) tensor
                try:  # an int past float's range is no finite float either
                    finite = not isinstance(w, (bool, np.bool_)) and isinstance(w, numbers.Real) and math.isfinite(w)
                except OverflowError:
                    finite = False
                if not finite:
                    raise ValueError(f"weights[{m!r}]: expected a finite number, got {w!r}")
                w = float(w)
                if abs(w) > _F32_MAX or 0 < abs(w) < _F32_TINY:
                    raise ValueError(f"weights[{m!r}]: {w!r} is outside float32's range (magnitudes 2**-126 = "
                                     f"1.18e-38 to 3.4e38, or 0), the dtype scores are computed in; scale every "
                                     f"weight by one positive factor (the ranking is the same)")
                wts[m] = w
        if precondition is not None and not isinstance(precondition, Precondition):
            try:
                precondition = Precondition(precondition, mode="query")
            except (TypeError, ValueError) as e:  # Precondition's messages name its own argument, matrix
                raise type(e)(f"precondition: {e}") from None
        q, lead, qexp = self._query_matrix(queries)
        if q.shape[0] == 0:  # an empty batch: empty results of the usual shape and dtypes, nothing scanned
            return (torch.empty(*lead, k, dtype=torch.float32, device=q.device),
                    torch.empty(*lead, k, dtype=torch.int64, device=q.device))
        bad = (~torch.isfinite(q).all(dim=1)).nonzero().flatten()
        if bad.numel():
            raise ValueError(f"queries: rows {bad[:10].tolist()} hold NaN or Inf")
        if not checked and self.projection is not None and not self._projection_warned:
            self._projection_warned = True
            warnings.warn(f"search: the index at {self.path} records the projection its rows were made with, but "
                          "this call passed no projection=, so the queries' projection could not be checked (queries "
                          "made with another seed or p give meaningless scores without any error); pass "
                          "projection=<the GradientCollector that made the queries> or its projection_config to "
                          "have a mismatch refused. Warned once per index object.", UncheckedProjectionWarning,
                          stacklevel=3)  # (search runs inside _holds_maps)
        dev = q.device
        # A layout with padding between modules (older bergson records) is scored in module columns only:
        # padding bytes never enter a norm, a preconditioner or a score.
        gaps = self._width != self.dim
        cols = self._dense_cols() if gaps else self._cols
        if gaps:
            q = self._dense(q)
        cosine = unit_norm or (precondition is not None and precondition.mode == "both")
        # qexp: None, or (Q,) int64 exponents with true query row = q row * 2**qexp; inner-product scores are scaled
        # back at the end (cosines are scale-free: there it is dropped, and only a weights rescale below sets it)
        key_pre = None
        if precondition is not None:
            # the query-side transform in float64 (one row's result does not depend on the other queries: float64
            # sums rounded once to float32), then each row brought to [0.5, 1) by a power of two (exact)
            p = -1.0 if precondition.mode == "query" else -0.5
            blocks = precondition.blocks(self.modules, p)
            y, e_pre = self._apply64(q.to(torch.float64), blocks, dense=gaps)
            if precondition.mode == "both":  # the rows' transform (on the CPU, where the blocks are read)
                key_pre = [(lo, hi, mat.to("cpu", torch.float64), e) for lo, hi, mat, e in blocks]
            if cosine:
                q, qexp = self._unit64(y).to(torch.float32), None
            else:
                y, r = self._pow2_rows64(y)
                q = y.to(torch.float32)
                qexp = r + e_pre if qexp is None else qexp + r + e_pre
        elif cosine:  # divide by the exact norm (computed on the rescaled row: no fp32 under/overflow)
            qexp = None
            q = self._pow2_rows(q)
            norm = torch.linalg.vector_norm(q, dim=1, keepdim=True)
            q = torch.where(norm > 0, q / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(q))
        # selection / weights (each weight rounded to float32; the products in float64, exact), then the scale:
        # a score's ranking is invariant to a positive scale of the query, so a weighted row whose largest entry is
        # 2**64 or more, or below 2**-64, is brought to [0.5, 1) by a power of two (exact) before it is rounded to
        # float32, so that neither the weighted query nor a partial sum of its scores over- or underflows fp32 (each
        # backend sums in its own order: a finite score could become inf on one and not on another); its scores are
        # scaled back at the end (inf or 0 where they leave fp32). Session 40: the rescale came before the weights
        # (inner products only), and a query of entries ~1e18 weighted by 1e21 became inf in float32 (+-inf and
        # NaN scores, wrong ranks), a cosine weighted by ~1e-38 float32 subnormals (lost precision).
        keep = torch.zeros(q.shape[1], dtype=torch.float32, device=dev)
        for m in sel:
            lo, hi = cols[m]
            keep[lo:hi] = wts.get(m, 1.0)
        q64 = q.to(torch.float64) * keep.to(torch.float64)
        amax = q64.abs().amax(dim=1)
        resc = (amax >= 2.0 ** 64) | ((amax > 0) & (amax < 2.0 ** -64))
        if bool(resc.any()):
            e = torch.where(resc, torch.frexp(amax)[1], 0).to(torch.int64)
            q64 = self._ldexp64(q64, -e[:, None])
            qexp = e if qexp is None else qexp + e
        q = q64.to(torch.float32)
        lo = min(cols[m][0] for m in sel)
        hi = max(cols[m][1] for m in sel)
        # The kernel reads the window [lo, hi), the query zero on the columns of modules left out. A bergson index
        # may hold NaN / Inf (gradkit's refuses them on append), and 0 * NaN would make a row NaN (ranked last)
        # for values in a module that is not selected: there a selection with holes is read column run by run
        # (one copy of the selected columns per block), so such a row scores on its selected modules, as in bergson.
        runs: List[Tuple[int, int]] = []
        for a, b in sorted(cols[m] for m in sel):
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((a, b))
        if len(runs) > 1 and self.layout == "bergson":
            def window(t: torch.Tensor) -> torch.Tensor:
                return torch.cat([t[:, a:b] for a, b in runs], dim=1)
        else:
            def window(t: torch.Tensor) -> torch.Tensor:
                return t[:, lo:hi]
        qw = window(q).contiguous()
        largest = not reverse
        run_s = run_i = None
        for base, blk in self._blocks(batch_rows):
            if gaps:
                blk = self._dense(blk)
            scale = None
            if key_pre is not None:
                kb, scale = self._precondition_rows(blk, key_pre, dense=gaps)
                kv = window(kb)
            else:
                if blk.dtype == torch.float64:  # a float64 bergson index; for cosine each row is first brought to
                    blk = (self._pow2_rows64(blk)[0] if cosine else blk).to(torch.float32)  # [0.5, 1) (exact)
                if cosine:
                    blk, scale = self._unit_scale(blk)
                kv = window(blk)
            if kv.device != dev:
                kv = kv.to(dev, non_blocking=True)
                scale = scale.to(dev) if scale is not None else None
            if backend == "faiss":
                run_s, run_i = self._faiss_block(qw, kv, k, largest, scale, run_s, run_i, base)
            else:
                run_s, run_i = ops.score_topk(qw, kv, k, largest=largest, key_scale=scale, scores_in=run_s,
                                              idx_in=run_i, base=base)
        if qexp is not None:
            run_s = self._scale_scores(run_s, qexp.to(run_s.device))
        return run_s.reshape(*lead, k), run_i.reshape(*lead, k)

    @staticmethod
    def _pow2_64(e: torch.Tensor) -> torch.Tensor:
        """2.0 ** e as float64 for integer exponents in [-1022, 1023], built from the exponent bits (exact)."""
        return ((e.to(torch.int64) + 1023) << 52).contiguous().view(torch.float64)

    @classmethod
    def _ldexp64(cls, x: torch.Tensor, e) -> torch.Tensor:
        """x * 2**e for float64 x and integer exponents e (an int or an int tensor broadcastable to x), as two
        power-of-two factors: exact wherever the result is a normal float64."""
        e = torch.as_tensor(e, dtype=torch.int64, device=x.device).clamp(-2044, 2046)
        h = torch.div(e, 2, rounding_mode="floor")
        return x * cls._pow2_64(h) * cls._pow2_64(e - h)

    @classmethod
    def _pow2_rows64(cls, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x', e): float64 x (rows, D) with each row multiplied by the power of two 2**-e[row] that brings its
        largest |entry| into [0.5, 1) (exact; all-zero and non-finite rows unchanged, e = 0), e (rows,) int64."""
        amax = x.abs().amax(dim=1)
        ok = torch.isfinite(amax) & (amax > 0)
        e = torch.where(ok, torch.frexp(amax)[1], 0).to(torch.int64)
        return cls._ldexp64(x, -e[:, None]), e

    @classmethod
    def _unit64(cls, y: torch.Tensor) -> torch.Tensor:
        """float64 rows divided by their norm (rows of norm 0 stay 0), after a power-of-two rescale (no overflow)."""
        y, _ = cls._pow2_rows64(y)
        norm = torch.linalg.vector_norm(y, dim=1, keepdim=True)
        return torch.where(norm > 0, y / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(y))

    @classmethod
    def _scale_scores(cls, s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """float32 scores (Q, k) times 2**e[q], rounded once (float64 product, exact): a score past float32's
        range becomes +-inf, one below it 0 or a subnormal, as float32 holds it."""
        e = e.to(torch.int64).clamp(-400, 400)[:, None]  # beyond +-400 every nonzero float32 score saturates anyway
        return cls._ldexp64(s.to(torch.float64), e).to(torch.float32)

    def _apply64(self, x: torch.Tensor, blocks, dense: bool = False,
                 out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, int]:
        """(y, E): x (rows, W) float64 in storage layout, or (rows, D) module columns when ``dense``, with each dense
        module block multiplied by its matrix power and the other columns kept, is y * 2**E (y float64; E the
        largest block exponent, or 0 if that is larger and a module is left out: nothing in y over- or
        underflows). Every product is float64 (the float32 matrices are exact in it). ``out``: a float64 buffer of
        x's shape that y may be written to."""
        covered = sum(hi - lo for lo, hi, _, _ in blocks)
        big = max(e for _, _, _, e in blocks)
        if covered < self.dim:
            big = max(big, 0)
        plain = dense or self._plain_layout()
        xd = x if plain else self._dense(x)
        if len(blocks) == 1 and covered == xd.shape[1]:  # one matrix over every column
            mat = blocks[0][2].to(xd.device, torch.float64)
            y = torch.mm(xd, mat, out=out) if plain and out is not None else xd @ mat
        else:
            y = self._ldexp64(xd, -big) if big != 0 else xd.clone()
            for lo, hi, mat, e in blocks:
                part = xd[:, lo:hi] @ mat.to(xd.device, torch.float64)
                y[:, lo:hi] = self._ldexp64(part, e - big) if e != big else part
        if plain:
            return y, big
        res = torch.empty_like(x)
        for n, (dlo, dhi) in self._dense_cols().items():
            slo, shi = self._cols[n]
            res[:, slo:shi] = y[:, dlo:dhi]
        return res, big

    def _precondition_rows(self, x: torch.Tensor, blocks, dense: bool = False,
                           chunk_bytes: int = 4 << 20) -> Tuple[torch.Tensor, torch.Tensor]:
        """mode="both" keys: (k, inv) with k (rows, W) float32 = x H^-1/2 up to a positive factor per row and
        inv (rows,) float32 = 1 / ||that row|| (0 for a row of norm 0 or not finite). Computed in float64 in chunks
        of about ``chunk_bytes`` (cache-sized): the products and sums are float64 and rounded once to float32, so a
        row's key does not depend on how many rows share its block (BLAS rounds a one-row product differently in
        float32); rows of a float64 index are brought to [0.5, 1) by a power of two first, and keys whose norm is
        outside [2**-60, 2**60] are rescaled by a power of two before the float32 cast."""
        n, width = x.shape
        out = torch.empty(n, width, dtype=torch.float32)
        inv = torch.empty(n, dtype=torch.float32)
        step = max(1, min(n, max(64, chunk_bytes // (8 * max(1, width)))))
        blocks64 = [(lo, hi, mat.to(torch.float64), e) for lo, hi, mat, e in blocks]  # no copy if float64 already
        # reused chunk buffers: a fresh multi-MiB tensor per chunk is a fresh mapping, page-faulted every time
        xbuf = torch.empty(step, width, dtype=torch.float64)
        ybuf = torch.empty(step, width, dtype=torch.float64)
        for i in range(0, n, step):
            m = min(step, n - i)
            xc = xbuf[:m]
            xc.copy_(x[i:i + m])
            if x.dtype == torch.float64:
                xc, _ = self._pow2_rows64(xc)
            y, _ = self._apply64(xc, blocks64, dense=dense, out=ybuf[:m])
            nrm = torch.linalg.vector_norm(y, dim=1)
            sus = ~((nrm >= 2.0 ** -60) & (nrm <= 2.0 ** 60))  # also 0, Inf and NaN
            if bool(sus.any()):
                idx = sus.nonzero().flatten()
                rows, _ = self._pow2_rows64(y[idx])  # all-zero and non-finite rows stay as they are
                y[idx] = rows
                nrm[idx] = torch.linalg.vector_norm(rows, dim=1)
            out[i:i + step] = y
            inv[i:i + step] = torch.where(nrm > 0, 1.0 / nrm, torch.zeros_like(nrm))
        return out, inv

    def _plain_layout(self) -> bool:
        return self._width == self.dim and self._cols == self._dense_cols()

    @staticmethod
    def _pow2_rows(x: torch.Tensor) -> torch.Tensor:
        """x (rows, D) float32 with each row multiplied by the power of two that brings its largest |entry| into
        [0.5, 1) (exact; all-zero and non-finite rows unchanged)."""
        amax = x.abs().amax(dim=1)
        amax = torch.where(torch.isfinite(amax) & (amax > 0), amax, torch.full_like(amax, 0.5))
        e = torch.frexp(amax)[1].to(torch.int32)[:, None]
        h = torch.div(e, 2, rounding_mode="floor")  # two steps: 2**-e alone leaves fp32's range for e < -127
        return torch.ldexp(torch.ldexp(x, -h), h - e)

    @classmethod
    def _unit_scale(cls, x: torch.Tensor, owned: bool = False, chunk: int = 8192) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cosine key scaling: (x', inv) with inv (rows,) float32 = 1 / ||x'_row|| (0 for a row of norm 0) and
        x' = x, or a float32 copy of it (x itself, written in place, when ``owned``) in which each row whose
        fp32 sum of squares under- or overflows (entries below ~1e-19 or above ~1e19) is rescaled by a power
        of two first: the row's direction, hence its cosine, is unchanged and its norm is exact."""
        n = x.shape[0]
        inv = torch.empty(n, dtype=torch.float32, device=x.device)
        sus = torch.zeros(n, dtype=torch.bool, device=x.device)
        # below this norm the subnormal squares of a row could move its fp32 sum of squares by more than 2**-30
        tiny = math.sqrt(max(1, x.shape[1])) * 2.0 ** -48
        check = owned or x.dtype != torch.float16  # fp16 entries square within fp32's normal range
        for i in range(0, n, chunk):
            nrm = torch.linalg.vector_norm(x[i:i + chunk].float(), dim=1)
            inv[i:i + chunk] = torch.where(nrm > 0, 1.0 / nrm, torch.zeros_like(nrm))
            if check:
                sus[i:i + chunk] = (nrm < tiny) | torch.isinf(nrm)
        if not check or not bool(sus.any()):
            return x, inv
        idx = sus.nonzero().flatten()
        rows = x[idx].float()
        amax = rows.abs().amax(dim=1)
        live = (amax > 0) & torch.isfinite(amax)  # all-zero rows keep norm 0; rows holding Inf stay as they were
        if not bool(live.any()):
            return x, inv
        idx, rows = idx[live], cls._pow2_rows(rows[live])
        if not owned:
            x = x.to(torch.float32, copy=True)
        x[idx] = rows
        inv[idx] = 1.0 / torch.linalg.vector_norm(rows, dim=1)
        return x, inv

    @staticmethod
    def _faiss_block(qw, kv, k, largest, scale, run_s, run_i, base):
        import faiss

        xq = (qw if largest else -qw).detach().to("cpu", torch.float32).contiguous().numpy()
        xb = kv.detach().to("cpu", torch.float32)
        if scale is not None:  # in place when the conversion made xb (a bf16 / fp16 block): one fp32 block, not two
            sc = scale.to("cpu")[:, None]
            xb = xb.mul_(sc) if xb.data_ptr() != kv.data_ptr() else xb * sc
        xb = xb.contiguous().numpy()
        kb = min(k, xb.shape[0])
        dist, idx = faiss.knn(xq, xb, kb, metric=faiss.METRIC_INNER_PRODUCT)
        s = torch.from_numpy(dist).to(torch.float32)
        i = torch.from_numpy(idx).to(torch.int64)
        i = torch.where(i >= 0, i + base, i)
        if not largest:
            s = -s
        bad = (i < 0).any(dim=1)
        if bool(bad.any()):
            # faiss's heap starts at -inf and takes only scores above it: a row scoring -inf or NaN (+inf / NaN
            # reversed) is never taken, and its slot comes back -1 although the block holds kb rows. Those
            # queries' block results are redone by the torch kernel, which ranks such rows last (NaN as -inf /
            # +inf) with ties on the lowest row, as the torch backend does.
            rs, ri = ops.score_topk(qw[bad.to(qw.device)].to(torch.float32), kv, kb, largest=largest,
                                    key_scale=scale, base=base)
            s[bad], i[bad] = rs.cpu(), ri.cpu()
        if run_s is not None:
            s = torch.cat([run_s.cpu(), s], dim=1)
            i = torch.cat([run_i.cpu(), i], dim=1)
        empty = torch.empty(0, qw.shape[1], dtype=torch.float32)
        out_s, out_i = ops.score_topk(torch.zeros(xq.shape[0], qw.shape[1]), empty, k, largest=largest,
                                      scores_in=s, idx_in=i, base=0)
        return out_s.to(qw.device), out_i.to(qw.device)

    def __repr__(self) -> str:
        state = "building" if self._writable else "aborted" if self._closed else "closed" if self._released \
            else "read-only"
        return (f"GradientIndex({str(self.path)!r}, layout={getattr(self, 'layout', '?')}, rows={len(self)}, "
                f"dim={self.dim}, dtype={self.dtype}, modules={len(self.modules)}, per_token={self.per_token}, "
                f"{state})")
