"""Audit (s39, second pass) of gradkit.projection.GradientCollector: OPTIONS and WORKFLOWS rather than model families.

Reuses the reference helpers of test_audit_s39_collector.py (per-example backward, real weight gradient, explicit
float64 projection). Per-token references are built from the module's own input ``a`` and output gradient ``g``
(captured with plain hooks on an un-hooked copy): row (b, t) = vec(L g_bt a_bt^T R^T), the docstring's definition,
with the mask applied and the ones column appended for ``bias=True``. Normalised references divide the explicit
per-example (per-token) gradient elementwise by sqrt(V) (Adafactor's rank-one V, bias column by
sqrt(bias_avg_sq + bias_eps)) or by sqrt(v) + eps (Adam).

No case below is marked ``# DEFECT:``: every option / workflow checked gave the per-example projected gradients
(or was refused by name). ``test_two_forwards_one_backward_sums_rows_position_by_position`` documents a hazard
(gradient accumulation over two different micro-batches before one backward sums row b of each), see its comment.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.index import GradientIndex
from gradkit.projection import (AdafactorNormalizer, AdamNormalizer, GradientCollector, derive_seed,
                                projection_matrix)
from test_audit_s39_collector import P, SEED, VOCAB, assert_rows, reference, untied

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------- helpers
class Net(nn.Module):
    """Token-wise MLP (no mixing between positions): per-token rows are each token's own loss gradient."""

    def __init__(self, V=20, H=6):
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.l1 = nn.Linear(H, 8)
        self.l2 = nn.Linear(8, 5)

    def forward(self, input_ids):
        return self.l2(torch.tanh(self.l1(self.emb(input_ids))))


def net_data():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 20, (3, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 0, 0]])
    return ids, mask


def net_loss(model, ids, mask):
    return (model(ids).sin().sum(-1) * mask).sum()  # a per-token loss, summed over real tokens and examples


def capture(model, names, loss, seq_first=(), bt=None):
    """{name: (a (B, T, I), g (B, T, O))} float64 from a plain backward (the model must not be hooked)."""
    mods, caps, hs = dict(model.named_modules()), {}, []
    for n in names:
        def hook(m, i, o, n=n):
            o.retain_grad()
            caps[n] = (i[0].detach(), o)
        hs.append(mods[n].register_forward_hook(hook))
    model.zero_grad(set_to_none=True)
    loss().backward()
    model.zero_grad(set_to_none=True)
    for h in hs:
        h.remove()
    out = {}
    for n, (a, o) in caps.items():
        g = o.grad
        if n in seq_first:
            a, g = a.transpose(0, 1), g.transpose(0, 1)
        if a.dim() == 2:  # (B * T, I) flattened tokens
            a, g = a.reshape(*bt, -1), g.reshape(*bt, -1)
        out[n] = (a.double(), g.double())
    return out


def token_grads(a, g, bias=False, mask=None):
    """(B, T, O, I(+1)) per-token gradients g_bt a_bt^T (masked positions zero)."""
    if bias:
        a = torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], -1)
    if mask is not None:
        m = mask.double()[..., None]
        a, g = a * m, g * m
    return torch.einsum("bto,bti->btoi", g, a)


def project(G, name):
    """(..., O, I) -> (..., p*p): vec(L G R^T) with the collector's matrices, float64."""
    L = projection_matrix(P, G.shape[-2], seed=derive_seed(SEED, name, "left")).double()
    R = projection_matrix(P, G.shape[-1], seed=derive_seed(SEED, name, "right")).double()
    return (L @ G @ R.T).reshape(*G.shape[:-2], P * P)


def per_token_reference(caps, bias=False, mask=None):
    return {n: project(token_grads(a, g, bias, mask), n) for n, (a, g) in caps.items()}


def normalised(G, nz, bias):
    """G (..., O, I(+1)) divided as the normaliser defines it."""
    Gw, Gb = (G[..., :-1], G[..., -1:]) if bias else (G, None)
    if isinstance(nz, AdafactorNormalizer):
        r, c = nz.row.double() + nz.eps, nz.col.double() + nz.eps
        Gw = Gw / (torch.outer(r, c) / r.mean()).sqrt()
        if Gb is not None and nz.bias_avg_sq is not None:
            Gb = Gb / (nz.bias_avg_sq.double() + nz.bias_eps).sqrt()[:, None]
    else:
        Gw = Gw / (nz.v.double().sqrt() + nz.eps)
        if Gb is not None and nz.bias_avg_sq is not None:
            Gb = Gb / (nz.bias_avg_sq.double().sqrt() + nz.eps)[:, None]
    return Gw if Gb is None else torch.cat([Gw, Gb], -1)


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=24, num_hidden_layers=1, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return OPTForCausalLM(cfg).eval()


