"""Session 35 audit of gradkit.golden_reverse (reverse-golden masks) and gradkit.cli against GoldenParams'
semantics and the project's docs. Every test here failed on the code before the fix it names."""
import math
import sys
import warnings

import numpy as np
import pytest
import torch

from gradkit import cli
from gradkit import golden as G
from gradkit import golden_reverse as gr
from gradkit.golden import percent_to_k


pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py


class _LM(torch.nn.Module):
    """A tiny language model: embedding, a 0-dim scale, an empty parameter (all used), a mixing matrix
    and a head, optionally tied to the embedding; ``unused`` takes no part in the forward."""

    def __init__(self, vocab=11, d=6, tie=False, unused=False, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, d, generator=g))
        self.scale = torch.nn.Parameter(torch.tensor(1.5))
        self.empty = torch.nn.Parameter(torch.zeros(0, 3))
        self.mix = torch.nn.Parameter(torch.randn(d, d, generator=g) / math.sqrt(d))
        self.head = torch.nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(vocab, d, generator=g))
        if tie:
            self.head.weight = self.emb
        if unused:
            self.unused = torch.nn.Parameter(torch.randn(5, 4, generator=g))

    def forward(self, input_ids, attention_mask=None):
        h = self.emb[input_ids] * self.scale + self.empty.sum()
        return self.head(torch.tanh(h @ self.mix) + h)


def _batches(n, seed=0, vocab=11):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (2, 5), generator=g)} for _ in range(n)]


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snap):
    return all(torch.equal(p.detach().view(torch.int32), snap[n].view(torch.int32))
               for n, p in model.named_parameters())


# ----------------------------------------------------------------------------- masks in GoldenParams' formats

def test_masked_kl_accepts_sparse_coo_and_maskset_masks():
    """Fixed: a sparse COO bool mask (GoldenParams' saved format) passed the mask check and then crashed inside
    zeroed_params with NotImplementedError (aten::index on SparseCPU); a MaskSet (golden_masks /
    load_goldenparams) was refused although the docs say masked_kl scores any mask."""
    model, evals = _LM(), _batches(2)
    g = torch.Generator().manual_seed(1)
    dense = {"mix": torch.rand(6, 6, generator=g) < 0.3, "head.weight": torch.rand(11, 6, generator=g) < 0.2}
    want = gr.masked_kl(model, dense, evals)
    assert want > 0
    snap = _snapshot(model)
    assert gr.masked_kl(model, {n: m.to_sparse() for n, m in dense.items()}, evals) == want
    assert gr.masked_kl(model, G.MaskSet(dense), evals) == want
    # float-valued sparse COO (stored non-zeros are set), as load_goldenparams reads them
    assert gr.masked_kl(model, {n: m.float().to_sparse() for n, m in dense.items()}, evals) == want
    with gr.zeroed_params(model, {"mix": dense["mix"].to_sparse()}):
        assert bool((model.mix.detach()[dense["mix"]] == 0).all())
        assert torch.equal(model.mix.detach()[~dense["mix"]], snap["mix"][~dense["mix"]])
    assert _same(model, snap)


def test_bad_sparse_mask_refused_before_any_write():
    model, evals = _LM(), _batches(1)
    snap = _snapshot(model)
    good = torch.ones(6, 6, dtype=torch.bool)
    wrong_shape = torch.ones(6, 5, dtype=torch.bool).to_sparse()
    with pytest.raises(ValueError, match=r"^masks\['head.weight'\]: shape \(6, 5\)"):
        with gr.zeroed_params(model, {"mix": good, "head.weight": wrong_shape}):
            pass
    with pytest.raises(ValueError, match=r"^masks: 'mix' needs a bool tensor"):
        gr.masked_kl(model, {"mix": torch.ones(6, 6)}, evals)  # a dense 0/1 float mask stays refused
    assert _same(model, snap)


# ----------------------------------------------------------------------------- tied parameters

def test_tied_parameter_alias():
    """Fixed: naming a tied weight by its second name (HF's lm_head.weight) was 'unknown parameter names'
    for params and for masks; masks now accept the alias, params says which name to use."""
    model, evals = _LM(tie=True), _batches(2)
    assert "head.weight" not in dict(model.named_parameters())
    mask = torch.rand(11, 6, generator=torch.Generator().manual_seed(2)) < 0.3
    assert gr.masked_kl(model, {"head.weight": mask}, evals) == gr.masked_kl(model, {"emb": mask}, evals) > 0
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"^params: 'head.weight' is tied to 'emb'"):
        gr.reverse_golden_masks(model, evals, 10.0, params=["head.weight", "mix"], progress=False)
    assert _same(model, snap)
    r = gr.reverse_golden_masks(model, evals, 10.0, chunk_size=2, progress=False)
    assert list(r.masks) == ["emb", "scale", "empty", "mix"] and r.no_grad == []


# ----------------------------------------------------------------------------- parameters without a gradient

