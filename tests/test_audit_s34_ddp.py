"""Audit (session 34): the attribution path run across 2 torch.distributed processes (gloo, CPU), as a bergson user
runs it under torchrun: every rank wraps a tiny randomly initialised transformer (gradkit.testing.tiny_gpt, a plain
nn.Module; Hugging Face GPT-2 built from a tiny config, Conv1D layers) in DistributedDataParallel, hooks it with a
GradientCollector, collects projected per-example gradients of its share of the data and builds ONE GradientIndex
across the ranks. A single process then opens the index and checks it against an explicit reference (each example
run alone, without DDP, its weight gradient from autograd projected with
``projection_matrix(derive_seed(seed, name, side))``), the documented global order (rank 0's rows first),
self-retrieval, and that queries of a single-process collector are accepted (same projection) / refused (other
seed or p).

Also: DDP's allreduce (with a comm hook that rescales .grad) does not touch the rows; no_sync() gradient
accumulation; find_unused_parameters=True with an unused Linear; col.backward() instead of loss.backward() under
DDP; a frozen hooked module (collected: true gradient) and a frozen first layer whose output cannot require grad
(refused by name); per_token=True across ranks; a batch-mean loss with scale="batch" and batch sizes that differ
between ranks (uneven last batch); a rank with no data at all.

One spawn runs every scenario on both ranks (results saved as tensors, read back with weights_only=True); it runs
under a hard deadline in the parent (workers killed past it, the test fails) and a short gloo timeout.

Tests marked ``# DEFECT:`` fail on the current code; the others pass."""
import json
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from gradkit.index import GradientIndex
from gradkit.projection import GradientCollector, derive_seed, projection_matrix
from gradkit.testing import random_batches, tiny_gpt

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.filterwarnings("ignore::gradkit.index.UncheckedProjectionWarning"),
              pytest.mark.filterwarnings("ignore:find_unused_parameters=True")]

WORLD = 2
DEADLINE_S = 80                       # the whole spawn, in the parent
GLOO_TIMEOUT = timedelta(seconds=30)  # per collective, in the workers
P, SEED = 8, 1234
VOCAB, SEQ, N = 31, 8, 16
SHARE = {0: list(range(0, 10)), 1: list(range(10, 16))}   # global order: rank 0's examples, then rank 1's
BATCHES = {0: [4, 4, 2], 1: [2, 2, 2]}                      # same number of DDP steps, different sizes
TOK_MODULES = "transformer.h.0.mlp.*"


# --------------------------------------------------------------------------- models, data, losses


def make_gpt():
    return tiny_gpt(vocab=VOCAB, n_layer=1, d_model=16, n_head=2, n_ctx=SEQ, seed=0)


def make_hf():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).eval()


class WithAux(nn.Module):
    """tiny_gpt plus a Linear that never runs (DDP needs find_unused_parameters=True)."""

    def __init__(self):
        super().__init__()
        self.core = make_gpt()
        self.aux = nn.Linear(16, 16)

    def forward(self, ids, mask=None):
        return self.core(ids, mask)


class FrozenFirst(nn.Module):
    """A plain MLP whose first Linear is frozen and reads the raw (no-grad) input."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc0 = nn.Linear(6, 8)
        self.fc1 = nn.Linear(8, 3)
        with torch.no_grad():
            for prm in self.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g))
        self.fc0.requires_grad_(False)

    def forward(self, x):
        return self.fc1(torch.tanh(self.fc0(x)))


def make_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    torch.manual_seed(0)
    return T5ForConditionalGeneration(cfg).eval()


def t5_loss(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["input_ids"]).loss


def frozen_gpt():
    m = make_gpt()
    m.transformer.h[0].mlp.c_fc.requires_grad_(False)
    return m


def pool():
    """N examples (input_ids, attention_mask), right-padded to random lengths."""
    b = random_batches(1, batch=N, seq=SEQ, vocab=VOCAB, seed=11)[0]
    return b["input_ids"], b["attention_mask"]


def rank_batches(rank, sizes=None):
    ids, mask = pool()
    idx = SHARE[rank]
    out, s = [], 0
    for n in (BATCHES[rank] if sizes is None else sizes):
        sel = idx[s:s + n]
        out.append({"input_ids": ids[sel], "attention_mask": mask[sel]})
        s += n
    assert s == len(idx)
    return out


def losses(model, batch):
    """Per-example next-token cross-entropy summed over the real positions -> (B,)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = model(ids, mask) if not _is_hf(model) else model(input_ids=ids, attention_mask=mask)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                          reduction="none")
    return tok.view(ids.shape[0], -1).sum(1)


