"""Review (session 43) of the session's changes: score_topk's autograd formula (ops/search.py), MaskedAdamW's
schedule factor and inference-mode state (optim.py), scope's float8 refusals (scope.py).

Defects found, each proved by a test below:

* score_topk backward (ops/search.py ``_score_topk_backward``): a slot was credited to the block whenever its row
  lay in the block's range, and otherwise to the *first* idx_in entry with that row. With a row repeated in idx_in
  (two running entries of row 5, the second one kept) the gradient went to the other entry; with an idx_in row that
  is also a row of this block (scores_in's value kept) it went to that key / query instead of scores_in. The
  composite path (the documented reference) credits the candidate the selection kept. Fixed: slots are matched to
  candidates by row and reported score, in candidate order (scores_in first), as the stable selection takes them.
* score_topk backward with D = 0 and no slot (Q = 0 or k = 0) and keys requiring grad: ``reshape(-1, 0)`` raised
  torch's "cannot reshape tensor of 0 elements" RuntimeError. Fixed (explicit row count).
* MaskedAdamW.load_state_dict under torch.inference_mode(): its ``step`` clone was an inference tensor, so every
  later step outside inference mode was refused (naming a state "made under inference mode" that was not); moments
  that are themselves inference tensors (a checkpoint torch.load-ed under inference mode) were refused likewise.
  Fixed: the load's copies are normal tensors, inference-tensor moments are copied.
* BlockCoupling.keep_blocks / apply_mask with a float8 member: ``_check_targets`` (scope.py) let float8 through
  (``is_floating_point()``), so the first member was zeroed before the second refused its dtype. Fixed.
* Fixed after the review (csrc/cpu/search.cpp now detaches its inputs): score_topk's BLAS scoring path (csrc/cpu/search.cpp ``at::mm_out`` inside
  ``at::parallel_for``) raises torch's "mm(): functions with out=... arguments don't support automatic
  differentiation" RuntimeError whenever queries or keys require grad and the work is split over threads -- even
  under torch.no_grad() (the OpenMP workers run with grad mode on). It is the path of every call with
  GRADKIT_SEARCH_ISA=blas, of CPUs without AVX2 (non-x86), and of D = 0 on x86; README promises score_topk
  differentiable "on every backend". The existing tests ran it on one thread, where it did not show.
"""
import io
import warnings

import pytest
import torch

from gradkit import _ext, ops
from gradkit.kernels import composite
from gradkit.optim import MaskedAdamW
from gradkit.scope import BlockCoupling, BlockSpec

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")


# =========================================================================== score_topk autograd


def _grads(fn, leaves, w):
    """(scores, idx, grads of every leaf) of sum(finite scores * w) through ``fn``."""
    ts = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    s, i = fn(*ts)
    if s.requires_grad:
        (torch.where(torch.isfinite(s), s, 0) * w).sum().backward()
    return s.detach(), i, [None if t is None else t.grad for t in ts]


def _both(q, keys, k, *, largest=True, key_scale=None, scores_in=None, idx_in=None, base=0, w=None):
    w = torch.arange(1.0, k + 1).expand(q.shape[0], k) if w is None else w
    ours = _grads(lambda a, b, c, d: ops.score_topk(a, b, k, largest=largest, key_scale=c, scores_in=d,
                                                    idx_in=idx_in, base=base), [q, keys, key_scale, scores_in], w)
    ref = _grads(lambda a, b, c, d: composite.score_topk(a, b, k, largest, c, d, idx_in, base),
                 [q, keys, key_scale, scores_in], w)
    return ours, ref


def _assert_same(ours, ref):
    assert torch.equal(ours[1], ref[1])
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-6)
    for name, a, b in zip(("queries", "keys", "key_scale", "scores_in"), ours[2], ref[2]):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("largest", [True, False])
def test_score_topk_grad_of_a_row_repeated_in_idx_in_goes_to_the_kept_entry(largest):
    # row 5 twice in the running top-k; the better entry (3.0 largest / -3.0 smallest) is kept, the other is not
    # (k = 3 leaves it out): its gradient went to the first entry (position 0), not the kept one (position 1)
    sign = 1.0 if largest else -1.0
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.5, 0.0], [0.25, 0.0], [0.1, 0.0]]) * sign
    si = torch.tensor([[1.0, 3.0, 2.0]]) * sign
    ii = torch.tensor([[5, 5, 6]])
    ours, ref = _both(q, keys, 3, largest=largest, scores_in=si, idx_in=ii, base=0)
    assert ours[1].tolist() == [[5, 6, 0]]
    assert ours[2][3].tolist() == [[0.0, 1.0, 2.0]]
    _assert_same(ours, ref)


