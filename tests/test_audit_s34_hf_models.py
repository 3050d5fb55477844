"""Audit (s34) of gradkit.projection.GradientCollector on the Hugging Face model families used for attribution.

LLaMA (RMSNorm, rotary, gated MLP, GQA, tied / untied embeddings), BERT for sequence classification (biases, a pooler
and a classifier with 2-D inputs), GPT-NeoX / Pythia (fused QKV), Qwen2 (q/k/v biases only), Mistral (sliding
window), mixture-of-experts (Mixtral, Qwen2-MoE, Switch Transformers), OPT and T5. Every value check compares the
collector's rows with L G_b R^T of the REAL per-example weight gradient, obtained by running each example ALONE (same
padding) and reading ``weight.grad`` (on a copy whose lm_head is untied from the embedding, so that its ``.grad`` is
the Linear's share, which the collector documents it collects), projected with the explicit matrices
``projection_matrix(p, n, derive_seed(seed, name, side))``.

Tests of correct behaviour pass. Tests marked ``# DEFECT:`` fail on the current code: they assert what the collector
should do (the right rows, or a refusal by name instead of silently wrong rows).
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.projection import GradientCollector, derive_seed, projection_matrix

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

P, SEED = 4, 11
VOCAB = 100


# ----------------------------------------------------------------------------- references
def lgr(G, name, p=P, seed=SEED):
    L = projection_matrix(p, G.shape[0], seed=derive_seed(seed, name, "left")).double()
    R = projection_matrix(p, G.shape[1], seed=derive_seed(seed, name, "right")).double()
    return (L @ G.double() @ R.T).reshape(-1)


def weight_grad(mod, bias=False):
    g = mod.weight.grad
    g = torch.zeros_like(mod.weight) if g is None else g  # a module the example never reached (an idle expert)
    if bias:
        bg = mod.bias.grad
        bg = torch.zeros_like(mod.bias) if bg is None else bg
        g = torch.cat([g, bg[:, None]], 1)
    return g.detach().double().clone()


def untied(model):
    """A copy whose lm_head weight is its own parameter: its .grad is the Linear's share only."""
    m = copy.deepcopy(model)
    head = m.get_output_embeddings()
    if head is not None and any(head.weight is e.weight for e in m.modules() if isinstance(e, nn.Embedding)):
        head.weight = nn.Parameter(head.weight.detach().clone())
    return m


def reference(model, names, n, loss_of_example, bias=False):
    """{name: (n, p*p)} float64: each example's own backward, its real weight gradient, projected."""
    mods = dict(model.named_modules())
    out = {k: [] for k in names}
    for b in range(n):
        model.zero_grad(set_to_none=True)
        loss_of_example(model, b).backward()
        for k in names:
            out[k].append(lgr(weight_grad(mods[k], bias and mods[k].bias is not None), k))
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in out.items()}


def rel_errors(got, want):
    return {k: float((got[k].double() - want[k]).abs().max()) / max(float(want[k].abs().max()), 1e-3) for k in want}


def assert_rows(got, want, rtol=1e-4):
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for k in want:
        assert tuple(got[k].shape) == tuple(want[k].shape), (k, tuple(got[k].shape), tuple(want[k].shape))
    bad = {k: round(e, 4) for k, e in rel_errors(got, want).items() if e > rtol}
    assert not bad, f"rows differ from the per-example reference (max error / max |row|): {bad}"


