"""Audit (s39) of gradkit.projection.GradientCollector on more model families and module kinds.

Every value check compares the collector's rows with L G_b R^T of the REAL per-example weight gradient, obtained by
running each example ALONE (same padding) and reading ``weight.grad`` (on a copy whose output embedding is untied,
so its ``.grad`` is the Linear's share), projected in float64 with the explicit matrices
``projection_matrix(p, n, derive_seed(seed, name, side))`` -- the approach of test_audit_s33_collector.py.

Tests marked ``# DEFECT:`` failed on d91d642 + the session's first commits: the collector silently returned rows that
were not the per-example projected gradients (no exception). They assert what it should do: the right rows, or an
error that names the module (``collected_or_refused``). Session 39 fixed all but the DeBERTa one (an xfail, strict:
it documents a limitation still there). The other tests document cases checked and found correct (or refused by
name, which is a correct outcome).
"""
import copy
import fnmatch
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.projection import AdafactorNormalizer, GradientCollector, derive_seed, projection_matrix

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

P, SEED = 3, 5
VOCAB = 40


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ----------------------------------------------------------------------------- references
def lgr(G, name, p=P, seed=SEED):
    L = projection_matrix(p, G.shape[0], seed=derive_seed(seed, name, "left")).double()
    R = projection_matrix(p, G.shape[1], seed=derive_seed(seed, name, "right")).double()
    return (L @ G.double() @ R.T).reshape(-1)


def weight_grad(mod, bias=False):
    g = mod.weight.grad
    g = torch.zeros_like(mod.weight) if g is None else g
    if type(mod).__name__ == "Conv1D":
        g = g.T
    if bias:
        bg = mod.bias.grad
        g = torch.cat([g, (torch.zeros_like(mod.bias) if bg is None else bg)[:, None]], 1)
    return g.detach().double().clone()


def reference(model, names, n, loss_of_example, bias=False):
    """{name: (n, p*p)} float64: each example's own backward, its real weight gradient, projected."""
    mods = dict(model.named_modules())
    out = {k: [] for k in names}
    for b in range(n):
        model.zero_grad(set_to_none=True)
        loss_of_example(b).backward()
        for k in names:
            out[k].append(lgr(weight_grad(mods[k], bias and mods[k].bias is not None), k))
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in out.items()}


def rel_errors(got, want):
    return {k: float((got[k].double() - want[k]).abs().max()) / max(float(want[k].abs().max()), 1e-6) for k in want}


def assert_rows(got, want, rtol=1e-4):
    assert set(want) <= set(got), sorted(set(want) - set(got))
    shapes = {k: (tuple(got[k].shape), tuple(want[k].shape)) for k in want if tuple(got[k].shape) != tuple(want[k].shape)}
    assert not shapes, f"rows of the wrong shape (got, per-example reference): {shapes}"
    bad = {k: round(e, 4) for k, e in rel_errors(got, want).items() if e > rtol}
    assert not bad, f"rows differ from the per-example reference (max error / max |row|): {bad}"


def collected_or_refused(make_rows, want, match, rtol=1e-4):
    """Either the collector refuses (an error whose message contains ``match``) or its rows are the reference."""
    try:
        got = make_rows()
    except (ValueError, RuntimeError, TypeError) as e:
        assert match in str(e), str(e)
        return
    assert_rows(got, want, rtol)


def run(model, loss, mask=None, modules=None, **kw):
    col = GradientCollector(model, modules=modules, p=P, seed=SEED, **kw)
    with col:
        col.set_mask(mask)
        col.backward(loss())
        return col.collect()


def untied(model):
    """A copy whose output embedding is its own parameter: its .grad is the Linear's share only."""
    m = copy.deepcopy(model)
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        head.weight = nn.Parameter(head.weight.detach().clone())
    return m


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def padded(B=3, T=7, left=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if left:
        mask[1, :3] = 0
        mask[2, :5] = 0
    else:
        mask[1, 5:] = 0
        mask[2, 3:] = 0
    return ids.masked_fill(mask == 0, 1), mask


def lm_losses(model, ids, mask=None):
    """Per-example causal-LM loss over pairs whose input AND target are real tokens."""
    mask = torch.ones_like(ids) if mask is None else mask
    logits = model(input_ids=ids, attention_mask=mask).logits
    tgt = ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100,
                          reduction="none")
    return tok.view(ids.shape[0], -1).sum(1)


def mlm_losses(model, ids, mask=None):
    """Per-example token cross-entropy of a masked-LM head (predict the input itself, real tokens only)."""
    mask = torch.ones_like(ids) if mask is None else mask
    logits = model(input_ids=ids, attention_mask=mask).logits
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1), reduction="none")
    return (tok.view(ids.shape[0], -1) * mask).sum(1)


