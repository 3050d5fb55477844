"""Session 35: GradientCollector on hooked modules whose input has the tokens flattened into the first axis.

OPT's fc1 / fc2 (``hidden_states.reshape(-1, H)``), Qwen2-MoE's shared expert and many hand-written MLPs feed a Linear
``(B * T, I)`` instead of ``(B, T, I)``. Those inputs were refused (with a mask set) or taken as B * T "examples"; now,
when the batch's (B, T) is known (the padding mask, or another hooked module's (B, T, I) input in the same batch, also
one that runs later), the rows are the row-major flattening of (B, T) and the module is collected exactly as if fed
(B, T, I), the mask applied to its rows. What cannot be interpreted is refused by name.

Every value check compares the collector with L G R^T of per-example (per-token) weight gradients computed by plain
autograd: each example run ALONE reading ``weight.grad``, or one batched forward in which the module applies a
separate copy of its weight (and bias) to every row, so that each copy's ``.grad`` is that row's g a^T.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.projection import GradientCollector, derive_seed, projection_matrix

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

P, SEED, VOCAB = 4, 5, 50
FC = ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2",
      "model.decoder.layers.1.fc1", "model.decoder.layers.1.fc2"]


def tiny_opt(seed=0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, ffn_dim=24, num_attention_heads=2,
                    word_embed_proj_dim=16, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
                    layerdrop=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=0)
    model = OPTForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero biases, so the bias column is checked too
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    return model


def batch(B=3, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0  # left padding, as OPT is used
    mask[2, :4] = 0
    ids = torch.randint(2, VOCAB, (B, T), generator=g).masked_fill(mask == 0, 1)
    return ids, mask


def lm_losses(model, ids, mask):
    """(B,) causal-LM losses over the pairs whose input and target are real tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    tgt = ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tgt.reshape(-1), ignore_index=-100, reduction="none")
    return tok.view(ids.shape[0], -1).sum(1)


