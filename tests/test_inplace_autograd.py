"""gradkit's in-place ops and autograd: every op that writes a tensor in place bumps that tensor's version
counter, as torch's own in-place ops do, so a backward through a graph that saved the tensor raises instead
of silently using the new values (the custom ops' kernels write through data pointers, which autograd does
not see); and writing a tensor that requires grad while grad mode is on is refused before anything is
written (the ops have no derivative). Before this, every case below ran silently."""
import pytest
import torch

from gradkit import _ext, ops

pytestmark = pytest.mark.skipif(not _ext.has_op("scatter_segments_"), reason="compiled extension not built")


def _adamw(p):
    n = p.numel()
    return lambda: ops.masked_adamw_([p], [torch.ones_like(p)], [torch.zeros_like(p)], [torch.zeros_like(p)],
                                     [torch.full(((n + 7) // 8,), 255, dtype=torch.uint8)], masked_lr=0.1,
                                     unmasked_lr=0.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                                     bias_correction1=[0.1], bias_correction2_sqrt=[0.1])


def _schur(ut):
    n, cap, K = ut.shape
    xf = torch.randn(n, 1, K)
    return lambda: ops.obs_schur_extend_(ut, xf, torch.zeros(n, 1, 0), torch.ones(n, 1, 1), 0)


# name -> (make the target tensor, the call writing it in place)
CASES = {
    "scatter_segments_": (lambda: torch.zeros(6), lambda t: lambda: ops.scatter_segments_(
        torch.arange(3.0), [torch.tensor([0, 2, 4])], [t])),
    "gather_segments(out=)": (lambda: torch.zeros(3), lambda t: lambda: ops.gather_segments(
        [torch.arange(6.0)], [torch.tensor([5, 1, 3])], out=t)),
    "scope_hard_threshold_": (lambda: torch.randn(4, 8), lambda t: lambda: ops.scope_hard_threshold_(
        t, [1, 2], [1, 4], 1)),
    "block_apply_mask_": (lambda: torch.randn(4, 8), lambda t: lambda: ops.block_apply_mask_(
        t, [1, 4], torch.tensor([[True, False]] * 4))),
    "block_soft_threshold_": (lambda: torch.randn(4, 8), lambda t: lambda: ops.block_soft_threshold_(
        t, [1, 4], torch.full((4, 2), 0.5))),
    "masked_adamw_": (lambda: torch.randn(10), _adamw),
    "obs_schur_extend_": (lambda: torch.zeros(2, 3, 5), _schur),
    "projection_matrix_": (lambda: torch.zeros(3, 7), lambda t: lambda: ops.projection_matrix_(t, 1, 0, 3)),
    "obs_sweep_": (lambda: torch.randn(4, 6), lambda t: lambda: ops.obs_sweep_(
        t, torch.zeros(4, 6), torch.eye(4) * 2, torch.ones(4, 6, dtype=torch.bool), 0, 4)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_inplace_op_bumps_the_version_counter(name):
    make, call = CASES[name]
    # a graph that saved the target: (t * w).sum() saves t for w's gradient
    w = torch.ones((), requires_grad=True)
    t = make()
    loss = (t * w).sum()
    v = t._version
    call(t)()
    assert t._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("name", list(CASES))
def test_native_inplace_op_bumps_once_per_call(name):
    """One call, one bump, as torch's add_ does: the native op bumps in its ADInplaceOrView kernel and the
    wrapper adds nothing (it used to bump a second time). The Triton kernels write past the dispatcher, so
    there the wrapper bumps; the reference kernels bump once per torch in-place op they run, then once more."""
    assert ops.backend() == "native"
    make, call = CASES[name]
    t = make()
    v = t._version
    call(t)()
    assert t._version == v + 1
    call(t)()
    assert t._version == v + 2


@pytest.mark.parametrize("name", list(CASES))
def test_inplace_op_refuses_a_tensor_requiring_grad_under_grad_mode(name):
    make, call = CASES[name]
    t = make().requires_grad_()
    before = t.detach().clone()
    with pytest.raises(RuntimeError, match=r"^[a-z_]+(\[0\])?: requires grad and grad mode is on"):
        call(t)()
    assert torch.equal(t.detach(), before)  # nothing written
    with torch.no_grad():  # the documented way: allowed, and written
        call(t)()


def test_golden_topk_and_bumps_bits_and_counts():
    g = torch.randn(20)
    bits = torch.zeros(3, dtype=torch.uint8)
    counts = torch.zeros(20, dtype=torch.int32)
    vb, vc = bits._version, counts._version
    ops.golden_topk_and_(g, bits, 5, counts=counts, first=True)
    assert bits._version > vb and counts._version > vc


def test_direct_dispatcher_calls_bump_too():
    """torch.ops.gradkit.* called directly (past the wrappers): the ADInplaceOrView kernels bump every argument
    the schema marks written, single tensors, optional ones and lists."""
    G = torch.ops.gradkit
    x = torch.randn(4, 8)
    G.block_apply_mask_(x, [1, 4], torch.tensor([[True, False]] * 4))
    dst = [torch.zeros(6), torch.zeros(2)]
    G.scatter_segments_(torch.arange(5.0), [torch.tensor([0, 2, 4]), None], dst, 1.0, False)
    out = torch.zeros(3, 7)
    G.projection_matrix_(out, 1, 0, 3, 0, 0)
    bits, counts = torch.zeros(3, dtype=torch.uint8), torch.zeros(20, dtype=torch.int32)
    G.golden_topk_and_(torch.randn(20), bits, counts, 5, True)
    p, m, v = torch.randn(10), torch.zeros(10), torch.zeros(10)
    G.masked_adamw_([p], [torch.ones(10)], [m], [v], [None], 0.1, 0.1, 0.9, 0.99, 1e-8, 0.0, [0.1], [0.1], False)
    for t in (x, *dst, out, bits, counts, p, m, v):
        assert t._version > 0
    # and a graph that saved one raises on backward
    w = torch.ones((), requires_grad=True)
    y = torch.randn(4, 8)
    loss = (y * w).sum()
    G.block_apply_mask_(y, [1, 4], torch.tensor([[False, True]] * 4))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_direct_dispatcher_calls_refuse_a_tensor_requiring_grad():
    """torch.ops.gradkit.* called directly on a written tensor that requires grad, grad mode on: refused before
    anything is written, naming the schema's argument (it used to write a leaf and leave any graph through a
    non-leaf silently wrong); under no_grad it runs."""
    G = torch.ops.gradkit
    mask = torch.tensor([[True, False]] * 4)
    for x in (torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True) * 1):
        before = x.detach().clone()
        with pytest.raises(RuntimeError, match="^x: requires grad and grad mode is on"):
            G.block_apply_mask_(x, [1, 4], mask)
        assert torch.equal(x.detach(), before)
    dst = [torch.zeros(6), torch.zeros(2, requires_grad=True)]
    with pytest.raises(RuntimeError, match=r"^dst\[1\]: requires grad"):
        G.scatter_segments_(torch.arange(5.0), [torch.tensor([0, 2, 4]), None], dst, 1.0, False)
    assert not dst[0].any()
    leaf = torch.randn(4, 8, requires_grad=True)
    with torch.no_grad():
        G.block_apply_mask_(leaf, [1, 4], mask)
    assert not leaf[:, 4:].any()



# ---- the read side: a source whose values flow into the written tensor. The write is outside autograd, so with
# the source requiring grad (grad mode on) the target used to hold values whose gradient was silently dropped
# (torch refuses out= with such an input the same way). Each case: (make the call given a source that requires
# grad, the argument name the error must give, the tensors that must come out unwritten).
def _read_cases():
    def gather(src):
        out = torch.zeros(5)
        return (lambda: ops.gather_segments([torch.ones(2), src], [None, torch.tensor([5, 1, 3])], out=out)), [out]

    def scatter(flat):
        dst = [torch.zeros(6)]
        return (lambda: ops.scatter_segments_(flat, [torch.tensor([0, 2, 4])], dst)), dst

    def soft(th):
        x = torch.randn(4, 8)
        return (lambda: ops.block_soft_threshold_(x, [1, 4], th)), [x]

    def soft_cond(c):
        x = torch.randn(4, 8)
        return (lambda: ops.block_soft_threshold_(x, [1, 4], torch.full((4, 2), 0.5), conditioner=c)), [x]

    def adamw(g):
        p, m, v = torch.randn(10), torch.zeros(10), torch.zeros(10)
        return (lambda: ops.masked_adamw_([p], [g], [m], [v], [None], masked_lr=0.1, unmasked_lr=0.1, beta1=0.9,
                                          beta2=0.99, eps=1e-8, weight_decay=0.0, bias_correction1=[0.1],
                                          bias_correction2_sqrt=[0.1])), [p, m, v]

    def schur(which):
        def make(t):
            n, K = 2, 5
            args = {"xf": torch.randn(n, 1, K), "up": torch.zeros(n, 1, 0), "linv": torch.ones(n, 1, 1)}
            args[which] = t
            ut = torch.zeros(n, 3, K)
            return (lambda: ops.obs_schur_extend_(ut, args["xf"], args["up"], args["linv"], 0)), [ut]
        return make

    def sweep(u):
        w, err = torch.randn(4, 6), torch.zeros(4, 6)
        return (lambda: ops.obs_sweep_(w, err, u, torch.ones(4, 6, dtype=torch.bool), 0, 4)), [w, err]

    return {
        "gather_segments(out=)": (lambda: torch.arange(6.0), gather, r"src\[1\]"),
        "scatter_segments_": (lambda: torch.arange(3.0), scatter, "flat"),
        "block_soft_threshold_ thresholds": (lambda: torch.full((4, 2), 0.5), soft, "thresholds"),
        "block_soft_threshold_ conditioner": (lambda: torch.rand(4, 8) + 0.5, soft_cond, "conditioner"),
        "masked_adamw_": (lambda: torch.ones(10), adamw, r"grads\[0\]"),
        "obs_schur_extend_ xf": (lambda: torch.randn(2, 1, 5), schur("xf"), "xf"),
        "obs_schur_extend_ linv": (lambda: torch.ones(2, 1, 1), schur("linv"), "linv"),
        "obs_sweep_": (lambda: torch.eye(4) * 2, sweep, "u"),
    }


READ_CASES = _read_cases()


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("name", list(READ_CASES))
def test_inplace_op_refuses_a_source_requiring_grad_under_grad_mode(name, backend):
    from conftest import use_backend
    make, call, argname = READ_CASES[name]
    for src in (make().requires_grad_(), make().requires_grad_() * 1):  # a leaf and a non-leaf
        fn, targets = call(src)
        before = [t.clone() for t in targets]
        with use_backend(backend), pytest.raises(RuntimeError, match=f"^{argname}: requires grad and grad mode is on, "
                                                                     "but the values written into"):
            fn()
        assert all(torch.equal(t, b) for t, b in zip(targets, before))  # nothing written
    # under no_grad, and with the source detached, the same call runs and writes the same values
    torch.manual_seed(0)
    fn, targets = call(make().requires_grad_())
    init = [t.clone() for t in targets]
    with use_backend(backend), torch.no_grad():
        fn()
    torch.manual_seed(0)
    fn2, targets2 = call(make().requires_grad_().detach())
    with use_backend(backend):
        fn2()
    assert all(torch.equal(a, b) for a, b in zip(targets, targets2))
    assert any(not torch.equal(a, b) for a, b in zip(targets, init))  # it did write


def test_direct_dispatcher_calls_refuse_a_source_requiring_grad():
    """torch.ops.gradkit.* called directly: the ADInplaceOrView kernel refuses the same sources, naming the
    schema's argument, before anything is written."""
    G = torch.ops.gradkit
    out = torch.zeros(8)
    src = [torch.randn(5), torch.randn(3, requires_grad=True)]
    with pytest.raises(RuntimeError, match=r"^src\[1\]: requires grad and grad mode is on.*written into out .*"
                                           r"or use gather_segments without `out`, which is differentiable$"):
        G.gather_segments_out(src, [None, None], out, False)
    assert not out.any()
    dst = [torch.zeros(6)]
    with pytest.raises(RuntimeError, match=r"^flat: requires grad and grad mode is on.*written into dst .*"
                                           r"or use scatter_segments, which"):
        G.scatter_segments_(torch.arange(3.0, requires_grad=True), [torch.tensor([0, 2, 4])], dst, 1.0, False)
    assert not dst[0].any()
    w, err = torch.randn(4, 6), torch.zeros(4, 6)
    w0 = w.clone()
    with pytest.raises(RuntimeError, match="^u: requires grad.*written into w and err are not differentiable"):
        G.obs_sweep_(w, err, (torch.eye(4) * 2).requires_grad_(), torch.ones(4, 6, dtype=torch.bool), 0, 4)
    assert torch.equal(w, w0) and not err.any()
    with torch.no_grad():
        G.gather_segments_out(src, [None, None], out, False)
    assert torch.equal(out, torch.cat([src[0], src[1].detach()]))


def test_values_that_only_choose_entries_may_require_grad():
    """scope_hard_threshold_'s ``values`` and golden_topk_and_'s ``g`` decide which entries are kept; no gradient
    flows from them, so they are not refused (the written x / bits stay what they were without grad)."""
    x = torch.randn(4, 8)
    vals = x.abs().requires_grad_()
    y = x.clone()
    ops.scope_hard_threshold_(x, [1, 2], [1, 4], 1, values=vals)
    ops.scope_hard_threshold_(y, [1, 2], [1, 4], 1, values=vals.detach())
    assert torch.equal(x, y)
    bits = torch.zeros(3, dtype=torch.uint8)
    ops.golden_topk_and_(torch.randn(20, requires_grad=True), bits, 5, first=True)
    assert int(bits.sum()) > 0


def test_functional_gather_stays_differentiable_and_parammap_names_the_entry():
    from gradkit import ParamMap
    a = torch.randn(5, requires_grad=True)
    flat = ops.gather_segments([a], [torch.tensor([4, 0])])
    flat.sum().backward()
    assert torch.equal(a.grad, torch.tensor([1.0, 0, 0, 0, 1.0]))
    pm = ParamMap({"w": {"shape": (5,), "repr": "all"}})
    out = torch.zeros(5)
    with pytest.raises(RuntimeError, match=r"^source\['w'\]: requires grad and grad mode is on.*gather without"):
        pm.gather({"w": a}, out=out)
    assert not out.any()
    assert torch.equal(pm.gather({"w": a}), a.detach()) and pm.gather({"w": a}).requires_grad


@pytest.mark.parametrize("coupled", [False, True])
def test_scope_soft_threshold_reads_thresholds_that_require_grad_as_values(coupled):
    """The scope API's proximal step writes the weights' .data (SparseKit's step, outside autograd): thresholds or
    conditioners computed from something that requires grad are read as values there, not refused."""
    from gradkit.scope import BlockCoupling, BlockSpec, ScopeCoupling, ScopeSpec

    def run(lam, cond):
        torch.manual_seed(3)
        a, b = torch.randn(4, 8), torch.randn(4, 8)
        if coupled:
            sc = ScopeCoupling([ScopeSpec(BlockCoupling([BlockSpec(a, (1, 4)), BlockSpec(b, (1, 4))]), (1, 2))])
        else:
            sc = ScopeSpec(BlockSpec(a, (1, 4)), (1, 2))
        h = {blk: cond for blk in sc.blocks()} if cond is not None else None
        sc.soft_threshold(torch.ones(sc.grid_shape) * lam, conditioners=h)
        return a, b

    lam = torch.tensor(0.4, requires_grad=True)
    cond = torch.rand(4, 8, generator=torch.Generator().manual_seed(1)) + 0.5
    got = run(lam, cond * lam)  # thresholds and conditioners: non-leaves that require grad
    want = run(0.4, cond * 0.4)
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    assert not torch.equal(got[0], run(0.0, None)[0])  # it did shrink