def cls_losses(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits.float().sin().sum(-1)


def check_lm(model, lossf, left=True, bias=False, modules=None, rtol=1e-4):
    ids, mask = padded(left=left)
    got = run(model, lambda: lossf(model, ids, mask).sum(), mask, modules=modules, bias=bias)
    ref = untied(model)
    want = reference(ref, list(got), 3, lambda b: lossf(ref, ids[b:b + 1], mask[b:b + 1]).sum(), bias=bias)
    assert_rows(got, want, rtol)


# ----------------------------------------------------------------------------- tiny models
def tiny_mobilebert_mlm():
    from transformers import MobileBertConfig, MobileBertForMaskedLM

    torch.manual_seed(0)
    cfg = MobileBertConfig(vocab_size=VOCAB, hidden_size=16, embedding_size=8, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=16, intra_bottleneck_size=8, true_hidden_size=8,
                           num_feedforward_networks=1, max_position_embeddings=16, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, pad_token_id=1)
    return MobileBertForMaskedLM(cfg).eval()


def tiny_wavlm():
    from transformers import WavLMConfig, WavLMModel

    torch.manual_seed(0)
    cfg = WavLMConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                      conv_dim=(8, 8), conv_stride=(4, 4), conv_kernel=(8, 4), num_conv_pos_embeddings=4,
                      num_conv_pos_embedding_groups=2, hidden_dropout=0.0, attention_dropout=0.0,
                      activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
                      num_buckets=16, max_bucket_distance=32)
    return WavLMModel(cfg).eval()


def tiny_mamba():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=3,
                      time_step_rank=4, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return MambaForCausalLM(cfg).eval()


def tiny_xlnet():
    from transformers import XLNetConfig, XLNetLMHeadModel

    torch.manual_seed(0)
    cfg = XLNetConfig(vocab_size=VOCAB, d_model=16, n_layer=1, n_head=2, d_inner=16, dropout=0.0, mem_len=None,
                      pad_token_id=1)
    return XLNetLMHeadModel(cfg).eval()


def tiny_longformer():
    from transformers import LongformerConfig, LongformerForMaskedLM

    torch.manual_seed(0)
    cfg = LongformerConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=24, attention_window=4, max_position_embeddings=40, pad_token_id=1,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return LongformerForMaskedLM(cfg).eval()


def tiny_swin():
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(0)
    cfg = SwinConfig(image_size=16, patch_size=2, num_channels=3, embed_dim=8, depths=[2, 1], num_heads=[2, 2],
                     window_size=4, mlp_ratio=2.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     drop_path_rate=0.0, num_labels=3)
    return SwinForImageClassification(cfg).eval()


def tiny_deberta_v3():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    # DeBERTa-v3's layout (share_att_key, position buckets, layer-normed relative embeddings, p2c|c2p) at a tiny
    # size: position_buckets=4 plays deberta-v3-base's 256 (its rel. embeddings are 2 * 256 = 512 rows)
    cfg = DebertaV2Config(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=24, max_position_embeddings=32, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, pad_token_id=1, num_labels=3, relative_attention=True,
                          position_buckets=4, max_relative_positions=32, pos_att_type=["p2c", "c2p"],
                          share_att_key=True, norm_rel_ebd="layer_norm", initializer_range=0.5)
    return DebertaV2ForSequenceClassification(cfg).eval()


# ============================================================================= defects
@pytest.mark.parametrize("family", ["mobilebert_mlm_head", "wavlm_attention", "mamba_dt_proj"])
def test_linears_whose_weight_is_used_without_calling_them_are_not_silently_zero(family):
    # DEFECT: these nn.Linear modules never run their forward: the model uses their weight directly
    #   - MobileBERT's MLM head: hidden.matmul(cat([decoder.weight.t(), dense.weight]))  (cls.predictions.dense,
    #     cls.predictions.decoder),
    #   - WavLM's attention: F.multi_head_attention_forward(q_proj_weight=self.q_proj.weight, ...,
    #     self.out_proj.weight)  (q_proj, k_proj, v_proj, out_proj of every layer),
    #   - Mamba's mixer (the torch path, i.e. every CPU run and every GPU run without the mamba-ssm kernels):
    #     time_step = self.dt_proj.weight @ time_step  (dt_proj of every layer).
    # They are selected by default, no hook ever fires, and collect() (missing="zeros", the default) returns rows of
    # ZEROS although their weights get real, non-zero per-example gradients. Exactly the nn.MultiheadAttention
    # out_proj situation that _unhookable() refuses, but only that one class is recognised. Correct: the true rows,
    # or an error naming the module (as for MHA's out_proj).
    if family == "mobilebert_mlm_head":
        model = tiny_mobilebert_mlm()
        ids, mask = padded(T=6, left=False)
        make = lambda: run(model, lambda: mlm_losses(model, ids, mask).sum(), mask)
        ref = untied(model)
        want = reference(ref, linear_names(model), 3, lambda b: mlm_losses(ref, ids[b:b + 1], mask[b:b + 1]).sum())
        name = "cls.predictions.dense"
    elif family == "wavlm_attention":
        model = tiny_wavlm()
        x = torch.randn(3, 200, generator=torch.Generator().manual_seed(2))
        lf = lambda x: model(x).last_hidden_state.sin().sum()
        make = lambda: run(model, lambda: lf(x))
        want = reference(model, linear_names(model), 3, lambda b: lf(x[b:b + 1]))
        name = "encoder.layers.0.attention.q_proj"
    else:
        model = tiny_mamba()
        ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(3))
        mask = torch.ones(3, 6)
        make = lambda: run(model, lambda: lm_losses(model, ids).sum(), mask)
        ref = untied(model)
        want = reference(ref, linear_names(model), 3, lambda b: lm_losses(ref, ids[b:b + 1]).sum())
        name = "backbone.layers.0.mixer.dt_proj"
    assert float(want[name].abs().max()) > 0  # the weight does get a per-example gradient
    collected_or_refused(make, want, name)


