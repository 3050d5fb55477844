"""Audit (s40) of gradkit.optim.MaskedAdamW, gradkit.parammap.ParamMap (save/load, prune ties, empty selections),
gradkit.golden_reverse argument checks and gradkit.cli exit statuses. Each test asserts values against plain
PyTorch or the documented behaviour; tests named ``*_fixed`` failed before this session's fixes."""
import io
import json
import os

import numpy as np
import pytest
import torch

import gradkit.golden_reverse as gr
import gradkit.parammap as pmmod
from gradkit import cli, ops
from gradkit.optim import MaskedAdamW
from gradkit.parammap import ParamMap


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()})


# --------------------------------------------------------------------------- MaskedAdamW


def test_mixed_dtype_step_refused_by_a_later_bucket_changes_nothing_fixed():
    """Fixed: with two (device, dtype) groups, the second fused call refusing its tensors (a gradient sharing memory
    with its parameter) left the first group's parameters stepped, with no state entered for them."""
    p1 = torch.nn.Parameter(torch.randn(4))
    p2 = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = MaskedAdamW({"a": p1, "b": p2}, {"a": torch.tensor([1, 0, 1, 0], dtype=torch.bool)},
                      masked_lr=1e-2, unmasked_lr=1e-3)
    g1 = torch.randn(4)
    p1.grad, p2.grad = g1.clone(), p2.detach()  # b's grad aliases b itself
    before = [p1.detach().clone(), p2.detach().clone()]
    with pytest.raises(ValueError, match="'b'"):
        opt.step()
    assert torch.equal(p1.detach(), before[0]) and torch.equal(p2.detach(), before[1])
    assert not any(opt.state[p] for p in (p1, p2))
    # once the gradient is a copy, the step is torch's, one parameter group at a time
    g2 = p2.detach().clone()
    p2.grad = g2.clone()
    opt.step()
    for p, b, g, lrs in ((p1, before[0], g1, torch.tensor([1e-2, 1e-3, 1e-2, 1e-3])), (p2, before[1], g2, None)):
        for i in range(4):
            lr = 1e-3 if lrs is None else float(lrs[i])
            r = torch.nn.Parameter(b[i:i + 1].clone())
            r.grad = g[i:i + 1].clone()
            torch.optim.AdamW([r], lr=lr, foreach=False).step()
            torch.testing.assert_close(p.detach()[i:i + 1], r.detach(), rtol=1e-6, atol=1e-7)
        assert opt.state[p]["step"].item() == 1.0


