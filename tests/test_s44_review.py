"""Review of session 44's changes (96b55f9..bce7e03): score_topk's chunked summation order (CPU paths and the CUDA C++
kernel), the torch.func support of the ops' wrappers, StructuredOBS's iterative refinement with half-precision
factors, and the normalisers' range checks.

Defects found, both fixed after the review (each test below failed before its fix):

* ops/__init__.py ``transforms_active`` counted a ``torch.func.functionalize`` level as a transform, so inside
  ``functionalize`` (alone, or with vmap) every differentiable wrapper (gather_segments, scatter_segments,
  project_flat / projection.project, factored_project, score_topk) applied its autograd.Function, and torch raised
  "NYI: Functionalize rule for custom_function_call". Before the session they called the op, which functionalize
  takes; they do again wherever a functionalize level is on the stack. ``make_fx(functionalize(f))`` the same.
* ops/search.py ``_score_topk_backward``: the key gradient was ``torch.zeros(keys.shape).index_add(...)`` (out of
  place, for vmap), which held the zeros and their copy at once: the backward's peak memory was 2x the float32 key
  block (133 MiB for 64 MiB of keys, 69 MiB with the in-place form) on the ordinary path. Now
  ``torch.zeros(()).expand(keys.shape).index_add(...)``: one allocation, and it vmaps.

Checked and found right (tests below where the session's tests could not fail on a mistake):

* every CPU scoring level (AVX-512 micro-kernel with and without the bf16 screen, AVX2, BLAS blocks with exact
  rescoring, the unpacked path of 1-5 queries) gives the chunked chains' bits at D = 0, below, at and just past a
  chain of 128, not a multiple of 8, with row-strided fp32 / fp16 / bf16 keys and key_scale (the session's test
  covers D = 300 and only bounds the BLAS level to 2e-4);
* the CUDA C++ kernel (emulated) gives the CPU kernel's bits on float data (the emulator's search test uses integer
  data, whose sums are exact in any order, so it could not see a different summation order);
* the refinement keeps each row's loss at most its unrefined loss (per-row acceptance), with the same mask.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.func import functionalize, vmap

import gradkit.projection as gp
from gradkit import _ext, ops

from _bits import same
from conftest import env_set
from test_search_ops import PACKED_ISAS, SEARCH_ISAS, _dense, fma_chain, search_isa

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")

IX = torch.tensor([7, 0, 19, 3, 11])


def _g(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- 1. the chunked summation order (CPU)


def _levels():
    """(GRADKIT_SEARCH_ISA, GRADKIT_SEARCH_EXACT) pairs: the bf16 screen exists at the AVX-512 level only."""
    out = []
    for isa in SEARCH_ISAS:
        out.append((isa, "0"))
        if isa == "avx512":
            out.append((isa, "1"))
    return out


@pytest.mark.parametrize("D", [0, 9, 127, 128, 129, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_cpu_level_gives_the_chunked_chain_bits_at_chain_boundaries(D, dtype):
    """Every CPU level, every query count (1 and 5: the unpacked path; 6, 15: micro-tiles with a partial one), at D
    around the 128-feature chain (one chain, exactly one, one plus one feature, two plus one) and not a multiple of 8:
    all N scores are the oracle's chunked chains bit for bit (the BLAS level's rescoring included: the session's
    test only bounds it), and the smallest top-k with key_scale is the oracle's, order and ties included."""
    N = 45
    q = torch.randn(15, D, generator=_g(D))
    keys = torch.randn(N, 2 * D + 3, generator=_g(D + 1)).to(dtype)[:, 1:D + 1]  # row stride 2D + 3, unit column
    scale = torch.rand(N, generator=_g(D + 2)) + 0.5
    want = fma_chain(q, keys.float())
    low = torch.sort(want * scale, dim=1, stable=True)
    for isa, exact in _levels():
        with search_isa(isa), env_set("GRADKIT_SEARCH_EXACT", exact):
            for nq in (1, 5, 6, 15):
                s, i = ops.score_topk(q[:nq], keys, N)
                assert same(_dense(s, i, N), want[:nq]), (isa, exact, nq)
                s, i = ops.score_topk(q[:nq], keys, 5, largest=False, key_scale=scale)
                assert same(s, low.values[:nq, :5]) and torch.equal(i, low.indices[:nq, :5]), (isa, exact, nq)