def test_score_topk_grad_of_a_row_repeated_in_idx_in_both_kept():
    # both entries of row 5 kept (k = 6 > candidates: empty slots too), in score order, and a bf16 key block
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, generator=gen)
    keys = torch.randn(3, 4, generator=gen).bfloat16()
    si = torch.tensor([[1.0, 3.0, 3.0, -1.0], [0.5, 0.5, 0.25, 7.0]])
    ii = torch.tensor([[5, 5, 5, -1], [9, 9, 8, 9]])
    ours, ref = _both(q, keys, 9, key_scale=torch.rand(3, generator=gen), scores_in=si, idx_in=ii, base=20,
                      w=torch.randn(2, 9, generator=gen))
    assert (ours[1] == -1).any() and (ours[1] == 5).sum() == 3
    _assert_same(ours, ref)


@pytest.mark.parametrize("case", ["scores_in kept", "block kept", "both kept (tie)"])
def test_score_topk_grad_of_an_idx_in_row_that_is_also_in_the_block(case):
    # idx_in holds row 1, also this block's row 1 (base 0): the slot is the candidate the selection kept
    q = torch.tensor([[1.0, 2.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # scores 1, 2, -1
    value, k = {"scores_in kept": (50.0, 1), "block kept": (-50.0, 3), "both kept (tie)": (2.0, 4)}[case]
    ours, ref = _both(q, keys, k, key_scale=torch.ones(3), scores_in=torch.tensor([[value]]),
                      idx_in=torch.tensor([[1]]), base=0)
    _assert_same(ours, ref)
    d_in = ours[2][3].item()
    assert d_in == {"scores_in kept": 1.0, "block kept": 0.0, "both kept (tie)": 1.0}[case]
    if case == "scores_in kept":  # key row 1's score was not kept: no gradient reaches it
        assert ours[2][1][1].abs().sum() == 0 and ours[2][2][1] == 0


def test_score_topk_grad_matches_the_composite_path_with_many_repeats_and_ties():
    # small integer data: rows repeated in idx_in and shared with the block, equal scores, NaN running scores, empty
    # slots, k past the candidates, both orders, half keys, key_scale or not (the original formula: ~half differ)
    for seed in range(120):
        g = torch.Generator().manual_seed(seed)
        Q, N, k, kin, base = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in
                              ((1, 4), (0, 7), (0, 10), (0, 6), (0, 3)))
        q = torch.randint(-2, 3, (Q, 3), generator=g).float()
        keys = torch.randint(-2, 3, (N, 3), generator=g).float()
        keys = keys.half() if seed % 3 == 0 else keys
        si = torch.randint(-4, 5, (Q, kin), generator=g).float()
        if seed % 5 == 0 and kin:
            si[0, 0] = float("nan")
        ii = torch.randint(-1, 6, (Q, kin), generator=g)
        ks = torch.randint(1, 3, (N,), generator=g).float() if seed % 4 == 0 else None
        ours, ref = _both(q, keys, k, largest=bool(seed % 2), key_scale=ks, scores_in=si, idx_in=ii, base=base,
                          w=torch.randn(Q, k, generator=g))
        _assert_same(ours, ref)


def test_score_topk_grad_zero_width_keys_without_slots():
    # D = 0 with no slot (Q = 0, or k = 0): the keys' gradient is zeros (was reshape(-1, 0)'s RuntimeError)
    for q, k in ((torch.zeros(0, 0), 2), (torch.zeros(3, 0), 0)):
        keys = torch.zeros(6, 0, requires_grad=True)
        qq = q.clone().requires_grad_()
        s, i = ops.score_topk(qq, keys, k)
        (s.sum() + 0 * keys.sum()).backward()
        assert keys.grad.shape == (6, 0) and qq.grad.shape == q.shape


def test_score_topk_opcheck_with_repeated_rows_and_grads():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(3, 5, generator=gen, requires_grad=True)
    keys = torch.randn(7, 5, generator=gen, requires_grad=True)
    ks = torch.rand(7, generator=gen, requires_grad=True)
    si = torch.randn(3, 4, generator=gen, requires_grad=True)
    ii = torch.tensor([[2, 2, 40, -1], [41, 41, 3, 3], [-1, 0, 0, 6]])
    res = torch.library.opcheck(torch.ops.gradkit.score_topk, (q, keys, 6, True, ks, si, ii, 0))
    assert set(res.values()) == {"SUCCESS"}, res


@pytest.mark.parametrize("case", ["blas", "blas-no-grad", "D=0"])
def test_score_topk_blas_path_with_inputs_that_require_grad(case, monkeypatch):
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # the workers that show it
    try:
        gen = torch.Generator().manual_seed(2)
        D = 0 if case == "D=0" else 8
        if case != "D=0":
            monkeypatch.setenv("GRADKIT_SEARCH_ISA", "blas")
        q = torch.randn(6, D, generator=gen)
        keys = torch.randn(40, D, generator=gen)
        if case == "blas-no-grad":
            with torch.no_grad():
                s, i = ops.score_topk(q.requires_grad_(), keys, 4)
            assert torch.equal(s, ops.score_topk(q.detach(), keys, 4)[0])
        else:
            ours, ref = _both(q, keys, 4)
            _assert_same(ours, ref)
    finally:
        torch.set_num_threads(old)


# =========================================================================== MaskedAdamW


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


_MASKS = {"0.weight": torch.rand(6, 4, generator=torch.Generator().manual_seed(1)) < .5}


def _set_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _stepped(steps, dtype=torch.float32):
    model = _net().to(dtype)
    opt = MaskedAdamW(model.named_parameters(), _MASKS, 1e-2, 1e-3, amsgrad=True)
    for s in range(steps):
        _set_grads(model, s)
        opt.step()
    return model, opt


@pytest.mark.parametrize("how", ["load under inference_mode", "inference-tensor checkpoint",
                                 "half model, load under inference_mode"])
def test_masked_adamw_state_loaded_under_inference_mode_steps_on_outside_it(how):
    dtype = torch.float16 if how.startswith("half") else torch.float32
    ref_model, ref_opt = _stepped(2, dtype)
    src_model, src_opt = _stepped(2, dtype)
    sd = src_opt.state_dict()
    if how == "inference-tensor checkpoint":  # torch.load under inference mode makes inference tensors
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        with torch.inference_mode():
            sd = torch.load(buf, weights_only=True)
        assert sd["state"][0]["exp_avg"].is_inference()
    model, opt = _stepped(0, dtype)
    model.load_state_dict(src_model.state_dict())
    if how == "inference-tensor checkpoint":
        opt.load_state_dict(sd)
    else:
        with torch.inference_mode():
            opt.load_state_dict(sd)
    assert not any(t.is_inference() for st in opt.state.values() for t in st.values())
    for m, o in ((ref_model, ref_opt), (model, opt)):
        _set_grads(m, 9)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), model.parameters()))
    assert all(opt.state[p]["step"].item() == 3 for p in model.parameters())


