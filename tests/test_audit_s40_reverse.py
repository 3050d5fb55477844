"""Session-40 audit of gradkit.golden_reverse: masked KL against a plain float64 computation, exact mask
sizes, zeroed_params restoration (tied weights, fp16 / bf16, signed zeros / NaN payloads), the search left
clean after an exception at any forward call, dropout determinism, chunk_size invariance of the masks,
fluctuation-strategy arguments (NaN used to pin every proposal to min_percent silently), layer_filter name
checks and fp64 log-probs (used to be rounded to fp32)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from gradkit import golden_reverse as gr
from gradkit.golden import percent_to_k, topk_mask
from gradkit.testing import random_batches, tiny_gpt

_IV = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}
FC = "transformer.h.1.mlp.c_fc.weight"


pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py


def _snap(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def _same(m, s):
    return all(torch.equal(p.detach().view(_IV[p.dtype]), s[n].view(_IV[p.dtype])) for n, p in m.named_parameters())


def _kl64(model, masks, batches):
    """Mean over real tokens of sum_v p (log p - log q), log_softmax in float64 of both models' logits."""
    named = dict(model.named_parameters())
    tot, cnt = 0.0, 0
    with torch.no_grad():
        refs = [F.log_softmax(model(b["input_ids"], attention_mask=b.get("attention_mask")).double(), -1)
                for b in batches]
        saved = {n: named[n].clone() for n in masks}
        for n, mk in masks.items():
            named[n][mk] = 0
        for r, b in zip(refs, batches):
            q = F.log_softmax(model(b["input_ids"], attention_mask=b.get("attention_mask")).double(), -1)
            per = (r.exp() * (r - q)).sum(-1)
            am = b.get("attention_mask", torch.ones_like(b["input_ids"])).bool()
            tot += per[am].sum().item()
            cnt += int(am.sum())
        for n, v in saved.items():
            named[n].copy_(v)
    return tot / cnt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_kl_matches_float64_with_padding_excluded(dtype):
    m = tiny_gpt(seed=1, n_layer=2).to(dtype)
    bs = random_batches(2, batch=3, seq=8, seed=3)
    w = dict(m.named_parameters())[FC]
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    got, want = gr.masked_kl(m, {FC: mask}, bs), _kl64(m, {FC: mask}, bs)
    assert got == pytest.approx(want, rel=1e-5)
    # no attention_mask: every position counts
    nopad = [{"input_ids": b["input_ids"]} for b in bs]
    assert gr.masked_kl(m, {FC: mask}, nopad) == pytest.approx(_kl64(m, {FC: mask}, nopad), rel=1e-5)


def test_fp64_model_logprobs_stay_fp64_small_kl_exact():
    """Was: log_softmax forced to fp32, so an fp64 model's 3e-7 KL came out 6% off."""
    m = tiny_gpt(seed=1, n_layer=2).double()
    bs = random_batches(1, batch=2, seq=8, seed=3)
    assert gr.full_logprobs(m, bs[0]["input_ids"]).dtype == torch.float64
    assert gr.logprobs_for_fixed_ids(m, bs[0]["input_ids"]).dtype == torch.float64
    assert gr.full_logprobs(m.float(), bs[0]["input_ids"]).dtype == torch.float32
    m = tiny_gpt(seed=1, n_layer=2).double()
    mask = torch.zeros(dict(m.named_parameters())[FC].shape, dtype=torch.bool)
    mask.view(-1)[0] = True
    want = _kl64(m, {FC: mask}, bs)
    assert 0 < want < 1e-5
    assert gr.masked_kl(m, {FC: mask}, bs) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_zeroed_params_tied_overlapping_masks_restore_bitexact(dtype):
    m = tiny_gpt(seed=2, n_layer=1).to(dtype)
    m.lm_head.weight = m.transformer.wte.weight
    with torch.no_grad():
        m.transformer.wte.weight[0, :4] = torch.tensor([-0.0, float("nan"), float("inf"), 6e-8]).to(dtype)
    s = _snap(m)
    g = torch.Generator().manual_seed(1)
    sh = m.lm_head.weight.shape
    ma, mb = torch.rand(sh, generator=g) < 0.5, torch.rand(sh, generator=g) < 0.5
    ma[0, :4] = True
    mb[0, :2] = True
    with pytest.raises(KeyError):
        with gr.zeroed_params(m, {"lm_head.weight": ma, "transformer.wte.weight": mb}):
            z = m.lm_head.weight[ma | mb]
            assert (z == 0).all() and not torch.signbit(z).any()
            raise KeyError("inside")
    assert _same(m, s)


class _Boom(torch.nn.Module):
    def __init__(self, when):
        super().__init__()
        self.g, self.n, self.when = tiny_gpt(seed=3, n_layer=2), 0, when
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, ids, attention_mask=None):
        self.n += 1
        if self.n == self.when:
            raise RuntimeError("boom")
        return self.drop(self.g(ids, attention_mask=attention_mask))


@pytest.mark.parametrize("when", [1, 2, 3, 5, 8])
def test_search_exception_at_any_forward_leaves_everything_as_found(when):
    # 1 ref pass (eval = first chunk); per chunk of 1: a gradient pass, a scoring pass; 8 = the final scoring
    m = _Boom(when)
    m.g.transformer.h[0].eval()
    s, rng = _snap(m), torch.get_rng_state()
    strat = gr.MomentumBased(5.0, amplitude=0.5)
    before = copy.deepcopy(vars(strat))
    with pytest.raises(RuntimeError, match="boom"):
        gr.reverse_golden_masks(m, random_batches(3, batch=2, seq=8, seed=5), 5.0, strategy=strat, chunk_size=1,
                                progress=False, params=[f"g.{FC}"])
    assert _same(m, s) and torch.equal(rng, torch.get_rng_state())
    assert m.training and m.drop.training and not m.g.transformer.h[0].training and m.g.transformer.h[1].training
    assert strat.current == before["current"] and strat.velocity == before["velocity"]


