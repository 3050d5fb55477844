"""Audit (s34) of the GRADIEND user path: gradkit.ParamMap and gradkit.compat.gradiend against
gradiend 0.2.3's own code and plain torch indexing on identical inputs.

Tests marked ``# DEFECT:`` assert what the library should do and fail on the current code."""
import copy
import os
import tempfile

import pytest
import torch

from gradiend.model.param_mapped import ParamMappedGradiendModel

from gradkit import ParamMap, ops
from gradkit.compat.gradiend import accelerate

CPU = torch.device("cpu")


def _base(seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    base(torch.randn(2, 6)).pow(2).sum().backward()
    return base


def _spec(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "0.weight": {"shape": (4, 6), "repr": "mask", "mask": torch.rand(4, 6, generator=g) < 0.5},
        "2.weight": {"shape": (3, 4), "repr": "indices", "indices": torch.tensor([7, 1, 4, 11])},  # unsorted
        "0.bias": {"shape": (4,), "repr": "all"},
        "2.bias": {"shape": (3,), "repr": "indices", "indices": torch.empty(0, dtype=torch.long)},
    }


def _torch_gather(model, spec):
    params = dict(model.named_parameters())
    parts = []
    for n, e in spec.items():
        g = params[n].grad.reshape(-1)
        if e["repr"] == "all":
            parts.append(g)
        elif e["repr"] == "mask":
            parts.append(g[e["mask"].reshape(-1)])
        else:
            parts.append(g[e["indices"].long()])
    return torch.cat(parts)


# =========================================================================== defects


def test_scatter_into_parameters_bumps_their_autograd_version():
    # DEFECT: ParamMap.scatter(out=model, target="param") writes through ``p.data`` (parammap.py:461), a tensor
    # with its own version counter, so the parameter's version is never bumped. A backward through a graph
    # that saved the weight then silently uses the *updated* weight (README's "SGD step" usage), where
    # torch's own in-place update (and gradkit's scope ops / ops._wrote, by their docs) make it raise.
    lin = torch.nn.Linear(3, 2)
    pm = ParamMap.from_model(lin)
    w_old = lin.weight.detach().clone()
    v0 = lin.weight._version
    loss = (lin.weight * lin.weight).sum()  # saves the weight for backward
    pm.scatter(torch.ones(pm.input_dim), out=lin, mode="add", scale=-0.5, target="param")
    assert torch.equal(lin.weight.detach(), w_old - 0.5)  # the update itself is right
    assert lin.weight._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_from_model_keeps_parameters_beside_a_child_named_module():
    # DEFECT: _named_parameters (parammap.py:894-897) unwraps *any* model with a ``.module`` attribute that
    # is an nn.Module, not just DDP / DataParallel wrappers. A plain model with a child called "module"
    # loses every other parameter: from_model(model) (documented "None = every parameter") silently
    # drops "head.*", and gather/scatter by those names fail with "the model has no parameter(s)".
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Linear(3, 2)
            self.head = torch.nn.Linear(2, 1)

    w = Wrapper()
    w.head(w.module(torch.randn(4, 3))).sum().backward()
    pm = ParamMap.from_model(w)
    want = [n for n, _ in w.named_parameters()]
    assert pm.names == want
    ref = torch.cat([p.grad.reshape(-1) for _, p in w.named_parameters()])
    assert torch.equal(pm.gather(w), ref)


def test_gather_and_scatter_through_a_torch_compiled_model():
    # DEFECT: _named_parameters (parammap.py:894-897) unwraps DDP's ``.module`` but not torch.compile's
    # OptimizedModule (``_orig_mod.`` prefix), which GRADIEND's lookup normalizes
    # (gradiend.model.utils._normalize_param_name strips "module." and "_orig_mod."). A map built on the
    # plain model cannot gather from / scatter into the compiled one ("the model has no parameter(s)"),
    # and from_model(compiled) names every entry "_orig_mod.*" (unusable on the plain model), unlike
    # from_model(DDP(model)).
    base = _base()
    compiled = torch.compile(base)  # nothing is compiled until it is called
    spec = _spec()
    pm = ParamMap(spec)
    want = _torch_gather(base, {k: v for k, v in spec.items() if k != "2.bias"})
    assert torch.equal(pm.gather(compiled), want)
    assert ParamMap.from_model(compiled).names == ParamMap.from_model(base).names
    before = base[0].bias.detach().clone()
    pm.scatter(torch.ones(pm.input_dim), out=compiled, mode="add", target="param")
    assert torch.equal(base[0].bias.detach(), before + 1)


def test_spec_entry_with_a_selection_but_no_repr_is_not_read_as_all():
    # DEFECT: _make_entry (parammap.py:93) defaults a missing "repr" to "all" even when the entry carries a
    # "mask" / "indices" tensor, so {"shape": (4,), "mask": m} silently selects every element (input_dim 4
    # instead of 2) and the flat order no longer matches the user's map. GRADIEND refuses such an entry
    # (KeyError 'repr' in _CompiledParamSelector; ModelWithGradiend: "missing required key 'repr'").
    # Expected: a ValueError naming the entry (or the repr inferred from the one selection key given).
    m = torch.tensor([True, False, True, False])
    try:
        pm = ParamMap({"w": {"shape": (4,), "mask": m}})
    except (ValueError, TypeError) as exc:
        assert "w" in str(exc)
        return
    assert pm.input_dim == 2 and pm.repr_of("w") == "mask"


def test_accelerate_takes_a_uint8_mask_like_gradiend():
    # DEFECT (parity, low severity): GRADIEND's selector reads a mask with ``.bool()`` (param_mapped.py:71),
    # so a 0/1 uint8 mask -- the dtype of GRADIEND's own mapping_masks file -- works in every GRADIEND
    # method; accelerate() raises TypeError "expected dtype torch.bool" (parammap.py:106 via
    # compat/gradiend.py:50 param_map_of), a difference the compat docstring does not list.
    base = _base()
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(4, 6, generator=g) < 0.5).to(torch.uint8)
    spec = {"0.weight": {"shape": (4, 6), "repr": "mask", "mask": mask}, "2.bias": {"shape": (3,), "repr": "all"}}
    n = int(mask.sum()) + 3
    ref = ParamMappedGradiendModel(n, 2, spec, device=CPU)
    want = ref.extract_gradients(base)
    fast = accelerate(copy.deepcopy(ref))
    assert torch.equal(fast.extract_gradients(base), want)


