"""Review of session 42's changes (git diff 97a299c..HEAD): the defects they introduced (found as strict xfails,
fixed the same session; the tests now pin the fixes) and the risky cases that were checked and behave correctly.

Defects found (all fixed):

* ops/__init__.py:_check_not_inference (also ops/obs.py:obs_shared_prune's ``values=``, and
  kernels/reference/obs.py:_addressless): the "skip while tracing" test is ``torch.compiler.is_compiling()``, a
  process-wide flag that torch sets for a whole compile session, so an eager call on another thread while any
  torch.compile runs skips the checks: an inference tensor is written in place outside inference mode, silently.
  Fix: ``torch.compiler.is_dynamo_compiling()`` (False outside Dynamo's trace, constant-folded True by it; a
  fullgraph compile still traces).
* ops fake impls (_fake_check): the wrappers' checks are stricter than the eager C++ ops in a few places, so
  FakeTensorMode / torch.compile refuse calls that the eager op runs: scatter_segments(_) with a non-finite scale,
  projection_matrix_ with row0 + rows or col0 + cols >= 2**63, project_flat with col0 + D >= 2**63; and a 2-D
  gather index is a ValueError eagerly but a TypeError traced. Fix: the same rules on both sides (C++ checks in
  csrc/checks.h / csrc/factored_checks.h matching the wrappers, or the fake impls relaxed to the C++ rules).
* csrc/cpu/projection.cpp:project_flat_gemm's row-block schedule: the last block holds B % 64 rows, and a block of
  1-3 rows takes another MKL kernel, so equal rows (an expand()ed x, or duplicate rows) give other bits in that
  block (B = 129, 130, 131); the one-product path (B < 128) and blocks of >= 4 rows keep them equal, as the code's
  own comment requires. Fix: fold the remainder into the previous block (blocks of 64..127 rows).
* index.py:GradientIndex.search / get: a reader closed between the readability check and the scan (another thread's
  close()) fails with AttributeError ('NoneType' object has no attribute 'reshape') / IndexError instead of the
  documented RuntimeError (memory is safe: the maps are reference counted). Fixed: reads are counted and a close()
  meanwhile releases the maps after the last one (the read completes); a read starting after close() raises.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import multiprocessing as mp
import os
import pickle
import threading
import time

import numpy as np
import pytest
import torch

import gradkit.index as gi
from gradkit import _ext
from gradkit import ops
from gradkit.index import GradientIndex
from gradkit.projection import AdafactorNormalizer, factored_project

needs_ext = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")
MODS = {"a": 5, "b": 3}


def _rows(n, seed, d=8):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _index(path, x, **kw):
    with GradientIndex.create(path, MODS, dtype=kw.pop("dtype", torch.float32), **kw) as w:
        w.append(x)
    return path


# ------------------------------------------------------------------------------------------------ index: _FileMap


def test_views_outlive_a_readers_close_and_the_object(tmp_path):
    """A tensor viewing a shard keeps its map alive (numpy base -> _FileMap): close() and del of the reader do not
    unmap memory that is still read (bfloat16 index: the torch view is a .view() of the numpy array)."""
    x = _rows(9, 1)
    p = _index(tmp_path / "ix", x, dtype=torch.bfloat16, shard_rows=4)
    r = GradientIndex.open(p)
    views = [v for _, v in r._shards]
    offs = r.offsets
    want = torch.cat([v.float() for v in views])
    r.close()
    assert r._maps == [] and r._shards == []
    del r
    gc.collect()
    assert torch.equal(torch.cat([v.float() for v in views]), want)
    assert torch.equal(want, x.bfloat16().float()) and offs is None


def test_reads_after_close_and_after_a_with_block_raise(tmp_path):
    x = _rows(6, 2)
    p = _index(tmp_path / "ix", x)
    with GradientIndex.open(p) as r:
        got = r.get([0, 5])
    assert torch.equal(got, x[[0, 5]])  # get copies: its result outlives the maps
    for call in (lambda: r.get(0), lambda: r.search(x[:1], k=1), lambda: r.example_of([0])):
        with pytest.raises(RuntimeError, match="the index was closed"):
            call()
    assert "closed" in repr(r) and len(r) == 6


def test_pickle_and_deepcopy_are_refused_and_leave_the_reader_intact(tmp_path):
    """_FileMap holds ctypes function pointers: pickling refuses (before the change: TypeError from mmap.mmap; now
    ValueError from ctypes), and no copy holding the same address (a second munmap) is ever made."""
    x = _rows(7, 3)
    p = _index(tmp_path / "ix", x, shard_rows=3)
    r = GradientIndex.open(p)
    for f in (pickle.dumps, copy.deepcopy):
        with pytest.raises((TypeError, ValueError)):
            f(r)
    gc.collect()
    assert torch.equal(r.get(range(7)), x)
    c = copy.copy(r)  # a shallow copy shares the maps: closing the original leaves it readable
    r.close()
    assert torch.equal(c.get(range(7)), x)
    c.close()


def _child_reads(r, conn):
    try:
        conn.send(r.get(range(len(r))).tolist())
        r.close()  # unmaps in the child only
        conn.send("ok")
    except BaseException as e:  # noqa: BLE001
        conn.send(repr(e))
    finally:
        conn.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_forked_child_reads_and_closes_without_touching_the_parent(tmp_path):
    x = _rows(5, 4)
    p = _index(tmp_path / "ix", x, shard_rows=2)
    r = GradientIndex.open(p)
    ctx = mp.get_context("fork")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=_child_reads, args=(r, b))
    proc.start()
    got, status = a.recv(), a.recv()
    proc.join(30)
    assert status == "ok" and proc.exitcode == 0
    assert torch.equal(torch.tensor(got), x)
    assert torch.equal(r.get(range(5)), x)  # the parent's maps are its own


def test_python_mmap_fallback_reads_searches_and_closes(tmp_path, monkeypatch):
    """Where the C library's mmap cannot be called (32-bit, other platforms) Python's mmap is used: same reads,
    low_memory's madvise, and close()."""
    import mmap

    x = _rows(11, 5)
    p = _index(tmp_path / "ix", x, shard_rows=4)
    q = _rows(2, 6)
    want = GradientIndex.open(p).search(q, k=4)
    monkeypatch.setattr(gi, "_LIBC_MAP", False)
    for low in (False, True):
        r = GradientIndex.open(p, low_memory=low)
        assert all(isinstance(m, mmap.mmap) for m in r._maps) and len(r._maps) == 3
        got = r.search(q, k=4, batch_rows=3)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert torch.equal(r.get(range(11)), x)
        r.close()
        with pytest.raises(RuntimeError, match="the index was closed"):
            r.get(0)