_SCHEDS = {
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.StepLR(o, 2, 0.5), torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.9 ** e)]),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, 1.0, 3), torch.optim.lr_scheduler.CosineAnnealingLR(o, 5)],
        milestones=[3]),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 2.0, total_steps=20),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.1, 1.0, step_size_up=3),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
}


@pytest.mark.parametrize("name", list(_SCHEDS))
def test_masked_adamw_and_scheduler_checkpoint_resume_continues_bit_for_bit(name):
    # a checkpoint (model, optimizer, scheduler state dicts through torch.save) resumed mid-schedule continues as
    # the uninterrupted run: the same factors and the same bits
    def tick(s, i):
        s.step(float(i)) if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) else s.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schedulers' deprecation notes
        model, opt = _stepped(0)
        sched = _SCHEDS[name](opt)
        for i in range(4):
            _set_grads(model, i)
            opt.step()
            tick(sched, i)
        buf = io.BytesIO()
        torch.save({"m": model.state_dict(), "o": opt.state_dict(), "s": sched.state_dict()}, buf)
        buf.seek(0)
        ck = torch.load(buf, weights_only=True)
        m2, o2 = _stepped(0)
        s2 = _SCHEDS[name](o2)
        m2.load_state_dict(ck["m"])
        o2.load_state_dict(ck["o"])
        s2.load_state_dict(ck["s"])
        lrs = ([], [])
        for i in range(4, 9):
            for (m, o, s), seen in zip(((model, opt, sched), (m2, o2, s2)), lrs):
                _set_grads(m, i)
                o.step()
                tick(s, i)
                seen.append(o.param_groups[0]["lr"])
    assert lrs[0] == lrs[1] and len(set(lrs[0])) > 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m2.parameters()))


# =========================================================================== scope


@pytest.mark.parametrize("method", ["keep_blocks", "apply_mask"])
def test_block_coupling_with_a_float8_member_is_refused_before_any_write(method):
    a = torch.nn.Parameter(torch.ones(2, 4))
    b = torch.nn.Parameter(torch.ones(2, 4).to(torch.float8_e4m3fn), requires_grad=False)
    c = BlockCoupling([BlockSpec(a, (1, 2)), BlockSpec(b, (1, 2))])
    keep = torch.tensor([[True, False], [False, True]])
    with pytest.raises(TypeError, match=r"^specs\[1\]: expected floating weights, got torch.float8_e4m3fn"):
        getattr(c, method)(keep if method == "keep_blocks" else ~keep)
    assert torch.equal(a.detach(), torch.ones(2, 4)) and torch.equal(b.detach().float(), torch.ones(2, 4))
