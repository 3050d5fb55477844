"""Session 42: bad-argument audit of the parameter-selection and pruning API (gradkit.scope, gradkit.golden,
gradkit.golden_reverse, gradkit.parammap, gradkit.optim, gradkit.obs).

What the earlier audits (test_audit_s34/s35/s40/s41_*) had not reached: meta tensors in the metrics, ParamMap,
MaskedAdamW, golden / golden_reverse and scope entry points (torch's "Cannot copy out of meta tensor" or
"Tensor.item() cannot be called on meta tensors", naming nothing, or a silent no-op); prune_model's
``method_kwargs`` checked only once the first layer was pruned (after the calibration forward and with
``progress.json`` already written, so the corrected rerun was refused); ``collect_hessians(device=...)`` unchecked;
float / complex masks read as "non-zero = set"; integer StructuredOBS weights truncated; an expanded parameter half
stepped by MaskedAdamW; unnamed TypeErrors from non-iterables and from ``atol=None``. Every refusal here must name
the argument, be a TypeError / ValueError, and leave what the caller had untouched; valid but unusual inputs
(numpy scalars, integer 0/1 masks, expanded / non-contiguous tensors) must give plain PyTorch's answer.
"""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from torch import nn

from gradkit import golden_reverse as gr
from gradkit.golden import Bitmask, golden_masks, topk_mask
from gradkit.obs import StructuredOBS, collect_hessians, output_error, prune_model, resolve
from gradkit.optim import MaskedAdamW
from gradkit.parammap import ParamMap
from gradkit.scope import BlockCoupling, BlockSpec, ScopeCoupling, ScopeSpec

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    cur = model.state_dict()
    return set(cur) == set(snap) and all(torch.equal(cur[k], snap[k]) for k in snap)