class MuReadout(nn.Linear):
    """The readout layer of the `mup` package (Yang et al., muP), verbatim apart from the width multiplier, which
    mup reads from ``self.weight.infshape.width_mult()`` after ``set_base_shapes``."""

    def __init__(self, *args, output_mult=1.0, width_mult=4.0, **kwargs):
        self.output_mult = output_mult
        self._width_mult = width_mult
        super().__init__(*args, **kwargs)

    def width_mult(self):
        return self._width_mult

    def forward(self, x):
        return super().forward(self.output_mult * x / self.width_mult())


@pytest.mark.parametrize("layer", ["mup_readout", "bitnet_autobitlinear"])
def test_linear_subclass_that_transforms_its_input_is_not_silently_wrong(layer):
    # DEFECT: an nn.Linear subclass whose forward applies the weight to something other than the module input:
    #   - muP's MuReadout: super().forward(output_mult * x / width_mult)   (input scaled by 1/4 here),
    #   - transformers.integrations.bitnet.AutoBitLinear (BitNet quantisation-aware training, online_quant=True,
    #     use_rms_norm=True): F.linear(ActQuant(rms_norm(x)), WeightQuant(W)) with straight-through estimators.
    # Input and output widths are the weight's, so the session-33 width check passes, and the collector forms
    # sum_t g_t x_t^T from the module's INPUT x: the muP readout's rows come out width_mult (4x) too large, the
    # BitNet layer's rows are those of un-normalised activations (relative error ~0.55). Correct: the weight's true
    # per-example gradient, or an error naming the module (a Linear subclass overriding forward cannot be trusted
    # to apply its weight to its input as nn.Linear does).
    torch.manual_seed(0)
    if layer == "mup_readout":
        head = MuReadout(8, 5)
    else:
        from transformers.integrations.bitnet import AutoBitLinear

        head = AutoBitLinear(8, 5, bias=False, online_quant=True, use_rms_norm=True)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), head)
    x = torch.randn(3, 4, 6)
    lf = lambda x: model(x).sin().sum()
    with torch._dynamo.config.patch(disable=True):  # BitNet's quantisers are @torch.compile'd: run them eagerly
        want = reference(model, ["0", "2"], 3, lambda b: lf(x[b:b + 1]))
        collected_or_refused(lambda: run(model, lambda: lf(x)), want, "'2'")


@pytest.mark.parametrize("family", ["xlnet", "longformer"])
def test_hf_sequence_first_layers_with_t_equal_b_are_not_silently_wrong(family):
    # DEFECT: XLNet runs its whole stack sequence-first (input_ids.transpose(0, 1): its ff.layer_1 / layer_2 see
    # (T, B, d)); Longformer's self-attention does hidden_states.transpose(0, 1) before query / key / value. When
    # T == B the batch-size check cannot notice, and even the (B, T) padding mask passes the shape check (it is then
    # applied transposed). The collector returns B rows of per-POSITION gradients summed over the batch: relative
    # errors 0.6 - 1.3, default selection, with or without set_mask. Session 39 refuses torch's nn.Transformer layers
    # built with batch_first=False for exactly this reason (_sequence_first), but knows no Hugging Face model.
    # Correct: an error naming the sequence-first modules (or the true rows).
    B = T = 4
    model = tiny_xlnet() if family == "xlnet" else tiny_longformer()
    lossf = lm_losses if family == "xlnet" else mlm_losses
    ids = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(B, T, dtype=torch.long)
    ref = untied(model)
    want = reference(ref, linear_names(model), B, lambda b: lossf(ref, ids[b:b + 1]).sum())
    # session 39: these modules are read with the batch on their input's second axis (_HF_SEQUENCE_FIRST): the rows
    assert_rows(run(model, lambda: lossf(model, ids).sum(), mask), want)
    assert_rows(run(model, lambda: lossf(model, ids).sum()), want)


@pytest.mark.parametrize("case", ["bert_multiple_choice", "longformer_attention", "xlnet_layers",
                                  "swin_window_attention"])