def test_filemap_error_path_raises_oserror_and_collects_cleanly(tmp_path):
    if not gi._libc_map():
        pytest.skip("no C library mmap here")
    f = tmp_path / "f.bin"
    f.write_bytes(b"\0" * 10)
    fd = os.open(f, os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            gi._FileMap(fd, 0)  # EINVAL: no half-made map is unmapped later
        m = gi._FileMap(fd, 10)
    finally:
        os.close(fd)
    assert np.asarray(m).tolist() == [0] * 10 and len(m) == 10  # the descriptor is not needed by the map
    del m
    gc.collect()


def _bergson_shard(root, k, rows, width=4):
    d = root / f"shard-{k:05d}"
    d.mkdir(parents=True)
    (d / "info.json").write_text(json.dumps({"num_grads": rows, "grad_sizes": {"a": width},
                                             "base_dtype": "float32"}))
    data = (np.arange(rows * width, dtype=np.float32) + 100 * k).reshape(rows, width)
    if rows:
        data.tofile(d / "gradients.bin")
    else:
        (d / "gradients.bin").write_bytes(b"\0")  # numpy's memmap of 0 rows writes one byte
    return torch.from_numpy(data)


def test_bergson_empty_shard_and_low_memory_madvise_hit_the_right_map(tmp_path, monkeypatch):
    """An empty bergson shard makes no map: the views and the maps stay aligned, so low_memory's madvise goes to
    the map of the block just scored, within its length (a misaligned call would drop another shard's pages)."""
    root = tmp_path / "bs"
    parts = [_bergson_shard(root, 0, 5), _bergson_shard(root, 1, 0), _bergson_shard(root, 2, 7)]
    x = torch.cat(parts)
    calls = []
    if gi._libc_map():
        real = gi._FileMap.madvise
        monkeypatch.setattr(gi._FileMap, "madvise", lambda self, adv, s, n: (calls.append((self, s, n)),
                                                                             real(self, adv, s, n))[1])
    q = torch.randn(3, 4, generator=torch.Generator().manual_seed(7))
    plain = GradientIndex.open(root).search(q, k=6)
    r = GradientIndex.open(root, low_memory=True)
    assert len(r._maps) == len(r._shards) == 2
    low = r.search(q, k=6, batch_rows=2)
    assert all(torch.equal(a, b) for a, b in zip(plain, low))
    assert torch.equal(r.get(range(12)), x)  # pages dropped are read back from the file
    if gi._libc_map():
        addr = {id(m): v.data_ptr() for m, (_, v) in zip(r._maps, r._shards)}
        assert len(calls) == 3 + 4
        for m, s, n in calls:
            assert m._addr == addr[id(m)] and s % 4096 == 0 and 0 < s + n <= len(m)


def test_a_scan_begun_before_close_finishes_on_its_own_references(tmp_path):
    """close() after a search's block scan began (another thread) leaves the scan on the list it holds: every block
    is still read, from maps kept alive by their views (no unmapped read)."""
    x = _rows(40, 8)
    p = _index(tmp_path / "ix", x, shard_rows=10)
    r = GradientIndex.open(p)
    gen = r._blocks(7)
    first = next(gen)
    r.close()
    rest = list(gen)
    assert torch.equal(torch.cat([b for _, b in [first] + rest]), x)


@pytest.mark.parametrize("call", ["search", "get"])
def test_close_racing_a_read_raises_runtimeerror(tmp_path, monkeypatch, call):
    x = _rows(20, 10)
    p = _index(tmp_path / "ix", x, shard_rows=6)
    q = _rows(2, 11)
    want = GradientIndex.open(p).search(q, k=3)
    r = GradientIndex.open(p)
    hook = "_query_matrix" if call == "search" else "_row_numbers"
    real = getattr(GradientIndex, hook)

    def closing(self, *a, **k):  # what another thread's close() does at this point
        self.close()
        return real(self, *a, **k)

    monkeypatch.setattr(GradientIndex, hook, closing)
    try:
        got = r.search(q, k=3) if call == "search" else r.get([0, 19])
    except RuntimeError as e:
        assert "closed" in str(e)
        return
    if call == "search":  # or it finished on what it held
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    else:
        assert torch.equal(got, x[[0, 19]])
    # the close() took effect once the read ended: maps released, later reads refused
    assert r._shards == [] and r._maps == []
    with pytest.raises(RuntimeError, match="closed"):
        r.get([0])


# ------------------------------------------------------------------------------ ops: tracing skips, fake impls


@needs_ext
def test_inplace_checks_still_run_while_another_thread_compiles():
    started, release = threading.Event(), threading.Event()

    def backend(gm, example):
        started.set()
        release.wait(60)
        return gm

    def work(t):
        return t * 3 + 1

    torch._dynamo.reset()  # a cached compile would never call the backend
    th = threading.Thread(target=lambda: torch.compile(work, backend=backend)(torch.ones(3)), daemon=True)
    th.start()
    try:
        assert started.wait(60) and torch.compiler.is_compiling()  # the other thread's compile session
        with torch.inference_mode():
            x = torch.ones(4, 4)
        keep = torch.tensor([[True, False], [False, True]])
        with pytest.raises(RuntimeError, match="inference tensor"):
            ops.block_apply_mask_(x, [2, 2], keep)
        assert bool((x == 1).all())  # nothing written
    finally:
        release.set()
        th.join(60)


def test_inplace_inference_check_runs_in_eager_without_a_compile():
    assert not torch.compiler.is_compiling()
    with torch.inference_mode():
        x = torch.ones(4, 4)
    with pytest.raises(RuntimeError, match="inference tensor"):
        ops.block_apply_mask_(x, [2, 2], torch.ones(2, 2, dtype=torch.bool))
    assert bool((x == 1).all())


def _outcome(fn, args):
    try:
        fn(*args)
        return None
    except Exception as e:  # noqa: BLE001
        return type(e).__name__


def _fake_args(mode, args):
    def conv(a):
        if isinstance(a, torch.Tensor):
            return mode.from_tensor(a)
        if isinstance(a, list):
            return [conv(t) for t in a]
        return a
    return [conv(a) for a in args]


def _cases():
    f32 = torch.float32
    u8 = torch.uint8
    b = torch.bool
    ok = [
        ("gather_9d", "gather_segments", lambda: ([torch.ones([1] * 9)], [None], None)),
        ("topk_2d_scores", "topk_select", lambda: (torch.rand(2, 3), None, 2)),
        ("topk_active_other_shape", "topk_select", lambda: (torch.rand(6), torch.ones(2, 3, dtype=b), 2)),
        ("topk_k_too_big", "topk_select", lambda: (torch.rand(3), None, 4)),
        ("soft_atol_inf", "block_soft_threshold_", lambda: (torch.ones(4), [2], torch.ones(2), None, 5, math.inf,
                                                            1e-7)),
        ("soft_eps_neg", "block_soft_threshold_", lambda: (torch.ones(4), [2], torch.ones(2), None, 5, 1e-8, -1.0)),
        ("score_topk_k_gt_n", "score_topk", lambda: (torch.ones(2, 3), torch.ones(1, 3), 3, True, None, None, None, 0)),
        ("factored_strided_rows", "factored_project", lambda: (torch.ones(4, 6)[:, ::2], torch.ones(4, 2),
                                                               torch.ones(2, 3), torch.ones(3, 3), None, None, 2)),
        ("adamw_f64", "masked_adamw_", lambda: ([torch.ones(3, dtype=torch.float64)],
                                                [torch.ones(3, dtype=torch.float64)],
                                                [torch.zeros(3, dtype=torch.float64)],
                                                [torch.zeros(3, dtype=torch.float64)], [None], 0.1, 0.1, 0.9, 0.99,
                                                1e-8, 0.0, [1.0], [1.0], False)),
        ("adamw_bc_zero", "masked_adamw_", lambda: ([torch.ones(3)], [torch.ones(3)], [torch.zeros(3)],
                                                    [torch.zeros(3)], [None], 0.1, 0.1, 0.9, 0.99, 1e-8, 0.0, [0.0],
                                                    [1.0], False)),
        ("obs_select_eps_inf", "obs_select", lambda: (torch.ones(2, 4), torch.ones(2, 4), 2, 1, 1, math.inf)),
        ("obs_shared_values_unread", "obs_shared_prune", lambda: (torch.ones(2, 4), torch.eye(4),
                                                                  torch.ones(2, 1, 1, 1),
                                                                  torch.zeros(1, 1, dtype=torch.long), 2, False)),
        ("obs_sweep", "obs_sweep_", lambda: (torch.ones(2, 3), torch.zeros(2, 3), torch.eye(2),
                                             torch.zeros(2, 3, dtype=b), 0, 2)),
        ("obs_sweep_expanded_err", "obs_sweep_", lambda: (torch.ones(2, 3), torch.zeros(1, 3).expand(2, 3),
                                                          torch.eye(2), torch.zeros(2, 3, dtype=b), 0, 2)),
        ("golden_noncontig_g", "golden_topk_and_", lambda: (torch.ones(4, 4).t(), torch.zeros(2, dtype=u8), None, 2,
                                                            True)),
        ("bitmask_binary_bad_op", "bitmask_binary", lambda: ([torch.zeros(1, dtype=u8)], [torch.zeros(1, dtype=u8)],
                                                             7)),
        ("scope_kth_p_nan", "scope_kth", lambda: (torch.ones(4), [1], [4], 1, math.nan, False, 1.0, False)),
        ("scope_kth_kw_inf", "scope_kth", lambda: (torch.ones(4), [1], [4], 1, 2.0, False, math.inf, True)),
        ("hard_threshold_values_dtype", "scope_hard_threshold_", lambda: (torch.ones(4), torch.ones(4).double(), [1],
                                                                          [4], 2, 2.0, False)),
        ("project_flat_f64", "project_flat", lambda: (torch.ones(2, 3, dtype=torch.float64), 4, 1, 0, 0)),
        ("projmat_int_out", "projection_matrix_", lambda: (torch.empty(2, 2, dtype=torch.int32), 1, 0, 4, 0, 0)),
        ("scatter_numel_neg", "scatter_segments", lambda: (torch.ones(0, dtype=f32), [None], [-1], 1.0)),
    ]
    bad = [
        ("scatter_scale_inf", "scatter_segments", lambda: (torch.ones(3), [None], [3], math.inf),
         "ops/__init__.py:_scatter_fake runs check_scatter_segments (_finite(scale)); the C++ op takes any scale"),
        ("scatter_scale_nan", "scatter_segments", lambda: (torch.ones(3), [None], [3], math.nan),
         "ops/__init__.py:_scatter_fake: NaN scale refused traced, taken eagerly"),
        ("scatter_inplace_scale_inf", "scatter_segments_", lambda: (torch.ones(3), [None], [torch.zeros(3)], math.inf,
                                                                     False),
         "ops/__init__.py:_scatter_inplace_fake: non-finite scale refused traced, taken eagerly"),
        ("projmat_row0_range", "projection_matrix_", lambda: (torch.empty(2, 2), 1, 0, 4, 2 ** 63 - 2, 0),
         "ops/projection.py:_projection_matrix_fake: row0 + rows >= 2**63 refused traced; csrc/factored_checks.h "
         "check_projection_matrix does not check it"),
        ("projmat_col0_range", "projection_matrix_", lambda: (torch.empty(2, 2), 1, 0, 4, 0, 2 ** 63 - 2),
         "ops/projection.py:_projection_matrix_fake: col0 + cols >= 2**63 refused traced only"),
        ("project_flat_col0_range", "project_flat", lambda: (torch.ones(2, 3), 4, 1, 0, 2 ** 63 - 2),
         "ops/projection.py:_project_flat_fake: col0 + D >= 2**63 refused traced; csrc check_project_flat does not"),
        ("gather_index_2d_kind", "gather_segments", lambda: ([torch.ones(4)], [torch.zeros(1, 2, dtype=torch.long)],
                                                             None),
         "ops/__init__.py:_check_segments: a 2-D index is TypeError traced, ValueError from the C++ op "
         "(csrc/segments.h)"),
    ]
    out = [pytest.param(op, mk, id=name) for name, op, mk in ok]
    out += [pytest.param(op, mk, id=name) for name, op, mk, _why in bad]  # fixed in session 42 (were strict xfails)
    return out


@needs_ext
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("op,make", _cases())
def test_fake_impl_refuses_exactly_what_the_eager_op_refuses(op, make):
    """Each fake impl now runs the op's checks: under FakeTensorMode a call must be accepted or refused (with the
    same exception type) as the eager op accepts or refuses it; no check reads data (fake tensors have none)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fn = getattr(torch.ops.gradkit, op)
    eager = _outcome(fn, make())
    mode = FakeTensorMode()
    args = _fake_args(mode, make())
    with mode:
        fake = _outcome(fn, args)
    assert fake == eager, (eager, fake)


# ------------------------------------------------------------------------- projection: Adafactor + bias, two calls


def _adafactor(O, I, with_bias_sq, seed=0):
    g = torch.Generator().manual_seed(seed)
    return AdafactorNormalizer(row=torch.rand(O, generator=g), col=torch.rand(I, generator=g),
                               bias_avg_sq=torch.rand(O, generator=g) if with_bias_sq else None)


@needs_ext
@pytest.mark.parametrize("with_bias_sq", [True, False])
def test_adafactor_bias_two_calls_against_float64_masks_nan_and_batch(with_bias_sq):
    gen = torch.Generator().manual_seed(3)
    B, T, I, O, p = 3, 5, 12, 10, 4
    a, g = torch.randn(B, T, I, generator=gen), torch.randn(B, T, O, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    a[~mask] = float("nan")  # masked tokens never reach a sum
    nz = _adafactor(O, I, with_bias_sq)
    kw = dict(p=p, seed=3, name="m", mask=mask, bias=True, normalizer=nz)
    got = factored_project(a, g, **kw)
    want = factored_project(a.double(), g.double(), **kw)  # the float64 composite, rounded once
    assert torch.isfinite(got).all()
    assert (got.double() - want.double()).abs().max().item() <= 1e-6 * want.abs().max().item()
    one = factored_project(a[1:2], g[1:2], **{**kw, "mask": mask[1:2]})
    assert torch.equal(one[0], got[1])  # an example's bits do not depend on its batch
    tokens = factored_project(a, g, **{**kw, "per_token": True}).double().sum(1)
    assert torch.allclose(tokens, want.double(), rtol=1e-5, atol=1e-5)


@needs_ext
def test_adafactor_bias_half_t0_2d_and_grads():
    B, T, I, O, p = 2, 3, 6, 5, 3
    nz = _adafactor(O, I, True, 1)
    gen = torch.Generator().manual_seed(4)
    ab, gb = torch.randn(B, T, I, generator=gen).bfloat16(), torch.randn(B, T, O, generator=gen).bfloat16()
    kw = dict(p=p, seed=1, name="m", bias=True, normalizer=nz)
    assert torch.equal(factored_project(ab, gb, **kw), factored_project(ab.float(), gb.float(), **kw))
    z = factored_project(torch.randn(B, 0, I), torch.randn(B, 0, O), **kw)
    assert z.shape == (B, p * p) and bool((z == 0).all())
    m1 = torch.tensor([True, False])
    r2 = factored_project(ab[:, 0].float(), gb[:, 0].float(), mask=m1, **kw)
    assert bool((r2[1] == 0).all()) and bool((r2[0] != 0).any())
    mask = torch.tensor([[True, False, True], [True, True, False]])
    a = torch.randn(B, T, I, generator=gen, requires_grad=True)
    g = torch.randn(B, T, O, generator=gen, requires_grad=True)
    w = torch.randn(B, p * p, generator=gen)
    (factored_project(a, g, mask=mask, **kw) * w).sum().backward()
    ad, gd = a.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    (factored_project(ad, gd, mask=mask, **kw) * w.double()).sum().backward()
    assert torch.allclose(a.grad.double(), ad.grad, atol=1e-5) and torch.allclose(g.grad.double(), gd.grad, atol=1e-5)
    assert bool((a.grad[~mask] == 0).all())


# ---------------------------------------------------------------------- projection.cpp: project_flat_gemm row blocks


def _explicit(x, k, seed, kind, col0):
    R = ops.projection_matrix(k, x.shape[1], seed, kind, k, 0, col0, dtype=torch.float64)
    return x.double() @ R.T


@needs_ext
@pytest.mark.parametrize("form", ["tcol", "half", "rowstride", "offset", "expand"])
@pytest.mark.parametrize("B,D,k", [(128, 1500, 300), (129, 2100, 100), (200, 1024, 257)])
def test_row_block_schedule_non_contiguous_x_any_d_k_col0(monkeypatch, form, B, D, k):
    """The row-block schedule (B >= 128 over few tiles, not tiny) on every x layout: the non-direct xbuf path
    (transposed, half, strided rows, stride-0 rows), D and k off the tile sizes, col0 != 0: within float32 rounding
    of the float64 product and the same bits at 1 and 2 threads (Gaussian: always the GEMM path)."""
    gen = torch.Generator().manual_seed(B + D + k)
    x = {"tcol": lambda: torch.randn(D, B, generator=gen).T,
         "half": lambda: torch.randn(B, D, generator=gen).half(),
         "rowstride": lambda: torch.randn(B, D + 7, generator=gen)[:, 3:3 + D],
         "offset": lambda: torch.randn(B + 1, D, generator=gen)[1:],
         "expand": lambda: torch.randn(1, D, generator=gen).expand(B, D)}[form]()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        o1 = ops.project_flat(x, k, 5, 1, 777)
        torch.set_num_threads(2)
        o2 = ops.project_flat(x, k, 5, 1, 777)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(o1, o2)
    want = _explicit(x, k, 5, 1, 777)
    scale = x.double().abs().sum(1, keepdim=True) / math.sqrt(k)
    assert ((o1.double() - want).abs() / scale).max().item() < 1e-6


def _equal_rows_case(B):
    x = torch.randn(1, 1500, generator=torch.Generator().manual_seed(B)).expand(B, 1500)
    out = ops.project_flat(x, 300, 5, 1, 0)
    return (out != out[0]).any(1).nonzero().flatten().tolist()


@needs_ext
@pytest.mark.parametrize("B", [65, 127, 128, 132, 192])
def test_equal_rows_give_equal_outputs(B):
    """One product (B < 128) or row blocks of >= 4 rows: an expand()ed x gives one output row repeated."""
    assert _equal_rows_case(B) == []


@needs_ext
@pytest.mark.parametrize("B", [129, 131])
def test_equal_rows_give_equal_outputs_in_a_short_last_row_block(B):
    assert _equal_rows_case(B) == []


# ------------------------------------------------------------------------ obs/driver.py: the per-group broadcast


def _bcast_worker(rank, tmp):
    import torch.distributed as dist

    from gradkit.obs import driver

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        half = torch.nn.Linear(8, 6, dtype=torch.float16)
        brain = torch.nn.Linear(8, 6, dtype=torch.bfloat16)
        strided = torch.nn.Linear(8, 6)
        strided.weight = torch.nn.Parameter(torch.randn(8, 6).t())  # a non-contiguous weight
        driver._same_weights_on_every_rank([("h", half), ("b", brain), ("s", strided)])
        torch.save({"h": half.weight.detach(), "b": brain.weight.detach(), "s": strided.weight.detach(),
                    "s_stride": torch.tensor(strided.weight.stride())}, f"{tmp}/r{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_group_broadcast_half_bf16_and_strided_weights(tmp_path):
    """_same_weights_on_every_rank on gloo: float16, bfloat16 and a non-contiguous weight all end as rank 0's, the
    strided one keeping its layout (copied back into the parameter)."""
    import torch.multiprocessing as tmp_mp

    ctx = tmp_mp.spawn(_bcast_worker, args=(str(tmp_path),), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the distributed workers did not finish within 120 s")
    r0 = torch.load(tmp_path / "r0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "r1.pt", weights_only=True)
    for n in ("h", "b", "s"):
        assert torch.equal(r0[n], r1[n]), n
    assert r1["s_stride"].tolist() == [1, 6]
