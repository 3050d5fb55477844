"""Audit (s34): per-token gradients end to end, and the normalisers.

GradientCollector(per_token=True) with padding masks (left / right padding, an all-padding example, a
one-token example that bergson gives no rows) -> pack_tokens -> GradientIndex(per_token=True) -> search ->
example_of / (example, token) mapping; bergson's per-token layout (gradients.bin + info.json + offsets.npy)
written by bergson's own pipeline and opened by gradkit; the Adafactor normaliser (never forms G) and the Adam
normaliser (forms G a block at a time within memory_budget) on every budget.

Every value is compared with an explicit reference: the per-token gradient G_bt = g_bt a_bt^T formed in float64
from the module's input and output gradient (captured by independent hooks), normalised by bergson's OWN
normaliser classes (``bergson.gradients.AdamNormalizer`` / ``AdafactorNormalizer``: normalize_weight /
normalize_bias), and projected with the explicit matrices ``projection_matrix(p, n, derive_seed(seed, name,
side))``. The bergson end-to-end test goes further: bergson's unprojected per-token gradients (its own
collector, normalisers and bias column) projected with gradkit's matrices must equal gradkit's per-token rows.

All tests here pass on the current code (no defect found in this area).
"""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradkit.projection as P
from gradkit.index import GradientIndex
from gradkit.projection import (AdafactorNormalizer, AdamNormalizer, GradientCollector, derive_seed,
                                projection_matrix)

transformers = pytest.importorskip("transformers")
bergson = pytest.importorskip("bergson")
import bergson.gradients as BG  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore::gradkit.index.UncheckedProjectionWarning")


# ----------------------------------------------------------------------------- references
def mats(p, O, I, seed, name, kind="rademacher"):
    L = projection_matrix(p, O, seed=derive_seed(seed, name, "left"), kind=kind).double()
    R = projection_matrix(p, I, seed=derive_seed(seed, name, "right"), kind=kind).double()
    return L, R


