"""Audit of the two long-running drivers: gradkit.obs.driver.prune_model (bad input refused before
any work, resume refusing checkpoints of another model before touching it, SIGKILL mid-write,
GPT-2 Conv1D and tied heads, dtype overflow, failure reports) and
gradkit.golden_reverse.reverse_golden_masks (determinism with dropout, argument checks, infinite
and NaN KL)."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from gradkit import golden_reverse as gr
from gradkit.obs import baselines
from gradkit.obs.driver import CheckpointError, collect_hessians, prune_model
from gradkit.scope import BlockSpec, ScopeSpec
from gradkit.testing import random_batches, tiny_gpt
from test_audit_obs import _Three  # h.2 sees one feature 8 times: H of rank 1, not positive definite at damp=0
import test_obs_driver as _od
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    cur = model.state_dict()
    return set(cur) == set(snap) and all(torch.equal(cur[k], snap[k]) for k in snap)


class _Interrupt(Exception):
    pass


def _stop_after(n):
    done = []

    def cb(rep):
        done.append(rep.name)
        if len(done) == n:
            raise _Interrupt()
    return cb


# ============================================================================ prune_model: bad input


class _Misfit(nn.Module):
    """The last layer has 6 input features: '2:4' cannot apply to it."""

    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList([nn.Linear(8, 8, bias=False), nn.Linear(8, 6), nn.Linear(6, 4)])
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        for lin in self.h:
            x = torch.tanh(lin(x))
        return x


def test_nm_misfit_in_a_late_layer_is_refused_before_any_work(tmp_path):
    # before: h.0 and h.1 were pruned into the model, then h.2 raised "pattern '2:4': ..."
    torch.manual_seed(0)
    net = _Misfit()
    snap = _state(net)
    ck = tmp_path / "ck"
    with pytest.raises(ValueError, match=r"^pattern: '2:4': layer 'h\.2' has 6 input features, not a multiple of 4$"):
        prune_model(net, [torch.randn(16, 8)], "2:4", progress=False, checkpoint_dir=str(ck))
    assert net.calls == 0 and _same(net, snap) and not ck.exists()


def test_bad_device_and_method_kwargs_name_the_argument():
    torch.manual_seed(0)
    net = _Misfit()
    snap = _state(net)
    with pytest.raises(ValueError, match=r"^device: expected None or a torch device, got 'nope'"):
        prune_model(net, [torch.randn(16, 8)], "2:4", modules=["h.0"], device="nope", progress=False)
    with pytest.raises(TypeError, match=r"^method_kwargs: expected a dict, got int$"):
        prune_model(net, [torch.randn(16, 8)], "2:4", modules=["h.0"], method_kwargs=5, progress=False)
    assert net.calls == 0 and _same(net, snap)
    # a pattern callable's errors start with "pattern: " too (before: "pattern('h.0'): ...")
    with pytest.raises(ValueError, match=r"^pattern: the ScopeSpec for layer 'h\.0' must be built on the weight"):
        prune_model(net, [torch.randn(16, 8)], lambda n, w: ScopeSpec(BlockSpec(w.clone(), (1, 1)), (1, 4)), nnz=2,
                    modules=["h.0"], progress=False)
    assert _same(net, snap)


# ============================================================================ prune_model: resume


def _gpt(seed=0):
    return tiny_gpt(n_layer=2, d_model=32, seed=seed)


def _resumes_to_the_uninterrupted_result(ck, data, n_done):
    """A fresh model resumed from checkpoint ``ck`` takes its first ``n_done`` of 9 layers from it and ends
    bit for bit where an uninterrupted run ends."""
    ref = _gpt()
    prune_model(ref, data, progress=False)
    model = _gpt()
    rep = prune_model(model, data, checkpoint_dir=ck, progress=False)
    assert [r.resumed for r in rep.layers] == [i < n_done for i in range(9)]
    assert _same(model, _state(ref))


def test_resume_refuses_a_model_that_differs_outside_the_pruned_layers(tmp_path):
    # same Linear weights, another token embedding: before, the checkpoint was accepted and the
    # resumed model mixed layers pruned on the old embedding's inputs with ones pruned on the new
    data = random_batches(3, batch=4, seq=16, seed=0)
    ck = str(tmp_path / "ck")
    with pytest.raises(_Interrupt):
        prune_model(_gpt(), data, checkpoint_dir=ck, callback=_stop_after(5), progress=False)
    other = _gpt()
    with torch.no_grad():
        other.transformer.wte.weight.add_(0.5)
    snap = _state(other)
    with pytest.raises(CheckpointError, match=r"outside the pruned layers \(parameters \['transformer\.wte\.weight'\]"):
        prune_model(other, data, checkpoint_dir=ck, progress=False)
    assert _same(other, snap)
    # the right model still resumes, to exactly the uninterrupted result
    _resumes_to_the_uninterrupted_result(ck, data, 5)


def test_corrupt_late_layer_file_is_refused_before_the_model_is_modified(tmp_path):
    # before: group transformer.h.0 was loaded into the model, then h.1's file raised "corrupt"
    data = random_batches(3, batch=4, seq=16, seed=0)
    ck = str(tmp_path / "ck")
    prune_model(_gpt(), data, checkpoint_dir=ck, progress=False)
    with open(os.path.join(ck, "progress.json")) as fh:
        entry = json.load(fh)["layers"]["transformer.h.1.mlp.c_fc"]
    path = os.path.join(ck, entry["file"])
    with open(path, "rb") as fh:
        raw = bytearray(fh.read())
    raw[-5] ^= 0x10
    with open(path, "wb") as fh:
        fh.write(bytes(raw))
    model = _gpt()
    snap = _state(model)
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc.*corrupt"):
        prune_model(model, data, checkpoint_dir=ck, progress=False)
    assert _same(model, snap)


_CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    import gradkit._io as io
    from gradkit.obs.driver import prune_model
    from gradkit.testing import random_batches, tiny_gpt
    torch.set_num_threads(1)
    real, n = io.write_safetensors, [0]

    def dying(path, tensors):  # the 4th layer file: half written, then the process is killed
        n[0] += 1
        if n[0] == 4:
            with open(path, "wb") as f:
                f.write(b"\\0" * 100)
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, tensors)

    io.write_safetensors = dying
    prune_model(tiny_gpt(n_layer=2, d_model=32), random_batches(3, batch=4, seq=16, seed=0),
                checkpoint_dir=sys.argv[1], progress=False)
""")