def all_position_losses(model, ids, mask):
    """(B,) losses that also read the padded positions: only the collector's mask keeps them out of its rows."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    w = torch.linspace(0.5, 1.5, logits.shape[1])[None, :, None]
    return (logits.tanh() * w).sum((1, 2))


def lgr(G, name):
    L = projection_matrix(P, G.shape[0], seed=derive_seed(SEED, name, "left")).double()
    R = projection_matrix(P, G.shape[1], seed=derive_seed(SEED, name, "right")).double()
    return (L @ G.double() @ R.T).reshape(-1)


def collect(model, modules, loss_fn, ids, mask, per_token=False, bias=False, col_mask="same", backward="col"):
    col = GradientCollector(model, modules=modules, p=P, seed=SEED, per_token=per_token, bias=bias)
    with col:
        col.set_mask(mask if col_mask == "same" else col_mask)
        loss = loss_fn(model, ids, mask).sum()
        col.backward(loss) if backward == "col" else loss.backward()
        return col.collect(missing="error")


def alone_reference(model, names, loss_fn, ids, mask):
    """{name: (B, p*p)}: each example's own backward, its module's weight.grad, projected."""
    mods = dict(model.named_modules())
    out = {n: [] for n in names}
    for b in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        loss_fn(model, ids[b:b + 1], mask[b:b + 1]).sum().backward()
        for n in names:
            out[n].append(lgr(mods[n].weight.grad, n))
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(v) for n, v in out.items()}


def per_row_reference(model, names, loss_fn, ids, mask, bias):
    """{name: (B, T, p*p)} float64: every row n of a hooked (B*T, I) input gets its own weight copy W_n (and b_n), so
    W_n.grad = g_n a_n^T exactly; projected per token."""
    mods = dict(model.named_modules())
    B, T = ids.shape
    rows = {}
    for n in names:
        m = mods[n]
        W = m.weight.detach().expand(B * T, *m.weight.shape).clone().requires_grad_()
        b = m.bias.detach().expand(B * T, *m.bias.shape).clone().requires_grad_()
        rows[n] = (W, b)

        def fwd(x, W=W, b=b):
            assert x.shape[0] == W.shape[0]  # the module really gets the tokens flattened: (B*T, I)
            return torch.einsum("noi,ni->no", W, x) + b

        m.forward = fwd  # an instance attribute: shadows the class's forward until deleted
    try:
        loss_fn(model, ids, mask).sum().backward()
    finally:
        for n in names:
            del mods[n].forward  # back to the class's forward
    model.zero_grad(set_to_none=True)
    out = {}
    for n, (W, b) in rows.items():
        G = torch.cat([W.grad, b.grad[..., None]], -1) if bias else W.grad
        out[n] = torch.stack([lgr(G[i], n) for i in range(B * T)]).view(B, T, -1)
    return out


def assert_rows(got, want, rtol=2e-5):
    for n in want:
        g, w = got[n].double(), want[n]
        assert g.shape == w.shape, (n, g.shape, w.shape)
        scale = float(w.abs().max())
        assert scale > 1e-3, n
        torch.testing.assert_close(g, w, atol=rtol * scale, rtol=0, msg=n)


# ----------------------------------------------------------------------------- OPT: values
def test_opt_fc1_fc2_rows_are_the_per_example_weight_gradients():
    """fc1 / fc2 get (B * T, H): under the padding mask (and without one when a hooked attention projection gives
    (B, T)), each row is that example's own weight gradient, projected. Refused before session 35 (mask set), or
    returned as B * T = 18 'examples'."""
    model = tiny_opt()
    ids, mask = batch()
    want = alone_reference(model, FC, lm_losses, ids, mask)
    got = collect(model, FC, lm_losses, ids, mask)
    assert list(got) == FC
    assert_rows(got, want)
    # no mask: the (B, T) of a hooked attention projection (it runs before fc1) tells the rows apart
    got = collect(model, FC + ["model.decoder.layers.0.self_attn.q_proj"], lm_losses, ids, mask, col_mask=None)
    assert_rows(got, want)
    # the same through per_example_grads, whose batch dict's attention_mask is the mask
    col = GradientCollector(model, modules="*.fc?", p=P, seed=SEED)
    (got,) = col.per_example_grads([dict(input_ids=ids, attention_mask=mask)],
                                   lambda m, b: lm_losses(m, b["input_ids"], b["attention_mask"]))
    assert_rows(got, want)


@pytest.mark.parametrize("per_token", [False, True])
def test_opt_fc1_fc2_per_token_rows_with_mask_and_bias(per_token):
    """A loss that also reads the padded positions: the mask must zero fc1 / fc2's padded ROWS (rows b*T + t) as it
    does a (B, T, I) module's padded positions; per_token gives (B, T, p*p) in example order."""
    model = tiny_opt(seed=3)
    ids, mask = batch(seed=4)
    ref = per_row_reference(model, FC, all_position_losses, ids, mask, bias=True)
    keep = mask.bool()[..., None].double()
    want = {n: (v * keep if per_token else (v * keep).sum(1)) for n, v in ref.items()}
    got = collect(model, FC, all_position_losses, ids, mask, per_token=per_token, bias=True)
    assert_rows(got, want)
    # the padded positions matter here: without the mask the rows differ (and equal the unmasked reference)
    got = collect(model, FC + ["model.decoder.layers.0.self_attn.k_proj"], all_position_losses, ids, mask,
                  per_token=per_token, bias=True, col_mask=None)
    unmasked = {n: (v if per_token else v.sum(1)) for n, v in ref.items()}
    assert_rows(got, unmasked)
    assert not torch.allclose(got[FC[0]].double(), want[FC[0]], atol=1e-3)