def test_parameter_without_gradient_gets_no_mask():
    """Fixed: a selected parameter that the loss never reached got a 'golden' mask of its first k entries
    (importance all 0, ties by position); GoldenParams only masks parameters that received a gradient."""
    model, batches = _LM(unused=True), _batches(2)
    with pytest.warns(RuntimeWarning, match=r"received no gradient.*\['unused'\]"):
        r = gr.reverse_golden_masks(model, batches, 10.0, chunk_size=1, progress=False)
    assert r.no_grad == ["unused"] and "unused" not in r.masks and "unused" not in r.summary
    assert list(r.masks) == ["emb", "scale", "empty", "mix", "head.weight"]
    for n, m in r.masks.items():  # a 0-dim parameter keeps one entry, an empty one none
        assert int(m.sum()) == percent_to_k(m.numel(), 10.0) == r.summary[n]["active"], n
    assert int(r.masks["scale"]) == 1 and r.masks["empty"].shape == (0, 3)
    # the same search without the unused parameter gives the same masks and KL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r2 = gr.reverse_golden_masks(model, batches, 10.0, chunk_size=1, progress=False,
                                     params=[n for n in r.masks])
    assert r2.kl == r.kl and all(torch.equal(r2.masks[n], m) for n, m in r.masks.items())


def test_no_selected_parameter_with_gradient_is_an_error():
    model, batches = _LM(unused=True), _batches(2)
    strat = gr.ChaosDriven(10.0, seed=4)
    before = dict(vars(strat))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"^loss_fn: no selected parameter received a gradient"):
        gr.reverse_golden_masks(model, batches, 10.0, strat, params=["unused"], chunk_size=1, progress=False)
    assert _same(model, snap) and all(p.grad is None for p in model.parameters())
    assert vars(strat).keys() == before.keys() and strat.current == before["current"] \
        and strat.state == before["state"]


# ----------------------------------------------------------------------------- argument checks

def test_seed_numpy_int_accepted_and_out_of_range_named():
    """Fixed: np.int64 seeds were refused ('expected an int'); a seed beyond 64 bits raised torch's
    'Overflow when unpacking long long' without naming seed."""
    model, batches = _LM(), _batches(2)
    a = gr.reverse_golden_masks(model, batches, 10.0, "exploration_decay", seed=3, chunk_size=1, progress=False)
    b = gr.reverse_golden_masks(model, batches, 10.0, "exploration_decay", seed=np.int64(3), chunk_size=1,
                                progress=False)
    assert a.history == b.history and all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    for bad in (2 ** 64, -2 ** 63 - 1, 1.0, True):
        with pytest.raises(ValueError, match=r"^seed: "):
            gr.reverse_golden_masks(model, batches, 10.0, seed=bad, progress=False)


def test_model_that_is_not_a_module_is_a_type_error():
    """Fixed: a plain function as model gave AttributeError ('function' object has no attribute
    'named_parameters') from deep inside."""
    fn = lambda ids, attention_mask=None: torch.zeros(*ids.shape, 4)  # noqa: E731
    for call in (lambda: gr.reverse_golden_masks(fn, _batches(1), 10.0, progress=False),
                 lambda: gr.masked_kl(fn, {}, _batches(1))):
        with pytest.raises(TypeError, match=r"^model: expected a torch.nn.Module, got function"):
            call()


# ----------------------------------------------------------------------------- CLI

def test_cli_bench_help_is_the_runners(capsys):
    """Fixed: `gradkit bench --help` printed gradkit's own two-line usage (the top-level parser took -h), so
    the runner's options (--family, --quick, ...) were never shown."""
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--family" in out and "--quick" in out


def test_cli_info_refuses_stray_arguments(capsys):
    """Fixed: `gradkit info --bogus` ignored the argument and exited 0."""
    with pytest.raises(SystemExit) as e:
        cli.main(["info", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["demo"])
    assert e.value.code == 2


@pytest.mark.parametrize("code, status", [("bench failed: no GPU", 1), (3, 3), (None, 0), (0, 0)])
def test_cli_bench_exit_status_and_argv(monkeypatch, capsys, code, status):
    """Fixed: a runner exiting with a message (sys.exit("...")) crashed `gradkit bench` with ValueError
    (int("...")) and lost the message; sys.argv was left replaced after an in-process call."""
    seen = []

    def fake_run_path(path, run_name=None):
        seen.append(list(sys.argv))
        raise SystemExit(code)

    monkeypatch.setattr(cli.runpy, "run_path", fake_run_path)
    monkeypatch.setattr(sys, "argv", ["caller-argv", "--x"])
    assert cli.main(["bench", "--quick", "--family", "golden"]) == status
    assert sys.argv == ["caller-argv", "--x"]
    assert seen[0][1:] == ["--quick", "--family", "golden"] and seen[0][0].endswith("run.py")
    err = capsys.readouterr().err
    assert ("bench failed: no GPU" in err) == isinstance(code, str)