def test_sigkill_mid_write_then_resume_equals_uninterrupted_and_leaves_no_temporaries(tmp_path):
    # before: the half-written .tmp-* file of the killed run stayed in the checkpoint directory
    ck = str(tmp_path / "ck")
    proc = subprocess.run([sys.executable, "-c", _CHILD, ck], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert any(f.startswith(".tmp-") for f in os.listdir(ck))  # what the kill left behind
    with open(os.path.join(ck, "progress.json")) as fh:
        assert len(json.load(fh)["layers"]) == 3  # progress.json is whole and lists the 3 finished layers
    data = random_batches(3, batch=4, seq=16, seed=0)
    _resumes_to_the_uninterrupted_result(ck, data, 3)
    assert not [f for f in os.listdir(ck) if f.startswith(".tmp-")]


# ============================================================================ prune_model: GPT-2, dtypes, failures


def _gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_layers_are_pruned_and_the_tied_head_is_refused(tmp_path):
    # before: Conv1D layers were silently skipped, only lm_head was pruned, and since it is tied
    # to transformer.wte the token embedding was silently pruned with it
    g = _gpt2()
    data = [{"input_ids": torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(i))}
            for i in range(3)]
    snap = _state(g)
    with pytest.raises(ValueError, match=r"^modules: the weight of 'lm_head' is tied to the parameter "
                                         r"'transformer\.wte\.weight'"):
        prune_model(g, data, progress=False)
    assert _same(g, snap)
    dense = _gpt2()
    H = collect_hessians(dense, data, modules="transformer.h.0.*", progress=False)
    assert sorted(H) == sorted(f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    ck = str(tmp_path / "ck")
    with pytest.raises(_Interrupt):
        prune_model(g, data, modules="transformer.h.*", checkpoint_dir=ck, callback=_stop_after(3), progress=False)
    rep = prune_model(g, data, modules="transformer.h.*", checkpoint_dir=ck, progress=False)  # resumed
    assert len(rep.layers) == 8 and [r.resumed for r in rep.layers] == [i < 3 for i in range(8)]
    assert rep["transformer.h.0.mlp.c_proj"].shape == (32, 128)  # reported as (out, in)
    w = dense.transformer.h[0].attn.c_attn.weight.detach().T.contiguous()  # Conv1D stores (in, out)
    want = baselines.sparsegpt(ScopeSpec(BlockSpec(w, (1, 1)), (1, 4)), H["transformer.h.0.attn.c_attn"], 2,
                               damp=0.01)
    assert torch.equal(g.transformer.h[0].attn.c_attn.weight.detach(), want.T)
    for blk in g.transformer.h:
        for conv in (blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj):
            wt = conv.weight.detach().T  # 2:4 along the inputs
            assert int((wt != 0).reshape(wt.shape[0], -1, 4).sum(-1).max()) == 2
    assert torch.equal(g.transformer.wte.weight, snap["transformer.wte.weight"])
    assert torch.equal(g.lm_head.weight, snap["lm_head.weight"])


def test_fp16_overflow_of_the_pruned_weights_is_refused_not_written():
    # 4 perfectly correlated inputs: SparseGPT moves the 2 pruned weights onto the 2 kept ones,
    # 2 * 6e4 > 65504; before, the layer was silently written back as inf
    net = nn.Sequential(nn.Linear(4, 2, bias=False)).half()
    with torch.no_grad():
        net[0].weight.fill_(6.0e4)
    x = torch.randn(32, 1, generator=torch.Generator().manual_seed(0)).repeat(1, 4).half()
    snap = _state(net)
    with pytest.raises(RuntimeError, match=r"^sparsegpt: the pruned weights of layer '0' overflow the layer's dtype "
                                           r"torch\.float16") as ei:
        prune_model(net, [x], "2:4", progress=False)
    assert _same(net, snap)
    assert any("no layer of the model was modified" in n for n in ei.value.__notes__)


def test_failure_note_reports_what_the_model_and_checkpoint_hold(tmp_path):
    # before, the note only said that the failing group was not written into the model
    torch.manual_seed(0)
    net = _Three()
    ck = str(tmp_path / "ck")
    with pytest.raises(ValueError, match="^hessian: ") as ei:
        prune_model(net, [torch.randn(16, 8)], "2:4", method="true_obs", damp=0.0, progress=False, checkpoint_dir=ck)
    note = [n for n in ei.value.__notes__ if n.startswith("prune_model:")]
    assert len(note) == 1
    assert "the model holds the 2 pruned layer(s) of the groups finished before it ('h.0' ... 'h.1')" in note[0]
    assert "the checkpoint holds 2 finished layer(s)" in note[0]


# ============================================================================ reverse_golden_masks


class _DropoutLM(nn.Module):
    """Embedding -> dropout -> head, left in training mode: the gradient passes draw dropout masks."""

    def __init__(self):
        super().__init__()
        g = tiny_gpt(n_layer=1, seed=3)
        self.wte, self.head, self.drop = g.transformer.wte, g.lm_head, nn.Dropout(0.3)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return self.head(self.drop(self.wte(input_ids)))


def test_reverse_golden_same_seed_same_masks_with_dropout_and_global_rng_untouched():
    # before: dropout drew from the global RNG, so two identical calls gave different masks
    batches = random_batches(6, seed=0)
    model = _DropoutLM()
    state = torch.get_rng_state()
    r1 = gr.reverse_golden_masks(model, batches, 5.0, chunk_size=2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    r2 = gr.reverse_golden_masks(model, batches, 5.0, chunk_size=2, progress=False)
    assert set(r1.masks) == set(r2.masks)
    assert all(torch.equal(r1.masks[n], r2.masks[n]) for n in r1.masks)
    assert r1.history == r2.history and r1.kl == r2.kl
    r3 = gr.reverse_golden_masks(model, batches, 5.0, chunk_size=2, progress=False, seed=1)
    assert any(not torch.equal(r1.masks[n], r3.masks[n]) for n in r1.masks)  # the seed drives dropout
    for n, m in r1.masks.items():
        assert int(m.sum()) == gr._golden().percent_to_k(m.numel(), 5.0)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(seed="x"), r"^seed: expected an int, got 'x'$"),
    (dict(seed=1.5), r"^seed: expected an int, got 1\.5$"),
    (dict(loss_fn=3), r"^loss_fn: expected None or a callable"),
    (dict(progress="yes"), r"^progress: expected a bool, got str 'yes'$"),
])
def test_reverse_golden_bad_arguments_name_the_argument_before_any_forward(kwargs, msg):
    model = _DropoutLM()
    snap = _state(model)
    with pytest.raises(ValueError, match=msg):
        gr.reverse_golden_masks(model, random_batches(2, seed=0), 5.0, **{"progress": False, **kwargs})
    assert model.calls == 0 and _same(model, snap)