@pytest.mark.parametrize("reentrant", [False, True])
def test_opt_gradient_checkpointing(reentrant):
    """HF gradient checkpointing recomputes each layer in the backward pass: fc1 / fc2's rows are the same as
    without it (reentrant: loss.backward(), with the mask of the first forward)."""
    model = tiny_opt(seed=5)
    ids, mask = batch(seed=6)
    want = collect(model, FC, all_position_losses, ids, mask, per_token=True)
    model.train()  # HF checkpoints only in training mode (dropout is 0)
    kw = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:  # older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    calls = []
    h = model.get_submodule(FC[0]).register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    got = collect(model, FC, all_position_losses, ids, mask, per_token=True,
                  backward="loss" if reentrant else "col")
    h.remove()
    assert calls == [not reentrant, True]  # the forward, then its recomputation in the backward pass
    for n in FC:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5)
    if reentrant:
        # no mask, nothing else hooked: the recomputed fc1 is only told apart by the model's (B, T) token ids, in
        # its gradient hook (the model's own hook ran before the recomputation): refused, batch dropped
        col = GradientCollector(model, modules=FC, p=P, seed=SEED)
        with col:
            with pytest.raises(ValueError, match=r"'model\.decoder\.layers\.1\.fc2' got a 2-D input of 18 rows, the "
                                                 r"B \* T = 3 \* 6 tokens"):
                all_position_losses(model, ids, mask).sum().backward()
            assert not col._grads and not col._pending
            model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- hook order, plain modules
class FlatFirst(nn.Module):
    """``fc`` sees (B * T, I) and runs BEFORE the (B, T, I) module ``proj``; ``head`` sees a pooled (B, I)."""

    def __init__(self, flat=True):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.proj = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)
        self.flat = flat

    def forward(self, x):
        B, T, I = x.shape
        h = self.fc(x.reshape(B * T, I)).reshape(B, T, -1) if self.flat else self.fc(x)
        h = self.proj(torch.tanh(h))
        return self.head(h.mean(1)).sin().sum(1) + h.pow(2).sum((1, 2))


@pytest.mark.parametrize("per_token", [False, True])
def test_flattened_module_before_any_3d_module_equals_the_3d_twin(per_token):
    """With no mask, fc's (B * T, I) input is seen before anything tells (B, T); proj's (B, T, I) input later in the
    same forward decides it. The rows equal the same model with fc fed (B, T, I), bit for bit; under a mask too."""
    torch.manual_seed(7)
    model, twin = FlatFirst(), FlatFirst(flat=False)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(3, 5, 4)
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    unmasked = None
    for m in (None, mask):
        res = []
        for net in (model, twin):
            col = GradientCollector(net, p=P, seed=SEED, per_token=per_token)
            with col:
                col.set_mask(m)
                col.backward(net(x).sum())
                res.append(col.collect(missing="error"))
        got, want = res
        assert got["fc"].shape == ((3, 5, P * P) if per_token else (3, P * P))
        for n in ("fc", "proj", "head"):
            assert torch.equal(got[n], want[n]), (n, m is None)
        unmasked = got if m is None else unmasked
        if m is not None and per_token:
            assert not got["fc"][0, 3:].any() and unmasked["fc"][0, 3:].abs().sum() > 0
    # and it is the per-example weight gradient
    mods = dict(model.named_modules())
    for b in range(3):
        model.zero_grad(set_to_none=True)
        model(x[b:b + 1]).sum().backward()
        if not per_token:
            torch.testing.assert_close(unmasked["fc"][b].double(), lgr(mods["fc"].weight.grad, "fc"), atol=1e-5,
                                       rtol=1e-5)


