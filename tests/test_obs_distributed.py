"""gradkit.obs.driver under torch.distributed: two gloo processes on CPU, each with half of the
calibration batches. The all-reduced Hessians must equal the single-process Hessians over all
batches; prune_model must give every rank the same weights and write the checkpoint from rank 0."""
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gradkit.testing import random_batches, tiny_gpt

WORLD = 2


def _data():
    return random_batches(6, batch=3, seq=20, seed=3)


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    from gradkit.obs.driver import collect_hessians, prune_model
    from safetensors.torch import save_file

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                            world_size=WORLD)
    try:
        mine = _data()[rank::WORLD]
        model = tiny_gpt(n_layer=2, d_model=32)
        hs = collect_hessians(model, mine, progress=False)
        out = {f"H/{n}": h for n, h in hs.items()}
        out.update({f"tokens/{n}": torch.tensor([c]) for n, c in hs.tokens.items()})
        prune_model(model, mine, pattern="2:4", checkpoint_dir=os.path.join(tmp, "ck"), progress=False)
        out.update({f"W/{n}": m.weight.detach().clone() for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear)})
        save_file(out, os.path.join(tmp, f"rank{rank}.safetensors"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_allreduced_hessians_equal_single_process(tmp_path):
    from gradkit.obs.driver import collect_hessians
    from safetensors.torch import load_file

    tmp = str(tmp_path)
    ctx = mp.spawn(_worker, args=(tmp,), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the distributed workers did not finish within 120 s")
    res = [load_file(os.path.join(tmp, f"rank{r}.safetensors")) for r in range(WORLD)]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = collect_hessians(tiny_gpt(n_layer=2, d_model=32), _data(), progress=False)
    finally:
        torch.set_num_threads(old)
    assert len(single) == 9
    for name, h in single.items():
        for r in range(WORLD):
            torch.testing.assert_close(res[r][f"H/{name}"], h, rtol=1e-5, atol=1e-4)
            assert int(res[r][f"tokens/{name}"]) == single.tokens[name]
        assert torch.equal(res[0][f"H/{name}"], res[1][f"H/{name}"])  # every rank holds the same sum
        w0, w1 = res[0][f"W/{name}"], res[1][f"W/{name}"]
        assert torch.equal(w0, w1)  # same Hessians -> same pruning on every rank
        assert bool(((w0 != 0).reshape(w0.shape[0], -1, 4).sum(-1) == 2).all())
    with open(os.path.join(tmp, "ck", "progress.json")) as fh:
        prog = json.load(fh)
    assert len(prog["layers"]) == 9
    assert len([f for f in os.listdir(os.path.join(tmp, "ck")) if f.endswith(".safetensors")]) == 9