def _is_hf(model):
    inner = getattr(model, "module", model)
    return type(inner).__module__.startswith("transformers.")


# --------------------------------------------------------------------------- explicit reference


def _kind(mod):
    return "linear" if isinstance(mod, nn.Linear) else "conv1d"


def ref_rows(model, names, examples, p=P, seed=SEED):
    """Each example alone (B=1, no DDP, no collector): autograd's weight gradient of its summed loss, in
    nn.Linear layout, projected as ``L G R^T`` with ``L, R = projection_matrix(p, ., derive_seed(seed, name,
    side))``; modules concatenated in ``names`` order -> (n, len(names) * p * p) float32."""
    mods = dict(model.named_modules())
    ws = [mods[n].weight for n in names]
    flags = [w.requires_grad for w in ws]
    for w in ws:
        w.requires_grad_(True)  # a frozen module's true gradient
    try:
        rows = []
        for ex in examples:
            gs = torch.autograd.grad(losses(model, ex).sum(), ws)
            parts = []
            for n, g in zip(names, gs):
                G = (g if _kind(mods[n]) == "linear" else g.T).double()
                O, I = G.shape
                L = projection_matrix(p, O, derive_seed(seed, n, "left")).double()
                R = projection_matrix(p, I, derive_seed(seed, n, "right")).double()
                parts.append((L @ G @ R.T).reshape(-1))
            rows.append(torch.cat(parts).float())
        return torch.stack(rows)
    finally:
        for w, f in zip(ws, flags):
            w.requires_grad_(f)


def ref_token_rows(model, name, ex, p=P, seed=SEED):
    """Per-token reference for one module: ``vec((L g_t)(R a_t)^T)`` with a_t / g_t captured by plain hooks."""
    mod = dict(model.named_modules())[name]
    cap = {}

    def fwd(m, args, out):
        cap["a"] = args[0].detach()
        out.register_hook(lambda g: cap.__setitem__("g", g.detach()))

    h = mod.register_forward_hook(fwd)
    try:
        losses(model, ex).sum().backward()
    finally:
        h.remove()
        model.zero_grad(set_to_none=True)
    a, g = cap["a"][0].double(), cap["g"][0].double()  # (T, I), (T, O)
    L = projection_matrix(p, g.shape[-1], derive_seed(seed, name, "left")).double()
    R = projection_matrix(p, a.shape[-1], derive_seed(seed, name, "right")).double()
    return ((g @ L.T)[:, :, None] * (a @ R.T)[:, None, :]).reshape(a.shape[0], p * p).float()