def test_modules_whose_first_axis_is_not_the_batch_do_not_return_that_many_rows(case):
    # DEFECT: when every selected module's input agrees on a first axis that is NOT the batch, nothing checks it
    # against the batch the model was given, and collect() silently returns one row per choice / position / window:
    #   - BertForMultipleChoice (SWAG / RACE / ARC fine-tuning), DEFAULT selection: input_ids (B, num_choices, T) are
    #     flattened to (B * num_choices, T), so every Linear sees B * num_choices rows -> 6 rows for 3 questions
    #     (each question's gradient is the sum of its choices' rows; its loss couples them through the softmax),
    #   - Longformer, modules="*.attention.self.*": query/key/value see (T, B, d) -> 8 rows for 3 examples,
    #   - XLNet, modules="transformer.*" (the layers without the LM head): (T, B, d) -> 8 rows for 3 examples,
    #   - Swin, the window attention of stage 0: (B * num_windows, window_size**2, C) -> 12 rows for 3 examples
    #     (summing each example's 4 window rows gives exactly the reference: the rows are windows, not examples).
    # The model's own input says the batch: integer input_ids (B, T) / (B, num_choices, T) (the collector already
    # looks at them in _model_pre_hook, but only at 2-D ones, and checks only 2-D module inputs against them) or
    # (B, C, H, W) pixel_values. Correct: an error naming the module (or B per-example rows).
    if case == "bert_multiple_choice":
        from transformers import BertConfig, BertForMultipleChoice

        torch.manual_seed(0)
        model = BertForMultipleChoice(BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            pad_token_id=1)).eval()
        ids = torch.randint(3, VOCAB, (3, 2, 5), generator=torch.Generator().manual_seed(5))
        labels = torch.tensor([0, 1, 1])
        lf = lambda ids, lab: F.cross_entropy(model(input_ids=ids).logits, lab, reduction="none")
        names = linear_names(model)
        want = reference(model, names, 3, lambda b: lf(ids[b:b + 1], labels[b:b + 1]).sum())
        make = lambda: run(model, lambda: lf(ids, labels).sum())
    elif case == "swin_window_attention":
        model = tiny_swin()
        x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
        lf = lambda x: model(pixel_values=x).logits.sin().sum()
        pattern = "swin.encoder.layers.0.blocks.*.attention.*"
        names = [n for n in linear_names(model) if n.startswith("swin.encoder.layers.0.") and ".attention." in n]
        want = reference(model, names, 3, lambda b: lf(x[b:b + 1]))
        make = lambda: run(model, lambda: lf(x), modules=pattern)
    else:
        model = tiny_longformer() if case == "longformer_attention" else tiny_xlnet()
        lossf = mlm_losses if case == "longformer_attention" else lm_losses
        pattern = "*.attention.self.*" if case == "longformer_attention" else "transformer.*"
        ids = torch.randint(3, VOCAB, (3, 8), generator=torch.Generator().manual_seed(6))
        names = [n for n in linear_names(model) if fnmatch.fnmatchcase(n, pattern)]
        want = reference(model, names, 3, lambda b: lossf(model, ids[b:b + 1]).sum())
        make = lambda: run(model, lambda: lossf(model, ids).sum(), modules=pattern)
    collected_or_refused(make, want, names[0])


def test_opt_flattened_mlp_fed_inputs_embeds_is_not_taken_as_b_times_t_examples():
    # DEFECT: OPT's fc1 / fc2 get hidden.reshape(-1, H), (B * T, H). With no mask and no hooked (B, T, H) module the
    # collector refuses B * T rows only when the model was given integer token ids (_model_pre_hook /
    # _check_pending); a model called with inputs_embeds= (soft prompts, embedding perturbations, ...) is not
    # recognised, so the 15 token rows of 3 examples x 5 tokens come back as 15 "examples". The (B, T, H)
    # inputs_embeds tells (B, T) just as well. Correct: the 3 per-example rows (as with set_mask(ones)), or the same
    # refusal as for input_ids, naming the module.
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=24, num_hidden_layers=1, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = OPTForCausalLM(cfg).eval()
    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(7))

    def losses(ids):
        logits = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
        tok = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
        return tok.view(ids.shape[0], -1).sum(1)

    names = ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"]
    want = reference(model, names, 3, lambda b: losses(ids[b:b + 1]).sum())
    assert_rows(run(model, lambda: losses(ids).sum(), torch.ones(3, 5), modules="*.fc?"), want)  # with a mask: right
    collected_or_refused(lambda: run(model, lambda: losses(ids).sum(), modules="*.fc?"), want, names[0])


@pytest.mark.xfail(strict=True, reason="known limitation (session 39): with B = 1 and T = 2 * position_buckets nothing "
                   "tells DeBERTa's relative-position call of query_proj / key_proj from its token call")
def test_deberta_v3_padding_mask_is_not_applied_to_the_relative_position_embeddings():
    # DEFECT: DeBERTa-v2/v3 run query_proj / key_proj (share_att_key=True, v3) or pos_query_proj / pos_key_proj (v2)
    # a second time on the relative-position embeddings, a (1, 2 * position_buckets, H) input shared by the whole
    # batch. With B > 1 that is refused (batch-size check), so B = 1 is how DeBERTa gets collected; and when the
    # padded length T equals 2 * position_buckets -- deberta-v3-base: position_buckets = 256 and the usual
    # padding="max_length", max_length=512 -- the (1, T) padding mask passes the shape check for that input and is
    # applied to the relative-position ROWS (they are not tokens, nothing there is padding). Rows of query_proj /
    # key_proj lose the contribution of the "masked" relative positions: relative error 0.15 / 0.36 here (0.3 - 0.9
    # with other seeds / paddings). Correct: the
    # mask applied only to inputs whose rows are the batch's tokens (or an error naming the module).
    model = tiny_deberta_v3()
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(8))  # T = 8 = 2 * position_buckets
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, 3:] = 0  # right padding
    ids = ids.masked_fill(mask == 0, 1)
    lf = lambda: cls_losses(model, ids, mask).sum()
    want = reference(model, linear_names(model), 1, lambda b: lf())
    assert_rows(run(model, lf), want)  # without the mask the rows are right (the loss ignores the padding anyway)
    collected_or_refused(lambda: run(model, lf, mask), want, "deberta.encoder.layer.0.attention.self.query_proj")