# =========================================================================== passing checks


def test_gather_matches_gradiend_and_torch_for_every_selection_form():
    base = _base()
    spec = _spec()
    bits = dict(spec)
    bits["0.weight"] = {"shape": (4, 6), "repr": "bitmask", "bitmask": ops.pack_bitmask(spec["0.weight"]["mask"])}
    ref = ParamMappedGradiendModel(ParamMap(spec).input_dim, 2, spec, device=CPU)
    want = ref.extract_gradients(base)
    assert torch.equal(want, _torch_gather(base, spec))
    for s in (spec, bits):
        pm = ParamMap(s)
        assert torch.equal(pm.gather(base), want)
        grads = {n: p.grad for n, p in base.named_parameters()}
        assert torch.equal(pm.gather(grads), want)
    # from_model with index lists / masks gives the model's order (not the dict's)
    pm = ParamMap.from_model(base, masks={"0.weight": spec["0.weight"]["mask"], "2.weight": spec["2.weight"]["indices"]})
    assert pm.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    ordered = {k: (spec[k] if k in spec and k != "2.bias" else {"shape": (3,), "repr": "all"})
               for k in pm.names}
    assert torch.equal(pm.gather(base), _torch_gather(base, ordered))


def test_decoder_outputs_written_back_like_gradiend_rewrite():
    # GRADIEND's rewrite_base_model: p.add_(lr * update) with update zero where unselected
    base = _base()
    spec = _spec()
    pm = ParamMap(spec)
    dec = torch.randn(pm.input_dim)
    for lr in (1.0, 0.1):
        mine, theirs = copy.deepcopy(base), copy.deepcopy(base)
        pm.scatter(dec, out=mine, mode="add", scale=lr, target="param")
        params = dict(theirs.named_parameters())
        idx = 0
        with torch.no_grad():
            for n, e in spec.items():
                p = params[n]
                upd = torch.zeros(p.numel())
                if e["repr"] == "all":
                    k = p.numel(); upd[:] = dec[idx:idx + k]
                elif e["repr"] == "mask":
                    k = int(e["mask"].sum()); upd[e["mask"].reshape(-1)] = dec[idx:idx + k]
                else:
                    k = e["indices"].numel(); upd[e["indices"].long()] = dec[idx:idx + k]
                p.add_(lr * upd.reshape(p.shape))
                idx += k
        for (n, a), (_, b) in zip(mine.named_parameters(), theirs.named_parameters()):
            if lr == 1.0:
                assert torch.equal(a, b), n
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_compat_dict_forward_and_backward_match_gradiend_in_low_precision():
    base = _base()
    spec = _spec()
    n = ParamMap(spec).input_dim
    grads = {k: v.grad for k, v in base.named_parameters()}
    for dt in (torch.bfloat16, torch.float16):
        torch.manual_seed(1)
        ref = ParamMappedGradiendModel(n, 2, spec, device=CPU, torch_dtype=dt)
        fast = accelerate(copy.deepcopy(ref))
        dr, er = ref(grads, return_encoded=True)
        df, ef = fast(grads, return_encoded=True)
        assert torch.equal(er, ef)
        for k in dr:
            assert dr[k].dtype == df[k].dtype and torch.equal(dr[k], df[k])
        sum(v.float().pow(2).sum() for v in dr.values()).backward()
        sum(v.float().pow(2).sum() for v in df.values()).backward()
        for (a, p), (_, q) in zip(ref.named_parameters(), fast.named_parameters()):
            assert torch.equal(p.grad, q.grad), (dt, a)
        assert torch.equal(fast.extract_gradients(base), ref.extract_gradients(base))


