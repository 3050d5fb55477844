"""A gradkit index built across 2 torch.distributed (gloo, CPU) processes: every rank writes its
own shard files, rank 0 writes the final header after all_gather of the counts; the result opens
as one index holding rank 0's rows then rank 1's. Also a distributed per-token build, and a
build whose ranks stop before close (no complete index). One spawn runs all three builds."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradkit.index import GradientIndex, IndexFormatError

MODS = {"a": 4, "b": 3}
D = 7


def rows(rank, n):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(100 + rank))


def _worker(rank, world, init_file, root):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with GradientIndex.create(f"{root}/plain", MODS, dtype=torch.float32, projection={"seed": 3},
                                  shard_rows=4) as ix:
            x = rows(rank, 10 + rank)
            ix.append(x[:6])
            ix.append(x[6:])
        with GradientIndex.create(f"{root}/tokens", MODS, dtype=torch.float32, per_token=True) as ix:
            counts = [2, 3] if rank == 0 else [1, 0, 4]
            ix.append(rows(rank, sum(counts)), num_tokens=counts)
        ix = GradientIndex.create(f"{root}/fail", MODS, dtype=torch.float32)
        ix.append(rows(rank, 3))
        # the ranks stop here without close(): nobody writes the final header
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_rank_builds(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)

    ix = GradientIndex.open(tmp_path / "plain")
    assert len(ix) == 21 and ix.projection == {"seed": 3}
    want = torch.cat([rows(0, 10), rows(1, 11)])
    assert torch.equal(ix.get(range(21)), want)
    names = sorted(p.name for p in (tmp_path / "plain" / "shards").iterdir() if p.suffix == ".bin")
    assert names == [f"r0000{r}-{i:06d}.bin" for r in (0, 1) for i in range(3)]
    s, i = ix.search(want[[3, 15]], 1, unit_norm=True)
    assert i[:, 0].tolist() == [3, 15]  # an example retrieves itself, across the rank boundary

    ix = GradientIndex.open(tmp_path / "tokens")
    assert ix.offsets.tolist() == [0, 2, 5, 6, 6, 10] and len(ix) == 10 and ix.num_examples == 5
    assert torch.equal(ix.get(range(10)), torch.cat([rows(0, 5), rows(1, 5)]))

    with pytest.raises(IndexFormatError, match="did not complete"):
        GradientIndex.open(tmp_path / "fail")