class _Net(nn.Module):
    """Three 8 -> 8 Linear layers; counts its forward calls."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.h = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        for lin in self.h:
            x = torch.tanh(lin(x))
        return x


def _data():
    return [torch.randn(16, 8, generator=torch.Generator().manual_seed(1))]


# ============================================================================ prune_model / collect_hessians


@pytest.mark.parametrize("method,kw,exc,msg", [
    ("sparsegpt", {"bogus": 1}, TypeError, r"^method_kwargs: 'bogus' is not an argument of method 'sparsegpt'"),
    ("sparsegpt", {"blocksize": 0}, ValueError, r"^blocksize: expected >= 1, got 0$"),
    ("resolve", {"blocksize": 2.5}, TypeError, r"^blocksize: expected an int, got float$"),
    ("sparsegpt", {"progress": "yes"}, TypeError, r"^progress: expected a bool"),
    ("magnitude", {"blocksize": 4}, TypeError, r"^method_kwargs: 'blocksize' is not an argument of method "
                                               r"'magnitude' \(it takes none\)$"),
    ("true_obs", {"order": "zz"}, ValueError, r"^order: expected 'left_to_right' or 'largest_first'"),
    ("true_obs", {"c_dtype": torch.int64}, TypeError, r"^c_dtype: "),
    ("obs_local", {"n_splits": 0}, ValueError, r"^n_splits: expected >= 1, got 0$"),
    ("obs_full", {"scope": None}, TypeError, r"^method_kwargs: 'scope' is not an argument"),
])
def test_bad_method_kwargs_refused_before_any_work_and_no_checkpoint_written(tmp_path, method, kw, exc, msg):
    # before: refused when the first layer was pruned, after the calibration forward, with checkpoint_dir already
    # holding a progress.json whose configuration then refused the corrected rerun (CheckpointError)
    net = _Net()
    snap = _state(net)
    ck = tmp_path / "ck"
    with pytest.raises(exc, match=msg):
        prune_model(net, _data(), "2:4", method=method, method_kwargs=kw, checkpoint_dir=str(ck), progress=False)
    assert net.calls == 0 and _same(net, snap) and not ck.exists()


def test_corrected_method_kwargs_rerun_in_the_same_checkpoint_dir_matches_a_fresh_run(tmp_path):
    ck = str(tmp_path / "ck")
    with pytest.raises(ValueError, match="^blocksize"):
        prune_model(_Net(), _data(), "2:4", method_kwargs={"blocksize": 0}, checkpoint_dir=ck, progress=False)
    net = _Net()
    rep = prune_model(net, _data(), "2:4", method_kwargs={"blocksize": 4}, checkpoint_dir=ck, progress=False)
    ref = _Net()
    prune_model(ref, _data(), "2:4", method_kwargs={"blocksize": 4}, progress=False)
    assert [r.resumed for r in rep.layers] == [False] * 3 and _same(net, _state(ref))


@pytest.mark.parametrize("device,msg", [("bogus", r"^device: expected None or a torch device, got 'bogus'"),
                                        (3, r"^device: expected None or a torch device, got 3"),
                                        ("meta", r"^device: 'meta' tensors hold no values")])
def test_bad_device_refused_before_any_forward(tmp_path, device, msg):
    # collect_hessians: before, RuntimeError from inside the first forward hook ("meta": meta Hessians returned)
    net = _Net()
    with pytest.raises(ValueError, match=msg):
        collect_hessians(net, _data(), device=device, progress=False)
    ck = tmp_path / "ck"
    with pytest.raises(ValueError, match=msg):
        prune_model(net, _data(), device=device, checkpoint_dir=str(ck), progress=False)
    assert net.calls == 0 and not ck.exists()


@pytest.mark.parametrize("d", [None, 3, [1]])
def test_layer_report_from_a_non_dict_is_a_checkpoint_error(d):
    # before: None / 3 raised "'NoneType' object is not iterable"; [1] was reported as lacking every field
    from gradkit.obs.driver import CheckpointError, LayerReport

    with pytest.raises(CheckpointError, match=r"^checkpoint: a layer report is not a dict, got "):
        LayerReport.from_dict(d)


@pytest.mark.parametrize("fn", ["collect", "prune"])
def test_non_iterable_modules_and_string_batches_are_named(fn):
    net = _Net()
    snap = _state(net)
    call = (lambda **k: collect_hessians(net, progress=False, **k)) if fn == "collect" else \
        (lambda **k: prune_model(net, progress=False, **k))
    with pytest.raises(TypeError, match=r"^modules: expected None, fnmatch pattern"):
        call(batches=_data(), modules=3)
    with pytest.raises(TypeError, match=r"^batches: expected an iterable of batches, got a str$"):
        call(batches="abc")
    assert net.calls == 0 and _same(net, snap)


def test_numpy_nnz_equals_int_nnz_and_checkpoints(tmp_path):
    # before: nnz=np.int64(2) was a TypeError (ScopeSpec and every pruner take numpy integers)
    def cols4(name, w):
        return ScopeSpec(BlockSpec(w, (1, 1)), (1, 4))

    ref = _Net()
    r_ref = prune_model(ref, _data(), cols4, nnz=2, progress=False)
    a = _Net()
    r_a = prune_model(a, _data(), cols4, nnz=np.int64(2), checkpoint_dir=str(tmp_path / "a"), progress=False)
    b = _Net()
    r_b = prune_model(b, _data(), lambda n, w: (cols4(n, w), np.int64(2)), progress=False)
    assert _same(a, _state(ref)) and _same(b, _state(ref))
    assert [r.nnz for r in r_a.layers] == [r.nnz for r in r_b.layers] == [r.nnz for r in r_ref.layers] == [2] * 3
    assert all(type(r.nnz) is int for r in r_a.layers + r_b.layers)
    with open(tmp_path / "a" / "progress.json") as f:
        assert json.load(f)["config"]["nnz"] == 2


# ============================================================================ obs.metrics / StructuredOBS


def _layer(m=4, k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, k, generator=g)
    X = torch.randn(32, k, generator=g)
    return W, X, X.T @ X


@pytest.mark.parametrize("where", ["W", "W_pruned", "H", "X"])
def test_output_error_refuses_meta_tensors_by_name(where):
    W, X, H = _layer()
    args = {"W": W, "W_pruned": W * 0.5}
    kw = {"X": X} if where == "X" else {"H": H}
    if where in args:
        args[where] = args[where].to("meta")
    else:
        kw[where] = kw[where].to("meta")
    with pytest.raises(ValueError, match=rf"^{where}: is a meta tensor"):
        output_error(args["W"], args["W_pruned"], **kw)


@pytest.mark.parametrize("where", ["W", "H", "mask"])
def test_resolve_refuses_meta_inputs_by_name(where):
    W, _, H = _layer()
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(2)) > 0.5
    args = {"W": W, "H": H, "mask": mask}
    args[where] = args[where].to("meta")
    with pytest.raises(ValueError, match=rf"^{where}: is a meta tensor"):
        resolve(args["W"], args["H"], args["mask"])


@pytest.mark.parametrize("how", ["meta", "expanded", "grad_leaf"])
def test_resolve_refuses_an_unwritable_out_before_solving(how):
    # before: meta was "written" (a silent no-op, a meta result), the others failed in copy_ after the whole solve
    W, _, H = _layer()
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(3)) > 0.5
    out = {"meta": torch.zeros(4, 8, device="meta"), "expanded": torch.zeros(1, 8).expand(4, 8),
           "grad_leaf": torch.zeros(4, 8, requires_grad=True)}[how]
    with pytest.raises(ValueError, match=r"^out: "):
        resolve(W, H, mask, out=out)
    if how != "meta":
        assert bool((out == 0).all())


def test_resolve_max_batch_bytes_and_non_contiguous_out():
    W, _, H = _layer()
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(4)) > 0.5
    for bad, exc in [(0, ValueError), (-1, ValueError), (True, TypeError), (2.0, TypeError)]:
        with pytest.raises(exc, match=r"^max_batch_bytes: expected"):
            resolve(W, H, mask, max_batch_bytes=bad)
    want = resolve(W, H, mask)
    assert torch.equal(resolve(W, H, mask, max_batch_bytes=np.int64(1 << 20)), want)
    out = torch.zeros(8, 4).T  # non-contiguous: written through copy_
    assert resolve(W, H, mask, out=out) is out and torch.equal(out, want)


def test_output_error_of_strided_views_is_the_plain_float64_formula():
    W, X, H = _layer(seed=5)
    Wt = W.T.contiguous().T  # non-contiguous
    Wp = W[:1].expand(4, 8)  # stride 0
    Xe = X[:1].expand(32, 8)  # stride 0
    D, Wd = W.double() - Wp.double(), W.double()
    want_h = float((D @ H.double() * D).sum() / (Wd @ H.double() * Wd).sum())
    assert output_error(Wt, Wp, H=H) == pytest.approx(want_h, rel=1e-12)
    want_x = float(((D @ Xe.double().T) ** 2).sum() / ((Wd @ Xe.double().T) ** 2).sum())
    assert output_error(Wt, Wp, X=Xe) == pytest.approx(want_x, rel=1e-12)


@pytest.mark.parametrize("method", ["prune", "true_obs"])
def test_structured_obs_refuses_an_integer_weight_untouched(method):
    # before: pruned, the compensated values truncated into the int64 weight on the write back
    _, _, H = _layer()
    w = torch.randint(-5, 6, (4, 8), generator=torch.Generator().manual_seed(6))
    w0 = w.clone()
    with pytest.raises(TypeError, match=r"^scope: the pruned weight must be floating, got torch\.int64$"):
        obs = StructuredOBS(ScopeSpec(BlockSpec(w, (1, 1)), (1, 4)), H)
        obs.prune(2) if method == "prune" else obs.prune_true_obs(2)
    assert torch.equal(w, w0)


# ============================================================================ gradkit.scope


def _w(seed=0):
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))


def _nm(w):
    return ScopeSpec(BlockSpec(w, (1, 1)), (1, 4))


@pytest.mark.parametrize("eps,exc", [(None, TypeError), ("1", TypeError), (True, TypeError),
                                     (float("nan"), ValueError), (-1.0, ValueError)])
def test_nnz_eps_is_checked(eps, exc):
    # before: None / "1" raised torch's TypeError naming nothing, NaN counted 0, -1.0 counted the zeros, True was 1
    with pytest.raises(exc, match=r"^eps: expected a number >= 0"):
        _nm(_w()).nnz(eps)


def test_nnz_numpy_eps_counts_as_torch():
    w = _w(1)
    w[0, :3] = 0
    for eps in (np.float32(0.5), np.float64(0.25), 0, np.int64(1)):
        assert _nm(w).nnz(eps) == int((w.abs() > float(eps)).sum())


def _scope_calls(w):
    sp = _nm(w)
    bs = BlockSpec(w, (1, 1))
    g = torch.zeros(4, 8)
    return {
        "hard_threshold(thresholds)": lambda t: sp.hard_threshold(thresholds=t[:, :2]),
        "BlockSpec.hard_threshold": lambda t: bs.hard_threshold(t),
        "soft_threshold": lambda t: sp.soft_threshold(t[:, :2]),
        "apply_multiplier": lambda t: bs.apply_multiplier(t),
        "keep_blocks": lambda t: bs.keep_blocks(t),
        "apply_mask": lambda t: bs.apply_mask(t),
        "set_data": lambda t: bs.set_data(t),
        "get_masks(values)": lambda t: sp.get_masks(2, values=t),
        "hard_threshold(values)": lambda t: sp.hard_threshold(nnz=2, values=t),
        "block_keep(block_scores)": lambda t: sp.block_keep(2, block_scores=t.reshape(4, 2, 4)),
        "get_masks(block_mask)": lambda t: sp.get_masks(2, block_mask=t.reshape(4, 2, 4)),
        "coupling keep_blocks": lambda t: BlockCoupling([bs]).keep_blocks(t),
        "_g": g,
    }


@pytest.mark.parametrize("call", [k for k in _scope_calls(torch.zeros(4, 8)) if k != "_g"])
def test_meta_tensors_are_refused_by_name_with_the_weight_untouched(call):
    # before: torch's "Tensor.item() cannot be called on meta tensors", NotImplementedError, meta masks returned,
    # or (apply_multiplier) the weights silently left unchanged
    w = _w(2)
    w0 = w.clone()
    is_mask = call in ("keep_blocks", "apply_mask", "get_masks(block_mask)", "coupling keep_blocks")
    arg = torch.ones(4, 8, device="meta", dtype=torch.bool if is_mask else torch.float32)
    with pytest.raises(ValueError, match=r"^(thresholds|multiplier|keep|mask|data|values|block_scores|block_mask): "
                                         r"is a meta tensor"):
        _scope_calls(w)[call](arg)
    assert torch.equal(w, w0)


@pytest.mark.parametrize("call,arg,exc,msg", [
    ("hard_threshold(thresholds)", torch.full((4, 8), 0.1, dtype=torch.complex64), TypeError,
     r"^thresholds: expected real"),
    ("BlockSpec.hard_threshold", torch.full((4, 8), 0.1, dtype=torch.complex64), TypeError,
     r"^thresholds: expected real"),
    ("apply_multiplier", torch.ones(4, 8, dtype=torch.complex64), TypeError,
     r"^multiplier: a torch\.complex64 multiplier"),
    ("set_data", torch.ones(4, 8, dtype=torch.complex64), TypeError,
     r"^data: a torch\.complex64 tensor cannot be written"),
    ("set_data", [[0.0] * 8] * 4, TypeError, r"^data: expected a tensor, got list$"),
    ("get_masks(block_mask)", torch.ones(4, 8, dtype=torch.complex64), TypeError, r"^block_mask: expected a bool mask"),
    ("keep_blocks", torch.ones(4, 8, dtype=torch.complex64), TypeError, r"^keep: expected a bool mask"),
    ("block_keep(block_scores)", torch.ones(4, 8, dtype=torch.int64), TypeError,
     r"^block_scores: expected a floating tensor"),
    # floating masks other than 0 / 1 were read as non-zero = set (scores passed as a mask kept every block not
    # exactly 0, NaN included)
    ("keep_blocks", torch.full((4, 8), 0.3), ValueError, r"^keep: a torch\.float32 mask must hold only 0 and 1"),
    ("apply_mask", torch.full((4, 8), float("nan")), ValueError,
     r"^mask: a torch\.float32 mask must hold only 0 and 1"),
    ("coupling keep_blocks", torch.full((4, 8), 2.0, dtype=torch.float64), ValueError,
     r"^keep: a torch\.float64 mask must"),
])
def test_wrong_dtypes_are_refused_by_name_with_the_weight_untouched(call, arg, exc, msg):
    # before: NotImplementedError ("ge_cpu" for complex), RuntimeError from mul_, copy_'s TypeError, the kernels'
    # "x: ..." for block_scores
    w = _w(3)
    w0 = w.clone()
    with pytest.raises(exc, match=msg):
        _scope_calls(w)[call](arg)
    assert torch.equal(w, w0)


def test_view_data_setter_checks_the_value():
    w = _w(10)
    w0 = w.clone()
    v = BlockSpec(w, (1, 1)).view
    for bad, exc, msg in [(torch.ones(4, 8, device="meta"), ValueError, r"^data: is a meta tensor"),
                          (torch.ones(4, 8, dtype=torch.complex64), TypeError, r"^data: a torch\.complex64 tensor"),
                          ([[1.0] * 8] * 4, TypeError, r"^data: expected a tensor, got list$")]:
        with pytest.raises(exc, match=msg):
            v.data = bad
    assert torch.equal(w, w0)
    v.data = torch.arange(32.0).reshape(4, 8).T.contiguous().T  # non-contiguous source: plain copy_
    assert torch.equal(w, torch.arange(32.0).reshape(4, 8))


@pytest.mark.parametrize("call", ["keep_blocks", "apply_mask", "coupling keep_blocks"])
def test_floating_0_1_masks_act_as_their_bool_mask(call):
    keep = torch.rand(4, 8, generator=torch.Generator().manual_seed(3)) < 0.5
    a, b = _w(3), _w(3)
    _scope_calls(a)[call](keep)
    _scope_calls(b)[call](keep.double())
    assert torch.equal(a, b)
    assert not torch.equal(a, _w(3))


def test_scope_coupling_mask_of_another_dtype():
    a, b = _w(4), _w(5)
    pair = ScopeCoupling([_nm(a), _nm(b)])
    with pytest.raises(ValueError, match=r"^block_mask: a torch\.float32 mask must hold only 0 and 1"):
        pair.get_masks(2, block_mask=torch.full((4, 2, 8), 0.5))
    bm = torch.rand(4, 2, 8, generator=torch.Generator().manual_seed(4)) < 0.5
    want = pair.get_masks(2, block_mask=bm)
    got = pair.get_masks(2, block_mask=bm.float())
    assert isinstance(want, dict) and list(want) == list(got) and len(want) == 2
    for key in want:
        assert torch.equal(want[key], got[key])


def test_integer_masks_and_multipliers_give_plain_torch_results():
    w = _w(6)
    keep = torch.randint(0, 2, (4, 8), generator=torch.Generator().manual_seed(7))
    a = w.clone()
    BlockSpec(a, (1, 1)).keep_blocks(keep)
    assert torch.equal(a, w * keep.bool())
    a = w.clone()
    BlockSpec(a, (1, 2)).apply_mask(torch.tensor([[0, 1, 0, 2]] * 4))  # non-zero = prune
    assert torch.equal(a, w * torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0]] * 4))
    a = w.clone()
    mult = torch.arange(16).reshape(4, 4) - 5  # int64 into float32 weights: castable
    BlockSpec(a, (1, 2)).apply_multiplier(mult)
    assert torch.equal(a, w * mult.repeat_interleave(2, dim=1).float())
    m = _nm(w).get_masks(2, block_mask=torch.ones(4, 2, 4, dtype=torch.int8))[_nm(w).block]
    assert bool(m.all())


@pytest.mark.parametrize("kw,msg", [({"atol": None}, r"^atol: expected a finite number >= 0, got None$"),
                                    ({"max_iter": 2 ** 64}, r"^max_iter: expected an int below 2\*\*63")])
@pytest.mark.parametrize("who", ["ScopeSpec", "BlockSpec", "ScopeCoupling"])
def test_soft_threshold_scalars_the_op_does_not_catch(kw, msg, who):
    # before: atol=None raised float()'s TypeError naming nothing; max_iter >= 2**63 the op schema's RuntimeError
    a, b = _w(8), _w(9)
    a0, b0 = a.clone(), b.clone()
    t = torch.full((4, 2), 0.1)
    with pytest.raises(ValueError, match=msg):
        if who == "ScopeSpec":
            _nm(a).soft_threshold(t, **kw)
        elif who == "BlockSpec":
            BlockSpec(a, (1, 4)).soft_threshold(t, **kw)
        else:
            ScopeCoupling([_nm(a), _nm(b)]).soft_threshold(t, **kw)
    assert torch.equal(a, a0) and torch.equal(b, b0)


# ============================================================================ gradkit.golden


def test_bitmask_refuses_meta_bits():
    # before: accepted (count() / & then raised "Tensor.item() cannot be called on meta tensors"); with a partial
    # last byte the constructor raised it
    for shape in [(4, 8), (4, 7)]:
        with pytest.raises(ValueError, match=r"^bits: expected a dense uint8 tensor with data"):
            Bitmask(torch.zeros(4, dtype=torch.uint8, device="meta"), shape)


def test_golden_masks_refuses_non_string_gradient_names():
    g = torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"^grad_iter: sample 0 names a gradient 1; expected parameter names"):
        golden_masks([{1: g}], 10)


def test_topk_mask_of_an_expanded_tensor_is_the_plain_stable_sort():
    row = torch.tensor([0.5, -2.0, 2.0, 0.1, -0.5, 3.0])
    t = row.expand(3, 6)  # stride 0: equal values, ties broken by the lowest flat position
    # k = max(1, ceil(18 * pct / 100)): 1.8 -> 2, 5.994 -> 6, 9 -> 9, 2.25 -> 3 (a numpy float32 read as written)
    for pct, k in [(10, 2), (33.3, 6), (50, 9), (np.float32(12.5), 3)]:
        order = torch.sort(t.reshape(-1).abs(), descending=True, stable=True).indices[:k]
        want = torch.zeros(18, dtype=torch.bool)
        want[order] = True
        assert torch.equal(topk_mask(t, pct), want.reshape(3, 6)), pct


# ============================================================================ gradkit.golden_reverse


@pytest.mark.parametrize("pattern", [3, None, b"h\\.(\\d+)\\.", re.compile(b"h\\.(\\d+)"), "h\\.(\\d+"])
def test_layer_filter_bad_pattern_is_a_value_error_naming_it(pattern):
    # before: AttributeError (None / int / bytes), TypeError (a compiled bytes pattern), re.error (bad regex)
    with pytest.raises(ValueError, match=r"^pattern: "):
        gr.layer_filter(["h.0.w", "h.1.w"], 50, pattern=pattern)


@pytest.mark.parametrize("names", [None, 3])
def test_layer_filter_non_iterable_names(names):
    with pytest.raises(ValueError, match=r"^names: expected an iterable of parameter names"):
        gr.layer_filter(names, 50)


@pytest.mark.parametrize("it,imp,msg", [(2.7, 0.1, "iteration"), ("3", 0.1, "iteration"), (None, 0.1, "iteration"),
                                        (True, 0.1, "iteration"), (1, "0.5", "improvement"),
                                        (1, None, "improvement"), (1, True, "improvement")])
def test_next_percent_bad_arguments_leave_the_strategy_as_it_was(it, imp, msg):
    # before: 2.7 was read as 2, "3" as 3, "0.5" as 0.5, True as 1.0; None raised a TypeError naming nothing
    for cls in gr.STRATEGIES.values():
        s = cls(10.0, seed=3)
        before = dict(vars(s), _gen=None)
        with pytest.raises(ValueError, match=rf"^{msg}: expected"):
            s.next_percent(it, imp)
        assert dict(vars(s), _gen=None) == before


def test_next_percent_numpy_and_tensor_arguments_equal_python_numbers():
    for cls in gr.STRATEGIES.values():
        a, b = cls(10.0, seed=5), cls(10.0, seed=5)
        xs = [a.next_percent(i, 0.25 * (-1) ** i) for i in range(6)]
        ys = [b.next_percent(np.int64(i), torch.tensor(0.25 * (-1) ** i, dtype=torch.float64)) for i in range(6)]
        assert xs == ys


def test_kl_divergence_masks_and_meta_inputs():
    g = torch.Generator().manual_seed(11)
    ref = torch.log_softmax(torch.randn(2, 3, 5, generator=g), -1)
    lp = torch.log_softmax(torch.randn(2, 3, 5, generator=g), -1)
    keep = torch.tensor([[1, 0, 1], [1, 1, 0]])
    want = (ref.exp() * (ref - lp)).sum(-1)[keep.bool()].mean()
    for m in (keep.bool(), keep, keep.float(), keep.to(torch.uint8)):  # bool or 0 / 1: the same KL
        assert torch.allclose(gr.kl_divergence(ref, lp, mask=m), want, rtol=1e-6, atol=0)
    for m in (keep * 0.5, keep.float().masked_fill(keep == 0, float("nan")), keep * 2, keep.to(torch.complex64)):
        with pytest.raises(ValueError, match=r"^mask: expected a bool or 0/1 mask"):
            gr.kl_divergence(ref, lp, mask=m)
    with pytest.raises(ValueError, match=r"^mask: is a meta tensor"):
        gr.kl_divergence(ref, lp, mask=keep.to("meta"))
    with pytest.raises(ValueError, match=r"^ref_logprobs: is a meta tensor"):  # before: a meta "KL" returned
        gr.kl_divergence(ref.to("meta"), lp.to("meta"))


class _LM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(5, 4)
        self.o = nn.Linear(4, 5)

    def forward(self, ids, attention_mask=None):
        return self.o(self.e(ids))


def test_golden_reverse_meta_and_non_iterable_arguments_leave_the_model_untouched():
    m = _LM()
    snap = _state(m)
    ids = torch.randint(0, 5, (2, 3), generator=torch.Generator().manual_seed(12))
    for f, what in [(lambda: gr.full_logprobs(m, ids.to("meta")), "input_ids"),
                    (lambda: gr.logprobs_for_fixed_ids(m, ids, attention_mask=torch.ones(2, 3, device="meta")),
                     "attention_mask"),
                    (lambda: gr.logprobs_for_fixed_ids(m, ids, labels_mask=torch.ones(2, 3, device="meta")),
                     "labels_mask")]:
        with pytest.raises(ValueError, match=rf"^{what}: is a meta tensor"):
            f()
    masks = {"o.weight": torch.ones(5, 4, dtype=torch.bool, device="meta")}
    with pytest.raises(ValueError, match=r"^masks\['o\.weight'\]: is a meta tensor"):
        with gr.zeroed_params(m, masks):
            pass
    with pytest.raises(ValueError, match=r"^masks\['o\.weight'\]: is a meta tensor"):
        gr.masked_kl(m, masks, [{"input_ids": ids}])
    with pytest.raises(ValueError, match=r"^batches: expected an iterable of batches, got NoneType$"):
        gr.masked_kl(m, {"o.weight": torch.ones(5, 4, dtype=torch.bool)}, None)
    with pytest.raises(ValueError, match=r"^batches: no real tokens"):  # named after masked_kl's own argument
        gr.masked_kl(m, {"o.weight": torch.ones(5, 4, dtype=torch.bool)},
                     [{"input_ids": ids, "attention_mask": torch.zeros(2, 3)}])
    for kw in ({"batches": None}, {"batches": [{"input_ids": ids}], "eval_batches": 3}):
        with pytest.raises(ValueError, match=r"^(eval_)?batches: expected an iterable of batches"):
            gr.reverse_golden_masks(m, percent=10, progress=False, **kw)
    assert _same(m, snap)


def test_masked_kl_with_an_integer_attention_mask_counts_non_zero_tokens():
    # _kl_against passes its attention masks as bool now (kl_divergence takes 0 / 1 only): a mask of 2s still counts
    m = _LM()
    ids = torch.randint(0, 5, (2, 3), generator=torch.Generator().manual_seed(13))
    mk = {"o.weight": torch.rand(5, 4, generator=torch.Generator().manual_seed(14)) > 0.5}
    am = torch.tensor([[1, 1, 0], [1, 1, 1]])
    a = gr.masked_kl(m, mk, [{"input_ids": ids, "attention_mask": am}])
    b = gr.masked_kl(m, mk, [{"input_ids": ids, "attention_mask": am * 2}])
    assert a == b and a > 0


# ============================================================================ gradkit.parammap


def _pm():
    m = torch.tensor([[True, False, True, True], [False, True, False, True]])
    return ParamMap({"a": {"shape": (2, 4), "repr": "mask", "mask": m}, "b": {"shape": (3,), "repr": "all"}})


@pytest.mark.parametrize("r,t", [("mask", torch.ones(2, 4, dtype=torch.bool)),
                                  ("bitmask", torch.ones(1, dtype=torch.uint8)), ("indices", torch.tensor([1, 2]))])
def test_param_map_spec_meta_tensors_refused_by_name(r, t):
    with pytest.raises(ValueError, match=rf"^spec\['a'\]\['{r}'\]: is a meta tensor"):
        ParamMap({"a": {"shape": (2, 4), "repr": r, r: t.to("meta")}})


def test_param_map_prune_and_decode_meta_refused_by_name():
    pm = _pm()
    n = pm.input_dim
    with pytest.raises(ValueError, match=r"^mask: is a meta tensor"):
        pm.prune(mask=torch.ones(n, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match=r"^importance: is a meta tensor"):
        pm.prune(topk=2, importance=torch.ones(n, device="meta"))
    with pytest.raises(ValueError, match=r"^positions: is a meta tensor"):
        pm.base_global_index(torch.tensor([1], device="meta"))
    with pytest.raises(TypeError, match=r"^positions: expected integers, got torch\.complex64$"):
        pm.base_global_index(torch.tensor([1], dtype=torch.complex64))


def test_param_map_from_model_and_to_spec_argument_kinds():
    lin = nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"^names: expected None, a name / glob pattern or a list of them, got int$"):
        ParamMap.from_model(lin, names=3)
    with pytest.raises(TypeError, match=r"^masks: expected None or a dict name -> mask, got int$"):
        ParamMap.from_model(lin, masks=3)
    with pytest.raises(ValueError, match=r"^masks\['weight'\]: is a meta tensor"):
        ParamMap.from_model(lin, masks={"weight": torch.ones(2, 2, dtype=torch.bool, device="meta")}, bitmask=True)
    for v in ("yes", 1, None):  # before: read by truthiness ("no" stored bitmasks)
        with pytest.raises(TypeError, match=r"^bitmask: expected a bool"):
            ParamMap.from_model(lin, masks={"weight": torch.ones(2, 2, dtype=torch.bool)}, bitmask=v)
        with pytest.raises(TypeError, match=r"^bitmask_as_mask: expected a bool"):
            _pm().to_spec(bitmask_as_mask=v)
    # a list of (name, mask) pairs still builds the same map as the dict (dict() of pairs, as before)
    mk = torch.tensor([[True, False], [False, True]])
    assert ParamMap.from_model(lin, masks=[("weight", mk)]).hash == ParamMap.from_model(lin, masks={"weight": mk}).hash
    assert ParamMap.from_model(lin, masks={"weight": mk}, bitmask=np.bool_(True)).repr_of("weight") == "bitmask"


@pytest.mark.parametrize("directory", [None, 3])
def test_param_map_load_non_path_is_named(directory):
    # before: os.fspath's "expected str, bytes or os.PathLike object, not NoneType", naming no argument
    with pytest.raises(TypeError, match=r"^directory: expected a path, got (NoneType|int)$"):
        ParamMap.load(directory)


def test_param_map_expanded_and_non_contiguous_importance_rank_as_contiguous():
    pm = _pm()
    imp = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    nc = torch.stack([imp, -imp], 1)[:, 0]  # stride 2
    assert torch.equal(pm.prune(topk=3, importance=nc)[1], pm.prune(topk=3, importance=imp)[1])
    assert pm.prune(topk=3, importance=torch.tensor([2.0]).expand(8))[1].tolist() == [0, 1, 2]  # ties: lowest first


# ============================================================================ gradkit.optim.MaskedAdamW


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_masked_adamw_refuses_meta_and_csr_masks_by_name():
    lin = nn.Linear(4, 3)
    for mk in (torch.ones(3, 4, dtype=torch.bool, device="meta"), torch.ones(2, dtype=torch.uint8, device="meta")):
        with pytest.raises(ValueError, match=r"^masks\['weight'\]: is a meta tensor"):
            MaskedAdamW(lin.named_parameters(), {"weight": mk}, 1e-3, 0.0)
    with pytest.raises(TypeError, match=r"^masks\['weight'\]: expected a dense \(or sparse COO\) mask, got a "
                                        r"torch\.sparse_csr tensor"):
        MaskedAdamW(lin.named_parameters(), {"weight": torch.ones(3, 4, dtype=torch.bool).to_sparse_csr()}, 1e-3, 0.0)
    opt = MaskedAdamW(lin.named_parameters(), {"weight": torch.ones(3, 4, dtype=torch.bool)}, 1e-3, 0.0)
    with pytest.raises(ValueError, match=r"^state_dict: masks\['weight'\]: is a meta tensor"):
        sd = opt.state_dict()
        sd["masks"]["weight"] = sd["masks"]["weight"].to("meta")
        opt.load_state_dict(sd)


def test_masked_adamw_refuses_an_expanded_parameter_before_stepping_any():
    # before: step() updated 'a', then failed writing 'e' back (RuntimeError), with 'a' stepped and no state kept
    a = nn.Parameter(torch.ones(3))
    e = torch.ones(1).expand(3).requires_grad_()
    with pytest.raises(ValueError, match=r"^named_params\['e'\]: several elements share one memory location"):
        MaskedAdamW([("a", a), ("e", e)], None, 0.1, 0.1)


def test_masked_adamw_with_numpy_rates_and_expanded_gradient_matches_adamw():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3, 4))
    q = nn.Parameter(p.detach().clone())
    opt = MaskedAdamW([("p", p)], None, np.float32(0.0), np.float32(0.01), betas=(np.float32(0.9), 0.999),
                      weight_decay=np.float64(0.1))
    ref = torch.optim.AdamW([q], lr=float(np.float32(0.01)), betas=(float(np.float32(0.9)), 0.999), weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(1, 4).expand(3, 4)  # stride-0 gradient
        p.grad, q.grad = g, g.contiguous()
        opt.step()
        ref.step()
    assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
