"""One rule for boolean options (gradkit._rules.flag), float8 widening (_rules.widened), and obs_layout built on
BlockSpec.block_view.

* flag: a bool or numpy's bool_ (a Python bool back), anything else a TypeError naming the argument;
* every public site that uses it: np.bool_(b) gives exactly the result of b (outputs, files written, state), and
  "False" / 1 are refused by name before any work (weights, inputs, iterators, directories untouched);
* obs_layout's element table against one built here with plain loops from the view's (shape, stride, offset) and
  the block / scope grids (strided, transposed, sliced views; blocks spanning rows; empty weights);
* widened / all_finite on float8 with NaN / inf (bit patterns, not conversions), and golden's topk_mask on float8
  against its float32 copy.
"""
import contextlib
import io
import itertools
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradkit import _rules, ops
from gradkit import golden as G
from gradkit import golden_reverse as gr
from gradkit.index import GradientIndex
from gradkit.obs import baselines, metrics
from gradkit.obs.driver import collect_hessians, prune_model
from gradkit.obs.layout import obs_layout
from gradkit.obs.structured import StructuredOBS
from gradkit.optim import MaskedAdamW
from gradkit.scope import BlockSpec, ScopeSpec, View
from gradkit.testing import random_batches, tiny_gpt

pytestmark = pytest.mark.filterwarnings("ignore::gradkit.index.UncheckedProjectionWarning")

BAD = ["False", 1]


def _msg(name, v):
    return rf"^{name}: expected a bool, got {type(v).__name__} {re.escape(repr(v))}$"


# ============================================================================ 1. the rule itself


@pytest.mark.parametrize("v", [True, False, np.bool_(True), np.bool_(False), np.int64(3) == 3, np.array([1.0]) > 2])
def test_flag_accepts_bool_and_numpy_bool_as_python_bool(v):
    if isinstance(v, np.ndarray):  # a 1-element comparison: its element is numpy's bool_
        v = v[0]
    got = _rules.flag(v, "x")
    assert type(got) is bool and got == bool(v)


@pytest.mark.parametrize("v", ["False", "no", "", 1, 0, None, 1.0, 0.0, np.int64(1), torch.tensor(True),
                               torch.tensor(False), np.array(True), [True]],
                         ids=["str-False", "str-no", "str-empty", "int-1", "int-0", "None", "float-1", "float-0",
                              "np-int", "tensor-True", "tensor-False", "ndarray-0d", "list"])
def test_flag_refuses_everything_else_naming_the_argument(v):
    with pytest.raises(TypeError, match=_msg("my_option", v)):
        _rules.flag(v, "my_option")


def test_ops_flag_is_the_rule():
    assert ops._flag is _rules.flag


# ============================================================================ 2. every site
# A site: make(tmp) -> inputs; call(inp, v) -> a comparable result (for a progress flag: with whether a bar was
# drawn); _state(inp) -> a snapshot of every user datum (weights, inputs, iterators, files under tmp). ``differs``:
# True and False must give different results (the flag is read, and np.bool_(False) is not taken as True).


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, nn.Module):
        return {k: v.detach().clone() for k, v in x.state_dict().items()}
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _bits(t):
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def _eq(a, b):
    """Exact equality: tensors by dtype, shape and bits, containers by items, others by type and ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(_bits(a), _bits(b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _tree(root: Path):
    """Every file (its bytes) and directory under root."""
    out = {}
    for dp, dns, fns in os.walk(root):
        for d in dns:
            out[os.path.relpath(os.path.join(dp, d), root)] = "<dir>"
        for f in fns:
            p = os.path.join(dp, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def _bar(call):
    """call's result and whether it drew a progress bar (anything written to stderr)."""
    def wrapped(inp, v):
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            out = call(inp, v)
        return out, bool(buf.getvalue().strip())
    return wrapped


def _raised(fn):
    """fn()'s result, or ("raised", the exception's type name): a refusal must be the same for both values."""
    try:
        return fn()
    except AssertionError:
        raise
    except Exception as e:  # noqa: BLE001 - compared between the two calls
        return ("raised", type(e).__name__)


# ---------------------------------------------------------------- ops.obs_shared_prune(local)


