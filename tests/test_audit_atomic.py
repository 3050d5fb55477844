"""Audit: ops and public functions that write into the caller's tensors or objects leave everything as it
was when they raise (the project's rule: bad input gets an error naming the argument, before any work, and
no half-updated tensors after it). Each test feeds input that used to fail part way, after an earlier tensor,
list entry, bucket or scope had been written, and checks the error and that nothing changed.

Covered here (the param-map ops have their own tests): MaskedAdamW.step (an integer step count from a state
dict, a mask left behind by a parameter whose data was replaced, hyper-parameters edited in the group),
ops.masked_adamw_ (written moments that require grad, every backend), BlockCoupling.keep_blocks /
apply_multiplier (a later spec that cannot take the write), BlockCoupling / ScopeCoupling.soft_threshold
(scalar arguments and thresholds that only a later scope refused; every backend), SparsityBuilder.couple_scopes
(a repeated scope), SparseGradientAccumulator.add (errors name the gradient) and reverse_golden_masks (a
caller's strategy instance after a failed search)."""
import copy

import pytest
import torch
from torch import nn

from gradkit import golden_reverse as gr
from gradkit import ops
from gradkit.compat.sparsekit import SparsityBuilder
from gradkit.golden import SparseGradientAccumulator
from gradkit.optim import MaskedAdamW
from gradkit.scope import BlockCoupling, BlockSpec, ScopeCoupling, ScopeSpec

from conftest import use_backend

BACKENDS = ["native", "reference", "triton"]
GOOD = dict(masked_lr=1e-2, unmasked_lr=1e-3, weight_decay=0.1)


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _opt_snapshot(opt, params):
    """The parameters and the whole optimizer state (deep copies)."""
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()})


def _same_opt(opt, params, snap):
    ps, st = snap
    now = {id(p): s for p, s in opt.state.items()}
    return all(torch.equal(p.detach(), q) for p, q in zip(params, ps)) and now.keys() == st.keys() and \
        all(now[i].keys() == st[i].keys() and all(torch.equal(now[i][k], v) for k, v in st[i].items()) for i in st)


# --------------------------------------------------------------------------- MaskedAdamW.step