@pytest.mark.skipif(not PACKED_ISAS, reason="no register-blocked kernel on this CPU")
def test_cpu_levels_agree_on_overflowing_chunks_and_non_finite_keys():
    """Chunk sums that overflow to +-inf and add to NaN, inf / NaN keys, float32-max products, subnormal scores: every
    level (BLAS bounds turn NaN / inf; the bf16 screen falls back to fp32 on such blocks) returns the same top-k."""
    D, N = 300, 1100
    q = torch.randn(9, D, generator=_g(5))
    keys = torch.randn(N, D, generator=_g(6))
    keys[5, 10], keys[5, 200] = 3e38, -3e38  # chunk 0 -> +inf-ish, chunk 1 -> -inf-ish: NaN or inf by order
    keys[6, :] = 1e19
    q[2, :] = 1e19
    keys[7, D - 1] = float("inf")
    keys[8, 0] = float("nan")
    keys[9] = 1e-30
    q[3, :64] = 1e-20
    for k, largest in ((N, True), (7, False)):
        res = []
        for isa, exact in _levels():
            with search_isa(isa), env_set("GRADKIT_SEARCH_EXACT", exact):
                res.append((isa, exact, *ops.score_topk(q, keys, k, largest=largest)))
        for isa, exact, s, i in res[1:]:
            assert same(s, res[0][2]) and torch.equal(i, res[0][3]), (isa, exact, k)


# --------------------------------------------------------------------------- 1b. the CUDA C++ kernel, emulated


@pytest.mark.cuda_emu
@pytest.mark.parametrize("D", [0, 5, 128, 129, 300])
def test_cuda_kernel_gives_the_cpu_kernels_bits_on_float_data(D):
    """csrc/cuda/search.cu under tests/cuda_emu: a chain per 128 features walked in 32-feature slices (zero-padded
    past D), the chain sums added in order: the CPU kernel's bits on random float data (several 128-key tiles, two
    32-query slices of the emulator's grid limit, three key dtypes, both senses, key_scale)."""
    from test_cuda_emulated import emu

    E = emu("search")
    q = torch.randn(40, D, generator=_g(20 + D))
    scale = torch.rand(300, generator=_g(21)) + 0.5
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        keys = torch.randn(300, D, generator=_g(22 + D)).to(dtype)
        for largest in (True, False):
            for sc in (None, scale):
                got = E.score_topk(q, keys, 10, largest, sc, None, None, 3)
                want = ops.score_topk(q, keys, 10, largest=largest, key_scale=sc, base=3)
                assert same(got[0], want[0]) and torch.equal(got[1], want[1]), (dtype, largest, sc is None)


# --------------------------------------------------------------------------- 2. torch.func.functionalize


def _functional_cases():
    x = torch.randn(4, 5, generator=_g(30))
    a, g = torch.randn(3, 4, generator=_g(31)), torch.randn(3, 5, generator=_g(32))
    lt, rt = torch.randn(5, 2, generator=_g(33)), torch.randn(4, 2, generator=_g(34))
    keys = torch.randn(9, 5, generator=_g(35))
    return [
        ("gather_segments", lambda t: ops.gather_segments([t], [IX]), x),
        ("scatter_segments", lambda t: ops.scatter_segments(t.flatten()[:5], [IX], [20], scale=2.0)[0], x),
        ("project_flat", lambda t: ops.project_flat(t, 4, 1, 0, 0), x),
        ("projection.project", lambda t: gp.project(t, 4, seed=1), x),
        ("factored_project", lambda u: ops.factored_project(u, g, lt, rt), a),
        ("score_topk", lambda t: ops.score_topk(t, keys, 2)[0], x),
    ]


@pytest.mark.parametrize("name, f, x", _functional_cases(), ids=[c[0] for c in _functional_cases()])
def test_functionalize_through_the_differentiable_wrappers(name, f, x):
    assert same(functionalize(f)(x), f(x))


def test_vmap_of_functionalize_through_gather():
    X = torch.randn(3, 4, 5, generator=_g(36))
    f = lambda t: ops.gather_segments([t], [IX])  # noqa: E731
    assert same(vmap(functionalize(f))(X), X.reshape(3, -1)[:, IX])


def test_functionalize_takes_the_direct_op_calls():
    """What the wrappers called before the session (and what the fix can route to): the ops themselves run under
    functionalize, alone and under vmap, with the eager bits."""
    x = torch.randn(4, 5, generator=_g(37))
    X = torch.randn(3, 4, 5, generator=_g(38))
    keys = torch.randn(9, 5, generator=_g(39))
    G = torch.ops.gradkit
    assert same(functionalize(lambda t: G.gather_segments([t], [IX], None))(x), x.flatten()[IX])
    assert same(functionalize(lambda t: G.project_flat(t, 4, 1, 0, 0))(x), ops.project_flat(x, 4, 1, 0, 0))
    got = functionalize(lambda t: G.score_topk(t, keys, 2, True, None, None, None, 0))(x)
    want = ops.score_topk(x, keys, 2)
    assert same(got[0], want[0]) and torch.equal(got[1], want[1])
    assert same(vmap(functionalize(lambda t: G.gather_segments([t], [IX], None)))(X), X.reshape(3, -1)[:, IX])


# --------------------------------------------------------------------------- 2b. score_topk's key gradient: memory

