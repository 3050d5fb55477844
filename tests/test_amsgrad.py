"""AMSGrad in the fused masked AdamW step (``max_exp_avg_sqs``) and ``MaskedAdamW(amsgrad=True)``: every backend
(native CPU kernel, the plain-PyTorch reference, Triton under the interpreter, the CUDA C++ kernel under the
emulator of tests/cuda_emu) against the reference, and the optimizer against ``torch.optim.AdamW(amsgrad=True)``.
GoldenParams' README promises its MaskedAdamW "AMSGrad etc."; the optimizer refused ``amsgrad`` before."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it too on GPU-less machines

import io  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from gradkit import ops  # noqa: E402
from gradkit.kernels.reference import adamw as ref  # noqa: E402
from gradkit.optim import MaskedAdamW  # noqa: E402

import test_masked_adamw as t_adamw  # noqa: E402
from conftest import use_backend  # noqa: E402

ULP = {torch.float32: 2e-7, torch.float64: 1e-15, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _vmax(v, g, data, with_nan):
    """Running maxima around the new v: some entries above it (the maximum wins), some below (v wins), a NaN."""
    out = []
    for t in v:
        scale = torch.rand(t.shape, generator=g) * 2.0  # 0..2 x the old v: either side of the new one
        x = (t.double() * scale.double() + torch.rand(t.shape, generator=g).double() * 1e-3).to(t.dtype)
        if with_nan and x.numel():
            x.view(-1)[0] = float("nan")  # torch.maximum propagates it
        out.append(x)
    return out


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["native", "reference", "triton"])
@settings(deadline=None, max_examples=max(8, settings.default.max_examples // 2))
@given(st.data())
def test_op_with_amsgrad_matches_reference(backend, data):
    dtype, (p, g, m, v), bits, kw = t_adamw._op_case(data, "cpu")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    vm = _vmax(v, gen, data, data.draw(st.booleans()))
    want = [[t.clone() for t in x] for x in (p, m, v, vm)]
    ref.masked_adamw_(want[0], g, want[1], want[2], bits, *kw.values(), want[3])
    with use_backend(backend):
        ops.masked_adamw_(p, g, m, v, bits, **kw, max_exp_avg_sqs=vm)
    for got, exp in zip((p, m, v, vm), want):
        for a, b in zip(got, exp):
            torch.testing.assert_close(a, b, atol=ULP[dtype], rtol=2 * ULP[dtype], equal_nan=True)
    for a, b in zip(vm, want[3]):  # the stored maximum is never below the stored v (NaN aside)
        assert torch.equal(a.isnan(), b.isnan())


def test_reference_amsgrad_is_torch_maximum_of_the_new_v():
    """The definition: the denominator uses max(max_exp_avg_sq, new exp_avg_sq); without AMSGrad the op is unchanged."""
    p = torch.tensor([1.0, 1.0, 1.0])
    g = torch.tensor([1.0, 1.0, 1.0])
    vmax = torch.tensor([0.0, 4.0, float("nan")])
    kw = dict(masked_lr=0.1, unmasked_lr=0.1, beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0, bias_correction1=[1.0],
              bias_correction2_sqrt=[1.0], maximize=False)
    q, m, v = p.clone(), torch.zeros(3), torch.zeros(3)
    ops.masked_adamw_([q], [g], [m], [v], [None], **kw, max_exp_avg_sqs=[vmax])
    # beta1 = beta2 = 0: m = g = 1, v = g^2 = 1; denominators sqrt(max(0, 1)) = 1, sqrt(max(4, 1)) = 2, NaN
    assert torch.equal(v, torch.ones(3)) and vmax[:2].tolist() == [1.0, 4.0] and vmax[2].isnan()
    assert q[:2].tolist() == [pytest.approx(0.9), pytest.approx(0.95)] and q[2].isnan()
    q2, m2, v2 = p.clone(), torch.zeros(3), torch.zeros(3)
    ops.masked_adamw_([q2], [g], [m2], [v2], [None], **kw)
    assert torch.allclose(q2, torch.full((3,), 0.9))


def test_amsgrad_list_checked_by_name_before_any_write():
    p, g, m, v = (torch.randn(5) for _ in range(4))
    v = v.abs()
    before = [t.clone() for t in (p, m, v)]
    kw = dict(masked_lr=0.1, unmasked_lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
              bias_correction1=[0.1], bias_correction2_sqrt=[0.1])
    for bad, msg in (([], "max_exp_avg_sqs: expected a list of 1"), ([torch.zeros(4)], r"max_exp_avg_sqs\[0\]"),
                     ([torch.zeros(5, dtype=torch.float64)], r"max_exp_avg_sqs\[0\]"),
                     ([torch.zeros(10)[::2]], r"max_exp_avg_sqs\[0\]")):
        with pytest.raises((ValueError, TypeError), match=msg):
            ops.masked_adamw_([p], [g], [m], [v], [None], **kw, max_exp_avg_sqs=bad)
        with pytest.raises((ValueError, TypeError, RuntimeError), match="max_exp_avg_sqs"):  # the C++ check too
            torch.ops.gradkit.masked_adamw_([p], [g], [m], [v], [None], 0.1, 0.1, 0.9, 0.99, 1e-8, 0.0, [0.1], [0.1],
                                            False, bad)
        assert all(torch.equal(a, b) for a, b in zip((p, m, v), before))


def test_opcheck_with_amsgrad():
    gen = torch.Generator().manual_seed(0)
    p = [torch.randn(37, generator=gen), torch.randn(4, 9, generator=gen)]
    g = [torch.randn(t.shape, generator=gen) for t in p]
    m = [torch.randn(t.shape, generator=gen) * 0.1 for t in p]
    v = [torch.rand(t.shape, generator=gen) * 0.01 for t in p]
    vm = [torch.rand(t.shape, generator=gen) * 0.02 for t in p]
    bits = [ops.pack_bitmask(torch.rand(37, generator=gen) < 0.5), None]
    torch.library.opcheck(torch.ops.gradkit.masked_adamw_.default,
                          (p, g, m, v, bits, 1e-2, 1e-3, 0.9, 0.999, 1e-8, 0.01, [0.1, 0.2], [0.03, 0.05], False, vm))


def test_version_counters_bump_for_the_maxima():
    p, g, m, v, vm = (torch.rand(6) for _ in range(5))
    before = vm._version
    torch.ops.gradkit.masked_adamw_([p], [g], [m], [v], [None], 0.1, 0.1, 0.9, 0.99, 1e-8, 0.0, [0.1], [0.1], False,
                                    [vm])
    assert vm._version > before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optimizer_equal_rates_matches_torch_adamw_amsgrad(dtype):
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(33, generator=gen, dtype=dtype), torch.randn(5, 7, generator=gen, dtype=dtype)]
    ours = {f"p{i}": torch.nn.Parameter(t.clone()) for i, t in enumerate(init)}
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    plain = {f"p{i}": torch.nn.Parameter(t.clone()) for i, t in enumerate(init)}
    opt = MaskedAdamW(ours, None, masked_lr=3e-2, unmasked_lr=3e-2, weight_decay=0.1, amsgrad=True)
    topt = torch.optim.AdamW(theirs, lr=3e-2, weight_decay=0.1, amsgrad=True)
    popt = MaskedAdamW(plain, None, masked_lr=3e-2, unmasked_lr=3e-2, weight_decay=0.1)
    for step in range(12):
        # gradients that shrink, so the maximum (not the current v) sets the denominator in later steps
        grads = [torch.randn(t.shape, generator=gen, dtype=dtype) * (4.0 if step < 3 else 0.1) for t in init]
        for p, q, r, gr in zip(ours.values(), theirs, plain.values(), grads):
            p.grad, q.grad, r.grad = gr.clone(), gr.clone(), gr.clone()
        opt.step()
        topt.step()
        popt.step()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for p, q in zip(ours.values(), theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=tol, atol=tol)
        st, tst = opt.state[p], topt.state[q]
        torch.testing.assert_close(st["max_exp_avg_sq"], tst["max_exp_avg_sq"], rtol=tol, atol=tol * 1e-3)
        assert bool((st["max_exp_avg_sq"] >= st["exp_avg_sq"]).all())
        assert bool((st["max_exp_avg_sq"] > st["exp_avg_sq"]).any())  # the maximum did matter
    # and differs from plain AdamW on the same gradients (the test can fail)
    assert not torch.allclose(plain["p0"], ours["p0"], rtol=1e-3, atol=1e-4)


def test_optimizer_two_rates_equal_torch_amsgrad_run_once_per_rate():
    gen = torch.Generator().manual_seed(2)
    init = torch.randn(64, generator=gen)
    mask = torch.rand(64, generator=gen) < 0.4
    grads = [torch.randn(64, generator=gen) * (3.0 if s < 2 else 0.2) for s in range(8)]
    w = torch.nn.Parameter(init.clone())
    opt = MaskedAdamW({"w": w}, {"w": mask}, masked_lr=5e-2, unmasked_lr=5e-3, weight_decay=0.05, amsgrad=True)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ta = torch.optim.AdamW([a], lr=5e-2, weight_decay=0.05, amsgrad=True)
    tb = torch.optim.AdamW([b], lr=5e-3, weight_decay=0.05, amsgrad=True)
    for gr in grads:
        w.grad, a.grad, b.grad = gr.clone(), gr.clone(), gr.clone()
        opt.step()
        ta.step()
        tb.step()
    torch.testing.assert_close(w.detach(), torch.where(mask, a.detach(), b.detach()), rtol=1e-5, atol=1e-6)


def test_amsgrad_state_dict_round_trip_and_turning_it_on_later():
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(20, generator=gen))
    opt = MaskedAdamW({"w": w}, None, masked_lr=1e-2, unmasked_lr=1e-2, amsgrad=True)
    for _ in range(3):
        w.grad = torch.randn(20, generator=gen)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = MaskedAdamW({"w": w2}, None, masked_lr=1e-2, unmasked_lr=1e-2)  # amsgrad comes from the state
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["amsgrad"] is True
    gr = torch.randn(20, generator=gen)
    w.grad, w2.grad = gr.clone(), gr.clone()
    opt.step()
    opt2.step()
    assert torch.equal(w, w2) and torch.equal(opt.state[w]["max_exp_avg_sq"], opt2.state[w2]["max_exp_avg_sq"])
    # a wrongly shaped maximum in a state dict is refused by name before anything changes
    bad = opt.state_dict()
    bad["state"][0]["max_exp_avg_sq"] = torch.zeros(3)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        opt2.load_state_dict(bad)
    # plain AdamW state, amsgrad switched on in the group: the maximum starts at 0 (torch's initial value)
    u = torch.nn.Parameter(torch.randn(20, generator=gen))
    opt3 = MaskedAdamW({"u": u}, None, masked_lr=1e-2, unmasked_lr=1e-2)
    u.grad = torch.randn(20, generator=gen)
    opt3.step()
    assert "max_exp_avg_sq" not in opt3.state[u]
    opt3.param_groups[0]["amsgrad"] = True
    u.grad = torch.randn(20, generator=gen)
    opt3.step()
    assert torch.equal(opt3.state[u]["max_exp_avg_sq"], opt3.state[u]["exp_avg_sq"])
    with pytest.raises(TypeError, match="amsgrad"):
        MaskedAdamW({"u": u}, None, masked_lr=1e-2, unmasked_lr=1e-2, amsgrad="yes")


@pytest.mark.cuda_emu
def test_cuda_kernel_amsgrad_bitwise_equals_cpu_under_the_emulator():
    """csrc/cuda/adamw.cu with max_exp_avg_sqs, under tests/cuda_emu: the CPU kernel's bits, 16-byte units and the
    entry-wise tail (a view one element in), four dtypes."""
    from test_cuda_emulated import emu, emulated

    gen = torch.Generator().manual_seed(4)
    for dtype in t_adamw.FLOATS:
        for off in (0, 1):
            n = 4096 + 37
            mk = [torch.randn(n + off, generator=gen).to(dtype)[off:] for _ in range(3)]
            v = (torch.rand(n + off, generator=gen) * 0.01).to(dtype)[off:]
            vm = (torch.rand(n + off, generator=gen) * 0.02).to(dtype)[off:]
            bits = ops.pack_bitmask(torch.rand(n, generator=gen) < 0.5)
            args = (1e-2, 1e-3, 0.9, 0.999, 1e-8, 0.01, [0.3], [0.05], False)
            cpu = [t.clone() for t in (mk[0], mk[2], v, vm)]
            ops.masked_adamw_([cpu[0]], [mk[1]], [cpu[1]], [cpu[2]], [bits], masked_lr=1e-2, unmasked_lr=1e-3,
                              beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, bias_correction1=[0.3],
                              bias_correction2_sqrt=[0.05], max_exp_avg_sqs=[cpu[3]])
            with emulated(4):
                emu("adamw").masked_adamw_([mk[0]], [mk[1]], [mk[2]], [v], [bits], *args, [vm])
            for a, b in zip((mk[0], mk[2], v, vm), cpu):
                assert t_adamw._bits_equal(a, b), (dtype, off)