def _shared_make(tmp):
    g = _gen(1)
    n, nq, E = 3, 2, 4
    K = nq * E
    w = torch.randn(n, K, generator=g)
    A = torch.randn(K, K, generator=g)
    c = A @ A.T / K + torch.eye(K)
    pidx = torch.tensor([[0, 1], [1, 3], [2, 3]], dtype=torch.int64)
    cols = torch.arange(nq)[:, None, None] * E + pidx[None]
    cs = c[cols[..., :, None], cols[..., None, :]].double()
    cinv = torch.linalg.inv(cs).float().contiguous()
    return {"w": w, "c": c, "cinv": cinv, "pidx": pidx}


def _shared_call(inp, v):
    return tuple(ops.obs_shared_prune(inp["w"], inp["c"], inp["cinv"], inp["pidx"], 4, v))


# ---------------------------------------------------------------- MaskedAdamW(maximize, amsgrad)


def _adam_make(tmp):
    g = _gen(2)
    params = {"p0": nn.Parameter(torch.randn(5, 3, generator=g)), "p1": nn.Parameter(torch.randn(4, generator=g))}
    grads = [{k: torch.randn(p.shape, generator=g) * s for k, p in params.items()} for s in (3.0, 0.1, 0.01)]
    return {"params": params, "masks": {"p0": torch.rand(5, 3, generator=g) > 0.5}, "grads": grads}


def _adam_call(which):
    def call(inp, v):
        opt = MaskedAdamW(list(inp["params"].items()), inp["masks"], masked_lr=1e-2, unmasked_lr=1e-3,
                          **{which: v})
        assert type(opt.param_groups[0][which]) is bool
        for gs in inp["grads"]:
            for k, p in inp["params"].items():
                p.grad = gs[k].clone()
            opt.step()
        return ({k: p.detach().clone() for k, p in inp["params"].items()},
                {k: sorted(opt.state[p]) for k, p in inp["params"].items()})
    return call


# ---------------------------------------------------------------- prune_model(sequential, resume, progress, early_stop)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        g = _gen(3)
        self.h = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        with torch.no_grad():
            for lin in self.h:
                lin.weight.copy_(torch.randn(8, 8, generator=g))
                lin.bias.copy_(torch.randn(8, generator=g))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        for lin in self.h:
            x = torch.tanh(lin(x))
        return x


def _prune_make(resume):
    def make(tmp):
        data = [torch.randn(16, 8, generator=_gen(4))]
        if resume:  # a finished run to resume from
            prune_model(_Net(), data, "2:4", progress=False, checkpoint_dir=str(tmp / "ck"))
        return {"model": _Net(), "data": data, "tmp": tmp}
    return make


def _prune_call(which):
    def call(inp, v):
        ck = inp["tmp"] / "ck"
        rep = prune_model(inp["model"], inp["data"], "2:4", checkpoint_dir=str(ck),
                          **{"progress": False, which: v})
        with open(ck / "progress.json") as fh:
            config = json.load(fh)["config"]
        return _clone(inp["model"]), [r.resumed for r in rep.layers], config
    return call


def _hessians_call(inp, v):
    h = collect_hessians(inp["model"], inp["data"], progress=v)
    return dict(h), dict(h.tokens)


# ---------------------------------------------------------------- metrics.resolve(progress), baselines, structured


def _w_make(tmp):
    g = _gen(5)
    W = torch.randn(4, 8, generator=g)
    X = torch.randn(32, 8, generator=g)
    return {"W": W, "H": X.T @ X, "out": torch.full((4, 8), 7.0)}


def _scope(W):
    return ScopeSpec(BlockSpec(W, (1, 1)), (1, 4))


def _resolve_call(inp, v):
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[:, ::3] = True
    res = metrics.resolve(inp["W"], inp["H"], mask, damp=0.01, out=inp["out"], progress=v)
    return res.clone(), inp["out"].clone()


def _baseline_call(method, which):
    def call(inp, v):
        W = inp["W"]
        if method == "magnitude":
            out = baselines.magnitude(_scope(W), 2, **{which: v})
        elif method == "obd":
            out = baselines.obd(_scope(W), inp["H"], 2, **{which: v})
        else:
            out = baselines.sparsegpt(_scope(W), inp["H"], 2, **{which: v})
        return _clone(out), W.clone()
    return call


