"""Audit regressions: non-finite inputs (NaN, +-Inf, finite values that overflow an intermediate) through the
public API and the ops, on every CPU-testable backend (reference, native C++, Triton under the interpreter).
Each case either raises naming the argument or follows the documented rule, the same on every backend:

* golden_masks(scope="global"): a +inf |g| ranks above the dtype's largest finite value (it was mapped onto
  it by nan_to_num and lost the tie by position);
* kl_divergence: a NaN anywhere in a position's logprobs, or a +inf log-prob where P_ref > 0, makes it NaN
  (it was dropped, or clamped to 0);
* scope_kth(mid=True) / mid_kth_largest never give NaN (k_weight = 0 with an infinite neighbour, +inf next to
  -inf, k_weight or sums past float32's range);
* block_soft_threshold_ / BlockCoupling.soft_threshold: a +inf threshold zeroes a block holding Inf (it gave NaN,
  and the C++ kernel disagreed with the reference and Triton), 0 / 0 scales count as 0;
* prune_model: an error in a layer's report (a NaN Hessian under method="magnitude") names the layer;
* Adafactor / Adam normalisers refuse NaN / Inf / negative second moments (one entry turned every output NaN);
* GradientIndex.search: a finite query near float32's limit ranks the same on every backend.
"""
import json
import math
import warnings

import pytest
import torch

import gradkit.golden as G
import gradkit.projection as P
from gradkit import ops
from gradkit.index import GradientIndex
from gradkit.obs import prune_model
from gradkit.scope import BlockCoupling, BlockSpec, ScopeSpec

from conftest import use_backend

NAN, INF = float("nan"), float("inf")
BACKENDS = ("reference", "native", "triton")

# The Triton interpreter evaluates with numpy, which warns on the NaN / inf these tests feed on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")


def _same(a, b):
    """Equal values (NaN equal to NaN) and equal signs of zeros."""
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
        torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)) and torch.equal(
        torch.signbit(a) | torch.isnan(a), torch.signbit(b) | torch.isnan(b))


# --------------------------------------------------------------------------- golden


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float16), (torch.float32, torch.float32),
                                    (torch.float16, torch.float32)])
def test_golden_global_inf_beats_largest_finite(backend, dtypes):
    big = torch.finfo(dtypes[0]).max
    grads = {"a": torch.tensor([big, 1.0, NAN], dtype=dtypes[0]), "b": torch.tensor([-INF, 2.0, 0.0], dtype=dtypes[1])}
    with use_backend(backend):
        res = G.golden_masks([grads], 100 / 6, scope="global")  # k = 1 of 6
    assert res.masks["a"].to_bool().tolist() == [False, False, False]
    assert res.masks["b"].to_bool().tolist() == [True, False, False]


def test_kl_divergence_nan_and_posinf_are_nan():
    ref = torch.log_softmax(torch.tensor([[1.0, 2.0, -INF, 0.5]]), -1)
    ok = torch.tensor([[-1.0, -1.0, -INF, -2.0]])
    base = G.kl_divergence(ref, ok, reduction="none")
    assert torch.isfinite(base).all()  # -inf where P_ref = 0 contributes 0, as documented
    for bad in (torch.tensor([[-1.0, -1.0, NAN, -2.0]]),  # NaN where P_ref = 0
                torch.tensor([[INF, -1.0, -1.0, -2.0]])):  # +inf log-prob where P_ref > 0
        assert torch.isnan(G.kl_divergence(ref, bad, reduction="none")).all()
        assert math.isnan(float(G.kl_divergence(ref, bad)))


# --------------------------------------------------------------------------- scope: mid k-th value