def examples(indices):
    ids, mask = pool()
    return [{"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]} for i in indices]


def close(got, want, rel=2e-5):
    """Equal up to float32 rounding, relative to the largest entry of each row."""
    assert got.shape == want.shape, (got.shape, want.shape)
    tol = rel * want.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) + 1e-7
    bad = (got - want).abs() > tol
    assert not bad.any(), f"{int(bad.any(-1).sum())} of {got.shape[0]} rows differ; max err " \
                          f"{float((got - want).abs().max()):.3g} (row scale {float(want.abs().max()):.3g})"


# --------------------------------------------------------------------------- the spawned ranks


def _outcome(e):
    return None if e is None else f"{type(e).__name__}: {e}"


def _worker(rank, world, init_file, root):
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=GLOO_TIMEOUT)
    torch.set_num_threads(1)
    meta, tens = {}, {}
    try:
        batches = rank_batches(rank)

        def run(tag, col, model, index_kw=None, step=None, bs=batches, collect_kw=None):
            """Collect every batch (``step(model, col, batch)`` runs forward + backward); build an index."""
            rows = []
            ix = None
            if index_kw is not None:
                ix = GradientIndex.create(f"{root}/{tag}", col.module_dims, dtype=torch.float32,
                                          projection=col.projection_config, **index_kw)
            with col:
                for i, b in enumerate(bs):
                    with col.batch(b["attention_mask"]):
                        (step or default_step)(model, col, b, i)
                    g = col.collect(**(collect_kw or {}))
                    if col.per_token:
                        flat, counts = col.pack_tokens(col.flatten(g), b["attention_mask"])
                        if ix is not None:
                            ix.append(flat, num_tokens=counts)
                        rows.append(flat)
                    else:
                        if ix is not None:
                            ix.append(g)
                        rows.append(col.flatten(g))
            if ix is not None:
                ix.close()
                meta[tag + ".offsets"] = [ix.row_offset, ix.example_offset]
            tens[tag] = torch.cat(rows) if rows else torch.zeros(0, col.dim)

        def default_step(model, col, b, i):
            losses(model, b).sum().backward()

        # 1. the collector hooks the DDP wrapper itself
        ddp = DDP(make_gpt())
        col = GradientCollector(ddp, p=P, seed=SEED)
        meta["wrapped.names"] = list(col.module_dims)
        meta["wrapped.config"] = col.projection_config
        try:
            GradientCollector(ddp, modules=["transformer.h.*", "lm_head"], p=P, seed=SEED)
            meta["wrapped.patterns"] = None
        except Exception as e:  # noqa: BLE001
            meta["wrapped.patterns"] = _outcome(e)
        run("wrapped", col, ddp, index_kw={})

        # 2. the collector hooks ddp.module; forward through DDP, loss.backward() all-reduces .grad, with a comm
        #    hook that rescales the reduced gradient (x7): the rows must be local and unscaled
        ddp = DDP(make_gpt())

        def scaled_allreduce(state, bucket):
            t = bucket.buffer().mul_(7.0 / world)
            return dist.all_reduce(t, async_op=True).get_future().then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, scaled_allreduce)
        col = GradientCollector(ddp.module, p=P, seed=SEED)
        grads = []

        def sync_step(model, col, b, i):
            ddp.module.zero_grad(set_to_none=True)
            losses(model, b).sum().backward()
            if i == 0:
                grads.append(ddp.module.lm_head.weight.grad.clone())

        run("inner", col, ddp, index_kw={}, step=sync_step)
        tens["inner.grad0"] = grads[0]

        # 3. no_sync() gradient accumulation: batches 0 and 1 local, batch 2 synchronised
        ddp = DDP(make_gpt())
        col = GradientCollector(ddp.module, p=P, seed=SEED)

        def accum_step(model, col, b, i):
            if i < len(batches) - 1:
                with ddp.no_sync():
                    losses(model, b).sum().backward()
            else:
                losses(model, b).sum().backward()

        run("nosync", col, ddp, step=accum_step)

        # 4. col.backward(loss) (no .grad, no reducer hooks) under DDP
        ddp = DDP(make_gpt())
        col = GradientCollector(ddp.module, p=P, seed=SEED)
        run("colbwd", col, ddp, step=lambda model, col, b, i: col.backward(losses(model, b).sum()))

        # 5. find_unused_parameters=True with a Linear that never runs (collected as zeros, documented)
        ddp = DDP(WithAux(), find_unused_parameters=True)
        col = GradientCollector(ddp.module, p=P, seed=SEED)
        meta["unused.names"] = list(col.module_dims)
        run("unused", col, ddp)

        # 6. a frozen hooked module (its input requires grad): collected, its true gradient
        ddp = DDP(frozen_gpt())
        col = GradientCollector(ddp.module, p=P, seed=SEED)
        meta["frozen.names"] = list(col.module_dims)
        run("frozen", col, ddp, index_kw={})
        # ... and a frozen first layer reading the raw input: its output cannot require grad -> refused by name
        ddp = DDP(FrozenFirst())
        col = GradientCollector(ddp.module, p=P, seed=SEED)
        try:
            with col:
                ddp(torch.randn(3, 6)).sum().backward()
                col.collect()
            meta["frozen_first"] = None
        except Exception as e:  # noqa: BLE001
            meta["frozen_first"] = _outcome(e)

        # 7. Hugging Face GPT-2 (Conv1D) under DDP
        ddp = DDP(make_hf())
        col = GradientCollector(ddp.module, modules="transformer.h.*", p=P, seed=SEED)
        meta["hf.names"] = list(col.module_dims)
        run("hf", col, ddp, index_kw={})

        # 8. per_token=True across ranks
        ddp = DDP(make_gpt())
        col = GradientCollector(ddp.module, modules=TOK_MODULES, p=P, seed=SEED, per_token=True)
        run("tokens", col, ddp, index_kw={"per_token": True})

        # 9. a batch-mean loss, scale="batch"; the ranks' batch sizes differ, rank 0's last batch is short
        ddp = DDP(make_gpt())
        col = GradientCollector(ddp.module, p=P, seed=SEED)
        run("mean", col, ddp, step=lambda model, col, b, i: losses(model, b).mean().backward(),
            collect_kw={"scale": "batch"}, bs=rank_batches(rank, [3, 3, 3, 1] if rank == 0 else [1, 2, 2, 1]))

        # 10. rank 1 has no data at all: it joins the index build (a collective) and appends nothing
        m = make_gpt()
        col = GradientCollector(m, p=P, seed=SEED)
        run("empty", col, m, index_kw={}, bs=batches if rank == 0 else [])

        # ... and a per-token index of which rank 1 holds nothing
        m = make_gpt()
        col = GradientCollector(m, modules=TOK_MODULES, p=P, seed=SEED, per_token=True)
        run("tokens_empty", col, m, index_kw={"per_token": True}, bs=batches if rank == 0 else [])

        # 11. an encoder-decoder (T5) wrapped in DDP: per_example_grads must refuse the batch's attention_mask (the
        #     encoder's) as it does for the unwrapped model
        ddp = DDP(make_t5())
        col = GradientCollector(ddp, p=4, seed=SEED)
        b = {"input_ids": torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(rank)),
             "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
        try:
            list(col.per_example_grads([b], t5_loss))
            meta["t5_wrapped"] = None
        except Exception as e:  # noqa: BLE001
            meta["t5_wrapped"] = _outcome(e)

        t = torch.ones(1)
        dist.all_reduce(t)  # every rank made the same collective calls
        meta["group_check"] = int(t)
    except BaseException as e:
        meta["error"] = _outcome(e)
        raise
    finally:
        with open(f"{root}/meta-rank{rank}.json", "w") as f:
            json.dump(meta, f)
        torch.save(tens, f"{root}/tens-rank{rank}.pt")
        dist.destroy_process_group()