def _structured_call(method):
    def call(inp, v):
        o = StructuredOBS(_scope(inp["W"]), inp["H"], damp=0.01)
        keep = o.prune(2, return_mask=v) if method == "prune" else o.prune_true_obs(2, return_mask=v)
        return _clone(keep), inp["W"].clone()
    return call


# ---------------------------------------------------------------- golden_masks, reverse_golden_masks


class _Draws:
    """An iterable of gradient samples that records how many were drawn."""

    def __init__(self, samples):
        self.samples, self.drawn = samples, 0

    def __iter__(self):
        for s in self.samples:
            self.drawn += 1
            yield s


def _golden_make(tmp):
    g = _gen(6)
    samples = [{"w": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g)} for _ in range(3)]
    return {"it": _Draws(samples), "samples": samples}


def _golden_call(which):
    def call(inp, v):
        res = G.golden_masks(inp["it"], 20.0, **{which: v})
        return ({k: res.masks[k].to_bool() for k in ("w", "b")}, res.counts, res.history, res.summary, res.samples)
    return call


class _LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = tiny_gpt(n_layer=1, d_model=16, n_head=2, seed=3)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return self.inner(input_ids, attention_mask)


def _reverse_make(tmp):
    return {"model": _LM(), "batches": random_batches(2, batch=2, seq=8, seed=0)}


def _reverse_call(inp, v):
    r = gr.reverse_golden_masks(inp["model"], inp["batches"], 10.0, chunk_size=2, progress=v)
    return r.masks, r.kl, r.history


# ---------------------------------------------------------------- GradientIndex


MODS = {"a": 3, "b": 2}


def _rows(n, seed):
    return torch.randn(n, 5, generator=_gen(seed))


def _index_make(existing=False, incomplete=False, writer=False):
    def make(tmp):
        if existing:
            with GradientIndex.create(tmp / "ix", MODS, dtype=torch.float32) as ix:
                ix.append(_rows(3, 7))
        if incomplete:
            ix = GradientIndex.create(tmp / "part", MODS, dtype=torch.float32)
            ix.append(_rows(4, 8))
            ix.append(_rows(2, 9), commit=False)
            del ix  # a crash: never closed
        inp = {"tmp": tmp}
        if writer:
            inp["ix"] = GradientIndex.create(tmp / "w", MODS, dtype=torch.float32)
        return inp
    return make


def _header(p):
    with open(p / "index.json") as fh:
        return json.load(fh)


def _create_call(which):
    def call(inp, v):
        path = inp["tmp"] / "ix"
        with GradientIndex.create(path, MODS, dtype=torch.float32, **{which: v}) as ix:
            assert type(ix.per_token) is bool
            ix.append(_rows(3, 10), **({"num_tokens": [1, 2]} if ix.per_token else {}))
        out = GradientIndex.open(path)
        return _header(path), out.get(range(len(out)))
    return call


def _append_call(inp, v):
    ix = inp["ix"]
    rows = ix.append(_rows(3, 11), commit=v)
    committed = _header(inp["tmp"] / "w")["count"]
    ix.close()
    return rows, committed, _header(inp["tmp"] / "w")["count"]


def _open_call(which):
    def call(inp, v):
        ix = GradientIndex.open(inp["tmp"] / ("part" if which == "allow_incomplete" else "ix"), **{which: v})
        return len(ix), ix.low_memory, ix.get(range(len(ix))), ix.search(_rows(2, 12), 2)
    return call


def _search_call(which):
    def call(inp, v):
        ix = GradientIndex.open(inp["tmp"] / "ix")
        q = torch.randn(2, 5, generator=_gen(13)) * torch.tensor([[1.0], [5.0]])
        return ix.search(q, 2, **{which: v})
    return call


def _search_make(tmp):
    with GradientIndex.create(tmp / "ix", MODS, dtype=torch.float32) as ix:
        x = _rows(6, 14)
        x[0] *= 20.0  # a long row: tops the inner product, not the cosine
        ix.append(x)
    return {"tmp": tmp}


