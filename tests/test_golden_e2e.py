"""Issue 7 end to end on a small randomly initialised transformer built in code: per-sample
gradients -> golden masks (last half of the blocks) -> MaskedAdamW fine-tuning only the golden
entries; and reverse golden masks on the same model."""
import torch
import torch.nn.functional as F

from gradkit import golden as G
from gradkit.optim import MaskedAdamW
from gradkit.testing import random_batches, tiny_gpt


def _per_sample_grads(model, batches):
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            ids = b["input_ids"][i:i + 1]
            am = b["attention_mask"][i:i + 1]
            logits = model(ids, am)
            tgt = ids[:, 1:].masked_fill(am[:, 1:] == 0, -100)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
            yield dict(zip(names, torch.autograd.grad(loss, params)))


def test_golden_then_masked_finetune():
    torch.manual_seed(0)
    model = tiny_gpt(n_layer=4, d_model=32)
    batches = random_batches(3, batch=2, seq=12)
    names = G.layer_filter([n for n, _ in model.named_parameters()], 50.0)
    assert names and all(".h.2." in n or ".h.3." in n for n in names)
    res = G.golden_masks(_per_sample_grads(model, batches), 20.0, params=names, return_counts=True)
    assert res.samples == 6 and res.masks.count() > 0
    for n in names:  # intersection of 6 samples: selected entries were chosen by all 6
        c = res.counts[n]
        assert torch.equal(res.masks[n].to_bool(), c == 6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MaskedAdamW(model.named_parameters(), dict(res.masks), masked_lr=1e-2, unmasked_lr=0.0,
                      weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        b = batches[0]
        logits = model(b["input_ids"], b["attention_mask"])
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["input_ids"][:, 1:].reshape(-1))
        loss.backward()
        opt.step()
    moved = 0
    for n, p in model.named_parameters():
        if n in res.masks:
            m = res.masks[n].to_bool()
            assert torch.equal(p.detach()[~m], before[n][~m])  # unmasked entries bit-exactly unchanged
            moved += int((p.detach()[m] != before[n][m]).sum())
        else:
            assert torch.equal(p.detach(), before[n])  # no mask -> unmasked_lr = 0
    assert moved == res.masks.count()  # every golden entry was trained


def test_reverse_golden_on_tiny_transformer():
    model = tiny_gpt(n_layer=2, d_model=32, seed=3)
    batches = random_batches(4, batch=2, seq=12, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = G.reverse_golden_masks(model, batches, 5.0, strategy="chaos_driven", chunk_size=2, progress=False)
    for n, m in out.masks.items():
        assert int(m.sum()) == G.percent_to_k(m.numel(), 5.0)
    assert out.kl > 0 and out.history
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