# ============================================================================= checked and found correct
def _decoder(family):
    import transformers as T

    common = dict(vocab_size=VOCAB, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    if family == "gemma":
        return T.GemmaForCausalLM(T.GemmaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                                num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                                max_position_embeddings=32, **common)), False
    if family == "gemma2_sliding":
        return T.Gemma2ForCausalLM(T.Gemma2Config(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                                  max_position_embeddings=32, sliding_window=4, **common)), False
    if family == "phi":
        return T.PhiForCausalLM(T.PhiConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                            num_attention_heads=2, max_position_embeddings=32, resid_pdrop=0.0,
                                            embd_pdrop=0.0, attention_dropout=0.0, **common)), True
    if family == "phi3_fused":
        return T.Phi3ForCausalLM(T.Phi3Config(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=2,
                                              max_position_embeddings=32, **common)), False
    if family == "bloom_alibi":
        return T.BloomForCausalLM(T.BloomConfig(hidden_size=16, n_layer=1, n_head=2, **common)), True
    if family == "falcon_mqa":
        return T.FalconForCausalLM(T.FalconConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                  new_decoder_architecture=False, multi_query=True, alibi=False,
                                                  **common)), False
    if family == "falcon_alibi_bias":
        return T.FalconForCausalLM(T.FalconConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                  alibi=True, bias=True, **common)), True
    if family == "gptj":
        return T.GPTJForCausalLM(T.GPTJConfig(n_embd=16, n_layer=1, n_head=2, rotary_dim=4, n_positions=32,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)), False
    if family == "gpt_neo_local":
        return T.GPTNeoForCausalLM(T.GPTNeoConfig(hidden_size=16, num_layers=2, num_heads=2,
                                                  attention_types=[[["global", "local"], 1]], window_size=4,
                                                  max_position_embeddings=32, **common)), False
    if family == "olmo2":
        return T.Olmo2ForCausalLM(T.Olmo2Config(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                                num_attention_heads=2, max_position_embeddings=32, **common)), False
    if family == "qwen3":
        return T.Qwen3ForCausalLM(T.Qwen3Config(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                                num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                                max_position_embeddings=32, **common)), False
    raise KeyError(family)


@pytest.mark.parametrize("family", ["gemma", "gemma2_sliding", "phi", "phi3_fused", "bloom_alibi", "falcon_mqa",
                                    "falcon_alibi_bias", "gptj", "gpt_neo_local", "olmo2", "qwen3"])
def test_decoder_lms_left_padding_default_selection(family):
    model, bias = _decoder(family)
    check_lm(model.eval(), lm_losses, left=True, bias=bias)


def _encoder(family):
    import transformers as T

    enc = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
               max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1,
               num_labels=3)
    torch.manual_seed(0)
    if family == "roberta":
        return T.RobertaForSequenceClassification(T.RobertaConfig(**enc))
    if family == "distilbert":
        return T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, hidden_dim=24, dropout=0.0, attention_dropout=0.0,
            seq_classif_dropout=0.0, num_labels=3, pad_token_id=1))
    if family == "electra":
        return T.ElectraForSequenceClassification(T.ElectraConfig(embedding_size=8, **enc))
    if family == "albert_shared_layers":
        return T.AlbertForSequenceClassification(T.AlbertConfig(embedding_size=8, num_hidden_groups=1,
                                                                inner_group_num=1, **{**enc, "num_hidden_layers": 2}))
    if family == "mpnet":
        return T.MPNetForSequenceClassification(T.MPNetConfig(**enc))
    if family == "modernbert":
        return T.ModernBertForSequenceClassification(T.ModernBertConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2, num_labels=3,
            global_attn_every_n_layers=2, local_attention=4, max_position_embeddings=32))
    raise KeyError(family)


@pytest.mark.parametrize("family", ["roberta", "distilbert", "electra", "albert_shared_layers", "mpnet",
                                    "modernbert"])
def test_encoder_classifiers_right_padding_bias_default_selection(family):
    check_lm(_encoder(family).eval(), cls_losses, left=False, bias=True)


def test_deberta_v3_batch_of_several_is_refused_by_name_and_one_without_mask_is_right():
    model = tiny_deberta_v3()
    ids, mask = padded(T=6, left=False)
    with pytest.raises((ValueError, RuntimeError), match="query_proj|key_proj"):
        run(model, lambda: cls_losses(model, ids, mask).sum(), mask)
    with pytest.raises((ValueError, RuntimeError), match="query_proj|key_proj"):
        run(model, lambda: cls_losses(model, ids, mask).sum())
    one, m1 = ids[1:2], mask[1:2]
    want = reference(model, linear_names(model), 1, lambda b: cls_losses(model, one, m1).sum())
    assert_rows(run(model, lambda: cls_losses(model, one, m1).sum()), want)