def test_search_dropout_deterministic_sizes_and_kl_is_eval_mode_masked_kl():
    m = _Boom(-1)
    bs = random_batches(4, batch=2, seq=8, seed=5)
    names = [f"g.{FC}", "g.transformer.h.0.attn.c_attn.bias"]
    r1, r2 = (gr.reverse_golden_masks(m, bs, 7.3, chunk_size=2, progress=False, params=names) for _ in range(2))
    assert m.training and m.drop.training
    assert all(torch.equal(r1.masks[n], r2.masks[n]) for n in names) and r1.kl == r2.kl
    for n, mk in r1.masks.items():
        k = percent_to_k(mk.numel(), 7.3)
        assert int(mk.sum()) == k == math.ceil(mk.numel() * 0.073) and r1.summary[n]["active"] == k
    assert r1.kl == gr.masked_kl(m, r1.masks, bs[:2])  # default eval batches: the first chunk, eval mode
    assert r1.kl == pytest.approx(_kl64(m.eval(), r1.masks, bs[:2]), rel=1e-4)


def test_masks_independent_of_chunk_size_at_zero_amplitude_and_equal_topk_of_summed_abs_grad():
    m = tiny_gpt(seed=4, n_layer=2)
    bs = random_batches(4, batch=2, seq=8, seed=5)
    names = [FC, "transformer.h.0.attn.c_attn.weight"]
    acc = {n: torch.zeros_like(p) for n, p in m.named_parameters() if n in names}
    for b in bs:
        m.zero_grad()
        ids, am = b["input_ids"], b["attention_mask"].bool()
        logits = m(ids, attention_mask=b["attention_mask"])[:, :-1]
        t = ids[:, 1:].masked_fill(~(am[:, :-1] & am[:, 1:]), -100)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=-100).backward()
        for n, p in m.named_parameters():
            if n in names:
                acc[n] += p.grad.abs()
    m.zero_grad(set_to_none=True)
    for cs in (1, 3, 4, 10):
        r = gr.reverse_golden_masks(m, bs, 3.0, chunk_size=cs, amplitude=0.0, progress=False, params=names,
                                    eval_batches=bs[:1])
        assert all(h[1] == 3.0 for h in r.history) and len(r.history) == math.ceil(4 / cs)
        for n in names:
            assert torch.equal(r.masks[n], topk_mask(acc[n], 3.0)), (cs, n)
        assert r.kl == pytest.approx(_kl64(m, r.masks, bs[:1]), rel=1e-4)


@pytest.mark.parametrize("cls,kw,arg", [
    (gr.MomentumBased, dict(momentum=float("nan")), "momentum"),
    (gr.MomentumBased, dict(min_delta=float("nan")), "min_delta"),
    (gr.AdaptiveSinusoidal, dict(phase=float("nan")), "phase"),
    (gr.ExplorationDecay, dict(temperature=float("nan")), "temperature"),
    (gr.ExplorationDecay, dict(temperature=-1e-8), "temperature"),
    (gr.ExplorationDecay, dict(cooling=float("inf")), "cooling"),
    (gr.HarmonicOscillator, dict(k=float("nan")), "k"),
    (gr.HarmonicOscillator, dict(k=-1.0), "k"),
    (gr.HarmonicOscillator, dict(damping=float("inf")), "damping"),
    (gr.ChaosDriven, dict(r=float("nan")), "r"),
    (gr.ChaosDriven, dict(r=4.5), "r"),
    (gr.MomentumBased, dict(momentum="0.5"), "momentum"),
])
def test_strategy_own_arguments_checked(cls, kw, arg):
    """Was: NaN accepted and every proposal silently min_percent (k < 0: 'math domain error')."""
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        cls(10.0, **kw)


def test_nan_proposal_is_an_error_not_min_percent():
    s = gr.AdaptiveSinusoidal(10.0, amplitude=1e308)  # a overflows to inf, inf * sin(0) = NaN
    with pytest.raises(ValueError, match="NaN"):
        s.next_percent(0, 1.0)


@pytest.mark.parametrize("name", sorted(gr.STRATEGIES))
def test_strategy_schedule_bounded_and_deterministic_with_large_amplitude(name):
    def run():
        s = gr.STRATEGIES[name](10.0, amplitude=3.0, frequency=0.37, seed=7, min_percent=4.0, max_percent=13.0)
        return [s.next_percent(i, (-1) ** i * 0.01 * i) for i in range(40)]
    a = run()
    assert a == run() and all(4.0 <= x <= 13.0 for x in a)


def test_layer_filter_names_checked_and_floor_rule():
    names = [f"model.layers.{i}.w" for i in (0, 1, 2, 10, 11)] + ["model.embed.weight"]
    assert gr.layer_filter(names, 60) == names[2:5]   # floor(5 * 0.6) = 3 blocks, numeric order
    assert gr.layer_filter(names, 39.99) == names[4:5]  # floor(1.9995) = 1
    assert gr.layer_filter(names, 1) == names[4:5]  # at least one
    m = tiny_gpt(n_layer=2)
    with pytest.raises(ValueError, match="^names:"):
        gr.layer_filter(m.named_parameters(), 50)  # (name, param) tuples: was a bare re TypeError
    with pytest.raises(ValueError, match="^names:"):
        gr.layer_filter("transformer.h.1.attn.c_attn.weight", 50)