def _spawn(root):
    ctx = mp.spawn(_worker, args=(WORLD, str(root / "init"), str(root)), nprocs=WORLD, join=False)
    end = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > end:
                pytest.fail(f"the {WORLD} workers did not finish within {DEADLINE_S} s (a collective hung?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    _spawn(root)
    meta, tens = [], []
    for r in range(WORLD):
        with open(root / f"meta-rank{r}.json") as f:
            meta.append(json.load(f))
        tens.append(torch.load(root / f"tens-rank{r}.pt", weights_only=True))
    for m in meta:
        assert "error" not in m, m["error"]
        assert m["group_check"] == WORLD
    return root, meta, tens


@pytest.fixture(scope="module")
def single():
    """The single-process collector of the unwrapped model (what a user queries with) and its rows of every
    example, plus the explicit reference rows."""
    model = make_gpt()
    col = GradientCollector(model, p=P, seed=SEED)
    ex = examples(range(N))
    rows = torch.cat([col.flatten(g) for g in col.per_example_grads(ex, losses)])
    ref = ref_rows(model, list(col.module_dims), ex)
    return model, col, rows, ref


def both(tens, tag):
    """The two ranks' rows in the documented global order (rank 0's first)."""
    return torch.cat([tens[0][tag], tens[1][tag]])


# --------------------------------------------------------------------------- the reference itself


def test_single_process_collector_matches_explicit_reference(single):
    _, col, rows, ref = single
    assert rows.shape == (N, col.dim) == (N, 5 * P * P)
    close(rows, ref)


# --------------------------------------------------------------------------- collector hooked on ddp.module


def test_ddp_rows_equal_single_process_rows(ran, single):
    """Collector on ddp.module, forward through DDP, loss.backward() all-reducing .grad through a comm hook that
    scales it by 7: every rank's rows are its own examples' unscaled per-example gradients."""
    _, meta, tens = ran
    _, col, rows, ref = single
    for r in range(WORLD):
        close(tens[r]["inner"], ref[SHARE[r]])
    # DDP did reduce .grad (so the comparison above is meaningful): both ranks hold the same, rescaled gradient,
    # which is not their local one
    g0, g1 = tens[0]["inner.grad0"], tens[1]["inner.grad0"]
    assert torch.equal(g0, g1)
    model = make_gpt()
    local = []
    for r in range(WORLD):
        b = rank_batches(r)[0]
        model.zero_grad(set_to_none=True)
        losses(model, b).sum().backward()
        local.append(model.lm_head.weight.grad.clone())
    torch.testing.assert_close(g0, 7.0 * (local[0] + local[1]) / 2, rtol=1e-4, atol=1e-6)


def test_ddp_index_global_order_and_offsets(ran, single):
    root, meta, tens = ran
    _, col, rows, ref = single
    ix = GradientIndex.open(root / "inner")
    assert len(ix) == N and ix.num_examples == N
    assert list(ix.modules) == list(col.module_dims)
    got = ix.get(range(N))
    assert torch.equal(got, both(tens, "inner"))      # rank 0's rows first, then rank 1's, bit for bit
    close(got, ref)                                   # row i is example i
    assert [m["inner.offsets"] for m in meta] == [[0, 0], [10, 10]]


def test_ddp_index_self_retrieval_and_single_process_queries(ran, single):
    root, _, _ = ran
    model, col, rows, _ = single
    ix = GradientIndex.open(root / "inner")
    assert ix.projection == col.projection_config
    s, i = ix.search(rows, 2, unit_norm=True, projection=col)
    assert torch.equal(i[:, 0], torch.arange(N))
    assert torch.allclose(s[:, 0], torch.ones(N), atol=1e-5) and (s[:, 0] - s[:, 1]).min() > 1e-3
    ix.search(rows[:2], 1, projection=col.projection_config)  # the dict form, accepted
    for kw in ({"seed": SEED + 1}, {"p": P // 2}):
        other = GradientCollector(model, **{"p": P, "seed": SEED, **kw})
        q = next(other.per_example_grads(examples([0]), losses, flat=True))
        with pytest.raises(ValueError, match=r"^projection: the queries were projected with "):
            ix.search(q if q.shape[1] == ix.dim else rows[:1], 1, projection=other)


def test_no_sync_accumulation_rows(ran, single):
    _, _, tens = ran
    ref = single[3]
    for r in range(WORLD):
        close(tens[r]["nosync"], ref[SHARE[r]])


def test_collector_backward_under_ddp(ran, single):
    """col.backward(loss) (autograd.grad to the hooked outputs only: DDP's reducer hooks never fire) works for
    several DDP steps in a row and gives the same rows."""
    _, _, tens = ran
    ref = single[3]
    for r in range(WORLD):
        close(tens[r]["colbwd"], ref[SHARE[r]])


def test_find_unused_parameters(ran):
    """find_unused_parameters=True, a hooked Linear that never runs: its columns are zeros (collect's documented
    missing="zeros"), every other module's are the reference."""
    _, meta, tens = ran
    model = WithAux()
    names = meta[0]["unused.names"]
    assert names == [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] and names[-1] == "aux"
    used = names[:-1]
    ref = ref_rows(model, used, examples(range(N)))
    got = both(tens, "unused")
    close(got[:, :len(used) * P * P], ref)
    assert not got[:, len(used) * P * P:].any()


def test_frozen_module_collected_with_true_gradient(ran, single):
    root, meta, tens = ran
    ref = single[3]   # the unfrozen model's gradients: the frozen module's true gradient
    assert meta[0]["frozen.names"] == list(single[1].module_dims)
    close(both(tens, "frozen"), ref)
    close(GradientIndex.open(root / "frozen").get(range(N)), ref)


def test_frozen_first_layer_refused_by_name(ran):
    _, meta, _ = ran
    for m in meta:
        msg = m["frozen_first"]
        assert msg is not None and msg.startswith("ValueError: modules: 'fc0' ran forward with grad enabled"), msg
        assert "requires_grad=False" in msg


def test_hf_gpt2_conv1d_under_ddp(ran):
    root, meta, tens = ran
    model = make_hf()
    col = GradientCollector(model, modules="transformer.h.*", p=P, seed=SEED)
    assert meta[0]["hf.names"] == list(col.module_dims) == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj"]
    ex = examples(range(N))
    ref = ref_rows(model, list(col.module_dims), ex)
    close(both(tens, "hf"), ref)
    ix = GradientIndex.open(root / "hf")
    assert torch.equal(ix.get(range(N)), both(tens, "hf"))
    q = torch.cat([col.flatten(g) for g in col.per_example_grads(ex, losses)])
    _, i = ix.search(q, 1, unit_norm=True, projection=col)
    assert torch.equal(i[:, 0], torch.arange(N))


def test_per_token_across_ranks(ran):
    root, meta, tens = ran
    model = make_gpt()
    col = GradientCollector(model, modules=TOK_MODULES, p=P, seed=SEED, per_token=True)
    names = list(col.module_dims)
    _, mask = pool()
    counts = mask.sum(1)
    ix = GradientIndex.open(root / "tokens")
    assert ix.per_token and ix.num_examples == N and len(ix) == int(counts.sum())
    assert ix.offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    got = ix.get(range(len(ix)))
    assert torch.equal(got, both(tens, "tokens"))
    assert [m["tokens.offsets"] for m in meta] == [[0, 0], [int(counts[:10].sum()), 10]]
    ex = examples(range(N))
    ref_sum = ref_rows(model, names, ex)
    for e in range(N):
        lo, hi = int(ix.offsets[e]), int(ix.offsets[e + 1])
        assert torch.equal(ix.example_of(list(range(lo, hi))), torch.full((hi - lo,), e))
        want = torch.cat([ref_token_rows(model, n, ex[e]) for n in names], dim=1)[:hi - lo]
        close(got[lo:hi], want)
        close(got[lo:hi].sum(0, keepdim=True), ref_sum[e:e + 1], rel=1e-4)  # tokens sum to the example
    # a per-example single-process query of the same projection is accepted (per_token is not a projection
    # setting) and finds its example's tokens
    q_col = GradientCollector(model, modules=TOK_MODULES, p=P, seed=SEED)
    q = torch.cat([q_col.flatten(g) for g in q_col.per_example_grads(ex[:2], losses)])
    ix.search(q, 1, projection=q_col)


def test_batch_mean_loss_scale_batch_uneven_ranks(ran, single):
    _, _, tens = ran
    ref = single[3]
    for r in range(WORLD):
        close(tens[r]["mean"], ref[SHARE[r]], rel=5e-5)


def test_rank_without_data(ran, single):
    """Rank 1 has no data: it still takes part in create()/close() and the index holds rank 0's rows only."""
    root, meta, tens = ran
    assert tens[1]["empty"].shape[0] == 0
    ix = GradientIndex.open(root / "empty")
    assert len(ix) == 10
    close(ix.get(range(10)), single[3][:10])
    assert [m["empty.offsets"] for m in meta] == [[0, 0], [10, 10]]
    ix = GradientIndex.open(root / "tokens_empty")
    counts = pool()[1].sum(1)[:10]
    assert ix.num_examples == 10 and ix.offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    assert torch.equal(ix.get(range(len(ix))), tens[0]["tokens_empty"])
    assert [m["tokens_empty.offsets"] for m in meta] == [[0, 0], [int(counts.sum()), 10]]


# --------------------------------------------------------------------------- collector hooked on the DDP wrapper


def test_ddp_wrapper_names_are_the_models(ran, single):
    # DEFECT: GradientCollector(DistributedDataParallel(model)) names every module with DDP's "module." prefix
    # ("module.transformer.h.0.attn.c_attn"), so module names, index columns, projection_config and the derived
    # per-module seeds depend on the wrapper; it should name them as the wrapped model does (as
    # gradkit.parammap._named_parameters unwraps ``.module``).
    _, meta, _ = ran
    assert meta[0]["wrapped.names"] == list(single[1].module_dims)
    assert meta[0]["wrapped.config"] == single[1].projection_config


def test_ddp_wrapper_name_patterns_match(ran):
    # DEFECT: the model's own name patterns (as the docs and the e2e tests write them) match nothing on a
    # DDP-wrapped model: ValueError "pattern 'transformer.h.*' matches no module of the model".
    _, meta, _ = ran
    assert meta[0]["wrapped.patterns"] is None


def test_ddp_wrapper_rows_equal_single_process_rows(ran, single):
    # DEFECT: the rows collected through the DDP wrapper are projected with seeds derived from the "module."
    # names, so they are not the rows a single-process collector gives for the same example.
    _, _, tens = ran
    close(both(tens, "wrapped"), single[3])


def test_index_built_under_ddp_wrapper_accepts_single_process_queries(ran, single):
    # DEFECT: an index built from a DDP-wrapped collector refuses the queries of a single-process collector of
    # the same model, p and seed (modules / shapes in the projection config carry the "module." prefix).
    root, _, _ = ran
    _, col, rows, _ = single
    ix = GradientIndex.open(root / "wrapped")
    _, i = ix.search(rows, 1, unit_norm=True, projection=col)
    assert torch.equal(i[:, 0], torch.arange(N))


def test_encoder_decoder_mask_refused_under_ddp_wrapper(ran):
    # DEFECT: per_example_grads refuses an encoder-decoder's attention_mask by reading ``self.model.config``
    # (_collector.py, per_example_grads); a DDP wrapper has no ``config``, so a DDP-wrapped T5 is not refused and
    # the encoder's padding mask is silently applied to the decoder's modules (same lengths here: no shape error).
    _, meta, _ = ran
    model = make_t5()
    b = {"input_ids": torch.randint(1, VOCAB, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
    with pytest.raises(ValueError, match="per_example_grads: the model is an encoder-decoder"):
        list(GradientCollector(model, p=4, seed=SEED).per_example_grads([b], t5_loss))  # unwrapped: refused
    for m in meta:
        assert m["t5_wrapped"] is not None and "the model is an encoder-decoder" in m["t5_wrapped"], m["t5_wrapped"]


def test_compiled_model_wrapper_names_and_rows_are_the_models():
    """torch.compile(model) wraps the model in an OptimizedModule whose module names carry '_orig_mod.': the
    collector names (and seeds) the wrapped model's modules, and its rows equal the bare model's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(6, 5)
    bare = GradientCollector(model, p=2, seed=3)
    with bare:
        bare.backward(model(x).square().sum())
        want = bare.collect(flat=True)
    wrapped = torch.compile(model, backend="eager")
    col = GradientCollector(wrapped, p=2, seed=3)
    assert list(col.module_dims) == ["0", "2"] and col.projection_config == bare.projection_config
    with col:
        col.backward(wrapped(x).square().sum())
        got = col.collect(flat=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