def test_refusals_name_the_module_and_leave_no_state():
    torch.manual_seed(8)
    x = torch.randn(2, 4, 4)

    # rows that are neither B nor B * T (a subset of the tokens, as routed to an expert), (B, T) from a 3-D module
    class Routed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.expert = nn.Linear(4, 4)

        def forward(self, x):
            h = self.proj(x)
            return h.sum() + self.expert(h.reshape(-1, 4)[:5]).sum()

    model = Routed()
    col = GradientCollector(model, p=P, seed=SEED)
    with col:
        with pytest.raises(ValueError, match=r"^modules: 'expert' got a 2-D input of shape \(5, 4\): 5 rows, neither "
                                             r"the batch's B = 2 examples \(module 'proj'\) nor its B \* T = 8 tokens "
                                             r"\(T = 4 from module 'proj'\)"):
            model(x)
        assert not col._grads and not col._edges and not col._forward_shapes and not col._pending

    # the same, but the 2-D module runs first: refused when the 3-D module shows (B, T)
    class RoutedFirst(Routed):
        def forward(self, x):
            return self.expert(x.reshape(-1, 4)[:5]).sum() + self.proj(x).sum()

    model = RoutedFirst()
    col = GradientCollector(model, p=P, seed=SEED)
    with col:
        with pytest.raises(ValueError, match=r"^modules: 'expert' got a 2-D input of 5 rows, but 'proj' got an input "
                                             r"of shape \(2, 4, 4\), \(B, T\) = \(2, 4\), in the same batch"):
            model(x)
        assert not col._grads and not col._edges and not col._forward_shapes and not col._pending

    # two 2-D modules disagreeing on the rows with nothing to tell (B, T): refused, with the mask as the way out
    class TwoFlat(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Linear(4, 4)
            self.pool = nn.Linear(4, 4)

        def forward(self, x):
            return self.tok(x.reshape(-1, 4)).sum() + self.pool(x.mean(1)).sum()

    model = TwoFlat()
    col = GradientCollector(model, p=P, seed=SEED)
    with col:
        with pytest.raises(ValueError, match=r"^modules: 'pool' got a 2-D input of shape \(2, 4\) \(2 rows\) but "
                                             r"'tok' got 8 rows in the same batch.*padding mask"):
            model(x)
        assert not col._grads and not col._edges and not col._forward_shapes and not col._pending
        col.set_mask(torch.ones(2, 4))  # the way out: the mask tells (B, T)
        col.backward(model(x))
        got = col.collect(missing="error")
    assert got["tok"].shape == got["pool"].shape == (2, P * P)

    # a plain (B, I) model with nothing else is unchanged: its rows are the examples
    mlp = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    col = GradientCollector(mlp, p=P, seed=SEED)
    with col:
        col.backward(mlp(x[:, 0]).sum())
        assert col.collect()["0"].shape == (2, P * P)


def test_opt_fc_only_without_a_mask_is_refused_then_collected_with_one():
    """Only fc1 / fc2 hooked, no mask: nothing in the batch says its 18 rows are 3 * 6 tokens, but the model's (3, 6)
    token ids show they are not 18 examples: the forward is refused (before, 18 'examples' came back)."""
    model = tiny_opt(seed=9)
    ids, mask = batch(seed=10)
    col = GradientCollector(model, modules=FC, p=P, seed=SEED)
    with col:
        with pytest.raises(ValueError, match=r"^modules: 'model\.decoder\.layers\.0\.fc1' got a 2-D input of 18 rows, "
                                             r"the B \* T = 3 \* 6 tokens of the model's input_ids of shape \(3, 6\)"
                                             r".*col\.batch\(mask\)"):
            lm_losses(model, ids, mask)
        assert not col._grads and not col._edges and not col._forward_shapes and not col._pending
        with col.batch(torch.ones_like(mask)):  # nothing counted as padding: the loss ignores it anyway
            col.backward(lm_losses(model, ids, mask).sum())
        got = col.collect(missing="error")
    assert_rows(got, alone_reference(model, FC, lm_losses, ids, mask))


def test_gradient_taken_before_the_batch_shape_was_known_is_refused():
    """A flattened module backpropagated before any module showed (B, T) was taken as B * T examples; a later (B, T, I)
    module in the same batch that shows otherwise is refused, not mixed with those rows."""
    torch.manual_seed(11)
    model = FlatFirst()
    x = torch.randn(2, 3, 4)
    col = GradientCollector(model, modules=["fc", "proj"], p=P, seed=SEED)
    with col:
        model.fc(x.reshape(6, 4)).sum().backward()
        with pytest.raises(ValueError, match=r"'fc' got a 2-D input of 6 rows, the B \* T = 2 \* 3 tokens of 'proj'.*"
                                             r"already taken as that of 6 examples"):
            model.proj(torch.randn(2, 3, 6))
        assert not col._grads and not col._pending
