"""gradkit.kernels.triton._interp.fast_nested_calls (installed by conftest under TRITON_INTERPRET=1): nested
@triton.jit helpers no longer re-patch triton.language at every call. The launch still patches (once) and
restores everything afterwards, on success and on error, and results are those of the plain interpreter."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from gradkit.kernels.triton import _interp  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter only")


@triton.jit
def _sq(x):
    return x * x


@triton.jit
def _twice(x):
    return _sq(x) + _sq(x)  # a helper calling a helper


@triton.jit
def _kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    tl.store(y_ptr + offs, _twice(x) + tl.sqrt(tl.abs(x)), mask=m)


@triton.jit
def _bad_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(x_ptr + offs, _twice(x) + tl.arange(0, 2 * BLOCK))  # shapes that do not broadcast: raises


def _run(x):
    y = torch.empty_like(x)
    _kernel[(triton.cdiv(x.numel(), 8),)](x, y, x.numel(), BLOCK=8)
    return y


def _count_walks(monkeypatch):
    """Calls of triton's _patch_builtin (the inspect.getmembers walks a _patch_lang makes), counted."""
    from triton.runtime import interpreter as interp

    calls = []
    real = interp._patch_builtin
    monkeypatch.setattr(interp, "_patch_builtin", lambda *a: (calls.append(1), real(*a))[1])
    return calls


def test_installed_on_this_triton_and_nested_calls_skip_the_walk(monkeypatch):
    assert _interp.fast_nested_calls(), f"the wrapper does not match triton {triton.__version__}'s interpreter"
    walks = _count_walks(monkeypatch)
    _interp._STATE["orig"](_kernel.fn).restore()  # one walk, alone
    one = len(walks)
    assert one >= 3
    walks.clear()
    x = torch.randn(37)
    y = _run(x)
    torch.testing.assert_close(y, 2 * x * x + x.abs().sqrt(), rtol=1e-6, atol=1e-6)
    # 5 programs x 3 nested calls: only the launch walks (the plain interpreter: 1 + 15 walks)
    assert len(walks) == one


def test_language_restored_after_a_launch_and_after_an_error():
    assert _interp.fast_nested_calls()
    load, tensor_add = tl.load, tl.tensor.__add__
    assert tl.core.is_builtin(load)
    _run(torch.randn(9))
    assert tl.load is load and tl.tensor.__add__ is tensor_add and _interp._STATE["active"] is None
    with pytest.raises(Exception):
        _bad_kernel[(1,)](torch.zeros(8), 8, BLOCK=8)
    assert tl.load is load and tl.tensor.__add__ is tensor_add and _interp._STATE["active"] is None
    torch.testing.assert_close(_run(torch.full((3,), 4.0)), torch.full((3,), 34.0))  # 2*16 + 2


def test_same_results_as_the_plain_interpreter(monkeypatch):
    """The same launches with the wrapper taken out (triton's own _patch_lang at every nested call)."""
    from triton.runtime import interpreter as interp

    assert _interp.fast_nested_calls()
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    fast = _run(x)
    plain = _interp._STATE["orig"]
    walks = _count_walks(monkeypatch)
    monkeypatch.setattr(interp, "_patch_lang", plain)
    slow = _run(x)
    assert len(walks) > 100  # it did walk at every nested call (125 programs x 3 calls)
    assert torch.equal(fast, slow)


@triton.jit
def _to_bf16_kernel(x_ptr, o_ptr, o_rne_ptr, o_rtz_ptr, h_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(o_ptr + offs, x.to(tl.bfloat16))
    tl.store(o_rne_ptr + offs, x.to(tl.bfloat16, fp_downcast_rounding="rtne"))
    tl.store(o_rtz_ptr + offs, x.to(tl.bfloat16, fp_downcast_rounding="rtz"))
    tl.store(h_ptr + offs, x.to(tl.float16).to(tl.bfloat16))  # fp16 -> bf16 goes through float32


def test_float32_to_bfloat16_casts_round_to_nearest_even_as_on_the_gpu():
    # session 43: the interpreter truncated float32 -> bfloat16 (1/sqrt(3) stored as 0.5742, not 0.5781), so Triton
    # kernels storing bfloat16 gave other bits under TRITON_INTERPRET=1 than on a GPU (cvt.rn.bf16.f32) and torch
    assert _interp.exact_bfloat16_casts()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, generator=g) * torch.logspace(-40, 38, 256).float()
    x[:12] = torch.tensor([3 ** -0.5, 1.00390625, 1.01171875, -1.01171875, 3.4e38, -3.4e38, 1e-40, 0.0, -0.0,
                           float("nan"), float("inf"), float("-inf")])
    outs = [torch.empty(256, dtype=torch.bfloat16) for _ in range(4)]
    _to_bf16_kernel[(1,)](x, *outs, BLOCK=256)
    want = x.to(torch.bfloat16).view(torch.int16)
    assert torch.equal(outs[0].view(torch.int16), want) and torch.equal(outs[1].view(torch.int16), want)
    assert outs[0][0].item() == 0.578125 and outs[0][2].item() == 1.015625 and outs[0][4].item() == float("inf")
    # rtz truncates toward zero: the float32 bits with the low 16 cut (subnormals included); NaN stays NaN
    trunc = (x.view(torch.int32) >> 16).to(torch.int16)
    nan = x.isnan()
    assert torch.equal(outs[2].view(torch.int16)[~nan], trunc[~nan]) and outs[2][nan].isnan().all()
    assert outs[2][6].item() != 0 and outs[2][0].item() == 0.57421875
    assert torch.equal(outs[3].view(torch.int16), x.to(torch.float16).float().to(torch.bfloat16).view(torch.int16))