def test_step_advances_an_integer_step_count_from_a_state_dict():
    # torch keeps a loaded step tensor as it is: an int64 one made step() write the parameters and the
    # moments, then fail to add 1.0 to the count (the parameters stepped, the count not)
    def run(step_value):
        p = nn.Parameter(_rand(10))
        opt = MaskedAdamW([("a", p)], {"a": torch.arange(10) % 3 == 0}, **GOOD)
        p.grad = _rand(10, seed=1)
        opt.step()
        sd = opt.state_dict()
        sd["state"][0]["step"] = step_value
        opt.load_state_dict(sd)
        p.grad = _rand(10, seed=2)
        opt.step()
        return p.detach(), opt.state[p]

    want_p, want_st = run(torch.tensor(1.0))
    got_p, got_st = run(torch.tensor(1))
    assert torch.equal(got_p, want_p)
    assert all(torch.equal(got_st[k], want_st[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert got_st["step"].dtype == torch.int64 and int(got_st["step"]) == 2


def test_step_refuses_a_bool_step_count_before_any_change():
    p = nn.Parameter(_rand(10))
    opt = MaskedAdamW([("a", p)], None, **GOOD)
    p.grad = _rand(10, seed=1)
    opt.step()
    opt.state[p]["step"] = torch.tensor(True)
    p.grad = _rand(10, seed=2)
    snap = _opt_snapshot(opt, [p])
    with pytest.raises(ValueError, match=r"^state\['step'\] of 'a': "):
        opt.step()
    assert _same_opt(opt, [p], snap)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_step_checks_every_mask_before_the_first_fused_call(backend):
    # one fused call per (device, dtype): the float64 parameter's mask, stale since its data was replaced,
    # was refused (as bits[0]) only after the float32 parameters had been stepped
    a, b = nn.Parameter(_rand(16)), nn.Parameter(_rand(16, dtype=torch.float64))
    with use_backend(backend):
        opt = MaskedAdamW([("a", a), ("b", b)], {"a": torch.rand(16) < 0.5, "b": torch.rand(16) < 0.5}, **GOOD)
        a.grad, b.grad = _rand(16, seed=1), _rand(16, seed=2, dtype=torch.float64)
        opt.step()
        b.data = _rand(40, seed=3, dtype=torch.float64)
        b.grad = _rand(40, seed=4, dtype=torch.float64)
        opt.state.pop(b)  # as if b were stepped for the first time
        a.grad = _rand(16, seed=5)
        snap = _opt_snapshot(opt, [a, b])
        with pytest.raises(ValueError, match=r"^masks\['b'\]: 2 bytes, but the parameter now has 40 entries"):
            opt.step()
    assert _same_opt(opt, [a, b], snap)


@pytest.mark.parametrize("key, value", [("masked_lr", float("nan")), ("unmasked_lr", -1.0), ("eps", float("inf")),
                                        ("weight_decay", -0.5), ("betas", (1.0, 0.999)), ("maximize", 1)])
def test_step_checks_the_group_before_any_change(key, value):
    # a schedule that writes a bad value into the group: the ops wrapper refused it, but only after step()
    # had created the state (zero moments, step 0) of every parameter without one
    a, b = nn.Parameter(_rand(6)), nn.Parameter(_rand(3, 2))
    opt = MaskedAdamW([("a", a), ("b", b)], None, **GOOD)
    a.grad = _rand(6, seed=1)
    opt.step()
    b.grad = _rand(3, 2, seed=2)
    opt.param_groups[0][key] = value
    snap = _opt_snapshot(opt, [a, b])
    calls = []
    arg = r"betas\[0\]" if key == "betas" else key
    with pytest.raises((ValueError, TypeError), match=rf"^{arg}: "):
        opt.step(closure=lambda: calls.append(1))
    assert _same_opt(opt, [a, b], snap) and b not in opt.state and not calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_refuses_moments_that_require_grad_before_any_change(backend):
    # the native op refused them (its version-bump kernel checks every written list); the reference wrote
    # params[0] and failed on a moment with torch's unnamed leaf error, the Triton kernel wrote them all
    ps, gs = [_rand(10), _rand(12, seed=1)], [_rand(10, seed=2), _rand(12, seed=3)]
    ms, vs = [torch.zeros(10), torch.zeros(12)], [torch.zeros(10), torch.zeros(12)]
    kw = dict(masked_lr=0.1, unmasked_lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
              bias_correction1=[0.1, 0.1], bias_correction2_sqrt=[0.1, 0.1])
    for which, name in ((ms, "exp_avgs"), (vs, "exp_avg_sqs")):
        which[1].requires_grad_()
        before = [t.detach().clone() for t in ps + ms + vs]
        with use_backend(backend), pytest.raises(RuntimeError, match=rf"^{name}\[1\]: requires grad"):
            ops.masked_adamw_(ps, gs, ms, vs, [None, None], **kw)
        assert all(torch.equal(t.detach(), b) for t, b in zip(ps + ms + vs, before))
        which[1].requires_grad_(False)
        with torch.no_grad(), use_backend(backend):  # the same call under no_grad writes
            ops.masked_adamw_(ps, gs, ms, vs, [None, None], **kw)
        assert not torch.equal(ps[1], before[1])


# --------------------------------------------------------------------------- scope


def _coupling(dtype_b=torch.float32):
    a = _rand(4, 6)
    b = torch.arange(24).reshape(4, 6).to(dtype_b) if not dtype_b.is_floating_point else _rand(4, 6, seed=1)
    return a, b, BlockCoupling([BlockSpec(a, (1, 2)), BlockSpec(b, (1, 2))])


def test_block_coupling_writes_no_spec_unless_every_spec_takes_the_write():
    # the first spec was zeroed / scaled, then the integer second spec refused ("x: expected a floating tensor")
    a, b, bc = _coupling(torch.int64)
    keep = torch.arange(12).reshape(bc.grid_shape) % 2 == 0
    for call, exc, msg in ((lambda: bc.keep_blocks(keep), TypeError, r"^specs\[1\]: expected floating weights"),
                           (lambda: bc.apply_mask(~keep), TypeError, r"^specs\[1\]: expected floating weights"),
                           (lambda: bc.apply_multiplier(torch.full(bc.grid_shape, 0.5)), TypeError,
                            r"^multiplier: a torch.float32 multiplier cannot be applied in place to the torch.int64 "
                            r"weights of specs\[1\]")):
        before = (a.clone(), b.clone())
        with pytest.raises(exc, match=msg):
            call()
        assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    bc.apply_multiplier(torch.full(bc.grid_shape, 2, dtype=torch.int64))  # what the int weights can take
    assert torch.equal(b, 2 * torch.arange(24).reshape(4, 6))
    a, b, bc = _coupling()
    meta = BlockCoupling([BlockSpec(a, (1, 2)), BlockSpec(torch.empty(4, 6, device="meta"), (1, 2))])
    before = a.clone()
    with pytest.raises(ValueError, match=r"^keep: on cpu but the weights of specs\[1\] are on meta"):
        meta.keep_blocks(keep)
    assert torch.equal(a, before)


def _scope_coupling(first_coupled=True):
    """A ScopeCoupling whose first scope is a BlockCoupling (its step runs in Python) and second a BlockSpec."""
    a, c, d = _rand(4, 8), _rand(4, 8, seed=1), _rand(4, 8, seed=2)
    s1 = ScopeSpec(BlockCoupling([BlockSpec(a, (1, 2)), BlockSpec(c, (1, 2))]), (1, 2))
    s2 = ScopeSpec(BlockSpec(d, (1, 2)), (1, 2))
    return (a, c, d), ScopeCoupling([s1, s2] if first_coupled else [s2, s1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw, exc, msg", [
    (dict(atol=-1.0), ValueError, r"^atol: expected a finite number >= 0, got -1.0"),
    (dict(eps=float("nan")), ValueError, r"^eps: expected a finite number >= 0, got nan"),
    (dict(max_iter=-1), ValueError, r"^max_iter: expected >= 0, got -1"),
    (dict(max_iter=2.5), TypeError, r"^max_iter: expected an int, got float"),
    (dict(thresholds=torch.full((4, 2), 1, dtype=torch.int64)), TypeError, r"^thresholds: dtype torch.int64"),
])
@pytest.mark.parametrize("cond", [False, True])
def test_scope_coupling_soft_threshold_checks_every_scope_first(backend, kw, exc, msg, cond):
    # the BlockCoupling scope's Python step checked none of these: it was written, then the BlockSpec scope's
    # ops.block_soft_threshold_ refused the argument
    ts, sc = _scope_coupling()
    h = {b: torch.rand(4, 8, generator=torch.Generator().manual_seed(i)) + 0.5 for i, b in enumerate(sc.blocks())}
    kw = dict(kw)
    t = kw.pop("thresholds", torch.full(sc.grid_shape, 0.3))
    before = [x.clone() for x in ts]
    with use_backend(backend), pytest.raises(exc, match=msg):
        sc.soft_threshold(t, conditioners=h if cond else None, **kw)
    assert all(torch.equal(x, y) for x, y in zip(ts, before))
    # a BlockCoupling alone refuses them too (it accepted them silently)
    with use_backend(backend), pytest.raises(exc, match=msg):
        sc.scopes[0].soft_threshold(t, conditioners=h if cond else None, **kw)
    assert all(torch.equal(x, y) for x, y in zip(ts, before))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scope_coupling_soft_threshold_checks_every_scope_device_first(backend):
    # thresholds on another device than a later scope's weights: the first scope had been written
    a = _rand(4, 8)
    s1 = ScopeSpec(BlockSpec(a, (1, 2)), (1, 2))
    s2 = ScopeSpec(BlockSpec(torch.empty(4, 8, device="meta"), (1, 2)), (1, 2))
    before = a.clone()
    with use_backend(backend), pytest.raises(ValueError, match=r"^thresholds: on cpu but the weights of "
                                                               r"scopes\[1\]\.blocks\(\)\[0\] are on meta"):
        ScopeCoupling([s1, s2]).soft_threshold(torch.full((4, 2), 0.3))
    assert torch.equal(a, before)


def test_couple_scopes_refuses_a_repeated_scope_before_anything_is_registered():
    # it registered the coupling and consumed the scope, then raised KeyError('s') on the second deletion
    sb = SparsityBuilder().add_block(_rand(4, 8), (1, 2), "b").add_scope("b", (1, 2), "s")
    with pytest.raises(ValueError, match=r"^scope_names: a scope appears more than once"):
        sb.couple_scopes(["s", "s"], [(0, 1), (0, 1)], "c")
    assert list(sb._scopes) == ["s"] and not sb._scope_couplings
    sb.couple_scopes(["s"], [(0, 1)], "c")  # the builder is as it was: a valid call goes through
    assert list(sb._scope_couplings) == ["c"] and not sb._scopes


# --------------------------------------------------------------------------- golden


@pytest.mark.parametrize("bad, got", [(torch.arange(8), "a torch.strided torch.int64 tensor"), ([1.0] * 8, "list"),
                                      (_rand(8).to_sparse(), "a torch.sparse_coo torch.float32 tensor")])
def test_sparse_accumulator_names_the_bad_gradient(bad, got):
    # the errors named gather_segments' src[1] (or were an AttributeError), not the caller's grads['b']
    acc = SparseGradientAccumulator({"a": _rand(4, 4) > 0, "b": _rand(8, seed=1) > 0})
    acc.add({"a": _rand(4, 4, seed=2), "b": _rand(8, seed=3)})
    vals, steps = acc._flat.clone(), acc.steps
    with pytest.raises(TypeError, match=rf"^grads\['b'\]: expected a dense floating tensor, got {got}$"):
        acc.add({"a": _rand(4, 4, seed=4), "b": bad})
    assert torch.equal(acc._flat, vals) and acc.steps == steps


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(11, 8), nn.Linear(8, 11)

    def forward(self, input_ids, attention_mask=None):
        return self.fc(self.emb(input_ids))


@pytest.mark.parametrize("name", sorted(gr.STRATEGIES))
def test_failed_search_leaves_the_callers_strategy_as_it_was(name):
    # the strategy had been advanced by the chunks before the one whose gradient was NaN
    torch.manual_seed(0)
    model = _Tiny()
    batches = [{"input_ids": torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(i)), "i": i}
               for i in range(4)]

    def loss_fn(m, b):
        loss = m(b["input_ids"]).logsumexp(-1).mean()
        return loss * float("nan") if b["i"] == 2 else loss

    strat = gr.STRATEGIES[name](10.0, amplitude=0.5, seed=3)
    fresh = copy.deepcopy(strat)
    with pytest.raises(ValueError, match=r"^params: NaN gradient importance"):
        gr.reverse_golden_masks(model, batches, 10.0, strat, chunk_size=1, loss_fn=loss_fn, progress=False,
                                eval_batches=batches[:1])
    plain = {k: v for k, v in vars(fresh).items() if k != "_gen"}
    assert {k: v for k, v in vars(strat).items() if k != "_gen"} == plain
    assert torch.equal(strat._gen.get_state(), fresh._gen.get_state())
    # and it then runs a search exactly as a fresh instance does
    good = batches[:2]
    a = gr.reverse_golden_masks(model, good, 10.0, strat, chunk_size=1, loss_fn=loss_fn, progress=False)
    b = gr.reverse_golden_masks(model, good, 10.0, fresh, chunk_size=1, loss_fn=loss_fn, progress=False)
    assert a.history == b.history and all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
