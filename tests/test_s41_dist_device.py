"""Session 41: every collective of the distributed paths runs on the process group's device.

GradientIndex.create's collectives used CPU tensors, which an NCCL group (torchrun's usual GPU setup) refuses
("No backend type associated with device type cpu"); prune_model / collect_hessians already picked the group's
device. Both now go through gradkit._dist. Without a GPU the NCCL build itself cannot run here
(tests/test_audit_s41_io_dist.py::test_distributed_create_under_an_nccl_group runs it where CUDA is); these
tests check, with a recording stand-in for torch.distributed, that every tensor handed to a collective is on the
device gradkit._dist.device names, and that device's rule."""
from __future__ import annotations

import pytest
import torch

from gradkit import _dist, index
from gradkit.obs import driver


class _Recorder:
    """A world of ``world`` ranks seen from rank 0: all_gather copies this rank's tensor to every slot,
    broadcast leaves it; every tensor's device is recorded."""

    def __init__(self, backend="nccl", world=2):
        self.backend, self.world, self.devices = backend, world, []

    def get_backend(self):
        return self.backend

    def get_world_size(self):
        return self.world

    def get_rank(self):
        return 0

    def all_gather(self, out, mine):
        self.devices += [mine.device] + [o.device for o in out]
        for o in out:
            o.copy_(mine)

    def broadcast(self, t, src=0):
        self.devices.append(t.device)

    def all_reduce(self, t):
        self.devices.append(t.device)


def test_device_rule(monkeypatch):
    assert _dist.device(_Recorder("gloo")) == torch.device("cpu")
    assert _dist.device(_Recorder("mpi")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert _dist.device(_Recorder("nccl")) == torch.device("cuda", 3)


@pytest.fixture
def meta_group(monkeypatch):
    """The group's device made 'meta' (no CUDA here): a CPU tensor reaching a collective is then visible."""
    rec = _Recorder()
    monkeypatch.setattr(_dist, "device", lambda d: torch.device("meta"))
    return rec


def test_index_collectives_use_the_group_device(meta_group):
    # meta tensors hold no values: the results are not read here, only where the tensors were
    with pytest.raises((NotImplementedError, RuntimeError)):  # reading a meta tensor, after the collective
        _dist.gather_ints(meta_group, [1, 2, 3])
    with pytest.raises((NotImplementedError, RuntimeError)):
        _dist.broadcast_flag(meta_group, True)
    assert meta_group.devices and all(d.type == "meta" for d in meta_group.devices), meta_group.devices
    assert index._distributed is _dist and not hasattr(index, "_gather_ints")  # index gathers through gradkit._dist


def test_driver_collectives_use_the_group_device(meta_group):
    with pytest.raises((NotImplementedError, RuntimeError)):
        driver._gather_ints(meta_group, [0, 1])
    assert meta_group.devices and all(d.type == "meta" for d in meta_group.devices), meta_group.devices


def test_gloo_values_round_trip():
    rec = _Recorder("gloo", world=3)
    assert _dist.gather_ints(rec, [5, -7, 2 ** 40]) == [[5, -7, 2 ** 40]] * 3
    assert _dist.broadcast_flag(rec, True) is True and _dist.broadcast_flag(rec, False) is False
    assert all(d == torch.device("cpu") for d in rec.devices)


def test_no_module_builds_its_own_collective_tensors():
    """index.py and obs/driver.py call torch.distributed only through gradkit._dist's helpers or on tensors they
    moved to _dist_device: no torch.tensor(...) is handed to all_gather / broadcast directly."""
    import inspect
    import re

    for mod in (index, driver):
        src = inspect.getsource(mod)
        for m in re.finditer(r"\.(all_gather|broadcast|all_reduce)\(([^)]*)\)", src):
            line = src[:m.start()].count("\n") + 1
            ctx = src[max(0, m.start() - 400):m.start()]
            assert "torch.tensor(" not in ctx.splitlines()[-1] and re.search(r"device=|_dist_device|ddev", ctx), \
                (mod.__name__, line, m.group(0))
