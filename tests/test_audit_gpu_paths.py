"""Audit of the GPU code paths that had never run on a GPU, checked on the CPU: the CUDA C++ host code and
kernels under the emulator of tests/cuda_emu (built with GK_MAX_GRID_Y=1, see test_cuda_emulated), the Triton
launchers under the interpreter, and the launchers' device handling with fake CUDA tensors.

* TF32: the auto backend sends factored_project / score_topk to the CUDA C++ kernels exactly while torch lets
  cuBLAS use TF32 (ops.cublas_fp32_reduced), because those kernels are float32-exact whatever that setting.
  Their cuBLAS fallbacks (factored_project p > 64, score_topk k > 64, obs_schur_extend_ m > 256) ran at::mm /
  bmm under the caller's TF32 setting: each matrix product they make must run under at::NoTF32Guard (read here
  from inside the products through a dispatch mode).
* score_topk (CUDA C++ and Triton): more than 65535 query blocks (grid axis y) ran in one launch and were
  refused ("at most 2,097,120 queries per call") where the composite path, taken before TF32 routing, had no
  such limit: the launchers now run slices of queries; the emulator (and a shrunk limit for Triton) slices at
  one block, so the slice boundaries, the last partial slice and a running top-k through them are checked.
* Triton launchers: Triton launches on the current CUDA device, not the tensors'; a tensor on another GPU
  (auto-routed project_flat, the half-precision obs_schur_extend_) went to a kernel on the wrong device.
"""
import contextlib
import ctypes
import os

import pytest
import torch

from gradkit import _ext
from gradkit.kernels.reference import obs as obs_ref
from gradkit.kernels.reference import projection as pref
from gradkit.kernels.reference import search as sref

pytestmark = pytest.mark.skipif(not _ext.has_op("factored_project"), reason="compiled extension not built")

_MATMULS = ("aten.mm.", "aten.bmm.", "aten.baddbmm.", "aten.addmm.", "aten.matmul.", "aten.bmm_out", "aten.mm_out")