_MEM_CHILD = textwrap.dedent(r'''
    import ctypes, gc, sys, warnings
    import torch
    warnings.simplefilter("ignore")
    libc = ctypes.CDLL("libc.so.6")

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0

    def grow(fn):
        gc.collect()
        libc.malloc_trim(0)
        base = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM restarts at the current resident set
        out = fn()
        return status("VmHWM") - base, out

    torch.set_num_threads(1)
    from gradkit import ops
    N, D = 1 << 18, 64  # 64 MiB of float32 keys
    keys = torch.randn(N, D, generator=torch.Generator().manual_seed(0)).requires_grad_()
    q = torch.randn(4, D, generator=torch.Generator().manual_seed(1))
    s, _ = ops.score_topk(q, keys, 8)
    loss = s.sum()
    mib, (gk,) = grow(lambda: torch.autograd.grad(loss, keys))
    assert gk.shape == keys.shape and int((gk != 0).any(1).sum()) > 0
    print(mib)
''')


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable high-water mark")
def test_score_topk_key_gradient_peaks_at_one_copy_of_the_keys():
    out = subprocess.run([sys.executable, "-c", _MEM_CHILD], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    mib = float(out.stdout.strip().splitlines()[-1])
    assert mib < 64 * 1.3, mib  # one float32 copy of the keys (64 MiB) plus the small per-slot terms


# --------------------------------------------------------------------------- 3. StructuredOBS refinement


@pytest.mark.parametrize("c_dtype", [torch.bfloat16, torch.float16])
def test_refinement_never_raises_a_rows_loss(c_dtype, monkeypatch):
    """Per-row acceptance: against the same run without refinement (_REFINE_STEPS = 0, the pre-session weights),
    every row's loss (w' - w)^T (H + damp) (w' - w) in float64 is no larger (to float32 rounding), the mask is the
    same, and on an ill-conditioned H (cond 1e7, damp 1e-5, several factor batches) the total falls."""
    import gradkit.scope as sc
    from gradkit.obs import StructuredOBS
    from gradkit.obs import structured as S

    K, M, damp = 256, 16, 1e-5
    U, _ = torch.linalg.qr(torch.randn(K, K, generator=_g(40), dtype=torch.float64))
    H = ((U * torch.logspace(0, -7, K, dtype=torch.float64)) @ U.T).float()
    W0 = torch.randn(M, K, generator=_g(41))
    Hd = H.double() + damp * float(torch.diagonal(H).double().mean()) * torch.eye(K, dtype=torch.float64)

    def run(steps):
        monkeypatch.setattr(S, "_REFINE_STEPS", steps)
        W = W0.clone()
        StructuredOBS(sc.ScopeSpec(sc.BlockSpec(W, (1, 1)), (1, 4)), H, damp=damp).prune_true_obs(
            2, ng=4, c_dtype=c_dtype)
        d = (W - W0).double()
        return W, ((d @ Hd) * d).sum(1)

    W_plain, loss_plain = run(0)
    W_ref, loss_ref = run(3)
    assert torch.equal(W_plain != 0, W_ref != 0)
    assert bool((loss_ref <= loss_plain * (1 + 1e-6)).all()), (loss_ref / loss_plain).max()
    assert float(loss_ref.sum()) < float(loss_plain.sum()) * 0.999


# --------------------------------------------------------------------------- 4. the normalisers' new checks


def test_normalisers_accept_zero_half_precision_and_inference_moments():
    """The session's range checks refuse none of: all-zero moments in every floating dtype with the default eps,
    inference tensors used outside inference mode, empty (0-row / 0-column) moments, expanded / strided moments,
    and Adam's eps at exactly 2**-126; the factors they give are finite."""
    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        n = gp.AdafactorNormalizer(torch.zeros(5, dtype=dt), torch.zeros(7, dtype=dt), torch.zeros(5, dtype=dt))
        assert all(bool(torch.isfinite(f).all()) for f in (*n.factors(), n.bias_factor()))
        a = gp.AdamNormalizer(torch.zeros(5, 7, dtype=dt), torch.zeros(5, dtype=dt))
        assert bool(torch.isfinite(a.denominator()).all()) and bool(torch.isfinite(a.bias_factor()).all())
    with torch.inference_mode():
        r, c, v = torch.rand(5), torch.rand(7), torch.rand(5, 7)
    gp.AdafactorNormalizer(r, c, r)
    gp.AdamNormalizer(v, r)
    gp.AdafactorNormalizer(torch.zeros(0), torch.zeros(3))
    gp.AdafactorNormalizer(torch.zeros(1).expand(5), torch.rand(14)[::2])
    gp.AdamNormalizer(torch.rand(5, 7), eps=2.0 ** -126)
    with pytest.raises(ValueError, match="^eps: "):
        gp.AdamNormalizer(torch.rand(5, 7), eps=2.0 ** -127)