def lm_losses(model, ids, mask):
    """Per-example causal-LM loss: sum of token cross-entropies over pairs whose input AND target are real."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    tgt = ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100,
                          reduction="none")
    return tok.view(ids.shape[0], -1).sum(1)


def padded(B=3, T=8, seed=1, left=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if left:
        mask[1, :3] = 0
        mask[2, :5] = 0
    else:
        mask[1, 5:] = 0
        mask[2, 3:] = 0
    return ids.masked_fill(mask == 0, 1), mask


def collect_lm(model, ids, mask, use_col_backward=True, **kw):
    col = GradientCollector(model, p=P, seed=SEED, **kw)
    with col:
        col.set_mask(mask)
        loss = lm_losses(model, ids, mask).sum()
        col.backward(loss) if use_col_backward else loss.backward()
        return col, col.collect(missing="error")


def lm_reference(model, names, ids, mask, bias=False):
    ref = untied(model)
    return reference(ref, names, ids.shape[0], lambda m, b: lm_losses(m, ids[b:b + 1], mask[b:b + 1]).sum(), bias)


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def collected_or_refused(make_rows, want, match):
    """Either the collector refuses (an error matching ``match``) or its rows are the per-example reference."""
    try:
        got = make_rows()
    except (ValueError, RuntimeError) as e:
        assert match in str(e), str(e)
        return
    assert_rows(got, want)


# ----------------------------------------------------------------------------- models
def tiny_llama(tied=True, bias=False, attn="sdpa", seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias, pad_token_id=1, bos_token_id=0,
                      eos_token_id=0, attn_implementation=attn)
    model = LlamaForCausalLM(cfg).eval()
    if bias:  # HF initialises biases to 0: give them values, so that a wrong bias column shows
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.normal_(0, 0.1)
    return model


# ============================================================================= LLaMA
@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_llama_gqa_every_linear_default_selection(tied, bias):
    model = tiny_llama(tied=tied, bias=bias, seed=3)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids, mask = padded(seed=4)
    col, got = collect_lm(model, ids, mask, bias=bias)
    # modules=None: every nn.Linear, in model order, the tied lm_head included (its Linear share, documented)
    assert list(col.module_dims) == linear_names(model) and len(col.module_dims) == 15
    assert list(col.module_dims)[-1] == "lm_head"
    assert col.module_shapes["model.layers.0.self_attn.k_proj"] == (16, 32)  # GQA: 2 kv heads of 8
    assert col.projection_config["bias_modules"] == ([n for n in linear_names(model) if n != "lm_head"] if bias else [])
    want = lm_reference(model, list(col.module_dims), ids, mask, bias=bias)
    assert_rows(got, want)


def test_llama_name_pattern_selection_equals_default_rows():
    model = tiny_llama(tied=False, bias=True, seed=5)
    ids, mask = padded(seed=6)
    _, full = collect_lm(model, ids, mask, bias=True)
    pats = ["model.layers.*.self_attn.[qk]_proj", "model.layers.1.mlp.*", "lm_head"]
    col, got = collect_lm(model, ids, mask, bias=True, modules=pats)
    assert list(col.module_dims) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj", "lm_head"]
    for n in got:  # a module's seeds depend on its name only: a subset gives the same rows
        torch.testing.assert_close(got[n], full[n], rtol=1e-5, atol=1e-6)
    # a non-Linear named exactly is refused by name
    with pytest.raises(TypeError, match=r"'model.layers.0.input_layernorm' is a LlamaRMSNorm"):
        GradientCollector(model, modules=["model.layers.0.input_layernorm"])
    with pytest.raises(ValueError, match=r"pattern 'model.layers.9.\*' matches no module"):
        GradientCollector(model, modules=["model.layers.9.*"])


def test_llama_sdpa_and_eager_give_the_same_rows():
    sdpa = tiny_llama(tied=True, attn="sdpa", seed=7)
    eager = tiny_llama(tied=True, attn="eager", seed=7)
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    ids, mask = padded(seed=8)
    _, a = collect_lm(sdpa, ids, mask)
    _, b = collect_lm(eager, ids, mask)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-5)
    assert_rows(b, lm_reference(eager, list(b), ids, mask))


@pytest.mark.parametrize("reentrant", [None, True])
def test_llama_hf_gradient_checkpointing(reentrant):
    model = tiny_llama(tied=True, seed=9)
    ids, mask = padded(seed=10)
    want = lm_reference(model, linear_names(model), ids, mask)
    model.train()  # HF checkpoints only in training mode (no dropout in this config)
    kw = None if reentrant is None else {"use_reentrant": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    assert model.model.gradient_checkpointing
    # default (non-reentrant in this transformers): col.backward works; reentrant: loss.backward() (documented)
    _, got = collect_lm(model, ids, mask, use_col_backward=reentrant is None)
    assert_rows(got, want)
    if reentrant:
        col = GradientCollector(model, p=P, seed=SEED)
        with col, pytest.raises(RuntimeError, match="use_reentrant=True"):
            col.set_mask(mask)
            col.backward(lm_losses(model, ids, mask).sum())


def test_llama_bf16_model_close_to_the_fp32_reference():
    model = tiny_llama(tied=False, bias=True, seed=11)
    ids, mask = padded(seed=12)
    want = lm_reference(model, linear_names(model), ids, mask, bias=True)
    bf = copy.deepcopy(model).to(torch.bfloat16)
    want_bf = lm_reference(bf, linear_names(model), ids, mask, bias=True)  # each example alone, in bf16
    col, got = collect_lm(bf, ids, mask, bias=True)

    def rel(x, y):
        return float((x.double() - y).norm() / y.norm())

    for n, v in got.items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), n
        # the bf16 forward / backward itself is up to ~12 % off fp32 on the small q / k gradients of layer 1: the
        # collector may add no more than bf16 rounding to that
        assert rel(v, want_bf[n]) < 2e-2, (n, rel(v, want_bf[n]))
        assert rel(v, want[n]) < rel(want_bf[n], want[n]) + 2e-2, (n, rel(v, want[n]), rel(want_bf[n], want[n]))
        assert rel(v, want[n]) < 0.2, n
    col16 = GradientCollector(bf, p=P, seed=SEED, bias=True, dtype=torch.bfloat16)
    with col16:
        col16.set_mask(mask)
        col16.backward(lm_losses(bf, ids, mask).sum())
        got16 = col16.collect()
    for n in got:
        assert got16[n].dtype == torch.bfloat16
        torch.testing.assert_close(got16[n].float(), got[n], rtol=1e-2, atol=1e-3)


def test_llama_per_example_grads_with_attention_mask_in_the_batch():
    model = tiny_llama(tied=True, seed=13)
    ids, mask = padded(seed=14)
    col = GradientCollector(model, modules="model.layers.0.*", p=P, seed=SEED)
    batches = [dict(input_ids=ids[:2], attention_mask=mask[:2]), dict(input_ids=ids[2:], attention_mask=mask[2:])]
    rows = list(col.per_example_grads(batches, lambda m, b: lm_losses(m, b["input_ids"], b["attention_mask"])))
    got = {n: torch.cat([r[n] for r in rows]) for n in col.module_dims}
    assert_rows(got, lm_reference(model, list(col.module_dims), ids, mask))


# ============================================================================= BERT
def test_bert_sequence_classification_bias_pooler_and_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(15)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, classifier_dropout=0.0, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias.normal_(0, 0.1)
    ids, mask = padded(seed=16, left=False)
    labels = torch.tensor([0, 2, 1])

    def losses(m, ids, mask, labels):
        return F.cross_entropy(m(input_ids=ids, attention_mask=mask).logits, labels, reduction="none")

    col = GradientCollector(model, p=P, seed=SEED, bias=True)
    names = list(col.module_dims)
    assert names == linear_names(model) and names[-2:] == ["bert.pooler.dense", "classifier"]
    assert col.projection_config["bias_modules"] == names
    with col:
        col.set_mask(mask)  # pooler / classifier inputs are (B, I): the mask skips them
        col.backward(losses(model, ids, mask, labels).sum())
        got = col.collect(missing="error")
    want = reference(model, names, 3, lambda m, b: losses(m, ids[b:b + 1], mask[b:b + 1], labels[b:b + 1]).sum(),
                     bias=True)
    assert_rows(got, want)
    # a name pattern: the attention blocks only, same rows
    colp = GradientCollector(model, modules="bert.encoder.layer.*.attention.*", p=P, seed=SEED, bias=True)
    assert len(colp.module_dims) == 8
    with colp:
        colp.set_mask(mask)
        colp.backward(losses(model, ids, mask, labels).sum())
        gotp = colp.collect()
    for n in gotp:
        torch.testing.assert_close(gotp[n], got[n], rtol=1e-5, atol=1e-6)


# ============================================================================= GPT-NeoX / Pythia
def test_gpt_neox_fused_qkv_with_bias():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(17)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, rotary_pct=0.25, max_position_embeddings=64, attention_dropout=0.0,
                        hidden_dropout=0.0, use_parallel_residual=True, tie_word_embeddings=False, pad_token_id=1,
                        bos_token_id=0, eos_token_id=0)
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    ids, mask = padded(seed=18)
    col, got = collect_lm(model, ids, mask, bias=True)
    names = list(col.module_dims)
    assert names == linear_names(model) and names[-1] == "lm_head"  # untied (Pythia's embed_out)
    assert col.module_shapes["gpt_neox.layers.0.attention.query_key_value"] == (96, 32)
    assert "lm_head" not in col.projection_config["bias_modules"]
    assert_rows(got, lm_reference(model, names, ids, mask, bias=True))


# ============================================================================= Qwen2 / Mistral
@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_qwen2_qkv_bias_and_mistral_sliding_window(family):
    torch.manual_seed(19)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                  eos_token_id=0)
    if family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common)).eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.normal_(0, 0.1)
    else:
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(sliding_window=3, tie_word_embeddings=False, **common)).eval()
    ids, mask = padded(seed=20)
    col, got = collect_lm(model, ids, mask, bias=True)
    names = list(col.module_dims)
    assert names == linear_names(model)
    qkv = [n for n in names if n.endswith(("q_proj", "k_proj", "v_proj"))]
    assert col.projection_config["bias_modules"] == (qkv if family == "qwen2" else [])
    assert_rows(got, lm_reference(model, names, ids, mask, bias=True))


# ============================================================================= OPT
def test_opt_flattened_mlp_and_the_rest_are_right():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(21)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
                    word_embed_proj_dim=16, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                    pad_token_id=1, bos_token_id=0, eos_token_id=0)
    model = OPTForCausalLM(cfg).eval()
    ids, mask = padded(seed=22)
    # OPT's decoder layer runs fc1 / fc2 on the tokens flattened to (B * T, H): session 35 collects them as the
    # (B, T, H) they flatten (they were refused by name); project_in / project_out, attention and the tied lm_head's
    # share are per-example right too
    col, got = collect_lm(model, ids, mask, bias=True)
    names = list(col.module_dims)
    assert names == linear_names(model)
    assert "model.decoder.layers.0.fc1" in names and "model.decoder.project_in" in names
    assert_rows(got, lm_reference(model, names, ids, mask, bias=True))


# ============================================================================= T5 (encoder-decoder)
def tiny_t5(seed=23):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def t5_batch(T_dec=6):
    B, T = 3, 6
    am = torch.ones(B, T, dtype=torch.long)
    am[1, 4:] = 0
    am[2, 2:] = 0
    g = torch.Generator().manual_seed(24)
    ids = torch.randint(1, VOCAB, (B, T), generator=g).masked_fill(am == 0, 0)
    dm = torch.ones(B, T_dec, dtype=torch.long)
    dm[0, 3:] = 0
    dm[1, 5:] = 0
    labels = torch.randint(1, VOCAB, (B, T_dec), generator=g).masked_fill(dm == 0, -100)
    return ids, am, labels, dm


def t5_losses(m, ids, am, labels, dm):
    logits = m(input_ids=ids, attention_mask=am, labels=labels, decoder_attention_mask=dm).logits
    tok = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="none")
    return tok.view(logits.shape[0], -1).sum(1)


def t5_reference(model, names, batch):
    return reference(untied(model), names, 3, lambda m, b: t5_losses(m, *(x[b:b + 1] for x in batch)).sum())


def test_t5_encoder_and_decoder_collectors_with_cross_attention_kv_under_the_encoder_mask():
    """Two collectors, each with the mask of the positions its modules see: the decoder's cross-attention k / v take
    the ENCODER's states, so they belong with the encoder's mask."""
    model = tiny_t5()
    batch = ids, am, labels, dm = t5_batch()
    cross_kv = ["decoder.block.*.layer.1.EncDecAttention.[kv]"]
    enc = GradientCollector(model, modules=["encoder.*"] + cross_kv, p=P, seed=SEED)
    dec = GradientCollector(model, modules=lambda n, m: isinstance(m, nn.Linear) and not n.startswith("encoder.")
                            and not (".EncDecAttention.k" in n or ".EncDecAttention.v" in n), p=P, seed=SEED)
    assert "lm_head" in dec.module_dims  # tied to `shared`: its Linear share
    with enc, dec:
        enc.set_mask(am)
        dec.set_mask(dm)
        t5_losses(model, *batch).sum().backward()
        got = {**enc.collect(missing="error"), **dec.collect(missing="error")}
    assert sorted(got) == sorted(linear_names(model))
    assert_rows(got, t5_reference(model, list(got), batch))


def test_t5_decoder_mask_on_cross_attention_of_another_length_is_refused_by_name():
    model = tiny_t5()
    batch = ids, am, labels, dm = t5_batch(T_dec=8)
    dec = GradientCollector(model, modules="decoder.*", p=P, seed=SEED)
    with dec, pytest.raises(ValueError, match=r"mask: expected shape .*\(3, 6\).*'decoder\.block\.0\.layer\.1\.EncDecAttention\.k'"):
        dec.set_mask(dm)
        t5_losses(model, *batch)


def test_t5_separate_collectors_advice_of_the_refusal_is_right_for_cross_attention():
    # DEFECT: per_example_grads refuses an encoder-decoder's attention_mask and advises "hook encoder and decoder in
    # separate collectors and set each one's mask" (_collector.py:799-805). Followed literally (a "decoder.*"
    # collector with the decoder_attention_mask), the decoder's cross-attention k / v -- whose inputs are the
    # ENCODER's (B, T_enc, H) states -- get the DECODER's padding pattern: with T_enc == T_dec (padding="max_length")
    # it is accepted and zeroes real encoder positions, so EncDecAttention.k / .v rows are 23-65 % off, silently
    # (with T_enc != T_dec the advised setup is refused by the mask-shape check). Correct: the advice names the
    # exception (cross-attention k / v take the encoder's positions: give them the encoder's mask, or no mask), or
    # the advised setup gives the per-example rows.
    model = tiny_t5()
    batch = ids, am, labels, dm = t5_batch()
    col = GradientCollector(model, p=P, seed=SEED)
    with pytest.raises(ValueError, match="two collectors") as ei:
        next(col.per_example_grads([dict(input_ids=ids, attention_mask=am, labels=labels,
                                         decoder_attention_mask=dm)], lambda m, b: t5_losses(m, *batch)))
    advice = str(ei.value)
    enc = GradientCollector(model, modules="encoder.*", p=P, seed=SEED)
    dec = GradientCollector(model, modules="decoder.*", p=P, seed=SEED)
    with enc, dec:
        enc.set_mask(am)
        dec.set_mask(dm)
        t5_losses(model, *batch).sum().backward()
        got = {**enc.collect(), **dec.collect()}
    want = t5_reference(model, list(got), batch)
    errs = rel_errors(got, want)
    wrong = sorted(n for n, e in errs.items() if e > 1e-4)
    assert all("EncDecAttention.k" in n or "EncDecAttention.v" in n for n in wrong), wrong
    if wrong:
        assert "cross" in advice.lower() or "EncDecAttention" in advice, (
            f"following the advice {advice!r} gives wrong rows for {wrong} (max errors "
            f"{ {n: round(errs[n], 3) for n in wrong} })")


# ============================================================================= mixture of experts
def test_mixtral_fused_experts_and_router_are_not_linear_and_refused_by_name():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(25)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=0)
    model = MixtralForCausalLM(cfg).eval()
    ids, mask = padded(seed=26)
    col, got = collect_lm(model, ids, mask)
    # this transformers stores the experts as 3-D parameters and the router as a plain Module: modules=None hooks
    # the attention projections and lm_head (every nn.Linear, as documented)
    assert list(col.module_dims) == linear_names(model) and len(col.module_dims) == 9
    assert_rows(got, lm_reference(model, list(col.module_dims), ids, mask))
    with pytest.raises(TypeError, match=r"'model.layers.0.mlp.gate' is a MixtralTopKRouter"):
        GradientCollector(model, modules="model.layers.0.mlp.gate")
    with pytest.raises(TypeError, match=r"'model.layers.0.mlp.experts' is a MixtralExperts"):
        GradientCollector(model, modules=["model.layers.0.mlp.experts"])
    with pytest.raises(ValueError, match=r"match no nn.Linear / Conv1D module"):
        GradientCollector(model, modules="model.layers.*.mlp.*")


def test_qwen2_moe_flattened_shared_expert_and_the_rest_are_right():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(27)
    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                         shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                         pad_token_id=1, bos_token_id=0, eos_token_id=0)
    model = Qwen2MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    ids, mask = padded(seed=28)
    # the shared expert (and its gate) run on (B * T, H): session 35 collects them as the (B, T, H) they flatten
    # (they were refused by name); the routed experts are 3-D parameters in this transformers, not Linears
    col, got = collect_lm(model, ids, mask, bias=True)
    names = list(col.module_dims)
    assert "model.layers.0.mlp.shared_expert.gate_proj" in names and "model.layers.1.mlp.shared_expert_gate" in names
    assert_rows(got, lm_reference(model, names, ids, mask, bias=True))


def tiny_switch(seed=0):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(seed)
    cfg = SwitchTransformersConfig(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, expert_capacity=64, num_layers=2,
                                   num_sparse_encoder_layers=1, num_decoder_layers=2, num_sparse_decoder_layers=1,
                                   num_heads=4, num_experts=4, dropout_rate=0.0, router_jitter_noise=0.0,
                                   decoder_start_token_id=0, pad_token_id=0)
    return SwitchTransformersForConditionalGeneration(cfg).eval()


def switch_losses(m, ids, labels):
    logits = m(input_ids=ids, labels=labels).logits
    tok = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
    return tok.view(logits.shape[0], -1).sum(1)


def test_switch_transformers_experts_are_left_out_by_default_and_refused_by_name():
    """Session 34: expert Linears (under an ``experts`` module) see routed tokens, not examples: modules=None leaves
    them out (it hooked all 16 and refused a batch only when the routed counts differed from B), naming one is refused
    with the reason, a wildcard drops them; the router and the dense layers are per-example right."""
    model = tiny_switch()
    g = torch.Generator().manual_seed(2)
    ids, labels = torch.randint(1, VOCAB, (4, 6), generator=g), torch.randint(1, VOCAB, (4, 6), generator=g)
    experts = [n for n, m in model.named_modules() if ".experts.expert_" in n and isinstance(m, nn.Linear)]
    assert len(experts) == 16
    col = GradientCollector(model, p=P, seed=SEED)
    assert not any(".experts." in n for n in col.module_dims)
    assert "encoder.block.1.layer.1.mlp.router.classifier" in col.module_dims
    with col:
        col.backward(switch_losses(model, ids, labels).sum())
        got = col.collect(missing="error")
    want = reference(untied(model), list(got), 4, lambda m, b: switch_losses(m, ids[b:b + 1], labels[b:b + 1]).sum())
    assert_rows(got, want)
    with pytest.raises(ValueError, match=r"mixture-of-experts expert"):
        GradientCollector(model, modules=["encoder.block.0.layer.0.SelfAttention.q", experts[0]], p=P, seed=SEED)
    with pytest.raises(ValueError, match=r"mixture-of-experts expert"):
        GradientCollector(model, modules=lambda n, m: isinstance(m, nn.Linear), p=P, seed=SEED)
    assert not any(".experts." in n for n in GradientCollector(model, modules="encoder.*", p=P).module_dims)


def test_switch_transformers_experts_routed_exactly_b_tokens_are_not_silently_taken_as_examples():
    # DEFECT: an MoE expert's Linear sees the (N_e, H) tokens routed to it. The collector refuses it only when N_e
    # differs from the batch size seen by the other hooked modules (_collector.py:551-559, "mixture-of-experts expert
    # layers see the tokens routed to them"); when an expert happens to receive exactly B tokens its N_e token rows
    # are taken as the B examples' gradients: no error, wrong rows (up to 107 % off here), and whether a batch is
    # refused or silently wrong depends on the routing of the data. The module docstring lists no such exception
    # (only "a sequence-first (T, B, I) input ... with T == B nothing can tell"), and modules=None hooks these
    # Linears. Correct: refuse expert Linears (whose rows are routed tokens) whatever the count, or collect rows per
    # example.
    model = tiny_switch()
    B, T = 2, 4
    g = torch.Generator().manual_seed(50)
    ids, labels = torch.randint(1, 100, (B, T), generator=g), torch.randint(1, 100, (B, T), generator=g)
    counts = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: counts.__setitem__(n, a[0].shape[0]))
             for n, m in model.named_modules() if n.startswith("encoder.") and ".experts.expert_" in n]
    with torch.no_grad():
        model.encoder(input_ids=ids)
    for h in hooks:
        h.remove()
    if set(counts.values()) != {B}:
        pytest.skip(f"routing in this torch / transformers differs: tokens per expert {counts}")
    col = GradientCollector(model, modules="encoder.*", p=P, seed=SEED)
    want = reference(untied(model), list(col.module_dims), B,
                     lambda m, b: switch_losses(m, ids[b:b + 1], labels[b:b + 1]).sum())

    def rows():
        with col:
            col.backward(switch_losses(model, ids, labels).sum())
            return col.collect()

    collected_or_refused(rows, want, "expert")