def _tf32_guard_probe():
    """at::NoTF32Guard::should_disable_tf32() of the calling thread (what cuBLAS's TF32 choice reads besides
    torch's global setting), from libtorch_cpu without compiling anything."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    f = getattr(lib, "_ZN2at11NoTF32Guard19should_disable_tf32Ev")
    f.restype = ctypes.c_bool
    f.argtypes = []
    return f


@contextlib.contextmanager
def _matmul_tf32_log():
    """Records, for every ATen matrix product dispatched in the body (including those made inside C++ ops),
    whether TF32 was disabled for it by a NoTF32Guard."""
    from torch.utils._python_dispatch import TorchDispatchMode

    probe = _tf32_guard_probe()
    seen = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if name.startswith(_MATMULS):
                seen.append((name, bool(probe())))
            return func(*args, **(kwargs or {}))

    with Mode():
        yield seen


def _emu(stem):
    from test_cuda_emulated import emu

    return emu(stem)


# ------------------------------------------------------------------------------------------------ TF32


@pytest.mark.cuda_emu
def test_emulated_wide_factored_project_products_ignore_tf32():
    """p = 65 (past the kernel's 64): the composite's products run with TF32 disabled; result unchanged."""
    from test_factored_ops import close, make

    args = make(3, 5, 20, 17, 65, 1, rb=True, mask=True)
    E = _emu("projection")
    with _matmul_tf32_log() as seen:
        got = E.factored_project(*args, 5)
    assert seen, "the composite made no matrix product"
    assert all(off for _, off in seen), seen
    close(got, pref.factored_project(*args, 5))


@pytest.mark.cuda_emu
def test_emulated_score_topk_composite_products_ignore_tf32():
    """k = 70 (past the fused kernel's 64) and D = 0: the chunked GEMM path, TF32 disabled, results exact."""
    E = _emu("search")
    g = torch.Generator().manual_seed(4)
    q = torch.randint(-3, 4, (5, 12), generator=g).float()
    keys = torch.randint(-3, 4, (300, 12), generator=g).float()
    for qq, kk in ((q, keys), (q[:, :0], keys[:, :0])):
        for largest in (True, False):
            with _matmul_tf32_log() as seen:
                got = E.score_topk(qq, kk, 70, largest, None, None, None, 3)
            assert seen and all(off for _, off in seen), seen
            want = sref.score_topk(qq, kk, 70, largest, None, None, None, 3)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.cuda_emu
def test_emulated_schur_composite_products_ignore_tf32():
    """m = 300 (past the kernel's 256): the composite's batched products run with TF32 disabled."""
    import test_obs_schur_ops as t_schur

    args = t_schur.schur_make(2, 300, 40, 50, torch.float32, 1)
    E = _emu("obs")
    seen = []

    def op(*a):  # only the op's own products are logged (schur_check's reference makes others)
        with _matmul_tf32_log() as s:
            E.obs_schur_extend_(*a)
        seen.extend(s)

    t_schur.schur_check(op, args)
    assert seen and all(off for _, off in seen), seen


# --------------------------------------------------------------------------- score_topk query slicing


def _search_case(Q, N=200, D=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-3, 4, (Q, D), generator=g).float()
    keys = torch.randint(-3, 4, (N, D), generator=g).to(torch.bfloat16)
    scale = torch.randint(1, 4, (N,), generator=g).float()
    s_in, i_in = sref.score_topk(q, torch.randint(-3, 4, (50, D), generator=g).float(), 6, True, None, None, None,
                                 10_000)
    return q, keys, scale, s_in, i_in


@pytest.mark.cuda_emu
@pytest.mark.parametrize("Q", [32, 33, 64, 65, 97])
def test_emulated_score_topk_slices_queries_past_the_grid_limit(Q):
    """The emulator build allows one 32-query block on grid axis y: every Q > 32 runs in slices (the last one
    partial), with a running top-k, key scales and both senses: the reference's scores and indices."""
    E = _emu("search")
    ctl = _emu("projection")  # the emulator's control ops: stats(0) counts kernel launches
    q, keys, scale, s_in, i_in = _search_case(Q, seed=Q)
    for largest in (True, False):
        for sc, si, ii in ((None, None, None), (scale, s_in, i_in)):
            if not largest and si is not None:
                si = -si
            launches = ctl.stats(0)
            got = E.score_topk(q, keys, 5, largest, sc, si, ii, 7)
            # one tile-kernel launch per slice of 32 queries: no launch past the emulated grid-y limit of 1
            # (the merge is host code)
            assert ctl.stats(0) - launches == -(-Q // 32)
            want = sref.score_topk(q, keys, 5, largest, sc, si, ii, 7)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (Q, largest, sc is None)


def test_triton_score_topk_slices_queries_past_the_grid_limit(monkeypatch):
    """The Triton launcher with grid axis 1 limited to one query block: slices of queries, the reference's
    result (it refused more than 65535 query blocks)."""
    from gradkit.kernels.triton import search as T

    monkeypatch.setattr(T, "_MAX_GRID_Y", 1)
    monkeypatch.setitem(T.BLOCKS, "q", 16)
    q, keys, scale, s_in, i_in = _search_case(40, N=70, seed=1)
    for largest in (True, False):
        si = s_in if largest else -s_in
        got = T.score_topk(q, keys, 4, largest, scale, si, i_in, 2)
        want = sref.score_topk(q, keys, 4, largest, scale, si, i_in, 2)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), largest


# --------------------------------------------------------------------------- Triton launch device


@contextlib.contextmanager
def _fake_devices(monkeypatch):
    """torch.cuda.device replaced by a recorder of the current device (cuda:0 outside any guard); yields the
    list of devices that were current when a (faked) kernel launched."""
    cur = [0]
    launched = []

    class Device:
        def __init__(self, d):
            self.index = torch.device(d).index if not isinstance(d, int) else d

        def __enter__(self):
            cur.append(self.index)

        def __exit__(self, *exc):
            cur.pop()

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **kw: launched.append(cur[-1])

    monkeypatch.setattr(torch.cuda, "device", Device)
    yield launched, Kernel


def test_triton_launchers_run_on_the_tensors_device(monkeypatch):
    """Tensors on cuda:1 while cuda:0 is current (fake tensors, faked kernels): every launch of the projection,
    obs and search launchers happens with cuda:1 current, as the CUDA C++ kernels' CUDAGuard does."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gradkit.kernels.triton import obs as TO
    from gradkit.kernels.triton import projection as TP
    from gradkit.kernels.triton import search as TS

    with _fake_devices(monkeypatch) as (launched, Kernel):
        for mod, names in ((TP, ("_project_flat_kernel", "_matrix_kernel", "_factored_kernel",
                                 "_factored_short_kernel")),
                           (TO, ("_obs_select_kernel", "_shared_prune_kernel", "_schur_extend_kernel")),
                           (TS, ("_tile_topk_kernel",))):
            for n in names:
                monkeypatch.setattr(mod, n, Kernel())
        monkeypatch.setattr(TP, "_sm_count", lambda d: 132)
        monkeypatch.setattr(TS, "_merge", lambda cs, ci, *a: (cs, ci))  # the host merge: not a launch
        with FakeTensorMode():
            dev = torch.device("cuda", 1)
            TP.project_flat(torch.empty(70, 130, device=dev), 16, 3, 0, 0)
            TP.projection_matrix_(torch.empty(5, 70, device=dev), 3, 0, 16, 0, 0)
            a, g = torch.empty(8, 6, device=dev), torch.empty(8, 5, device=dev)
            lt, rt = torch.empty(5, 4, device=dev), torch.empty(6, 4, device=dev)
            TP.factored_project(a, g, lt, rt, None, None, 2)
            TP.factored_project(a, g, lt, rt, None, None, 8)
            TO.obs_select(torch.empty(3, 8, device=dev), torch.empty(3, 8, device=dev), 4, 1, 2, 1e-8)
            TO.obs_shared_prune(torch.empty(3, 8, device=dev), torch.empty(8, 8, device=dev),
                                torch.empty(2, 2, 2, 2, device=dev), torch.zeros(2, 2, dtype=torch.int64, device=dev),
                                4, True)
            TO.obs_schur_extend_(torch.empty(2, 9, 7, device=dev, dtype=torch.bfloat16), torch.empty(2, 3, 5, device=dev),
                                 torch.empty(2, 3, 4, device=dev), torch.empty(2, 3, 3, device=dev), 4)
            TS.score_topk(torch.empty(5, 8, device=dev), torch.empty(40, 8, device=dev), 3, True, None, None, None, 0)
    assert len(launched) == 8 and all(d == 1 for d in launched), launched


@pytest.mark.parametrize("n,m,triton", [(2, 256, True), (2, 257, False), (3, 300, False), (65536, 4, False)])
def test_half_schur_routing_leaves_triton_past_its_fused_range(monkeypatch, n, m, triton):
    """A bf16 factor on CUDA (fake tensors): the Triton tensor-core kernel within its range; past it (m > 256,
    or more rows than grid axis y takes) the op's CUDA C++ path, whose composite products ignore TF32, not the
    Triton launcher's torch fallback (TF32 under the caller's setting)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gradkit import ops
    from gradkit.ops import obs as OBS

    calls = []
    monkeypatch.setattr(OBS, "_tensor_core_schur", lambda: (lambda *a: calls.append("triton")))
    monkeypatch.delenv("GRADKIT_SCHUR_CUDA_CPP", raising=False)
    monkeypatch.setenv("GRADKIT_BACKEND", "auto")
    with FakeTensorMode():
        dev = torch.device("cuda", 0)
        cnt, F = 3, 5
        ut = torch.empty(n, cnt + m, F, device=dev, dtype=torch.bfloat16)
        ops.obs_schur_extend_(ut, torch.empty(n, m, F, device=dev), torch.empty(n, m, cnt, device=dev),
                              torch.empty(n, m, m, device=dev), cnt)
    assert calls == (["triton"] if triton else [])


def test_every_triton_launcher_handed_out_runs_on_its_tensors_device(monkeypatch):
    """The launchers of every family, as the triton backend (ops._impl) and register_triton_for_cuda hand them
    out, make their first tensor's GPU current, also when that tensor is inside a list argument (the segment
    ops take lists); the parammap / scope / golden / adamw launchers were not wrapped at all."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gradkit import _ext, ops
    from gradkit.kernels.triton import on_tensor_device

    seen = []

    def fake_launcher(*args, **kwargs):
        seen.append(cur[-1])

    cur = [0]

    class Device:
        def __init__(self, d):
            self.index = torch.device(d).index

        def __enter__(self):
            cur.append(self.index)

        def __exit__(self, *exc):
            cur.pop()

    monkeypatch.setattr(torch.cuda, "device", Device)
    wrapped = on_tensor_device(fake_launcher)
    assert on_tensor_device(wrapped) is wrapped  # idempotent
    with FakeTensorMode():
        dev = torch.device("cuda", 1)
        wrapped([torch.empty(3, device=dev)], [None], torch.empty(3, device=dev), False)
        wrapped(3, x=torch.empty(2, device=dev))
    wrapped(torch.empty(2))  # a CPU tensor: no device change
    assert seen == [1, 1, 0]
    for family, name in (("parammap", "gather_segments"), ("scope", "block_norms"),
                         ("golden", "bitmask_count"), ("adamw", "masked_adamw_")):
        monkeypatch.setattr(ops, "backend", lambda: "triton")
        fn = ops._impl(name, family)
        assert getattr(fn, "_gk_on_tensor_device", False), (family, name)
    # register_triton_for_cuda wraps what it registers (a CUDA device and a CUDA-less extension faked)
    registered = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "has_op", lambda n: True)
    monkeypatch.setattr(_ext, "has_kernel", lambda n, k: False)
    monkeypatch.setattr(torch.library, "impl", lambda qual, key: lambda f: registered.setdefault(qual, f))
    _ext.register_triton_for_cuda("scope", ["block_norms", "block_apply_mask_"])
    assert sorted(registered) == ["gradkit::block_apply_mask_", "gradkit::block_norms"]
    assert all(getattr(f, "_gk_on_tensor_device", False) for f in registered.values())
