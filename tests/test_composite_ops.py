"""The cuBLAS-composite GPU paths (gradkit.kernels.composite) and the default backend's routing of CUDA
tensors to them (``auto``). The composites are plain torch, so their semantics are checked here on CPU
tensors against the references (exact for score_topk on integer data, ties and NaN included); the
routing is checked by standing in for the CUDA test, and on a GPU by the CUDA cases at the end."""
import math

import pytest
import torch
from hypothesis import given

from conftest import env_set
from gradkit import _ext, ops
from gradkit.kernels import composite
from gradkit.kernels.reference import projection as pref
from gradkit.kernels.reference import search as sref
from test_factored_ops import CASES, DTYPES as F_DTYPES, close, make
from test_search_ops import problems

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")


@pytest.mark.parametrize("block,slack,margin", [(1, 0, 0), (7, 0, 0), (50, 0, 1), (50, 0, 8), (50, 256, 8),
                                                 (100_000, 256, 8)])
@given(p=problems())
def test_score_topk_composite_equals_reference(block, slack, margin, p):
    """Integer data (exact products): every block size, tie slack and topk margin gives the reference's
    bits. Slack 0 sends blocks to the one-topk path (kept only when the ties at the k-th best fit in the
    margin), then to the tie-gathering path, then whole."""
    q, keys, k, largest, scale, s_in, i_in, base = p
    saved = composite._TIE_SLACK, composite._MARGIN
    composite._TIE_SLACK, composite._MARGIN = slack, margin
    try:
        got = composite.score_topk(q, keys, k, largest, scale, s_in, i_in, base, block=block)
    finally:
        composite._TIE_SLACK, composite._MARGIN = saved
    want = sref.score_topk(q, keys, k, largest, scale, s_in, i_in, base)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("largest", [True, False])
def test_score_topk_composite_nan_inf_and_ties_across_blocks(largest):
    """NaN scores rank worst, +-inf keep their order, and a tie at the k-th best that spans two blocks is
    broken by the lower index, as in the reference."""
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-3, 4, (6, 5), generator=g).float()
    keys = torch.randint(-3, 4, (900, 5), generator=g).float()
    keys[10, 0] = float("nan")
    keys[20, 1] = float("inf")
    keys[400, 2] = float("-inf")
    keys[777] = keys[3]  # the same scores in another block
    for block in (64, 300, 4096):
        got = composite.score_topk(q, keys, 7, largest, None, None, None, 5, block=block)
        want = sref.score_topk(q, keys, 7, largest, None, None, None, 5)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), block