def test_vit_and_clip_dual_encoder():
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16,
                                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                               num_labels=3, hidden_dropout_prob=0.0,
                                               attention_probs_dropout_prob=0.0)).eval()
    x = torch.randn(3, 3, 16, 16)
    lf = lambda x: vit(pixel_values=x).logits.sin().sum()
    assert_rows(run(vit, lambda: lf(x), bias=True), reference(vit, linear_names(vit), 3, lambda b: lf(x[b:b + 1]),
                                                              bias=True))

    tc = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
              max_position_embeddings=16, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    vc = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=16,
              patch_size=8)
    clip = CLIPModel(CLIPConfig(text_config=tc, vision_config=vc, projection_dim=8)).eval()
    ids = torch.randint(3, VOCAB, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 3:] = 0
    ids[0, 5], ids[1, 3], ids[2, 2] = 2, 2, 2  # eos: pooled position

    def losses(ids, mask, x):
        o = clip(input_ids=ids, attention_mask=mask, pixel_values=x)
        return (o.text_embeds * o.image_embeds).sum(-1)

    want = reference(clip, linear_names(clip), 3, lambda b: losses(ids[b:b + 1], mask[b:b + 1], x[b:b + 1]).sum())
    assert_rows(run(clip, lambda: losses(ids, mask, x).sum()), want)
    # the text padding mask does not fit the vision tower's (B, patches + 1) inputs: refused by name
    with pytest.raises(ValueError, match="vision_model"):
        run(clip, lambda: losses(ids, mask, x).sum(), mask)


def test_swin_default_selection_is_refused_by_name():
    model = tiny_swin()
    x = torch.randn(3, 3, 16, 16)
    with pytest.raises(ValueError, match="swin.encoder.layers.0.blocks.0"):
        run(model, lambda: model(pixel_values=x).logits.sin().sum())


def test_whisper_and_bart_encoder_decoder_without_mask():
    from transformers import BartConfig, BartForConditionalGeneration, WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    whisper = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, d_model=16, encoder_ffn_dim=24, decoder_ffn_dim=24, max_source_positions=8,
        max_target_positions=16, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0)).eval()
    feats, labels = torch.randn(3, 8, 16), torch.randint(3, VOCAB, (3, 5))

    def wl(m, f, lab):
        lg = m(input_features=f, labels=lab).logits
        return F.cross_entropy(lg.reshape(-1, VOCAB), lab.reshape(-1), reduction="none").view(lab.shape[0], -1).sum(1)

    ref = untied(whisper)
    want = reference(ref, linear_names(whisper), 3, lambda b: wl(ref, feats[b:b + 1], labels[b:b + 1]).sum())
    assert_rows(run(whisper, lambda: wl(whisper, feats, labels).sum()), want)

    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=16, dropout=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)).eval()
    ids, am = padded(left=False)

    def bl(m, i, a, lab):
        lg = m(input_ids=i, attention_mask=a, labels=lab).logits
        return F.cross_entropy(lg.reshape(-1, VOCAB), lab.reshape(-1), reduction="none").view(lab.shape[0], -1).sum(1)

    ref = untied(bart)
    want = reference(ref, linear_names(bart), 3, lambda b: bl(ref, ids[b:b + 1], am[b:b + 1], labels[b:b + 1]).sum())
    assert_rows(run(bart, lambda: bl(bart, ids, am, labels).sum()), want)


def test_mamba_every_linear_but_dt_proj_is_right():
    model = tiny_mamba()
    ids = torch.randint(3, VOCAB, (3, 6))
    names = [n for n in linear_names(model) if not n.endswith("dt_proj")]
    got = run(model, lambda: lm_losses(model, ids).sum(), torch.ones(3, 6), modules=names)
    ref = untied(model)
    assert_rows(got, reference(ref, names, 3, lambda b: lm_losses(ref, ids[b:b + 1]).sum()))


def test_packed_sequences_per_token_rows_summed_per_segment():
    # three sequences packed into one row with a block-diagonal causal 4-D mask and restarting position_ids: the
    # per-token rows summed over each segment are that sequence's own gradient
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                         tie_word_embeddings=False, pad_token_id=1, bos_token_id=0,
                                         eos_token_id=2)).eval()
    lens = [4, 3, 5]
    seqs = [torch.randint(3, VOCAB, (n,)) for n in lens]
    packed, pos = torch.cat(seqs)[None], torch.cat([torch.arange(n) for n in lens])[None]
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    N = packed.shape[1]
    am = ((seg[:, None] == seg[None, :]) & (torch.arange(N)[:, None] >= torch.arange(N)[None, :]))[None, None]

    def packed_loss():
        lg = model(input_ids=packed, position_ids=pos, attention_mask=am).logits[0]
        return (F.cross_entropy(lg[:-1], packed[0, 1:], reduction="none") * (pos[0, 1:] != 0)).sum()

    def own_loss(b):
        lg = model(input_ids=seqs[b][None]).logits[0]
        return F.cross_entropy(lg[:-1], seqs[b][1:], reduction="sum")

    got = run(model, packed_loss, per_token=True)
    rows = {k: torch.zeros(3, P * P, dtype=torch.float64).index_add_(0, seg, v[0].double()) for k, v in got.items()}
    assert_rows(rows, reference(model, linear_names(model), 3, own_loss))