def test_parameters_viewing_one_flat_buffer_step_like_torch_across_dtype_groups():
    """Disjoint views of one buffer (flat-parameter layouts) are fine for the overlap rule, also when the step has
    several dtype groups (the up-front check runs element-wise there)."""
    flat, gflat = torch.randn(20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    q = torch.randn(3)
    mine = [torch.nn.Parameter(flat[:12].view(3, 4)), torch.nn.Parameter(flat[12:]),
            torch.nn.Parameter(q.clone())]
    ref = [torch.nn.Parameter(t.detach().clone()) for t in mine]
    opt = MaskedAdamW({"w": mine[0], "b": mine[1], "f": mine[2]}, None, masked_lr=5e-3, unmasked_lr=5e-3,
                      weight_decay=0.1)
    ropt = torch.optim.AdamW(ref, lr=5e-3, weight_decay=0.1, foreach=False)
    gq = torch.randn(3)
    for step in range(3):
        grads = [gflat[:12].view(3, 4) * (step + 1), gflat[12:] * (step + 1), gq * (step + 1)]  # grads: views too
        for p, r, g in zip(mine, ref, grads):
            p.grad, r.grad = g, g.clone()
        opt.step()
        ropt.step()
    for p, r in zip(mine, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(flat[12:], ref[1].detach(), rtol=1e-12, atol=1e-12)  # written through the view


def test_two_rates_amsgrad_maximize_and_skipped_steps_equal_torch_per_rate():
    g0 = torch.Generator().manual_seed(3)
    init = [torch.randn(3, 5, dtype=torch.float64, generator=g0), torch.randn(4, dtype=torch.float64, generator=g0)]
    mask = torch.rand(3, 5, generator=g0) < 0.4
    grads = [[torch.randn(3, 5, dtype=torch.float64, generator=g0),
              None if s == 1 else torch.randn(4, dtype=torch.float64, generator=g0)] for s in range(4)]
    kw = dict(betas=(0.8, 0.9), eps=1e-6, weight_decay=0.3, amsgrad=True, maximize=True)
    mine = [torch.nn.Parameter(t.clone()) for t in init]
    opt = MaskedAdamW({"w": mine[0], "b": mine[1]}, {"w": mask}, masked_lr=2e-2, unmasked_lr=1e-3, **kw)
    runs = {}
    for lr in (2e-2, 1e-3):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        o = torch.optim.AdamW(ps, lr=lr, foreach=False, **kw)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = None if g is None else g.clone()
            o.step()
        runs[lr] = ps
    for gs in grads:
        for p, g in zip(mine, gs):
            p.grad = None if g is None else g.clone()
        opt.step()
    want_w = torch.where(mask, runs[2e-2][0].detach(), runs[1e-3][0].detach())
    torch.testing.assert_close(mine[0].detach(), want_w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mine[1].detach(), runs[1e-3][1].detach(), rtol=1e-12, atol=1e-14)
    assert opt.state[mine[0]]["step"].item() == 4.0 and opt.state[mine[1]]["step"].item() == 3.0


def test_state_dict_masks_are_copies_and_round_trip_into_a_fresh_optimizer_fixed():
    """Fixed: state_dict()['masks'] were the optimizer's own packed tensors: an in-place edit of the dict changed
    the live optimizer's masks unchecked (bits past the last entry set: its own state_dict no longer loaded)."""
    torch.manual_seed(0)
    init = torch.randn(2, 5)
    mask = torch.rand(2, 5) < 0.5
    a = torch.nn.Parameter(init.clone())
    opt = MaskedAdamW({"a": a}, {"a": mask}, masked_lr=1e-2, unmasked_lr=0.0)
    a.grad = torch.randn(2, 5)
    opt.step()
    sd = opt.state_dict()
    sd["masks"]["a"].fill_(0xFF)
    assert torch.equal(opt.masks["a"], ops.pack_bitmask(mask))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    b = torch.nn.Parameter(a.detach().clone())
    fresh = MaskedAdamW({"a": b}, None, masked_lr=0.5, unmasked_lr=0.5)
    fresh.load_state_dict(loaded)
    g = torch.randn(2, 5)
    a.grad, b.grad = g.clone(), g.clone()
    a_before = a.detach().clone()
    opt.step()
    fresh.step()
    assert torch.equal(a.detach(), b.detach())
    assert torch.equal(a.detach()[~mask], a_before[~mask])  # unmasked rate 0 carried over with the mask
    assert fresh.state[b]["step"].item() == 2.0


def test_load_state_dict_with_corrupt_param_ids_is_a_value_error_changing_nothing_fixed():
    """Fixed: a param_groups 'params' list longer than the names (state for id 1 of one parameter) raised
    IndexError from inside load_state_dict."""
    a = torch.nn.Parameter(torch.randn(4))
    opt = MaskedAdamW({"a": a}, None, masked_lr=1e-2, unmasked_lr=1e-2)
    a.grad = torch.randn(4)
    opt.step()
    snap = _snapshot(opt, [a])
    for params, state_key in (([0, 1], 1), ([0, 0], 0), ([[0]], 0)):
        sd = opt.state_dict()
        sd["param_groups"][0]["params"] = params
        sd["state"] = {state_key: sd["state"][0]}
        with pytest.raises(ValueError, match="state_dict"):
            opt.load_state_dict(sd)
        now = _snapshot(opt, [a])
        assert torch.equal(now[0][0], snap[0][0])
        assert all(torch.equal(now[1][id(a)][k], v) for k, v in snap[1][id(a)].items())


def test_sparse_parameter_refused_at_construction_naming_it_fixed():
    """Fixed: a sparse COO parameter was accepted and only refused at the first step (its gradient is sparse)."""
    sp = torch.nn.Parameter(torch.randn(3, 4).to_sparse())
    with pytest.raises(TypeError, match=r"named_params\['emb'\].*sparse"):
        MaskedAdamW({"w": torch.nn.Parameter(torch.randn(2)), "emb": sp}, None, masked_lr=1e-2, unmasked_lr=1e-2)


def test_raising_closure_and_edited_group_change_nothing():
    a = torch.nn.Parameter(torch.randn(5))
    opt = MaskedAdamW({"a": a}, None, masked_lr=1e-2, unmasked_lr=1e-2)
    a.grad = torch.randn(5)

    def bad():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(bad)
    opt.param_groups[0]["weight_decay"] = -1.0
    with pytest.raises(ValueError, match="weight_decay"):
        opt.step()
    assert not opt.state[a]
    opt.param_groups[0]["weight_decay"] = 0.01
    with pytest.raises(ValueError, match="param_group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))]})


# --------------------------------------------------------------------------- ParamMap


def _pm():
    return ParamMap({"w": {"shape": (3, 4), "repr": "mask", "mask": torch.arange(12).reshape(3, 4) % 3 == 0},
                     "b": {"shape": (5,), "repr": "indices", "indices": torch.tensor([4, 0, 2])},
                     "z": {"shape": (6,), "repr": "mask", "mask": torch.zeros(6, dtype=torch.bool)}})


def _files(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


@pytest.mark.parametrize("where", ["safetensors", "config"])
def test_save_raising_midway_leaves_the_previous_map_intact(tmp_path, monkeypatch, where):
    d = str(tmp_path / "map")
    old = ParamMap({"w": {"shape": (3, 4), "repr": "all"}, "b": {"shape": (2,), "repr": "indices",
                                                                  "indices": torch.tensor([1])}})
    old.save(d)
    before = _files(d)
    real_st, real_dump = pmmod.write_safetensors, json.dump

    def st_boom(path, tensors):
        real_st(path, tensors)
        with open(path, "r+b") as f:  # a half-written file, then the failure
            f.truncate(8)
        raise OSError("disk full")

    def dump_boom(obj, f, **kw):
        f.write('{"mapping": ')
        raise OSError("disk full")

    if where == "safetensors":
        monkeypatch.setattr(pmmod, "write_safetensors", st_boom)
    else:
        monkeypatch.setattr(pmmod.json, "dump", dump_boom)
    with pytest.raises(OSError, match="disk full"):
        _pm().save(d)
    # a first save into a new directory that fails leaves no directory at all
    with pytest.raises(OSError, match="disk full"):
        _pm().save(str(tmp_path / "new"))
    monkeypatch.setattr(pmmod.json, "dump", real_dump)
    monkeypatch.setattr(pmmod, "write_safetensors", real_st)
    assert _files(d) == before
    assert sorted(os.listdir(tmp_path)) == ["map"]  # no staging directory left behind
    assert ParamMap.load(d) == old


def test_save_load_round_trip_with_empty_and_unsorted_entries(tmp_path):
    pm = _pm()
    pm.save(str(tmp_path))
    back = ParamMap.load(str(tmp_path))
    assert back == pm and back.names == ["w", "b", "z"] and back.counts == [4, 3, 0]
    src = {"w": torch.randn(3, 4), "b": torch.randn(5), "z": torch.randn(6)}
    want = torch.cat([src["w"].reshape(-1)[[0, 3, 6, 9]], src["b"][[4, 0, 2]]])
    assert torch.equal(back.gather(src), want)
    out = back.scatter(want)
    assert torch.equal(out["z"], torch.zeros(6)) and torch.equal(out["b"], torch.tensor(
        [src["b"][0], 0, src["b"][2], 0, src["b"][4]]))
    empty = ParamMap({})
    empty.save(str(tmp_path / "e"))
    e2 = ParamMap.load(str(tmp_path / "e"))
    assert e2 == empty and e2.input_dim == 0 and e2.gather({}).shape == (0,)


def test_load_refuses_pickled_selection_files_by_name(tmp_path):
    _pm().save(str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    torch.save({"L1": torch.tensor([4, 0, 2])}, tmp_path / "idx.pt")
    cfg["mapping"]["indices_file"] = "idx.pt"
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="indices_file.*never unpickles"):
        ParamMap.load(str(tmp_path))
    # pickle bytes under a .safetensors name (no checksum to catch it): refused as not safetensors
    cfg["mapping"]["indices_file"] = "mapping_indices.safetensors"
    cfg["mapping"]["gradkit"]["crc32"] = {}
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    os.replace(tmp_path / "idx.pt", tmp_path / "mapping_indices.safetensors")
    with pytest.raises(ValueError, match="mapping_indices.safetensors"):
        ParamMap.load(str(tmp_path))


def test_prune_threshold_and_topk_at_exact_ties():
    pm = ParamMap({"a": {"shape": (8,), "repr": "all"}})
    imp = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0, 2.0, 3.0, 2.0])
    _, kept = pm.prune(threshold=2.0, importance=imp)  # >= keeps every tie
    assert kept.tolist() == [1, 2, 3, 5, 6, 7]
    for k in range(1, 9):  # ties at the cut: lowest input position first (stable descending sort)
        _, kept = pm.prune(topk=k, importance=imp)
        want = sorted(torch.sort(imp, descending=True, stable=True).indices[:k].tolist())
        assert kept.tolist() == want
    _, kept = pm.prune(threshold=2.0, topk=2, importance=imp)
    assert kept.tolist() == [1, 6]  # 3.0, then the lowest-position 2.0 survivor
    with pytest.raises(ValueError, match="no input dimension is left"):
        pm.prune(threshold=3.5, topk=1, importance=imp)
    with pytest.raises(ValueError, match="remove every input dimension"):
        pm.prune(mask=torch.zeros(8, dtype=torch.bool))


# --------------------------------------------------------------------------- golden_reverse


class _LM(torch.nn.Module):
    def __init__(self, v=7, d=4):
        super().__init__()
        self.emb = torch.nn.Embedding(v, d)
        self.lin = torch.nn.Linear(d, v)

    def forward(self, ids, attention_mask=None):
        return self.lin(torch.tanh(self.emb(ids)))


def test_reverse_chunk_size_takes_numpy_ints_fixed():
    """Fixed: chunk_size=np.int64(2) was refused ("expected an int") while seed and percent take numpy scalars."""
    torch.manual_seed(0)
    m = _LM()
    batches = [{"input_ids": torch.randint(0, 7, (2, 5))} for _ in range(4)]
    a = gr.reverse_golden_masks(m, batches, 10.0, chunk_size=np.int64(2), progress=False, params=["lin.weight"])
    b = gr.reverse_golden_masks(m, batches, 10.0, chunk_size=2, progress=False, params=["lin.weight"])
    assert len(a.history) == 2 and torch.equal(a.masks["lin.weight"], b.masks["lin.weight"]) and a.kl == b.kl


def test_strategy_arguments_checked_by_name_fixed():
    """Fixed: seed=1.7 seeded with 1 silently, min_percent=True read as 1.0; np.float32 amplitude was refused while
    np.float64 passed."""
    with pytest.raises(ValueError, match="seed"):
        gr.ChaosDriven(10.0, seed=1.7)
    with pytest.raises(ValueError, match="min_percent"):
        gr.AdaptiveSinusoidal(10.0, min_percent=True)
    with pytest.raises(ValueError, match="max_percent"):
        gr.AdaptiveSinusoidal(10.0, max_percent="20")
    a = gr.ExplorationDecay(10.0, amplitude=np.float32(0.25), seed=np.int64(5))
    b = gr.ExplorationDecay(10.0, amplitude=0.25, seed=5)
    assert [a.next_percent(i, 0.01) for i in range(5)] == [b.next_percent(i, 0.01) for i in range(5)]


# --------------------------------------------------------------------------- cli


@pytest.mark.parametrize("code, status", [(False, 0), (True, 1)])
def test_cli_bench_bool_exit_codes_follow_python_fixed(monkeypatch, capsys, code, status):
    """Fixed: a runner ending with sys.exit(False) (``sys.exit(not ok)``) made `gradkit bench` print "False" and
    exit 1; Python exits 0 there (and 1, printing nothing, for True)."""
    def fake_run_path(path, run_name=None):
        raise SystemExit(code)

    monkeypatch.setattr(cli.runpy, "run_path", fake_run_path)
    assert cli.main(["bench"]) == status
    assert capsys.readouterr().err == ""


def test_cli_usage_errors_are_status_2_naming_the_problem(capsys):
    for argv, text in (([], "required: {bench,info}"), (["bogus"], "invalid choice: 'bogus'"),
                       (["info", "extra"], "unrecognized arguments: extra")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and text in err and "Traceback" not in err