def _state(inp):
    snap = {}
    for k, v in inp.items():
        if k == "tmp":
            snap[k] = _tree(v)
        elif k == "it":
            snap[k] = v.drawn
        elif k == "ix":
            snap[k] = len(v)
        elif k == "model":
            snap[k] = (_clone(v), v.calls)
        else:
            snap[k] = _clone(v)
    return snap


# (id, argument, make, call, differs, exception for a bad value)
SITES = [
    ("obs_shared_prune", "local", _shared_make, _shared_call, True, TypeError),
    ("MaskedAdamW", "maximize", _adam_make, _adam_call("maximize"), True, TypeError),
    ("MaskedAdamW", "amsgrad", _adam_make, _adam_call("amsgrad"), True, TypeError),
    ("prune_model", "sequential", _prune_make(False), _prune_call("sequential"), True, TypeError),
    ("prune_model", "resume", _prune_make(True), _prune_call("resume"), True, TypeError),
    ("prune_model", "progress", _prune_make(False), _bar(_prune_call("progress")), True, TypeError),
    ("prune_model", "early_stop", _prune_make(False), _prune_call("early_stop"), True, TypeError),
    ("collect_hessians", "progress", _prune_make(False), _bar(_hessians_call), True, TypeError),
    ("resolve", "progress", _w_make, _bar(_resolve_call), True, TypeError),
    ("magnitude", "inplace", _w_make, _baseline_call("magnitude", "inplace"), True, TypeError),
    ("obd", "inplace", _w_make, _baseline_call("obd", "inplace"), True, TypeError),
    ("sparsegpt", "inplace", _w_make, _baseline_call("sparsegpt", "inplace"), True, TypeError),
    ("sparsegpt", "progress", _w_make, _bar(_baseline_call("sparsegpt", "progress")), True, TypeError),
    ("sparsegpt", "return_mask", _w_make, _baseline_call("sparsegpt", "return_mask"), True, TypeError),
    ("StructuredOBS.prune", "return_mask", _w_make, _structured_call("prune"), True, TypeError),
    ("StructuredOBS.prune_true_obs", "return_mask", _w_make, _structured_call("true"), True, TypeError),
    ("golden_masks", "return_counts", _golden_make, _golden_call("return_counts"), True, TypeError),
    ("golden_masks", "progress", _golden_make, _bar(_golden_call("progress")), True, TypeError),
    ("reverse_golden_masks", "progress", _reverse_make, _bar(_reverse_call), True, ValueError),
    ("GradientIndex.create", "per_token", _index_make(), _create_call("per_token"), True, TypeError),
    ("GradientIndex.create", "resume", _index_make(existing=True), _create_call("resume"), True, TypeError),
    ("GradientIndex.create", "overwrite", _index_make(existing=True), _create_call("overwrite"), True, TypeError),
    ("GradientIndex.create", "distributed", _index_make(), _create_call("distributed"), True, TypeError),
    ("GradientIndex.append", "commit", _index_make(writer=True), _append_call, True, TypeError),
    ("GradientIndex.open", "low_memory", _index_make(existing=True), _open_call("low_memory"), True, TypeError),
    ("GradientIndex.open", "allow_incomplete", _index_make(incomplete=True), _open_call("allow_incomplete"), True,
     TypeError),
    ("GradientIndex.search", "unit_norm", _search_make, _search_call("unit_norm"), True, TypeError),
    ("GradientIndex.search", "reverse", _search_make, _search_call("reverse"), True, TypeError),
]
_IDS = [f"{s[0]}-{s[1]}" for s in SITES]


def _fresh(tmp_path, make, tag):
    d = tmp_path / tag
    d.mkdir()
    return make(d)


@pytest.mark.parametrize("site", SITES, ids=_IDS)
def test_numpy_bool_gives_the_bool_result(site, tmp_path):
    _, arg, make, call, differs, _exc = site
    got = {}
    for b in (True, False):
        inp_py, inp_np = _fresh(tmp_path, make, f"py-{b}"), _fresh(tmp_path, make, f"np-{b}")
        want = _raised(lambda: call(inp_py, b))
        have = _raised(lambda: call(inp_np, np.bool_(b)))
        assert _eq(have, want), f"{arg}=np.bool_({b}) gave another result than {arg}={b}"
        got[b] = want
    assert not all(isinstance(r, tuple) and r[:1] == ("raised",) for r in got.values()), got  # real work ran
    if differs:  # the flag is read (and np.bool_(False) is not taken as True)
        assert not _eq(got[True], got[False])


