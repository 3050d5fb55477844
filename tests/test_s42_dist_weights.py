"""Session 42: under torch.distributed every rank ends prune_model with rank 0's weights, also when the ranks run
other thread counts. The OBS factorisations (Cholesky, cholesky_inverse, triangular solves) run on the calling
thread and sum in an order that follows the thread count, so ranks pruning from the same all-reduced Hessians
held slightly different models (true OBS on this tiny GPT: other weights at 1 and 2 threads) until each group's
weights were broadcast from rank 0. Two gloo processes on CPU, rank 0 at 1 thread, rank 1 at 2."""
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gradkit.testing import random_batches, tiny_gpt

WORLD = 2


def _worker(rank: int, tmp: str, method: str, broadcast: bool) -> None:
    torch.set_num_threads(1 + rank)
    from gradkit.obs import driver
    from safetensors.torch import save_file

    if not broadcast:  # the control: what each rank computes by itself
        driver._same_weights_on_every_rank = lambda group: None
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                            world_size=WORLD)
    try:
        data = random_batches(4, batch=4, seq=32, seed=5)[rank::WORLD]
        model = tiny_gpt(n_layer=2, d_model=128)
        driver.prune_model(model, data, method=method, pattern="2:4", progress=False)
        save_file({n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)},
                  os.path.join(tmp, f"rank{rank}.safetensors"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(tmp: str, method: str, broadcast: bool):
    from safetensors.torch import load_file

    ctx = mp.spawn(_worker, args=(tmp, method, broadcast), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the distributed workers did not finish within 180 s")
    return [load_file(os.path.join(tmp, f"rank{r}.safetensors")) for r in range(WORLD)]


@pytest.mark.parametrize("method", ["true_obs", "sparsegpt"])
def test_ranks_with_other_thread_counts_hold_the_same_weights(tmp_path, method):
    w0, w1 = _run(str(tmp_path), method, broadcast=True)
    assert w0.keys() == w1.keys() and len(w0) == 9
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
        assert bool(((w0[name] != 0).reshape(w0[name].shape[0], -1, 4).sum(-1) == 2).all())