def opt_token_loss(model, ids, am):
    lg = model(input_ids=ids, attention_mask=am).logits
    tok = F.cross_entropy(lg.reshape(-1, VOCAB), ids.reshape(-1), reduction="none").view(ids.shape)
    return (tok * am).sum()


def opt_lm_losses(model, batch):
    ids, am = batch["input_ids"], batch["am"]
    lg = model(input_ids=ids, attention_mask=am).logits
    tgt = ids[:, 1:].masked_fill((am[:, 1:] == 0) | (am[:, :-1] == 0), -100)
    tok = F.cross_entropy(lg[:, :-1].reshape(-1, VOCAB), tgt.reshape(-1), ignore_index=-100, reduction="none")
    return tok.view(ids.shape[0], -1).sum(1)


def ragged_batches():
    g = torch.Generator().manual_seed(3)

    def mk(B, T, pads):
        ids = torch.randint(3, VOCAB, (B, T), generator=g)
        am = torch.ones(B, T, dtype=torch.long)
        for r, k in pads:
            am[r, :k] = 0
        return {"input_ids": ids.masked_fill(am == 0, 1), "am": am}

    return [mk(3, 6, [(1, 2), (2, 4)]), mk(2, 4, [(0, 1)]), mk(1, 5, [])]


def batch_reference(model, names, batch, bias=False):
    n = batch["input_ids"].shape[0]
    return reference(model, names, n, lambda k: opt_lm_losses(model, {kk: v[k:k + 1] for kk, v in batch.items()}).sum(),
                     bias=bias)


# ----------------------------------------------------------------------------- per_token
@pytest.mark.parametrize("bias", [False, True])
def test_per_token_rows_with_padding_are_each_tokens_own_gradient(bias):
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    ids, mask = net_data()
    col = GradientCollector(model, p=P, seed=SEED, per_token=True, bias=bias)
    with col:
        col.set_mask(mask)
        col.backward(net_loss(model, ids, mask))
        got = col.collect()
    assert got["l1"].shape == (3, 4, P * P)
    caps = capture(ref, ["l1", "l2"], lambda: net_loss(ref, ids, mask))
    assert_rows(got, per_token_reference(caps, bias, mask))
    # in a token-wise model, token (b, t)'s row is the gradient of that token's loss alone
    for b, t in ((0, 2), (2, 1)):
        one = reference(ref, ["l1", "l2"], 1, lambda _: ref(ids[b:b + 1, t:t + 1]).sin().sum(), bias=bias)
        assert_rows({k: v[b, t][None] for k, v in got.items()}, one)
    assert float(got["l1"][2, 2:].abs().max()) == 0.0  # padded positions: zero rows


def test_per_token_sequence_first_encoder_layer_with_padding_t_unequal_and_equal_b():
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0)  # batch_first=False
            self.head = nn.Linear(8, 3)

        def forward(self, input_ids, pad):
            return self.head(self.layer(self.emb(input_ids).transpose(0, 1), src_key_padding_mask=pad).transpose(0, 1))

    torch.manual_seed(0)
    model = Enc().eval()
    ref = copy.deepcopy(model)
    names = ["layer.linear1", "layer.linear2", "head"]
    for B, T in ((3, 5), (5, 5)):
        ids = torch.randint(0, 20, (B, T), generator=torch.Generator().manual_seed(B))
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, 3:] = 0
        mask[2, 2:] = 0

        def loss(m, ids=ids, mask=mask):
            return (m(ids, mask == 0).sin().sum(-1) * mask).sum()

        for per_token in (False, True):
            col = GradientCollector(model, modules=names, p=P, seed=SEED, per_token=per_token, bias=True)
            with col:
                col.set_mask(mask)
                col.backward(loss(model))
                got = col.collect()
            if per_token:
                caps = capture(ref, names, lambda: loss(ref), seq_first={"layer.linear1", "layer.linear2"})
                want = per_token_reference(caps, True, mask)
            else:
                want = reference(ref, names, B, lambda b: loss(ref, ids[b:b + 1], mask[b:b + 1]), bias=True)
            assert_rows(got, want)


