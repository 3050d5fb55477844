"""The torch.distributed helpers gradkit's distributed paths share (``GradientIndex.create``, ``prune_model``,
``collect_hessians``): the initialised default group, the device its collectives take, and small collectives."""
from __future__ import annotations

from typing import Dict, List, Mapping, NoReturn, Optional, Sequence

import torch


def group():
    """``torch.distributed`` when it is available and the default process group is initialised, else None."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def device(dist) -> torch.device:
    """The device the default group's collectives take: the current CUDA device under NCCL (which refuses CPU
    tensors: "No backend type associated with device type cpu"), the CPU otherwise (gloo, mpi)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_ints(dist, values: Sequence[int], dtype: torch.dtype = torch.int64) -> List[List[int]]:
    """Every rank's ``values`` (the same length on each), in rank order: one all_gather on the group's device
    (a collective: every rank calls it)."""
    mine = torch.tensor(list(values), dtype=dtype, device=device(dist))
    got = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(got, mine)
    return [g.cpu().tolist() for g in got]


def broadcast_flag(dist, flag: bool, src: int = 0) -> bool:
    """Rank ``src``'s ``flag`` on every rank: one broadcast on the group's device (a collective)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device(dist))
    dist.broadcast(t, src=src)
    return bool(int(t.item()))


def rank(dist: Optional[object] = None) -> int:
    """This process's rank in the default group (0 without one)."""
    d = dist if dist is not None else group()
    return d.get_rank() if d is not None else 0


def raise_rank_failure(own: Optional[BaseException], failed: List[int], msg: str,
                       other_error: type = RuntimeError) -> NoReturn:
    """After the ranks combined their outcomes: a failing rank re-raises its own error (its cause chain kept,
    ``msg`` added as a note: a KeyboardInterrupt's too, session 43), the others raise ``other_error(msg)``."""
    if own is None:
        raise other_error(msg)
    if hasattr(own, "add_note"):  # Python >= 3.11 (requires-python is 3.10)
        own.add_note(msg)
    raise own


def _digest(v) -> int:
    import hashlib
    import json

    s = json.dumps(v, sort_keys=True, default=repr)
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little", signed=True)


def agree(dist, err: Optional[BaseException], names: Sequence[str], settings: Optional[Mapping[str, object]], *,
          what: str, job: str, after: str, other_error: type = RuntimeError) -> None:
    """A collective call's first step (every rank, before any work): one all_gather of whether this rank's
    arguments were valid (``err`` None) and of a digest of each setting in ``names`` (``settings[name]``, JSON;
    ``settings`` None where ``err`` is set), which must be the same on every rank.

    A rank that refused its arguments raises its own error with a note, the others ``other_error``; settings that
    differ raise ValueError on every rank, naming them (``job``: the distributed work, in the message; ``after``:
    what became of the user's data, e.g. "nothing was written to PATH"). Without this, a rank raising alone left
    the others waiting in their next collective until the process group timed out, and ranks given different
    settings went on and silently computed different results. Without a process group, ``err`` is raised as it
    is."""
    if dist is None:
        if err is not None:
            raise err
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = [0 if err is None else 1] + [_digest(settings[k]) if settings is not None else 0 for k in names]
    got = gather_ints(dist, mine)
    failed = [r for r, g in enumerate(got) if g[0]]
    if failed:
        raise_rank_failure(err, failed, f"{what}: rank(s) {failed} of {world} refused their arguments (see those "
                                        f"ranks' errors); {after}", other_error)
    differ = [(j, k) for j, k in enumerate(names) if len({g[1 + j] for g in got}) > 1]
    if differ:
        j, _ = differ[0]
        groups: Dict[int, List[int]] = {}
        for r, g in enumerate(got):
            groups.setdefault(g[1 + j], []).append(r)
        bad = [k for _, k in differ]
        mine_v = "; ".join(f"{k} {settings[k]}" if len(differ) > 1 else str(settings[k]) for _, k in differ)
        every = f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]
        raise ValueError(
            f"{', '.join(bad)}: {'differ' if len(bad) > 1 else 'differs'} between the ranks of {job} (ranks "
            f"{' and '.join(str(g) for g in groups.values())} passed different values; this rank, {rank}, passed "
            f"{mine_v}); every rank must pass the same {every}; {after}")


def share_outcome(dist, err: Optional[BaseException], *, what: str, after: str,
                  other_error: type = RuntimeError) -> None:
    """After a step that may fail on some ranks only (a calibration forward, a file written by rank 0), before
    the next collective: one all_gather of whether each rank failed. A failing rank re-raises its own error with
    a note, the others ``other_error`` naming the failing ranks, so no rank is left waiting in a collective the
    failed ones never call. Without a process group, ``err`` is raised as it is."""
    if dist is None:
        if err is not None:
            raise err
        return
    failed = [r for r, (bad,) in enumerate(gather_ints(dist, [0 if err is None else 1])) if bad]
    if failed:
        raise_rank_failure(err, failed, f"{what}: failed on rank(s) {failed} of {dist.get_world_size()} (see "
                                        f"those ranks' errors); {after}", other_error)