def _effective_weight_reference(model, names, x, lossf):
    """Per-example gradient w.r.t. the weight each Linear APPLIES (for parametrized / pruned / normed weights, the
    tensor handed to F.linear), from the module's input and output gradient of each example run alone."""
    mods = dict(model.named_modules())
    out = {k: [] for k in names}
    for b in range(x.shape[0]):
        seen = {}
        hs = [mods[k].register_forward_hook(lambda m, a, o, k=k: seen.__setitem__(k, (a[0], o))) for k in names]
        try:
            gs = torch.autograd.grad(lossf(x[b:b + 1]), [seen[k][1] for k in names])
        finally:
            for h in hs:
                h.remove()
        for k, g in zip(names, gs):
            out[k].append(lgr(torch.einsum("...o,...i->oi", g.double(), seen[k][0].detach().double()), k))
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("how", ["parametrize_weight_norm_orthogonal", "old_weight_norm_spectral_norm", "prune"])
def test_reparametrized_weights_give_the_applied_weights_gradient(how):
    import torch.nn.utils.prune as prune
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "parametrize_weight_norm_orthogonal":
            parametrizations.weight_norm(model[0])
            parametrizations.orthogonal(model[2])
        elif how == "old_weight_norm_spectral_norm":
            torch.nn.utils.weight_norm(model[0])
            torch.nn.utils.spectral_norm(model[2])
        else:
            prune.l1_unstructured(model[0], "weight", amount=0.5)
    model.eval()
    x = torch.randn(3, 4, 6)
    lf = lambda x: model(x).sin().sum()
    assert_rows(run(model, lambda: lf(x)), _effective_weight_reference(model, ["0", "2"], x, lf))


class LoRALinear(nn.Linear):
    """A hand-written LoRA layer: W x + b + scaling * B(A(x)), the Linear's own weight applied to its input."""

    def __init__(self, i, o, r=2, alpha=4):
        super().__init__(i, o)
        self.lora_A = nn.Linear(i, r, bias=False)
        self.lora_B = nn.Linear(r, o, bias=False)
        nn.init.normal_(self.lora_B.weight)
        self.scaling = alpha / r

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x)) * self.scaling


def test_lora_style_linear_subclass_and_its_adapters():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(6, 8), nn.Tanh(), LoRALinear(8, 5))
    x = torch.randn(3, 4, 6)
    lf = lambda x: model(x).sin().sum()
    got = run(model, lambda: lf(x), bias=True)
    assert set(got) == {"0", "0.lora_A", "0.lora_B", "2", "2.lora_A", "2.lora_B"}
    assert_rows(got, reference(model, list(got), 3, lambda b: lf(x[b:b + 1]), bias=True))


class TeacherStudent(nn.Module):
    """A frozen-teacher pass under no_grad / inference_mode through the same Linear as the graded pass."""

    def __init__(self, ctx):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.ctx = ctx

    def forward(self, x):
        with self.ctx():
            t = torch.tanh(self.fc(x)).clone()
        return self.head(torch.tanh(self.fc(x)) + t)


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_no_grad_sub_block_through_a_hooked_module(ctx):
    model = TeacherStudent(ctx)
    x = torch.randn(3, 4, 6)
    lf = lambda x: model(x).sin().sum()
    assert_rows(run(model, lambda: lf(x)), reference(model, ["fc", "head"], 3, lambda b: lf(x[b:b + 1])))


class MixerBlock(nn.Module):
    """MLP-Mixer: token mixing is a Linear over the TOKEN axis of a transposed (B, C, T) view."""

    def __init__(self, T=5, C=4):
        super().__init__()
        torch.manual_seed(0)
        self.token_mix = nn.Linear(T, T)
        self.channel_mix = nn.Linear(C, C)

    def forward(self, x):  # (B, T, C)
        x = x + self.token_mix(x.transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mix(x)


def test_linear_on_a_transposed_view_mlp_mixer():
    model = MixerBlock()
    x = torch.randn(3, 5, 4)
    lf = lambda x: model(x).sin().sum()
    assert_rows(run(model, lambda: lf(x), bias=True),
                reference(model, ["token_mix", "channel_mix"], 3, lambda b: lf(x[b:b + 1]), bias=True))


def test_autocast_bf16_llama_with_left_padding():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                         tie_word_embeddings=False, pad_token_id=1, bos_token_id=0,
                                         eos_token_id=2)).eval()
    ids, mask = padded()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(model, lambda: lm_losses(model, ids, mask).sum(), mask)
    want = reference(model, linear_names(model), 3, lambda b: lm_losses(model, ids[b:b + 1], mask[b:b + 1]).sum())
    assert_rows(got, want, rtol=5e-2)