def test_score_topk_composite_candidate_path_on_distinct_scores():
    """Wide integer range (few ties): the top-k candidate path, not the whole-block fallback, decides."""
    g = torch.Generator().manual_seed(8)
    q = torch.randint(-1000, 1001, (20, 16), generator=g).float()
    keys = torch.randint(-1000, 1001, (5000, 16), generator=g).float()
    calls = []
    real = composite.select_topk

    def spy(s, i, k, largest):
        calls.append(s.shape[1])
        return real(s, i, k, largest)

    composite.select_topk = spy
    try:
        got = composite.score_topk(q, keys, 10, True, None, None, None, 0, block=1000)
    finally:
        composite.select_topk = real
    want = sref.score_topk(q, keys, 10, True, None, None, None, 0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert max(calls) < 1000  # each merge saw candidates, never a whole block


@given(**CASES)
def test_factored_composite_matches_reference(B, T, I, O, p, seed, rb, mask, strided, dtype):
    args = make(B, T, I, O, p, seed, rb, mask, strided, dtype)
    got = composite.factored_project(*args, T)
    assert got.dtype == torch.float32 and got.shape == (B, p, p)
    assert not bool(torch.isnan(got).any())  # masked NaN tokens never reach the sums
    close(got, pref.factored_project(*args, T))


class _Cuda:
    is_cuda = True


def test_gpu_auto_only_for_cuda_tensors_under_auto():
    assert not ops.gpu_auto(torch.zeros(2))
    with env_set("GRADKIT_BACKEND", "auto"):
        assert ops.gpu_auto(_Cuda())
    for b in ("native", "triton", "reference"):
        with env_set("GRADKIT_BACKEND", b):
            assert not ops.gpu_auto(_Cuda())
    with env_set("GRADKIT_BACKEND", "auto"):
        assert ops.backend() == "native"


def test_auto_routes_cuda_work_to_the_measured_paths(monkeypatch):
    """With gpu_auto standing in for a CUDA tensor: score_topk and factored_project reach the composites,
    Rademacher project_flat the Triton launcher; Gaussian and float64 x stay on the dispatcher."""
    import gradkit.ops.projection as P

    seen = []
    monkeypatch.setattr(ops, "gpu_auto", lambda t: True)
    monkeypatch.setattr(P, "gpu_auto", lambda t: True)
    real_s, real_f = composite.score_topk, composite.factored_project
    monkeypatch.setattr(composite, "score_topk", lambda *a, **kw: seen.append("search") or real_s(*a, **kw))
    monkeypatch.setattr(composite, "factored_project", lambda *a: seen.append("factored") or real_f(*a))

    class FakeTriton:
        @staticmethod
        def project_flat(x, k, seed, kind, col0):
            seen.append(("triton flat", x.dtype, kind))
            return pref.project_flat(x, k, seed, kind, col0)

    monkeypatch.setattr(P, "triton_family", lambda fam: FakeTriton)
    q = torch.randn(3, 8)
    keys = torch.randn(40, 8)
    s, i = ops.score_topk(q, keys, 4)
    want = sref.score_topk(q, keys, 4, True, None, None, None, 0)
    assert torch.equal(i, want[1])
    torch.testing.assert_close(s, want[0], rtol=1e-6, atol=1e-6)  # fp32 dots of 8 entries, summed in another order
    args = make(2, 3, 5, 4, 3, 1, rb=True, mask=True)
    close(ops.factored_project(*args, 3), pref.factored_project(*args, 3))
    x = torch.randn(2, 70)
    for xx, kind in ((x, 0), (x.bfloat16(), 0), (x, 1), (x.double(), 0)):  # Gaussian and float64: the dispatcher
        torch.testing.assert_close(ops.project_flat(xx, 16, 3, kind=kind), pref.project_flat(xx, 16, 3, kind, 0),
                                   rtol=1e-5, atol=1e-5)
    assert seen == ["search", "factored", ("triton flat", torch.float32, 0), ("triton flat", torch.bfloat16, 0)]


def test_tf32_keeps_search_and_factored_on_the_exact_kernels(monkeypatch):
    """While torch lets cuBLAS use TF32 for float32 products, the composites are not float32-exact: with
    gpu_auto standing in for a CUDA tensor, score_topk and factored_project then take the op's own kernel
    (the dispatcher), and reach the composites again once the setting is back."""
    import gradkit.ops.projection as P

    seen = []
    monkeypatch.setattr(ops, "gpu_auto", lambda t: True)
    monkeypatch.setattr(composite, "score_topk", lambda *a, **kw: seen.append("search"))
    monkeypatch.setattr(composite, "factored_project", lambda *a: seen.append("factored"))
    q, keys = torch.randn(3, 8), torch.randn(40, 8)
    args = make(2, 3, 5, 4, 3, 1, rb=True, mask=True)
    monkeypatch.setattr(ops, "cublas_fp32_reduced", lambda: True)
    s, i = ops.score_topk(q, keys, 4)
    want = sref.score_topk(q, keys, 4, True, None, None, None, 0)
    assert torch.equal(i, want[1])
    torch.testing.assert_close(s, want[0], rtol=1e-6, atol=1e-6)
    close(ops.factored_project(*args, 3), pref.factored_project(*args, 3))
    assert seen == []
    monkeypatch.setattr(ops, "cublas_fp32_reduced", lambda: False)
    ops.score_topk(q, keys, 4)
    P.factored_project(*args, 3)
    assert seen == ["search", "factored"]


def test_cublas_fp32_reduced_reads_every_way_to_enable_tf32():
    """Each way torch offers to enable TF32 for CUDA matmuls, and back (a fresh process per case: the
    settings are global, and torch refuses some reads once the legacy and new APIs are mixed)."""
    import subprocess
    import sys

    cases = {"pass": False, "torch.backends.cuda.matmul.allow_tf32 = True": True,
             "torch.set_float32_matmul_precision('medium')": True,
             "torch.set_float32_matmul_precision('high'); torch.set_float32_matmul_precision('highest')": False,
             "torch.backends.cuda.matmul.fp32_precision = 'tf32'": True,
             "torch.backends.fp32_precision = 'tf32'": True,
             "torch.backends.fp32_precision = 'tf32'; torch.backends.cuda.matmul.fp32_precision = 'ieee'": False,
             # mixed legacy and new API: torch's own getters raise here; still read
             "torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cuda.matmul.fp32_precision = 'ieee'": False}
    code = "import torch, sys\nfrom gradkit import ops\n{}\nsys.stdout.write(repr(ops.cublas_fp32_reduced()))"
    procs = {setup: subprocess.Popen([sys.executable, "-c", code.format(setup)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for setup in cases}  # all at once
    for setup, want in cases.items():
        out, err = procs[setup].communicate(timeout=300)
        assert procs[setup].returncode == 0, (setup, err[-2000:])
        assert out.strip().splitlines()[-1] == repr(want), (setup, out)


def test_auto_validates_before_routing(monkeypatch):
    """Bad input gets the op's error naming the argument on the routed path too."""
    import gradkit.ops.projection as P

    monkeypatch.setattr(ops, "gpu_auto", lambda t: True)
    monkeypatch.setattr(P, "gpu_auto", lambda t: True)
    with pytest.raises(ValueError, match="^keys: "):
        ops.score_topk(torch.randn(3, 8), torch.randn(5, 7), 2)
    with pytest.raises(ValueError, match="^T: "):
        ops.factored_project(*make(2, 3, 5, 4, 3, 1)[:4], T=4)
    with pytest.raises(TypeError, match="^x: "):
        ops.project_flat(torch.zeros(2, 3, dtype=torch.int32), 4, 0)


# ---- On a GPU: the default backend's results on CUDA tensors against the references.
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_auto_project_flat_matches_reference(dtype):
    x = torch.randn(70, 5000, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = ops.project_flat(x.cuda(), 300, 9, 0, 64).cpu()
    want = pref.project_flat(x, 300, 9, 0, 64)
    tol = (2e-6 * math.sqrt(5000) * 4 / math.sqrt(300) + 1e-6) * 8
    torch.testing.assert_close(got, want, rtol=1e-5, atol=tol)


@GPU
@given(p=problems(max_n=700))
def test_gpu_auto_score_topk_equals_reference(p):
    q, keys, k, largest, scale, s_in, i_in, base = p
    mv = lambda t: None if t is None else t.cuda()  # noqa: E731
    got = ops.score_topk(q.cuda(), keys.cuda(), k, largest=largest, key_scale=mv(scale), scores_in=mv(s_in),
                         idx_in=mv(i_in), base=base)
    want = sref.score_topk(q, keys, k, largest, scale, s_in, i_in, base)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@GPU
@pytest.mark.parametrize("dtype", F_DTYPES)
def test_gpu_auto_factored_matches_reference(dtype):
    for B, T, I, O, p in ((3, 37, 1003, 517, 16), (40, 3, 90, 70, 17), (0, 5, 8, 8, 4)):
        args = make(B, T, I, O, p, 5, rb=True, mask=True, dtype=dtype)
        got = ops.factored_project(*[None if t is None else t.cuda() for t in args], T).cpu()
        assert not bool(torch.isnan(got).any())
        close(got, pref.factored_project(*args, T))


@GPU
def test_gpu_tf32_on_auto_stays_float32_exact():
    """TF32 on: auto leaves the cuBLAS composites for the CUDA C++ kernels, whose own cuBLAS fallbacks (p > 64,
    k > 64) run under at::NoTF32Guard: results within float32 rounding of float64 (TF32 gives ~1e-3)."""
    was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for p in (16, 128):  # the kernel, then its cuBLAS fallback
            a, g, lt, rt, _, _ = make(4, 33, 700, 300, p, 11, dtype=torch.float32)
            got = ops.factored_project(a.cuda(), g.cuda(), lt.cuda(), rt.cuda(), None, None, 33).cpu().double()
            u, v = g.double() @ lt.double(), a.double() @ rt.double()  # L G R^T per example, in float64
            want = torch.bmm(u.view(4, 33, p).transpose(1, 2), v.view(4, 33, p))
            assert float((got - want).norm() / want.norm()) < 1e-5, p  # TF32: ~1e-3
        g = torch.Generator().manual_seed(3)
        q, keys = torch.randn(20, 256, generator=g), torch.randn(5000, 256, generator=g)
        for k in (10, 100):
            s, i = ops.score_topk(q.cuda(), keys.cuda(), k)
            want = (q.double() @ keys.double().T).topk(k)
            assert float((s.cpu().double() - want.values).norm() / want.values.norm()) < 1e-5, k  # TF32: ~5e-4
            assert float((i.cpu() == want.indices).float().mean()) > 0.99, k
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was


def test_cli_info_names_the_backend(capsys):
    from gradkit import cli

    with env_set("GRADKIT_BACKEND", "auto"):
        assert cli.main(["info"]) == 0
    assert "active backend: auto (native; on CUDA tensors Triton project_flat, cuBLAS factored_project" \
        in capsys.readouterr().out
    was = torch.backends.cuda.matmul.allow_tf32
    try:  # with TF32 allowed, auto routes CUDA tensors to gradkit's own kernels: info says so
        torch.backends.cuda.matmul.allow_tf32 = True
        with env_set("GRADKIT_BACKEND", "auto"):
            assert cli.main(["info"]) == 0
        assert "gradkit's own factored_project / score_topk kernels" in capsys.readouterr().out
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was
    with env_set("GRADKIT_BACKEND", "native"):
        assert cli.main(["info"]) == 0
    assert "active backend: native;" in capsys.readouterr().out