@pytest.mark.parametrize("site", SITES, ids=_IDS)
def test_bad_value_refused_by_name_before_any_work(site, tmp_path):
    _, arg, make, call, _differs, exc = site
    for i, bad in enumerate(BAD):
        inp = _fresh(tmp_path, make, f"bad-{i}")
        before = _state(inp)
        want = (_msg(arg, bad) if arg != "distributed"
                else rf"^distributed: expected a bool or None, got {type(bad).__name__}$")
        with pytest.raises(exc, match=want):
            call(inp, bad)
        assert _eq(_state(inp), before), f"{arg}={bad!r}: user data changed before the error"


def test_create_bad_flag_creates_no_directory(tmp_path):
    for arg in ("per_token", "resume", "overwrite", "distributed"):
        for bad in BAD:
            with pytest.raises(TypeError, match=rf"^{arg}: expected a bool"):
                GradientIndex.create(tmp_path / "new" / "ix", MODS, **{arg: bad})
            assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("arg", ["progress", "progress_fn"])
def test_structured_progress_takes_numpy_bool(arg):
    got = []
    for v in (False, np.bool_(False)):
        inp = _w_make(None)
        o = StructuredOBS(_scope(inp["W"]), inp["H"], damp=0.01)
        got.append((o.prune_true_obs(2, return_mask=True, **{arg: v}), inp["W"].clone()))
    assert _eq(got[0], got[1])


def test_masked_adamw_step_refuses_an_edited_group_flag_before_stepping():
    inp = _adam_make(None)
    opt = MaskedAdamW(list(inp["params"].items()), inp["masks"], masked_lr=1e-2, unmasked_lr=1e-3)
    for k, p in inp["params"].items():
        p.grad = inp["grads"][0][k].clone()
    before = _clone(inp["params"])
    for key in ("maximize", "amsgrad"):
        for bad in BAD:
            opt.param_groups[0][key] = bad
            with pytest.raises(TypeError, match=_msg(key, bad)):
                opt.step()
            assert _eq(_clone(inp["params"]), before) and not opt.state
        opt.param_groups[0][key] = np.bool_(False)  # a config array's value: taken as False
    opt.step()
    twin = _adam_make(None)
    ref = MaskedAdamW(list(twin["params"].items()), twin["masks"], masked_lr=1e-2, unmasked_lr=1e-3)
    for k, p in twin["params"].items():
        p.grad = twin["grads"][0][k].clone()
    ref.step()
    assert _eq(_clone(inp["params"]), _clone(twin["params"]))


# ============================================================================ 3. obs_layout against plain loops