@pytest.mark.parametrize("bias", [False, True])
def test_per_token_opt_flattened_fc_layers_with_left_padding(bias):
    model = tiny_opt()
    ref = copy.deepcopy(model)
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(5))
    am = torch.ones(3, 6, dtype=torch.long)
    am[1, :2] = 0
    am[2, :4] = 0
    names = ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2", "model.decoder.layers.0.self_attn.q_proj"]
    col = GradientCollector(model, modules=names, p=P, seed=SEED, per_token=True, bias=bias)
    with col:
        col.set_mask(am)
        col.backward(opt_token_loss(model, ids, am))
        got = col.collect()
    caps = capture(ref, names, lambda: opt_token_loss(ref, ids, am), bt=(3, 6))
    assert_rows(got, per_token_reference(caps, bias, am))
    # only the flattened modules, a batch-mean loss undone by scale="batch", flat rows
    col = GradientCollector(model, modules="*.fc?", p=P, seed=SEED, per_token=True)
    with col:
        col.set_mask(am)
        col.backward(opt_token_loss(model, ids, am) / 3)
        flat = col.collect(scale="batch", flat=True)
    assert flat.shape == (3, 6, 2 * P * P)
    assert_rows(col.split(flat), per_token_reference({n: caps[n] for n in names[:2]}, False, am))


# ----------------------------------------------------------------------------- bias / normalizers / collect options
def _normalizers(model, kind):
    torch.manual_seed(1)
    out = {}
    for n in ("l1", "l2"):
        O, I = getattr(model, n).weight.shape
        if kind == "adafactor":
            out[n] = AdafactorNormalizer(torch.rand(O) + .1, torch.rand(I) + .1, bias_avg_sq=torch.rand(O) + .1)
        else:
            out[n] = AdamNormalizer(torch.rand(O, I) + .1, bias_avg_sq=torch.rand(O) + .1)
    return out