def test_mixed_dtype_gather_and_low_precision_scatter_rounding():
    g = torch.Generator().manual_seed(0)
    d = {"a": torch.randn(5, generator=g).bfloat16(), "b": torch.randn(3, generator=g).half(),
         "c": torch.randn(4, generator=g)}
    pm = ParamMap({k: {"shape": tuple(v.shape), "repr": "all"} for k, v in d.items()})
    ref = torch.cat([v for v in d.values()])  # torch.cat promotes like GRADIEND's torch.concat
    got = pm.gather(d)
    assert got.dtype == ref.dtype == torch.float32 and torch.equal(got, ref)
    assert torch.equal(pm.gather(d, dtype=torch.float64), torch.cat([v.double() for v in d.values()]))
    # fp32 flat added into a bf16 parameter: rounded once, like p.add_(fp32) (GRADIEND's rewrite)
    p = torch.randn(256, generator=g).bfloat16()
    flat = torch.randn(256, generator=g) * 1e-2
    one = ParamMap({"w": {"shape": (256,), "repr": "all"}})
    o = {"w": p.clone()}
    one.scatter(flat, out=o, mode="add")
    assert torch.equal(o["w"], p.clone().add_(flat))
    o = {"w": p.clone()}
    one.scatter(flat, out=o, mode="write", scale=0.3)
    assert torch.equal(o["w"], (flat * 0.3).bfloat16())