def _expected_elems(view: View, block, scope):
    """(S, gs, bk) flat positions: scopes row-major over the scope grid, blocks row-major inside a scope, elements
    row-major inside a block; position = offset + sum(index * stride)."""
    shape, stride, off = view.shape, view.stride, view.offset
    grid = [n // b for n, b in zip(shape, block)]
    sgrid = [g // s for g, s in zip(grid, scope)]
    out = []
    for q in itertools.product(*[range(n) for n in sgrid]):
        blocks = []
        for loc in itertools.product(*[range(n) for n in scope]):
            elems = []
            for e in itertools.product(*[range(n) for n in block]):
                idx = [(qi * si + li) * bi + ei for qi, si, li, bi, ei in zip(q, scope, loc, block, e)]
                elems.append(off + sum(i * d for i, d in zip(idx, stride)))
            blocks.append(elems)
        out.append(blocks)
    return out


def _p(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed))


LAYOUTS = {
    # name: (param, view (shape, stride, offset) or None for the param itself, block shape, scope shape)
    "2:4": (_p(6, 8), None, (1, 1), (1, 4)),
    "2x2-blocks-span-rows": (_p(6, 8), None, (2, 2), (1, 2)),
    "3x1-blocks-column-scopes": (_p(6, 8), None, (3, 1), (2, 2)),
    "whole-rows": (_p(4, 6), None, (1, -1), (-1, 1)),
    "transposed": (_p(8, 6), ((6, 8), (1, 6), 0), (1, 4), (1, 2)),
    "transposed-2x2": (_p(8, 6), ((6, 8), (1, 6), 0), (2, 2), (3, 1)),
    "square-transposed": (_p(6, 6), ((6, 6), (1, 6), 0), (1, 3), (1, 2)),  # view shape == the param's
    "column-slice": (_p(6, 12), ((6, 8), (12, 1), 2), (1, 2), (1, 2)),
    "every-other-row": (_p(6, 12), ((3, 12), (24, 1), 12), (1, 3), (3, 2)),
    "strided-columns-transposed": (_p(8, 10), ((5, 4), (2, 20), 1), (1, 2), (5, 1)),
    "pairs": (_p(4, 32), "pairs", (1, 1, 1, 2), (1, 1, 4, 1)),
    "row-pairs": (_p(32, 16), "row_pairs", (1, 1, 1, 16), (1, 1, 2, 1)),
    "3-d-view": (_p(4, 12), ((4, 3, 4), (12, 1, 3), 0), (2, 1, 2), (1, 3, 1)),
    "no-rows": (_p(0, 8), None, (1, 1), (1, 4)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_obs_layout_matches_a_loop_built_position_table(name):
    param, v, block, scope = LAYOUTS[name]
    if v is None:
        view = View.from_existing(param)
    elif v == "pairs":
        view = View.pairs(param)
    elif v == "row_pairs":
        view = View.row_pairs(param)
    else:
        view = View(param, *v)
    spec = BlockSpec(view, block)
    sc = ScopeSpec(spec, scope)
    lay = obs_layout(sc)
    blk = spec.shape  # -1 resolved
    sshape = sc.shape
    want = _expected_elems(view, blk, sshape)
    gs, bk = math.prod(sshape), math.prod(blk)
    want_t = torch.tensor(want, dtype=torch.int64).reshape(len(want), gs, bk)
    assert lay.elems.dtype == torch.int64 and lay.elems.is_contiguous()
    assert torch.equal(lay.elems, want_t)
    M, K = param.shape
    assert (lay.M, lay.K, lay.S, lay.gs, lay.bk) == (M, K, len(want), gs, bk)
    assert lay.weight is param
    coupled = any(len({p // K for blk_ in s for p in blk_}) > 1 for s in want)
    assert lay.row_coupled is coupled
    if want:  # each position once, inside the parameter
        flat = [p for s in want for b in s for p in b]
        assert len(set(flat)) == len(flat) and 0 <= min(flat) and max(flat) < param.numel()
        assert torch.equal(lay.rows, want_t // K) and torch.equal(lay.cols, want_t % K)


def test_obs_layout_expected_cases_cover_what_they_claim():
    """The table above holds a strided view, blocks spanning rows and row-coupled scopes."""
    assert obs_layout(ScopeSpec(BlockSpec(View(LAYOUTS["transposed"][0], *LAYOUTS["transposed"][1]), (1, 4)),
                                (1, 2))).row_coupled
    assert obs_layout(ScopeSpec(BlockSpec(LAYOUTS["2x2-blocks-span-rows"][0], (2, 2)), (1, 2))).row_coupled
    assert not obs_layout(ScopeSpec(BlockSpec(LAYOUTS["2:4"][0], (1, 1)), (1, 4))).row_coupled


def test_obs_layout_of_a_float8_or_integer_weight():
    """Positions, not values: the weight's dtype plays no part (block_view of int offsets)."""
    for dt in (torch.float16, torch.float8_e4m3fn, torch.int8):
        w = torch.zeros(4, 8, dtype=dt)
        lay = obs_layout(ScopeSpec(BlockSpec(w, (1, 2)), (1, 2)))
        want = torch.tensor(_expected_elems(View.from_existing(w), (1, 2), (1, 2)), dtype=torch.int64)
        assert torch.equal(lay.elems, want.reshape(-1, 2, 2))


# ============================================================================ 4. float8: widened, all_finite, topk_mask


def _f8(bits, dtype):
    return torch.tensor(bits, dtype=torch.uint8).view(dtype)


# bit patterns: e4m3fn 0x7F / 0xFF NaN (no inf); e5m2 0x7C +inf, 0xFC -inf, 0x7E NaN; 0x38 / 0x3C are 1.0
F8 = {
    torch.float8_e4m3fn: {"one": 0x38, "bad": {"nan": 0x7F, "-nan": 0xFF}},
    torch.float8_e5m2: {"one": 0x3C, "bad": {"inf": 0x7C, "-inf": 0xFC, "nan": 0x7E}},
}


@pytest.mark.parametrize("dtype", list(F8), ids=str)
def test_widened_and_all_finite_on_float8(dtype):
    one = F8[dtype]["one"]
    assert float(_f8([one], dtype)[0].float()) == 1.0
    t = _f8([one, 0x00, 0x80, one | 0x80, 0x01], dtype)  # 1, +0, -0, -1, smallest subnormal
    w = _rules.widened(t)
    assert w.dtype == torch.float32 and torch.equal(w, t.float())
    assert torch.equal(torch.signbit(w), torch.tensor([False, False, True, True, False]))
    assert _rules.all_finite(t)
    assert _rules.all_finite(t.reshape(5, 1).expand(5, 3).t())  # strided
    for kind, bits in F8[dtype]["bad"].items():
        for pos in range(5):
            b = [one, 0x00, 0x80, one | 0x80, 0x01]
            b[pos] = bits
            bad = _f8(b, dtype)
            assert not _rules.all_finite(bad), (kind, pos)
            wb = _rules.widened(bad)
            want = {"inf": math.inf, "-inf": -math.inf}.get(kind)
            assert (math.isnan(float(wb[pos])) if want is None else float(wb[pos]) == want)
    assert _rules.all_finite(_f8([], dtype))


def test_widened_leaves_other_dtypes_alone_and_detaches():
    x = torch.randn(3, 4, requires_grad=True)
    w = _rules.widened(x)
    assert not w.requires_grad and w.dtype == torch.float32 and w.data_ptr() == x.data_ptr()
    for t in (torch.arange(6, dtype=torch.int8), torch.ones(3, dtype=torch.bool), torch.randn(3).half(),
              torch.randn(3, dtype=torch.bfloat16)):
        w = _rules.widened(t)
        assert w.dtype == t.dtype and w.data_ptr() == t.data_ptr()
    assert G.widened is _rules.widened  # golden scores through the one widening rule
    assert G.widened(_f8([0x38], torch.float8_e5m2)).dtype == torch.float32


@pytest.mark.parametrize("dtype", list(F8), ids=str)
@pytest.mark.parametrize("pct", [1.0, 10.0, 50.0, 100.0])
def test_topk_mask_of_float8_equals_its_float32_copy(dtype, pct):
    g = _gen(20)
    t = (torch.randn(37, 5, generator=g) * 4).to(dtype)  # coarse values: many ties
    flat = t.view(torch.uint8).reshape(-1)
    flat[[3, 50, 101]] = F8[dtype]["bad"]["nan"]
    for x in (t, t.t()):  # contiguous and transposed
        got = G.topk_mask(x, pct)
        want = G.topk_mask(x.float(), pct)
        assert got.dtype == torch.bool and got.shape == x.shape
        assert torch.equal(got, want)
        # oracle: the k largest |x| in row-major order, ties lowest position first, NaN never
        vals = x.float().reshape(-1).tolist()
        order = sorted((i for i, a in enumerate(vals) if a == a), key=lambda i: (-abs(vals[i]), i))
        oracle = torch.zeros(x.numel(), dtype=torch.bool)
        oracle[order[:G.percent_to_k(x.numel(), pct)]] = True
        assert torch.equal(got.reshape(-1), oracle)


def test_golden_masks_of_float8_gradients_equal_float32_ones():
    g = _gen(21)
    samples = [{"w": (torch.randn(9, 7, generator=g) * 3)} for _ in range(3)]
    f8 = [{"w": s["w"].to(torch.float8_e4m3fn)} for s in samples]
    f32 = [{"w": s["w"].float()} for s in f8]
    a = G.golden_masks(f8, 20.0, return_counts=True)
    b = G.golden_masks(f32, 20.0, return_counts=True)
    assert torch.equal(a.masks["w"].to_bool(), b.masks["w"].to_bool())
    assert torch.equal(a.counts["w"], b.counts["w"]) and a.history == b.history