def explicit_per_token(a, g, mask, p, seed, name, bnorm=None, bias=False):
    """(B, T, p*p) float64: L (N(g_bt a_bt^T) [| N_b(g_bt)]) R^T per token, 0 at masked tokens, where N / N_b are
    bergson's normalize_weight / normalize_bias (bias column unnormalised when the normaliser has no bias_avg_sq)."""
    a, g = a.double(), g.double()
    B, T, I = a.shape
    O = g.shape[-1]
    L, R = mats(p, O, I + int(bias), seed, name)
    out = torch.zeros(B, T, p * p, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if mask is not None and not bool(mask[b, t]):
                continue
            G = torch.outer(g[b, t], a[b, t])
            if bnorm is not None:
                G = bnorm.normalize_weight(G.clone())
            if bias:
                gb = g[b, t].clone()
                if bnorm is not None and bnorm.bias_avg_sq is not None:
                    gb = bnorm.normalize_bias(gb)
                G = torch.cat([G, gb[:, None]], 1)
            out[b, t] = (L @ G @ R.T).reshape(-1)
    return out


def assert_close_rel(got, want, rtol=1e-5, what=""):
    assert tuple(got.shape) == tuple(want.shape), (what, tuple(got.shape), tuple(want.shape))
    assert torch.isfinite(got).all(), what
    scale = max(float(want.abs().max()), 1e-12)
    err = float((got.double() - want).abs().max())
    assert err <= rtol * scale, f"{what}: max error {err:.3g} (max |want| {scale:.3g})"


def capture(model, names):
    """Independent hooks: each module's input a and output gradient g of the next forward/backward."""
    mods = dict(model.named_modules())
    cap, hs = {}, []
    for n in names:
        def fh(mod, args, out, n=n):
            cap[n] = {"a": args[0].detach().clone()}
            out.register_hook(lambda gr, n=n: cap[n].__setitem__("g", gr.detach().clone()))
        hs.append(mods[n].register_forward_hook(fh))
    return cap, hs


def tiny_hf_gpt2(seed=0, vocab=40, n_embd=16, n_inner=None, n_layer=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=n_embd, n_layer=n_layer, n_head=2, n_inner=n_inner,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def lm_loss(model, ids, mask, vocab):
    """Sum over examples of the next-token loss over pairs whose input and target are real tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    tgt = ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), tgt.reshape(-1), ignore_index=-100,
                           reduction="sum")


def padded_batch(vocab=40, seed=1):
    """4 x 7: example 0 full, 1 left-padded by 3, 2 all padding, 3 right-padded by 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :] = 0
    mask[3, 5:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def normalisers_for(kind, shapes, bias, seed=0):
    """gradkit and bergson normalisers with the same second moments, Linear layout (O, I); some zero entries."""
    gen = torch.Generator().manual_seed(seed)
    ours, theirs = {}, {}
    for n, (O, I) in shapes.items():
        v = torch.rand(O, I, generator=gen) + 0.05
        v[0, :] = 0.0  # a row and a column with zero second moments: eps keeps them finite
        v[:, 1] = 0.0
        bv = torch.rand(O, generator=gen)
        bv[0] = 0.0
        bvs = bv if bias else None
        if kind == "adam":
            ours[n] = AdamNormalizer(v, bias_avg_sq=bvs)
            theirs[n] = BG.AdamNormalizer(v.double(), bvs.double() if bias else None)
        elif kind == "adafactor":
            row, col = v.mean(1), v.mean(0)
            row[1] = 0.0
            ours[n] = AdafactorNormalizer(row, col, bias_avg_sq=bvs)
            theirs[n] = BG.AdafactorNormalizer(row.double(), col.double(), bvs.double() if bias else None)
    return ours, theirs


# ============================================================================= collector, per token
@pytest.mark.parametrize("nz", [None, "adam", "adafactor"])
@pytest.mark.parametrize("bias", [False, True])
def test_per_token_rows_equal_explicit_reference_gpt2_conv1d_padding(nz, bias):
    """HF GPT-2 (Conv1D, weight stored (I, O)) with left padding, right padding and an all-padding example: every
    token's row is L N(g_t a_t^T) R^T (bergson's normalisers, zero second moments included), padded positions are
    exactly 0, and the per-token rows sum to a per-example collector's rows (same config)."""
    vocab, p, seed = 40, 3, 11
    model = tiny_hf_gpt2(vocab=vocab)
    ids, mask = padded_batch(vocab)
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    mods = dict(model.named_modules())
    shapes = {n: (mods[n].weight.shape[1], mods[n].weight.shape[0]) for n in names}  # Conv1D: weight is (I, O)
    ours, theirs = normalisers_for(nz, shapes, bias)

    cap, hs = capture(model, names)
    lm_loss(model, ids, mask, vocab).backward()
    for h in hs:
        h.remove()
    model.zero_grad(set_to_none=True)

    col = GradientCollector(model, modules=names, p=p, seed=seed, bias=bias, per_token=True, normalizers=ours,
                            memory_budget=4 * (p + 2) * 3)  # Adam: tiny blocks of G
    assert dict(col.module_shapes) == shapes
    with col:
        col.set_mask(mask)
        col.backward(lm_loss(model, ids, mask, vocab))
        got = col.collect(missing="error")
    for n in names:
        want = explicit_per_token(cap[n]["a"], cap[n]["g"], mask, p, seed, n, theirs.get(n), bias)
        assert got[n].shape == (4, 7, p * p)
        assert float(got[n][mask == 0].abs().max()) == 0.0  # padded positions (all of example 2) are 0
        assert_close_rel(got[n], want, 2e-5, n)

    ex = GradientCollector(model, modules=names, p=p, seed=seed, bias=bias, normalizers=ours)
    with ex:
        ex.set_mask(mask)
        ex.backward(lm_loss(model, ids, mask, vocab))
        per_ex = ex.collect()
    for n in names:
        assert_close_rel(per_ex[n], got[n].double().sum(1), 2e-5, n)


def test_per_token_bf16_model_adam_with_zero_moments_and_bf16_output():
    """A bfloat16 model (bf16 activations and output gradients), Adam second moments held in bfloat16 with zero
    rows: every token's row equals the float64 explicit reference (computed from the same bf16 a, g and v) up to
    the bf16 rounding of the output; finite everywhere."""
    from gradkit.testing import tiny_gpt

    vocab, p, seed = 31, 3, 2
    model = tiny_gpt(n_layer=2, d_model=16, n_head=2, vocab=vocab, seed=3).to(torch.bfloat16)
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    mods = dict(model.named_modules())
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, vocab, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0
    mask[2] = 0

    def loss():
        lg = model(ids, mask).float()
        tgt = ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
        return F.cross_entropy(lg[:, :-1].reshape(-1, vocab), tgt.reshape(-1), ignore_index=-100, reduction="sum")

    ours, theirs = {}, {}
    for n in names:
        O, I = mods[n].weight.shape
        v = torch.rand(O, I, generator=g)
        v[:2] = 0.0
        v = v.bfloat16()
        ours[n] = AdamNormalizer(v)
        theirs[n] = BG.AdamNormalizer(v.double())
    cap, hs = capture(model, names)
    loss().backward()
    for h in hs:
        h.remove()
    model.zero_grad(set_to_none=True)
    col = GradientCollector(model, modules=names, p=p, seed=seed, per_token=True, normalizers=ours,
                            memory_budget=100, dtype=torch.bfloat16)
    with col:
        col.set_mask(mask)
        col.backward(loss())
        got = col.collect()
    for n in names:
        assert got[n].dtype == torch.bfloat16
        want = explicit_per_token(cap[n]["a"], cap[n]["g"], mask, p, seed, n, theirs[n])
        assert_close_rel(got[n].float(), want, 2 ** -7, n)  # bf16 output: 8 significant bits


# ============================================================================= collector -> index -> search
def test_per_token_index_offsets_search_and_mapping_back_to_example_and_token(tmp_path):
    """Per-token rows of two padded batches (left / right padding, an all-padding example, a one-token example)
    -> pack_tokens -> a per-token index (small shards, an append of a batch holding only empty examples): the
    offsets are the cumulated real-token counts, every stored row is the row of (example, k-th real position),
    per-token queries (B, T, D) find their own row, and example_of / offsets map each result back to that
    example and position."""
    vocab, p, seed = 40, 3, 5
    model = tiny_hf_gpt2(vocab=vocab)
    col = GradientCollector(model, modules="transformer.h.0.*", p=p, seed=seed, per_token=True, bias=True)
    ids1, m1 = padded_batch(vocab, seed=1)
    g = torch.Generator().manual_seed(9)
    ids2 = torch.randint(1, vocab, (3, 5), generator=g)
    m2 = torch.tensor([[0, 0, 0, 0, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])  # one real token (left padded)
    ids2 = ids2.masked_fill(m2 == 0, 0)
    empty_ids, empty_m = torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)

    def loss_all_tokens(model, batch):  # every real position's output reaches the loss (no zero rows)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        w = batch["attention_mask"][..., None].float()
        return (out.float().sin() * w).sum()

    batches = [{"input_ids": ids1, "attention_mask": m1}, {"input_ids": empty_ids, "attention_mask": empty_m},
               {"input_ids": ids2, "attention_mask": m2}]
    xs, ms = [], []
    with GradientIndex.create(tmp_path / "tok", col.module_dims, dtype=torch.float32, per_token=True, shard_rows=5,
                              projection=col) as index:
        for batch, x in zip(batches, col.per_example_grads(batches, loss_all_tokens, flat=True)):
            m = batch["attention_mask"]
            assert x.shape == (*m.shape, col.dim)
            rows, ntok = col.pack_tokens(x, m)
            assert ntok.tolist() == m.sum(1).tolist()
            index.append(rows, ntok)
            xs.append(x)
            ms.append(m)
    ix = GradientIndex.open(tmp_path / "tok")
    counts = torch.cat([m.sum(1) for m in ms])
    assert ix.per_token and ix.num_examples == 9 and len(ix) == int(counts.sum()) == 16 + 0 + 8
    assert ix.offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist()

    # every stored row: example e, position = the k-th real position of e in its padded batch
    where = []  # (batch, b, t) of each example's real positions
    for bi, m in enumerate(ms):
        for b in range(m.shape[0]):
            where.append([(bi, b, t) for t in range(m.shape[1]) if m[b, t]])
    stored = ix.get(range(len(ix)))
    ex_of = ix.example_of(torch.arange(len(ix)))
    for r in range(len(ix)):
        e = int(ex_of[r])
        k = r - int(ix.offsets[e])
        bi, b, t = where[e][k]
        assert torch.equal(stored[r], xs[bi][b, t])
    assert all(int((ex_of == e).sum()) == len(where[e]) for e in range(9))  # empty examples own no row

    # per-token queries (B, T, D): each real position finds its own row first (cosine 1)
    for bi, (x, m) in enumerate(zip(xs, ms)):
        if not m.any():
            continue
        s, idx = ix.search(x, 1, unit_norm=True, projection=col)
        assert s.shape == idx.shape == (*m.shape, 1)
        base = sum(ms[j].shape[0] for j in range(bi))
        for b in range(m.shape[0]):
            for t in range(m.shape[1]):
                if not m[b, t]:
                    continue
                r = int(idx[b, t, 0])
                e = int(ix.example_of(r))
                assert e == base + b and where[e][r - int(ix.offsets[e])] == (bi, b, t)
                assert abs(float(s[b, t, 0]) - 1.0) < 1e-5


# ============================================================================= bergson's own per-token build
def test_bergson_per_token_build_opens_and_equals_collector_rows(tmp_path):
    """bergson's own pipeline (collect_gradients, attribute_tokens=True, no projection, bias column, an Adam and
    an Adafactor normaliser) on a tiny GPT-2 with documents of lengths 5, 1, 8, 3, 6, 2 (bergson collects every
    real position but each document's last, so the one-token document has 0 rows). gradkit opens that index with
    bergson's rows and offsets; gradkit's per-token collector, masked with the same positions, gives rows equal to
    bergson's per-token gradients projected with gradkit's explicit matrices; a gradkit per-token index of those
    rows has bergson's offsets, and each row finds itself."""
    from datasets import Dataset

    from bergson.collection import collect_gradients
    from bergson.config.config import IndexConfig
    from bergson.data import TokenGradients

    vocab, p, seed = 32, 3, 7
    model = tiny_hf_gpt2(vocab=vocab, n_embd=8, n_inner=12, n_layer=1)
    rng = np.random.default_rng(0)
    lens = [5, 1, 8, 3, 6, 2]
    docs = [rng.integers(0, vocab, size=n).tolist() for n in lens]
    ds = Dataset.from_dict({"input_ids": docs, "length": lens})
    g = torch.Generator().manual_seed(0)
    bnorms = {"h.0.mlp.c_fc": BG.AdamNormalizer(torch.rand(12, 8, generator=g), torch.rand(12, generator=g)),
              "h.0.mlp.c_proj": BG.AdafactorNormalizer(torch.rand(8, generator=g), torch.rand(12, generator=g),
                                                       torch.rand(8, generator=g))}
    run = tmp_path / "run"
    icfg = IndexConfig(run_path=str(run), projection_dim=0, token_batch_size=64, attribute_tokens=True)
    collect_gradients(model, ds, BG.GradientProcessor(normalizers=bnorms, include_bias=True), icfg)
    shutil.move(str(tmp_path / "run.part"), str(run))  # what bergson's CLI does when the build is done
    info = json.loads((run / "info.json").read_text())
    boffs = np.load(run / "offsets.npy")
    tg = TokenGradients(run)
    assert info["attribute_tokens"] and boffs.tolist() == [0, 4, 4, 11, 13, 18, 19]

    ib = GradientIndex.open(run)
    assert ib.layout == "bergson" and ib.per_token and ib.num_examples == 6 and len(ib) == 19
    assert ib.offsets.tolist() == boffs.tolist()
    full = np.asarray(tg.mmap, dtype=np.float64)
    assert torch.equal(ib.get(range(19)).double(), torch.from_numpy(full))
    assert ib.example_of(torch.arange(19)).tolist() == np.repeat(np.arange(6), np.diff(boffs)).tolist()

    # gradkit's collector on the same positions (right padding, no attention mask: as bergson runs the model)
    B, T = len(lens), max(lens)
    ids = torch.zeros(B, T, dtype=torch.long)
    lab = torch.full((B, T), -100)
    cmask = torch.zeros(B, T, dtype=torch.bool)
    for b, d in enumerate(docs):
        ids[b, :len(d)] = torch.tensor(d)
        lab[b, :len(d)] = torch.tensor(d)
        cmask[b, :len(d) - 1] = True
    ours = {"transformer." + k: (AdamNormalizer(v.weight_avg_sq, v.bias_avg_sq) if isinstance(v, BG.AdamNormalizer)
                                 else AdafactorNormalizer(v.row, v.col, v.bias_avg_sq)) for k, v in bnorms.items()}
    col = GradientCollector(model, modules="transformer.h.0.*", p=p, seed=seed, per_token=True, bias=True,
                            normalizers=ours, memory_budget=500)
    assert [n.removeprefix("transformer.") for n in col.module_dims] == list(info["grad_sizes"])
    with col:
        col.set_mask(cmask)
        logits = model(ids).logits[:, :-1]
        col.backward(F.cross_entropy(logits.reshape(-1, vocab), lab[:, 1:].reshape(-1), reduction="sum"))
        rows, ntok = col.pack_tokens(col.collect(flat=True), cmask)
    assert ntok.tolist() == np.diff(boffs).tolist()

    want, lo = [], 0
    for n, d in info["grad_sizes"].items():
        O, I = col.module_shapes["transformer." + n]
        assert d == O * (I + 1)  # bergson's row: the (O, I + 1) gradient, bias column last, row-major
        G = torch.from_numpy(full[:, lo:lo + d]).reshape(-1, O, I + 1)
        lo += d
        L, R = mats(p, O, I + 1, seed, "transformer." + n)
        want.append((L @ G @ R.T).reshape(-1, p * p))
    assert_close_rel(rows, torch.cat(want, 1), 1e-5, "per-token rows vs bergson's")

    with GradientIndex.create(tmp_path / "gk", col.module_dims, dtype=torch.float32, per_token=True,
                              projection=col) as w:
        w.append(rows[:4], ntok[:2])  # a chunk ending with the 0-row document
        w.append(rows[4:], ntok[2:])
    ig = GradientIndex.open(tmp_path / "gk")
    assert ig.offsets.tolist() == boffs.tolist() and ig.num_examples == ib.num_examples
    _, idx = ig.search(rows, 1, unit_norm=True, projection=col)
    assert torch.equal(idx[:, 0], torch.arange(19))
    assert torch.equal(ig.example_of(idx[:, 0]), ib.example_of(torch.arange(19)))


# ============================================================================= normalisers
def _case(B, T, O, I, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, I, generator=gen).to(dtype)
    g = torch.randn(B, T, O, generator=gen).to(dtype)
    mask = torch.rand(B, T, generator=gen) < 0.6
    mask[0, 0] = True
    mask[-1] = False  # an all-padding example
    a = torch.where(mask[..., None], a, float("nan"))  # padding holds garbage: it must not leak
    return a, g, mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nz", ["adam", "adam-zero", "adafactor", "adafactor-zero"])
def test_normalisers_match_bergson_with_zero_moments_and_half_inputs(dtype, nz):
    """factored_project with bergson's normaliser semantics, every path (fused per-example, Python per-token,
    Adafactor with a bias column, Adam blocks), bf16 / fp16 / fp32 activations, second moments with zero rows and
    columns or all zero (eps keeps every factor finite), a bias column with or without bias second moments (without:
    left as is, as documented): equal to the explicit bergson-normalised reference."""
    B, T, O, I, p = 3, 4, 6, 5, 4
    a, g, mask = _case(B, T, O, I, dtype)
    gen = torch.Generator().manual_seed(5)
    zero = nz.endswith("zero")
    for bias, bias_sq in ((False, False), (True, True), (True, False)):  # bias column unnormalised without bias_sq
        v = torch.zeros(O, I) if zero else torch.rand(O, I, generator=gen)
        if not zero:
            v[0] = 0.0
            v[:, 3] = 0.0
        bv = torch.rand(O, generator=gen)
        bv[1] = 0.0
        if nz.startswith("adam"):
            ours = AdamNormalizer(v, bv if bias_sq else None)
            theirs = BG.AdamNormalizer(v.double(), bv.double() if bias_sq else None)
        else:
            row, col = (torch.zeros(O), torch.zeros(I)) if zero else (v.mean(1), v.mean(0))
            if not zero:
                row[2] = 0.0
            ours = AdafactorNormalizer(row, col, bv if bias_sq else None)
            theirs = BG.AdafactorNormalizer(row.double(), col.double(), bv.double() if bias_sq else None)
        want_tok = explicit_per_token(torch.nan_to_num(a.float()), g.float(), mask, p, 1, "x", theirs, bias)
        for per_token in (False, True):
            got = P.factored_project(a, g, p, seed=1, name="x", mask=mask, bias=bias, per_token=per_token,
                                     normalizer=ours, memory_budget=64)
            want = want_tok if per_token else want_tok.sum(1)
            assert_close_rel(got, want, 1e-5, f"{nz} bias={bias} bias_sq={bias_sq} per_token={per_token}")


@pytest.mark.parametrize("per_token", [False, True])
def test_adam_every_budget_equals_unchunked_and_bergson(per_token):
    """Every memory_budget from the minimum 4 (p + 2) bytes up past the whole computation, in steps of 4 bytes
    (every block plan: columns split, rows split, examples / tokens split, all at once), with a mask, a bias column
    with bias second moments, zero second moments: each result equals the unchunked one within float32 rounding,
    and both equal the explicit reference with bergson's AdamNormalizer."""
    B, T, O, I, p = 3, 3, 5, 4, 3
    a, g, mask = _case(B, T, O, I, torch.float32, seed=2)
    gen = torch.Generator().manual_seed(3)
    v = torch.rand(O, I, generator=gen)
    v[1] = 0.0
    v[:, 2] = 0.0
    bv = torch.rand(O, generator=gen)
    bv[0] = 0.0
    ours, theirs = AdamNormalizer(v, bv), BG.AdamNormalizer(v.double(), bv.double())
    want = explicit_per_token(torch.nan_to_num(a), g, mask, p, 3, "m", theirs, bias=True)
    want = want if per_token else want.sum(1)
    kw = dict(seed=3, name="m", mask=mask, bias=True, per_token=per_token, normalizer=ours)
    whole = P.factored_project(a, g, p, memory_budget=1 << 30, **kw)
    assert_close_rel(whole, want, 1e-5, "unchunked")
    n = B * T if per_token else B
    least, most = 4 * (p + 2), 4 * (O * I + 2 * O * (I + p)) * n + 64
    plans = set()
    for budget in range(least, most, 4):
        plans.add(P._adam_plan(n, O, I, p, budget))
        got = P.factored_project(a, g, p, memory_budget=budget, **kw)
        assert_close_rel(got, whole.double(), 1e-6, f"budget {budget}")
        assert_close_rel(got, want, 1e-5, f"budget {budget}")
    assert len(plans) >= 8 and (1, 1, 1) in plans and (n, O, I) in plans
    with pytest.raises(ValueError, match=r"^memory_budget: "):
        P.factored_project(a, g, p, memory_budget=least - 1, **kw)


class _Largest(TorchDispatchMode):
    """The largest tensor (elements) any aten op creates inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_adafactor_never_forms_g_and_adam_does_per_budget(per_token, bias):
    """The Adafactor normaliser is folded into the projection matrices: no tensor of O*I elements (one G) is ever
    made, per example or per token, with or without the bias column; the Adam normaliser within a budget of one
    row of G makes no tensor that large either, and with an unbounded budget it does (the check is not vacuous)."""
    B, T, O, I, p = 2, 3, 48, 40, 3
    gen = torch.Generator().manual_seed(1)
    a, g = torch.randn(B, T, I, generator=gen), torch.randn(B, T, O, generator=gen)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    v = torch.rand(O, I, generator=gen) + 0.1
    bv = torch.rand(O, generator=gen) + 0.1 if bias else None
    ada = AdafactorNormalizer(v.mean(1), v.mean(0), bv)
    adam = AdamNormalizer(v, bv)
    kw = dict(seed=4, name="blk", mask=mask, bias=bias, per_token=per_token)
    for nz, budget in ((ada, 1 << 30), (adam, 4 * (2 * I + p) * 2)):
        P.factored_project(a, g, p, normalizer=nz, memory_budget=budget, **kw)  # warm the matrix cache
        with _Largest() as tr:
            P.factored_project(a, g, p, normalizer=nz, memory_budget=budget, **kw)
        assert tr.largest < O * I, (type(nz).__name__, tr.largest)
    with _Largest() as tr:
        P.factored_project(a, g, p, normalizer=adam, memory_budget=1 << 30, **kw)
    assert tr.largest >= O * I


def test_pack_tokens_refuses_masks_set_mask_refuses():
    """pack_tokens took any nonzero value as 'keep' (a 2, a 0.5) where set_mask refuses such masks: the same mask
    must mean the same thing to both (0/1 or bool), and a bad one is named."""
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    with pytest.raises(ValueError, match="mask"):
        GradientCollector.pack_tokens(x, torch.tensor([[1, 2, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="mask"):
        GradientCollector.pack_tokens(x, torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]]))
    rows, n = GradientCollector.pack_tokens(x, torch.tensor([[1, 0, 1], [0, 0, 0]]))
    assert torch.equal(rows, x[0, [0, 2]]) and n.tolist() == [2, 0]
    rows_b, n_b = GradientCollector.pack_tokens(x, torch.tensor([[True, False, True], [False, False, False]]))
    assert torch.equal(rows_b, rows) and torch.equal(n_b, n)