def test_per_example_grads_dict_batches_bert_mean_loss_scale_batch():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
        pad_token_id=1)).eval()
    ids, mask = padded(left=False)
    tt = torch.zeros_like(ids)
    tt[:, 3:] = 1
    labels = torch.tensor([0, 2, 1])
    batches = [dict(input_ids=ids[:2], attention_mask=mask[:2], token_type_ids=tt[:2], labels=labels[:2]),
               dict(input_ids=ids[2:], attention_mask=mask[2:], token_type_ids=tt[2:], labels=labels[2:])]
    col = GradientCollector(model, p=P, seed=SEED, bias=True)
    got = list(col.per_example_grads(batches, lambda m, b: m(**b).loss, scale="batch"))  # HF's batch-mean loss
    got = {k: torch.cat([g[k] for g in got]) for k in got[0]}
    want = reference(model, linear_names(model), 3, lambda b: model(
        input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], token_type_ids=tt[b:b + 1], labels=labels[b:b + 1]).loss,
        bias=True)
    assert_rows(got, want)


def test_adafactor_normalizer_on_gpt2_conv1d_with_mask_and_bias():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                       eos_token_id=0)).eval()
    name = "transformer.h.0.mlp.c_fc"  # Conv1D, weight (I, O) = (16, 64)
    g = torch.Generator().manual_seed(9)
    # Adafactor's state for the stored (I, O) weight: exp_avg_sq_row (I,), exp_avg_sq_col (O,); the collector takes
    # nn.Linear layout, so row / col swap
    st_row, st_col, bias_sq = torch.rand(16, generator=g) + 0.1, torch.rand(64, generator=g) + 0.1, torch.rand(64) + .1
    nz = AdafactorNormalizer(row=st_col, col=st_row, bias_avg_sq=bias_sq)
    ids, mask = padded(T=6)
    got = run(model, lambda: lm_losses(model, ids, mask).sum(), mask, modules=name, bias=True,
              normalizers={name: nz})[name]
    rows = []
    mod = model.get_submodule(name)
    r, c = st_col.double() + nz.eps, st_row.double() + nz.eps
    for b in range(3):
        model.zero_grad(set_to_none=True)
        lm_losses(model, ids[b:b + 1], mask[b:b + 1]).sum().backward()
        G = mod.weight.grad.double().T / (torch.outer(r, c) / r.mean()).sqrt()
        gb = mod.bias.grad.double() / (bias_sq.double() + nz.bias_eps).sqrt()
        rows.append(lgr(torch.cat([G, gb[:, None]], 1), name))
    model.zero_grad(set_to_none=True)
    assert_rows({name: got}, {name: torch.stack(rows)})


@pytest.mark.parametrize("dora", [False, True])
def test_peft_lora_adapters_on_gpt2_conv1d_with_left_padding(dora):
    # peft's LoRA around GPT-2's Conv1D (fan_in_fan_out): the adapters' rows are right; DoRA also calls lora_A on an
    # identity matrix (in_features rows; here B * T = 2 * 8 = 16 = in_features, so those rows look like the batch's
    # tokens) to form its weight norm, but detaches it, so that call gets no gradient and the rows stay right. The
    # default selection includes the frozen base layers, whose outputs cannot require grad: refused by name.
    peft = pytest.importorskip("peft")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=0)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0,
                                                          fan_in_fan_out=True, init_lora_weights=False,
                                                          use_dora=dora)).eval()
    ids, mask = padded(T=8)
    ids, mask = ids[:2], mask[:2]  # the second example left-padded by 3
    names = [n for n in linear_names(model) if "lora_" in n]
    assert len(names) == 2
    want = reference(model, names, 2, lambda b: lm_losses(model, ids[b:b + 1], mask[b:b + 1]).sum())
    assert_rows(run(model, lambda: lm_losses(model, ids, mask).sum(), mask, modules="*lora_*"), want)
    with pytest.raises(ValueError, match="base_layer"):
        run(model, lambda: lm_losses(model, ids, mask).sum(), mask)


def test_model_inputs_of_two_batch_sizes_each_tower_keeps_its_own():
    # session 39's model-batch check: a module's batch must be one the model's inputs show. A CLIP-like model given
    # 5 text prompts (input_ids) and 3 images (pixel_values): the image tower's rows are per image, not refused
    class TwoTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 6)
            self.text = nn.Linear(6, 4)
            self.image = nn.Linear(12, 4)

        def forward(self, input_ids, pixel_values):
            t = self.text(self.emb(input_ids)).mean(1)  # (5, 4)
            v = self.image(pixel_values.flatten(1))  # (3, 4)
            return v @ t.T  # (3, 5)

    torch.manual_seed(3)
    model = TwoTower()
    ids = torch.randint(0, VOCAB, (5, 7), generator=torch.Generator().manual_seed(4))
    pix = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    lf = lambda px: model(input_ids=ids, pixel_values=px).sin().sum()
    want = reference(model, ["image"], 3, lambda b: lf(pix[b:b + 1]))
    assert_rows(run(model, lambda: lf(pix), modules="image"), want)
    # a module whose rows match neither input's batch (each image folded into 2 halves: 6 rows) is still refused
    model.image = nn.Sequential(nn.Unflatten(1, (2, 6)), nn.Flatten(0, 1), nn.Linear(6, 4),  # (6, 4): halves
                                nn.Unflatten(0, (3, 2)), nn.Flatten(1), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"^modules: 'image\.2' got a 2-D input of 6 rows, but the model's input_ids "
                                         r"of shape \(5, 7\) holds 5 examples"):
        run(model, lambda: lf(pix), modules="image.2")