def test_ddp_wrapped_model_is_unwrapped_for_gather_scatter_and_from_model():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    fd, path = tempfile.mkstemp()
    os.close(fd)
    os.unlink(path)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    try:
        base = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
        ddp = DDP(base)
        ddp(torch.randn(2, 6)).pow(2).sum().backward()
        spec = _spec()
        pm = ParamMap(spec)
        want = _torch_gather(base, {k: v for k, v in spec.items() if k != "2.bias"})
        assert torch.equal(pm.gather(ddp), want) and torch.equal(pm.gather(base), want)
        assert ParamMap.from_model(ddp).names == ParamMap.from_model(base).names
        before = {n: p.detach().clone() for n, p in base.named_parameters()}
        flat = torch.randn(pm.input_dim)
        pm.scatter(flat, out=ddp, mode="add", target="param")
        full = pm.scatter(flat)
        for n, p in base.named_parameters():
            assert torch.equal(p.detach(), before[n] + full[n]), n
        # GRADIEND and the compat layer agree on the wrapped model, with plain, "module." and "_orig_mod." names
        for prefix in ("", "module.", "_orig_mod."):
            s = {prefix + k: v for k, v in spec.items()}
            ref = ParamMappedGradiendModel(pm.input_dim, 2, s, device=CPU)
            fast = accelerate(copy.deepcopy(ref))
            for m in (base, ddp, torch.compile(base)):
                assert torch.equal(fast.extract_gradients(m), ref.extract_gradients(m))
    finally:
        dist.destroy_process_group()


def test_non_contiguous_and_channels_last_parameters():
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.t = torch.nn.Parameter(torch.randn(6, 4).t())
    m.conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)
    (m.conv(x).sum() + (m.t ** 2).sum()).backward()
    assert not m.t.grad.is_contiguous() and not m.conv.weight.grad.is_contiguous()
    idx = torch.tensor([23, 0, 5, 17])
    mask = torch.rand(4, 3, 3, 3) < 0.3
    pm = ParamMap.from_model(m, masks={"t": idx, "conv.weight": mask})
    want = torch.cat([m.t.grad.reshape(-1)[idx], m.conv.weight.grad.reshape(-1)[mask.reshape(-1)],
                      m.conv.bias.grad])
    assert torch.equal(pm.gather(m), want)
    flat = torch.randn(pm.input_dim)
    bt, bc = m.t.detach().clone().reshape(-1), m.conv.weight.detach().clone().reshape(-1)
    pm.scatter(flat, out=m, mode="add", target="param")
    bt[idx] += flat[:4]
    k = int(mask.sum())
    bc[mask.reshape(-1)] += flat[4:4 + k]
    assert torch.equal(m.t.detach().reshape(-1), bt) and torch.equal(m.conv.weight.detach().reshape(-1), bc)
    o = {"t": torch.zeros(6, 4).t(), "conv.weight": torch.zeros(4, 3, 3, 3).to(memory_format=torch.channels_last),
         "conv.bias": torch.zeros(4)}
    pm.scatter(flat, out=o)
    full = pm.scatter(flat)
    assert all(torch.equal(o[n], full[n]) for n in o)


def test_other_shapes_and_tied_aliases_are_refused_by_name_before_any_write():
    base = _base()
    pm = ParamMap.from_model(base)
    other = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 5))  # last layer differs
    snap = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match=r"2\.weight"):
        pm.scatter(torch.ones(pm.input_dim), out=other, mode="add")
    assert all(p.grad is None for p in other.parameters())  # no .grad created for the matching entries
    with pytest.raises(ValueError, match=r"2\.weight"):
        pm.scatter(torch.ones(pm.input_dim), out=other, target="param")
    assert all(torch.equal(p.detach(), snap[n]) for n, p in other.named_parameters())
    # tied weights: named_parameters lists the tensor once; the alias is refused like GRADIEND's KeyError
    tied = torch.nn.Module()
    tied.enc = torch.nn.Embedding(5, 3)
    tied.dec = torch.nn.Linear(3, 5, bias=False)
    tied.dec.weight = tied.enc.weight
    tied.dec(tied.enc(torch.tensor([1, 2]))).sum().backward()
    spec = {"enc.weight": {"shape": (5, 3), "repr": "all"}, "dec.weight": {"shape": (5, 3), "repr": "all"}}
    pm2 = ParamMap(spec)
    w0 = tied.enc.weight.detach().clone()
    with pytest.raises(ValueError, match="dec.weight"):
        pm2.gather(tied)
    with pytest.raises(ValueError, match="dec.weight"):
        pm2.scatter(torch.ones(30), out=tied, mode="add", target="param")
    assert torch.equal(tied.enc.weight.detach(), w0)
    with pytest.raises(KeyError):
        ParamMappedGradiendModel(30, 1, spec, device=CPU).extract_gradients(tied)


