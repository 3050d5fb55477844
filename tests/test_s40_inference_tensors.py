"""Inference tensors (made under torch.inference_mode()) have no version counter and no ADInplaceOrView key: torch's
own in-place ops refuse to write them outside inference mode, while gradkit's compiled kernels, reached through the
dispatcher without that key, wrote them silently. Every in-place op wrapper refuses them (naming the argument) before
anything is written, in any grad mode; inside inference mode they are written as any tensor is (session 40)."""
import pytest
import torch

from gradkit import ops


def _inf(t):
    with torch.inference_mode():
        return t.clone()


def test_torch_itself_refuses_outside_inference_mode():
    x = _inf(torch.ones(3))
    with torch.no_grad(), pytest.raises(RuntimeError, match="[Ii]nference"):
        x.add_(1)


def _cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g)
    keep = torch.tensor([[True, False, True, False]] * 4)
    yield ("block_apply_mask_", "x", lambda t: ops.block_apply_mask_(t, (1, 2), keep), x)
    yield ("scope_hard_threshold_", "x", lambda t: ops.scope_hard_threshold_(t, (1, 2), (1, 2), 1), x)
    yield ("block_soft_threshold_", "x",
           lambda t: ops.block_soft_threshold_(t, (1, 2), torch.full((4, 4), 0.1)), x)
    yield ("projection_matrix_", "out", lambda t: ops.projection_matrix_(t, 3, 0, 4), torch.zeros(4, 8))
    idx = torch.tensor([0, 5, 7])
    yield ("scatter_segments_", "dst", lambda t: ops.scatter_segments_(torch.tensor([1.0, 2.0, 3.0]), [idx], [t]),
           torch.zeros(8))
    yield ("gather_segments(out=)", "out", lambda t: ops.gather_segments([x.reshape(-1)], [idx], out=t),
           torch.zeros(3))


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
@pytest.mark.parametrize("grad_mode", ["no_grad", "enable_grad"])
def test_inplace_ops_refuse_inference_tensors_and_write_them_in_inference_mode(case, grad_mode):
    _, arg, call, base = case
    want = base.clone()
    call(want)  # the result on an ordinary tensor
    assert not torch.equal(want, base)  # the op does write something: the refusal below is observable
    t = _inf(base)
    ctx = torch.no_grad() if grad_mode == "no_grad" else torch.enable_grad()
    with ctx, pytest.raises(RuntimeError, match=rf"^{arg}(\[0\])?: is an inference tensor"):
        call(t)
    assert torch.equal(t, base)  # nothing written
    with torch.inference_mode():
        call(t)
    assert torch.equal(t, want)


def test_golden_topk_and_refuses_inference_bits_and_counts():
    g = torch.tensor([3.0, -1.0, 2.0, 0.5, 4.0, 0.0, 1.0, -5.0])
    bits = _inf(torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="^bits: is an inference tensor"):
        ops.golden_topk_and_(g, bits, 3, first=True)
    assert int(bits[0]) == 0
    counts = _inf(torch.zeros(8, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="^counts: is an inference tensor"):
        ops.golden_topk_and_(g, torch.zeros(1, dtype=torch.uint8), 3, counts=counts, first=True)
    assert not counts.any()
    with torch.inference_mode():
        n = ops.golden_topk_and_(g, bits, 3, counts=counts, first=True)
    assert int(n) == 3
    assert counts.tolist() == [1, 0, 0, 0, 1, 0, 0, 1]  # |g| top 3: -5, 4, 3


def test_masked_adamw_refuses_inference_parameters_before_any_write():
    p0, p1 = torch.ones(4), _inf(torch.ones(4))
    g = torch.full((4,), 0.5)
    m = [torch.zeros(4), torch.zeros(4)]
    v = [torch.zeros(4), torch.zeros(4)]
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"^params\[1\]: is an inference tensor"):
        ops.masked_adamw_([p0, p1], [g, g], m, v, [None, None], masked_lr=0.1, unmasked_lr=0.1, beta1=0.9,
                          beta2=0.999, eps=1e-8, weight_decay=0.0, bias_correction1=[0.1, 0.1],
                          bias_correction2_sqrt=[0.1 ** 0.5] * 2)
    assert torch.equal(p0, torch.ones(4)) and torch.equal(p1, torch.ones(4))  # the first one is untouched too
    assert not m[0].any() and not v[0].any()


def test_direct_dispatcher_call_refuses_inference_tensors():
    # outside inference mode the ADInplaceOrView key comes from thread-local state, so gradkit's kernel for it (the
    # version bumps) runs for an inference tensor too, and refuses it with the wrappers' message
    x = _inf(torch.ones(2, 4))
    keep = torch.tensor([[True, False]] * 2)
    with torch.no_grad(), pytest.raises(RuntimeError, match="^x: is an inference tensor"):
        torch.ops.gradkit.block_apply_mask_(x, [1, 2], keep)
    assert torch.equal(x, torch.ones(2, 4))
    with torch.inference_mode():
        torch.ops.gradkit.block_apply_mask_(x, [1, 2], keep)
    assert x.tolist() == [[1.0, 1.0, 0.0, 0.0]] * 2