@pytest.mark.parametrize("kind", ["adafactor", "adam", "adam-tiny-budget"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_normalizers_against_the_explicit_normalised_gradient(kind, bias, per_token):
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    ids, mask = net_data()
    nzs = _normalizers(model, kind.split("-")[0])
    kw = {"memory_budget": 4 * (P + 2) + 8} if kind == "adam-tiny-budget" else {}  # blocks of one entry
    col = GradientCollector(model, p=P, seed=SEED, bias=bias, per_token=per_token, normalizers=nzs, **kw)
    with col:
        col.set_mask(mask)
        col.backward(net_loss(model, ids, mask))
        got = col.collect()
    caps = capture(ref, ["l1", "l2"], lambda: net_loss(ref, ids, mask))
    want = {}
    for n, (a, g) in caps.items():
        G = token_grads(a, g, bias, mask)
        if not per_token:
            G = G.sum(1)
        want[n] = project(normalised(G, nzs[n], bias), n)
    assert_rows(got, want)


def test_bias_flat_scale_batch_half_dtype_and_missing_error():
    class Net2(Net):
        def __init__(self):
            super().__init__()
            self.side = nn.Linear(6, 3)

        def forward(self, input_ids):
            e = self.emb(input_ids)
            self.side(e)  # runs, never reaches the loss
            return self.l2(torch.tanh(self.l1(e)))

    torch.manual_seed(0)
    model = Net2()
    ids, mask = net_data()
    col = GradientCollector(model, modules=["l1", "l2"], p=P, seed=SEED, bias=True, dtype=torch.float16)
    with col:
        col.set_mask(mask)
        col.backward(net_loss(model, ids, mask) / 3)  # batch mean
        flat = col.collect(scale="batch", flat=True)
    assert flat.dtype == torch.float16 and flat.shape == (3, 2 * P * P)
    want = reference(model, ["l1", "l2"], 3, lambda b: net_loss(model, ids[b:b + 1], mask[b:b + 1]), bias=True)
    assert_rows(col.split(flat), want, rtol=2e-3)
    col = GradientCollector(model, p=P, seed=SEED)
    with col:
        col.backward(net_loss(model, ids, mask))
        with pytest.raises(RuntimeError, match="side"):
            col.collect(missing="error")
    col = GradientCollector(model, p=P, seed=SEED, per_token=True)
    with col:
        col.backward(net_loss(model, ids, mask))
        got = col.collect()
    assert got["side"].shape == (3, 4, P * P) and float(got["side"].abs().max()) == 0.0


# ----------------------------------------------------------------------------- workflows
def test_per_example_grads_ragged_batches_mask_key_mean_loss_then_index_and_self_retrieval(tmp_path):
    model = tiny_opt()
    ref = untied(model)  # OPT ties lm_head to the embedding: the reference reads the Linear's share
    batches = ragged_batches()
    col = GradientCollector(model, p=P, seed=SEED, bias=True)
    names = list(col.module_dims)
    outs = list(col.per_example_grads(batches, lambda m, b: opt_lm_losses(m, b).mean(), mask_key="am",
                                      scale="batch"))
    for out, b in zip(outs, batches):
        assert_rows(out, batch_reference(ref, names, b, bias=True))
    # into an index, as dicts and as flat rows; every example retrieves itself
    col = GradientCollector(model, p=P, seed=SEED)
    wants = torch.cat([torch.cat([w[n] for n in names], 1) for w in
                       (batch_reference(ref, names, b) for b in batches)])
    for flat in (False, True):
        path = os.path.join(tmp_path, f"ix{int(flat)}")
        rows = []
        with GradientIndex.create(path, col.module_dims, projection=col.projection_config,
                                  dtype=torch.float32) as index:
            for r in col.per_example_grads(batches, lambda m, b: opt_lm_losses(m, b).sum(), mask_key="am", flat=flat):
                index.append(r)
                rows.append(r if flat else col.flatten(r))
        Q = torch.cat(rows)
        assert_rows({"all": Q}, {"all": wants})
        index = GradientIndex.open(path)
        assert len(index) == 6
        _, idx = index.search(Q, k=1, unit_norm=True, projection=col)
        assert idx.view(-1).tolist() == list(range(6))


def test_torch_compile_after_attaching_with_changing_shapes_per_token():
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    col = GradientCollector(model, p=P, seed=SEED, per_token=True)
    g = torch.Generator().manual_seed(2)
    try:
        with col:
            compiled = torch.compile(model, backend="aot_eager")
            for B, T in ((3, 4), (2, 5), (3, 4)):
                ids = torch.randint(0, 20, (B, T), generator=g)
                mask = torch.ones(B, T, dtype=torch.long)
                mask[-1, -2:] = 0
                col.set_mask(mask)
                col.backward(net_loss(compiled, ids, mask))
                got = col.collect()
                caps = capture(ref, ["l1", "l2"], lambda: net_loss(ref, ids, mask))
                assert_rows(got, per_token_reference(caps, False, mask))
    finally:
        torch._dynamo.reset()


def test_loss_backward_float64_model_and_bf16_autocast():
    torch.manual_seed(0)
    model = Net()
    ids, mask = net_data()
    names = ["l1", "l2"]
    want = reference(model, names, 3, lambda b: net_loss(model, ids[b:b + 1], mask[b:b + 1]))
    col = GradientCollector(model, p=P, seed=SEED)
    with col:
        col.set_mask(mask)
        net_loss(model, ids, mask).backward()  # plain backward: also fills .grad
        got = col.collect()
    assert model.l1.weight.grad is not None
    model.zero_grad(set_to_none=True)
    assert_rows(got, want)
    m64 = copy.deepcopy(model).double()
    col = GradientCollector(m64, p=P, seed=SEED)
    with col:
        col.set_mask(mask)
        col.backward(net_loss(m64, ids, mask))
        got = col.collect()
    assert_rows(got, reference(m64, names, 3, lambda b: net_loss(m64, ids[b:b + 1], mask[b:b + 1])), rtol=1e-6)

    def bf16_loss(ids, mask):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net_loss(model, ids, mask)

    col = GradientCollector(model, p=P, seed=SEED)
    with col:
        col.set_mask(mask)
        col.backward(bf16_loss(ids, mask))
        got = col.collect()
    assert_rows(got, reference(model, names, 3, lambda b: bf16_loss(ids[b:b + 1], mask[b:b + 1])), rtol=1e-2)


def test_two_forwards_one_backward_sums_rows_position_by_position():
    # HAZARD (not counted as a defect: the collector sums a module's calls in one batch, which is right when row b of
    # both forwards is the same example, e.g. two views of it): gradient ACCUMULATION over two different micro-batches
    # of the same size before one backward comes back as B rows, row b = example b of the first micro-batch PLUS
    # example b of the second, silently (different sizes are refused). Rows of one micro-batch need collect() after
    # each backward. Documented here as it behaves today.
    torch.manual_seed(0)
    model = Net()
    ids, mask = net_data()
    ids2 = torch.randint(0, 20, (3, 4), generator=torch.Generator().manual_seed(9))
    names = ["l1", "l2"]
    col = GradientCollector(model, p=P, seed=SEED)
    with col:
        col.backward(net_loss(model, ids, mask) + net_loss(model, ids2, mask))
        got = col.collect()
    w1 = reference(model, names, 3, lambda b: net_loss(model, ids[b:b + 1], mask[b:b + 1]))
    w2 = reference(model, names, 3, lambda b: net_loss(model, ids2[b:b + 1], mask[b:b + 1]))
    assert_rows(got, {k: w1[k] + w2[k] for k in names})
    with col:  # a shorter second micro-batch is refused
        net_loss(model, ids, mask)
        with pytest.raises(RuntimeError, match="shapes"):
            net_loss(model, ids2[:2], mask[:2])