def test_bad_indices_refused_and_none_grads_only_where_nothing_is_selected():
    for bad in (torch.tensor([-1, 2]), torch.tensor([0, 24]), torch.tensor([3, 5, 3])):
        with pytest.raises(ValueError, match=r"spec\['w'\]\['indices'\]"):
            ParamMap({"w": {"shape": (6, 4), "repr": "indices", "indices": bad}})
    base = _base()
    base[2].bias.grad = None  # 2.bias selects nothing in _spec: its None grad is fine (as in GRADIEND)
    spec = _spec()
    ref = ParamMappedGradiendModel(ParamMap(spec).input_dim, 2, spec, device=CPU)
    assert torch.equal(ParamMap(spec).gather(base), ref.extract_gradients(base))
    base[0].bias.grad = None
    with pytest.raises(ValueError, match=r"0\.bias"):
        ParamMap(spec).gather(base)
    with pytest.raises(RuntimeError, match=r"0\.bias"):
        accelerate(copy.deepcopy(ref)).extract_gradients(base)


def test_scatter_add_into_grads_then_backward_accumulates_on_top():
    base = _base()
    pm = ParamMap(_spec())
    g0 = {n: p.grad.clone() for n, p in base.named_parameters()}
    flat = torch.randn(pm.input_dim)
    pm.scatter(flat, out=base, mode="add")
    full = pm.scatter(flat)
    torch.manual_seed(5)
    x = torch.randn(2, 6)
    extra = {n: g for n, g in zip([n for n, _ in base.named_parameters()],
                                   torch.autograd.grad(base(x).pow(2).sum(), list(base.parameters())))}
    base(x).pow(2).sum().backward()
    for n, p in base.named_parameters():
        torch.testing.assert_close(p.grad, g0[n] + full[n] + extra[n], rtol=0, atol=1e-6)


def test_entry_past_2_31_elements_bitmask_gathers_from_an_expanded_tensor():
    big = 2**31 + 10
    bits = torch.zeros((big + 7) // 8, dtype=torch.uint8)
    pos = [5, 2**31 - 1, 2**31, 2**31 + 9]
    for p in pos:
        bits[p // 8] |= 1 << (p % 8)
    pm = ParamMap({"h": {"shape": (big,), "repr": "bitmask", "bitmask": bits}, "s": {"shape": (3,), "repr": "all"}})
    del bits
    assert pm.input_dim == 7
    src = torch.arange(4.0)[-1:].expand(big)  # 2^31+10 elements, 4 bytes of storage
    assert torch.equal(pm.gather({"h": src, "s": torch.zeros(3)}), torch.tensor([3.0] * 4 + [0.0] * 3))
    assert pm.base_global_index([0, 1, 2, 3]) == [("h", p) for p in pos]
    same = ParamMap({"h": {"shape": (big,), "repr": "indices", "indices": torch.tensor(pos)},
                     "s": {"shape": (3,), "repr": "all"}})
    assert same.hash == pm.hash


def test_gather_and_scatter_under_torch_compile_match_eager_with_grads():
    pm = ParamMap(_spec())
    torch.manual_seed(0)
    xs = [torch.randn(4, 6, requires_grad=True), torch.randn(3, 4, requires_grad=True),
          torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]

    def f(a, b, c, d):
        g = pm.gather({"0.weight": a * 2, "2.weight": b, "0.bias": c, "2.bias": d})
        s = pm.scatter(g * 3)
        return g.sum() + sum(v.pow(2).sum() for v in s.values())

    eager = f(*xs)
    comp = torch.compile(f, backend="aot_eager")(*xs)
    torch.testing.assert_close(comp, eager)
    for a, b in zip(torch.autograd.grad(comp, xs, allow_unused=True), torch.autograd.grad(eager, xs, allow_unused=True)):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b)