class _LogAbs(nn.Module):
    """logits = log|E[id]| (or E/E for nan=True): zeroing an entry gives -inf (or NaN) logits."""

    def __init__(self, nan=False):
        super().__init__()
        self.e = nn.Parameter(torch.rand(7, 7, generator=torch.Generator().manual_seed(0)) + 0.5)
        self.nan = nan

    def forward(self, input_ids, attention_mask=None):
        e = self.e[input_ids]
        return torch.log(e.abs()) + (e / e.detach() - 1 if self.nan else 0)


def _ids(n):
    return [{"input_ids": torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(i))} for i in range(n)]


def test_reverse_golden_infinite_kl_is_no_improvement_not_nan():
    # before: the second infinite KL gave improvement inf - inf = NaN and the search raised
    # "improvement: NaN"
    model = _LogAbs()
    snap = _state(model)
    r = gr.reverse_golden_masks(model, _ids(4), 10.0, chunk_size=1, progress=False)
    assert r.kl == float("inf") and [kl for _, _, kl in r.history] == [float("inf")] * 4
    assert int(r.masks["e"].sum()) == gr._golden().percent_to_k(49, 10.0) == 5  # ceil(4.9): GoldenParams' count
    assert _same(model, snap)


def test_reverse_golden_nan_kl_names_the_model():
    # before: "improvement: NaN", naming an argument the caller never passed
    model = _LogAbs(nan=True)
    snap = _state(model)
    with pytest.raises(ValueError, match=r"^model: the KL of the iteration-0 candidate \(10%\) is NaN"):
        gr.reverse_golden_masks(model, _ids(2), 10.0, chunk_size=1, progress=False)
    assert _same(model, snap)


