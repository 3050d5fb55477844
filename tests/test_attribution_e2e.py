"""Issue 6 end to end on a small randomly initialised transformer built in code (no downloads):
collect projected per-example gradients -> build an on-disk index -> reopen -> search. Every training
example, used as a query, retrieves itself as its top-1 neighbour; a query made with a different
projection (seed, p) is refused."""
import json

import pytest
import torch
import torch.nn.functional as F

from gradkit.index import GradientIndex, UncheckedProjectionWarning
from gradkit.projection import GradientCollector
from gradkit.testing import random_batches, tiny_gpt

# every search here passes projection= (the collector that made the queries or its config), so
# the index's projection is checked on each call: an unchecked search is an error in this module
pytestmark = pytest.mark.filterwarnings(f"error::{UncheckedProjectionWarning.__module__}."
                                        f"{UncheckedProjectionWarning.__name__}")


def lm_losses(model, batch):
    """Per-example next-token cross-entropy, summed over the real positions -> (B,)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(ids, mask)
    tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                          ignore_index=-100, reduction="none")
    return tok.view(ids.shape[0], -1).sum(1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = tiny_gpt(n_layer=2, d_model=32, n_head=4, vocab=97, seed=0)
    batches = random_batches(8, batch=4, seq=16, vocab=97, seed=1)  # 32 training examples
    col = GradientCollector(model, modules=["transformer.h.*", "lm_head"], p=8, seed=1234)
    path = tmp_path_factory.mktemp("e2e") / "index"
    rows = []
    with GradientIndex.create(path, dict(col.module_dims), projection=col.projection_config) as index:
        for grads in col.per_example_grads(batches, lm_losses):
            assert list(grads) == list(col.module_dims)
            index.append(grads)
            rows.append(grads)
    flat = torch.cat([col.flatten(g) for g in rows])
    return model, batches, col, path, flat


def test_every_example_retrieves_itself(built):
    _, _, col, path, flat = built
    n = flat.shape[0]
    assert n == 32 and flat.shape[1] == col.dim == 9 * 64
    assert torch.isfinite(flat).all() and flat.norm(dim=1).min() > 0
    index = GradientIndex.open(path)
    assert len(index) == n
    scores, indices = index.search(flat, 5, unit_norm=True, projection=col)
    assert scores.shape == indices.shape == (n, 5)
    assert torch.equal(indices[:, 0], torch.arange(n))
    # cosine with itself ~ 1: fp16 storage moves a row's direction only to second order (~2^-22), and the
    # fp32 dot over 576 entries adds ~sqrt(576) * 2^-24; measured 1.4e-6, so 1e-5 (atol 5e-3 passed a cosine of 0.995)
    assert torch.allclose(scores[:, 0].float(), torch.ones(n), rtol=0, atol=1e-5)
    assert (scores[:, 0] - scores[:, 1]).min() > 1e-2
    # reverse: an example is never its own least similar neighbour
    _, rev = index.search(flat, 1, unit_norm=True, reverse=True, projection=col.projection_config)
    assert not torch.equal(rev[:, 0], torch.arange(n))


def test_query_collected_again_matches_index(built):
    """Collecting a training batch again (a fresh collector with the same config) gives queries that
    find the same examples: the projection is reproducible from the config alone."""
    model, batches, col, path, _ = built
    again = GradientCollector(model, modules=["transformer.h.*", "lm_head"], p=8, seed=1234)
    assert again.projection_config == col.projection_config
    q = next(again.per_example_grads(batches[3:4], lm_losses))
    index = GradientIndex.open(path)
    _, indices = index.search(again.flatten(q), 1, unit_norm=True, projection=again)
    assert indices[:, 0].tolist() == [12, 13, 14, 15]
    # the dict form, scoring one module only
    name = "transformer.h.1.mlp.c_fc"
    _, idx_m = index.search(dict(q), 1, unit_norm=True, modules=[name], projection=again.projection_config)
    assert idx_m[:, 0].tolist() == [12, 13, 14, 15]


def test_header_records_projection(built):
    _, _, col, path, _ = built
    index = GradientIndex.open(path)
    cfg = index.projection
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg == col.projection_config


def test_query_with_other_projection_is_refused(built):
    model, batches, col, path, flat = built
    index = GradientIndex.open(path)
    for kw in ({"seed": 99}, {"p": 4}):
        other = GradientCollector(model, modules=["transformer.h.*", "lm_head"], **{"p": 8, "seed": 1234, **kw})
        q = next(other.per_example_grads(batches[:1], lm_losses))
        with pytest.raises(ValueError, match=r"^projection: the queries were projected with .* but the index with "
                                             r".*; scores across different projections are meaningless$"):
            index.search(other.flatten(q), 1, projection=other.projection_config)
        with pytest.raises(ValueError, match=r"^projection: the queries were projected with "):
            index.search(other.flatten(q), 1, projection=other)  # the collector itself: same check
    # same data with the right config is accepted
    index.search(flat[:2], 1, projection=col.projection_config)


def test_per_token_index_retrieves_each_token(tmp_path):
    """Per-token: one row per real token; every token's vector finds its own row, and example_of
    maps rows back to the training example."""
    # layer 0 of 2: its output at t reaches the losses at every later position through attention,
    # so no two tokens share a gradient (a last-layer MLP token sees only its own next-token loss)
    model = tiny_gpt(n_layer=2, d_model=16, n_head=2, vocab=53, seed=2)
    batches = random_batches(3, batch=3, seq=8, vocab=53, seed=5)
    for b in batches:  # collect every real position but the last, whose output no loss term reads
        m = b["attention_mask"]
        b["collect_mask"] = m * (torch.arange(m.shape[1]) < m.sum(1, keepdim=True) - 1)
    col = GradientCollector(model, modules="transformer.h.0.mlp.*", p=4, seed=5, per_token=True, bias=True)
    rows, ntok = [], []
    with GradientIndex.create(tmp_path / "tok", col.module_dims, dtype=torch.float32, per_token=True,
                              projection=col.projection_config) as index:
        grads = col.per_example_grads(batches, lm_losses, mask_key="collect_mask", flat=True)
        for batch, x in zip(batches, grads):
            assert x.shape == (3, 8, col.dim)
            off = batch["collect_mask"] == 0
            assert torch.equal(x[off], torch.zeros_like(x[off]))
            r, n = col.pack_tokens(x, batch["collect_mask"])
            index.append(r, n)
            rows.append(r)
            ntok.append(n)
    rows, ntok = torch.cat(rows), torch.cat(ntok)
    assert rows.shape[0] == int(ntok.sum()) == sum(int(b["attention_mask"].sum()) - 3 for b in batches)
    index = GradientIndex.open(tmp_path / "tok")
    assert len(index) == rows.shape[0] and index.num_examples == 9
    assert rows.norm(dim=1).min() > 0  # a zero row could not find itself
    _, idx = index.search(rows, 1, unit_norm=True, projection=col.projection_config)
    assert torch.equal(idx[:, 0], torch.arange(rows.shape[0]))
    assert torch.equal(index.example_of(idx[:, 0]), torch.repeat_interleave(torch.arange(9), ntok))