_XK = torch.tensor([[3e38, 3e38, 1.0, 0.0, INF, -INF, NAN, NAN, 5.0, 4.0, 3.0, 2.0, 1e10, 3.0, NAN, NAN]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scope_kth_mid_never_nan_and_backends_agree(dtype):
    x = _XK.to(dtype)
    for w in (0.0, 1.0, 1e30, 1e39):
        for k in (1, 2, 3):
            for raw in (True, False):
                outs = {}
                for b in BACKENDS:
                    with use_backend(b):
                        outs[b] = ops.scope_kth(x, [1, 1], [1, 4], k, raw=raw, mid=True, k_weight=w)
                r = outs["reference"]
                assert not torch.isnan(r).any(), (w, k, raw, r)
                for b in BACKENDS[1:]:
                    assert _same(outs[b], r), (b, w, k, raw, outs[b], r)
                if w == 0.0:
                    with use_backend("reference"):
                        assert _same(r, ops.scope_kth(x, [1, 1], [1, 4], k, raw=raw))
    with use_backend("native"):
        m = ops.scope_kth(x, [1, 1], [1, 4], 1, raw=True, mid=True, k_weight=1.0).float()[0]
    assert m[0] == float(x[0, 0]) and m[1] == INF  # no overflow of 3e38 + 3e38; inf next to -inf stays inf


@pytest.mark.parametrize("backend", BACKENDS)
def test_mid_kth_largest_fewer_valid_with_zero_weight(backend):
    w = torch.tensor([[1.0, NAN, NAN, NAN, 2.0, INF, 1.0, 0.5]])
    s = ScopeSpec(BlockSpec(w, (1, 1)), (1, 4))
    with use_backend(backend):
        t = s.mid_kth_largest(nnz=1, k_weight=0.0)
        assert torch.equal(t, s.kth_largest(nnz=1))  # [1, inf]: no 0 * -inf, 0 * inf
        keep = s.hard_threshold(thresholds=t)  # a NaN threshold would be refused here
    assert keep.tolist() == [[True, False, False, False, False, True, False, False]]


# --------------------------------------------------------------------------- scope: soft threshold


_XS = torch.tensor([[1.0, INF, 2.0, 3.0], [NAN, 1.0, 3.0, 4.0], [1e20, 1e20, 1.0, 1.0], [-INF, -2.0, 0.0, -0.0],
                    [0.0, -0.0, -3.0, 4.0]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("block", [[1, 2], [1, 1], [1, 4]])
@pytest.mark.parametrize("cond", [False, True])
def test_soft_threshold_inf_threshold_zeroes_and_backends_agree(dtype, block, cond):
    grid = [5, 4 // block[1]]
    h = torch.full((5, 4), 2.0) if cond else None
    for thr, eps in ((INF, 1e-7), (0.0, 0.0), (1.0, 1e-7)):
        outs = {}
        for b in BACKENDS:
            y = _XS.to(dtype, copy=True)
            with use_backend(b):
                ops.block_soft_threshold_(y, block, torch.full(grid, thr), conditioner=h, eps=eps)
            outs[b] = y
        r = outs["reference"]
        for b in BACKENDS[1:]:
            assert _same(outs[b], r), (b, thr, eps, outs[b], r)
        if thr == INF:  # zeroes every block, whatever it holds (signs of x, +0 for a NaN block)
            assert not r.any() and not torch.isnan(r).any()
            if not cond or block == [1, 1]:  # the Euclidean form: x * 0
                assert torch.equal(torch.signbit(r[3]), torch.tensor([True, True, False, True]))
        elif thr == 0.0:
            assert not torch.isnan(r[4]).any()  # 0 / 0 scale (zero block, t = eps = 0): counts as 0
        else:
            assert r[0, 1] == INF  # a finite threshold keeps an infinite element


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_coupling_soft_threshold_inf(backend):
    x1 = torch.tensor([[1.0, 2.0], [3.0, 1.0], [1e20, 1.0]])
    x2 = torch.tensor([[-INF, 1.0], [2.0, 2.0], [1.0, -1.0]])
    c = BlockCoupling([BlockSpec(x1, (1, -1)), BlockSpec(x2, (1, -1))], [(0, 1), (0, 1)])
    with use_backend(backend):
        c.soft_threshold(torch.full((3, 1), INF))
    assert not x1.any() and not x2.any() and not torch.isnan(x2).any()
    assert torch.signbit(x2[0, 0]) and torch.signbit(x2[2, 1])  # x * 0 keeps x's sign, -inf included


# --------------------------------------------------------------------------- obs / projection / index


def test_prune_model_nan_activation_names_the_layer(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    before = [p.detach().clone() for p in model.parameters()]
    batches = [torch.randn(4, 8) for _ in range(2)]
    batches[1][0, 0] = NAN
    with pytest.raises(ValueError, match="^H: contains NaN") as info:
        prune_model(model, batches, pattern="2:4", method="magnitude", progress=False, checkpoint_dir=str(tmp_path))
    notes = getattr(info.value, "__notes__", None)
    if notes is not None or hasattr(info.value, "add_note"):  # Python >= 3.11
        assert any("layer '0'" in n and "no layer of the model was modified" in n for n in notes or [])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("bad", [NAN, INF, -1.0])
def test_normalizers_refuse_nonfinite_moments(bad):
    row = torch.rand(4) + 0.1
    row[1] = bad
    with pytest.raises(ValueError, match="^row:"):
        P.AdafactorNormalizer(row, torch.rand(5) + 0.1)
    with pytest.raises(ValueError, match="^bias_avg_sq:"):
        P.AdafactorNormalizer(torch.rand(4) + 0.1, torch.rand(5) + 0.1, bias_avg_sq=row)
    v = torch.rand(4, 5) + 0.1
    v[2, 3] = bad
    with pytest.raises(ValueError, match="^v:"):
        P.AdamNormalizer(v)
    with pytest.raises(ValueError, match="^bias_avg_sq:"):
        P.AdamNormalizer(torch.rand(4, 5) + 0.1, bias_avg_sq=row)
    with pytest.raises(ValueError, match="^eps:"):
        P.AdamNormalizer(torch.rand(4, 5) + 0.1, eps=bad if bad != INF else 0.0)


def test_normalizers_accept_zero_moments():
    a = torch.randn(2, 3, 5)
    g = torch.randn(2, 3, 4)
    for nz in (P.AdafactorNormalizer(torch.zeros(4), torch.zeros(5)), P.AdamNormalizer(torch.zeros(4, 5))):
        assert torch.isfinite(P.factored_project(a, g, 4, normalizer=nz)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_huge_query_ranks_by_true_score(tmp_path, backend):
    # scores against q = 3e38 * [1, 1, 1, 0, ...]: row 0 = 3e38 * 0.1 (its partial sums pass float32's range
    # in index order), row 1 = 3e38 * 0.2, row 2 = 3e38 * 0.3, row 3 = 0
    rows = torch.zeros(4, 8)
    rows[0, :3] = torch.tensor([1.0, 0.5, -1.4])
    rows[1, 0] = 0.2
    rows[2, 0] = 0.3
    with GradientIndex.create(tmp_path / "ix", {"m": 8}, dtype=torch.float32) as ix:
        ix.append(rows)
    q = torch.zeros(1, 8)
    q[0, :3] = 3e38
    want = (q.double() @ rows.double().T)[0]
    ix = GradientIndex.open(tmp_path / "ix")
    with use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s, i = ix.search(q, 4)
        sr, ir = ix.search(q, 4, reverse=True)
    assert i[0].tolist() == [2, 1, 0, 3] and ir[0].tolist() == [3, 0, 1, 2]
    torch.testing.assert_close(s[0].double(), want[i[0]], rtol=1e-6, atol=0)
    torch.testing.assert_close(sr[0].double(), want[ir[0]], rtol=1e-6, atol=0)


def test_search_nan_rows_of_a_bergson_index_rank_last(tmp_path):
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    x[2, 1] = NAN
    root = tmp_path / "b"
    root.mkdir()
    spec = {"names": ["m1", "m2"], "formats": ["(5,)<f4", "(3,)<f4"], "offsets": [0, 20], "itemsize": 32}
    x.numpy().astype("<f4").tofile(root / "gradients.bin")
    (root / "info.json").write_text(json.dumps({"num_grads": 6, "grad_sizes": {"m1": 5, "m2": 3}, "dtype": spec}))
    ix = GradientIndex.open(root)
    q = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    for b in BACKENDS:
        for kw in ({}, {"reverse": True}, {"unit_norm": True}):
            with use_backend(b):
                s, i = ix.search(q, 6, **kw)
            assert (i[:, -1] == 2).all() and (s[:, -1] == (INF if kw.get("reverse") else -INF)).all(), (b, kw)
