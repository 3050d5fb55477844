"""Session 41: arguments the op wrappers took without a check, and the one inference-tensor message.

* ``scatter_segments`` / ``scatter_segments_`` took ``scale="2"`` (``float("2")``), ``scale=True`` and a NaN or
  infinite scale (every written entry NaN / inf, silently).
* ``bitmask_binary(op=[...])`` raised "unhashable type: 'list'", naming no argument.
* ``check_masked_adamw_`` refused numpy float32 rates (``isinstance(v, (int, float))``) that ``MaskedAdamW`` takes.
* ``scope``'s refusal of an inference tensor is ``ops._check_not_inference``'s, named for the spec.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gradkit import ops
from gradkit.scope import BlockCoupling, BlockSpec

from conftest import use_backend

BACKENDS = ["native", "reference"]


def _segments():
    flat = torch.arange(1.0, 6.0)
    index = [torch.tensor([0, 2]), torch.tensor([1, 0, 3])]
    return flat, index


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale, exc", [("2", TypeError), (True, TypeError), (None, TypeError),
                                        (float("nan"), ValueError), (float("inf"), ValueError),
                                        (-float("inf"), ValueError)])
def test_scatter_segments_refuses_a_bad_scale_naming_it(backend, scale, exc):
    flat, index = _segments()
    with use_backend(backend):
        with pytest.raises(exc, match="^scale: "):
            ops.scatter_segments(flat, index, [3, 4], scale=scale)
        dst = [torch.full((3,), 7.0), torch.full((4,), 7.0)]
        with pytest.raises(exc, match="^scale: "):
            ops.scatter_segments_(flat, index, dst, scale=scale)
        assert all(torch.equal(d, torch.full_like(d, 7.0)) for d in dst)  # nothing written


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_segments_takes_numpy_scales_as_their_value(backend):
    flat, index = _segments()
    with use_backend(backend):
        want = ops.scatter_segments(flat, index, [3, 4], scale=0.5)
        for s in (np.float32(0.5), np.float64(0.5), np.int64(1) / 2):
            got = ops.scatter_segments(flat, index, [3, 4], scale=s)
            assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert torch.equal(want[0], torch.tensor([0.5, 0.0, 1.0]))
        assert torch.equal(want[1], torch.tensor([2.0, 1.5, 0.0, 2.5]))


@pytest.mark.parametrize("op", [["and"], ("and",), 0, None, b"and", "AND"])
def test_bitmask_binary_names_op(op):
    a = [torch.tensor([0b1010], dtype=torch.uint8)]
    b = [torch.tensor([0b0110], dtype=torch.uint8)]
    with pytest.raises(ValueError, match="^op: expected one of"):
        ops.bitmask_binary(a, b, op)
    assert ops.bitmask_binary(a, b, "and")[0].item() == 0b0010


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_adamw_takes_numpy_float32_rates(backend):
    """The rates as numpy float32 (a schedule's) step exactly as the same Python floats do."""
    torch.manual_seed(0)
    p0, g = torch.randn(10), torch.randn(10)
    bits = ops.pack_bitmask(torch.arange(10) % 3 == 0)
    outs = []
    for conv in (float, np.float32):
        p, m, v = p0.clone(), torch.zeros(10), torch.zeros(10)
        with use_backend(backend):
            ops.masked_adamw_([p], [g], [m], [v], [bits], masked_lr=conv(0.5), unmasked_lr=conv(0.25),
                              beta1=conv(0.5), beta2=conv(0.75), eps=conv(0.125), weight_decay=conv(0.0625),
                              bias_correction1=[conv(0.5)], bias_correction2_sqrt=[conv(0.5)])
        outs.append(p)
    assert not torch.equal(outs[0], p0)
    assert torch.equal(outs[0], outs[1])


def test_masked_adamw_still_refuses_a_string_rate():
    p, g, m, v = torch.randn(4), torch.randn(4), torch.zeros(4), torch.zeros(4)
    p0 = p.clone()
    with pytest.raises(ValueError, match="^masked_lr: "):
        ops.masked_adamw_([p], [g], [m], [v], [None], masked_lr="0.1", unmasked_lr=0.1, beta1=0.9, beta2=0.99,
                          eps=1e-8, weight_decay=0.0, bias_correction1=[0.1], bias_correction2_sqrt=[0.1])
    assert torch.equal(p, p0)


def _inference(*shape):
    with torch.inference_mode():
        return torch.randn(*shape)


def test_scope_inference_refusal_names_the_spec_with_ops_message():
    a, b = torch.randn(4, 4), _inference(4, 4)
    a0, b0 = a.clone(), b.clone()
    with pytest.raises(RuntimeError) as ei:
        BlockSpec(b, (1, 2), name="down").keep_blocks(torch.zeros(4, 2, dtype=torch.bool))
    msg = str(ei.value)
    assert msg.startswith("BlockSpec down weights: is an inference tensor"), msg
    with pytest.raises(RuntimeError, match=r"^BlockSpec weights: is an inference tensor"):
        BlockSpec(b, (1, 2)).keep_blocks(torch.zeros(4, 2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"^specs\[1\] weights: is an inference tensor"):
        BlockCoupling([BlockSpec(a, (1, 2), name="gate"), BlockSpec(b, (1, 2), name="up")]).keep_blocks(
            torch.zeros(4, 2, dtype=torch.bool))
    assert torch.equal(a, a0) and torch.equal(b, b0)
