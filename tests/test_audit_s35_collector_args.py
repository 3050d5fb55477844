"""GradientCollector arguments found by the session-35 bad-input sweep: each refused by name before any work."""
import pytest
import torch
from torch import nn

from gradkit.projection import GradientCollector


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


@pytest.mark.parametrize("kw, err, msg", [
    (dict(p=2 ** 70), ValueError, r"^p: "),
    (dict(p=1 << 31), ValueError, r"^p: "),
    (dict(normalizers=0), TypeError, r"^normalizers: "),
    (dict(normalizers=["0"]), TypeError, r"^normalizers: "),
    (dict(modules=torch.tensor(1)), TypeError, r"^modules: "),
])
def test_constructor_refuses_by_name(kw, err, msg):
    with pytest.raises(err, match=msg):
        GradientCollector(_model(), **kw)


def _one_batch(col, model):
    with col:
        y = model(torch.randn(5, 4))
        col.backward(y.square().sum())


@pytest.mark.parametrize("kw, err, msg", [
    (dict(flat="False"), TypeError, r"flat"),
    (dict(flat=1), TypeError, r"flat"),
    (dict(scale=2 ** 2000), ValueError, r"^scale: "),
])
def test_collect_refuses_by_name_and_keeps_the_batch(kw, err, msg):
    model = _model()
    col = GradientCollector(model, p=2)
    with col:
        y = model(torch.randn(5, 4))
        col.backward(y.square().sum())
        with pytest.raises(err, match=msg):
            col.collect(**kw)
        got = col.collect(flat=True)  # the refused call consumed nothing
    assert got.shape == (5, 8) and bool(got.abs().sum() > 0)


def test_per_example_grads_checks_flat_before_running_the_model():
    model = _model()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    col = GradientCollector(model, p=2)
    with pytest.raises(TypeError, match=r"flat"):
        list(col.per_example_grads([{"x": torch.randn(3, 4)}], lambda m, b: m(b["x"]).sum(), mask_key=None,
                                   flat="yes"))
    assert calls == []