# ------------------------------------------------------------------ prune_model: callable identity in checkpoints


def _keep_pattern(n, m):
    """A pattern callable: n of every m consecutive inputs of each row (closure over n, m)."""
    def pattern(name, w):
        return ScopeSpec(BlockSpec(w, (1, 1)), (1, m)), n
    return pattern


def test_resume_refuses_another_callable_under_the_same_name(tmp_path):
    """A checkpoint used to record a pattern / groups callable by module.qualname only: every lambda, and every
    closure made by one factory, looked the same, so a resumed run with another pattern mixed layers pruned two
    ways. Now its code, defaults and closure values are digested; the same callable (or an equal one made
    again) still resumes."""
    from gradkit.obs.driver import _identity_of

    a, b, a2 = _keep_pattern(2, 4), _keep_pattern(1, 4), _keep_pattern(2, 4)
    assert _identity_of(a) == _identity_of(a2) != _identity_of(b)
    assert _identity_of(a).startswith("callable:test_audit_drivers._keep_pattern.<locals>.pattern#")
    f, g = (lambda name: name.split(".")[1]), (lambda name: name.split(".")[2])
    assert _identity_of(f) != _identity_of(g)
    t1, t2 = torch.zeros(3), torch.ones(3)
    assert _identity_of(lambda n, t=t1: n) != _identity_of(lambda n, t=t2: n)
    assert _identity_of(lambda n, s={"x", "y", "z"}: n) == _identity_of(lambda n, s={"z", "y", "x"}: n)

    data = _od._data(3)
    ck = str(tmp_path / "ck")
    model = _od._model()
    prune_model(model, data, pattern=a, checkpoint_dir=ck, progress=False, sequential=False)
    done = _od._weights(model)
    model = _od._model()
    before = _od._weights(model)
    with pytest.raises(CheckpointError, match="different configuration.*pattern"):
        prune_model(model, data, pattern=b, checkpoint_dir=ck, progress=False, sequential=False)
    assert all(torch.equal(_od._weights(model)[n], before[n]) for n in before)
    model = _od._model()
    prune_model(model, data, pattern=a2, checkpoint_dir=ck, progress=False, sequential=False)  # resumes
    assert all(torch.equal(_od._weights(model)[n], done[n]) for n in done)
