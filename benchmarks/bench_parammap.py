"""Param-map family: gather / scatter / prune / save+load / hash on GRADIEND's workload.

Workload (issue 3): the 52 parameter tensors of a GPT-2 config with 4 layers and
width 512 (vocab 50257, 1024 positions: 38.9M parameters), random gradients,
a 5%-density random mask on every tensor for gather/scatter/save/hash, and the
"all" map for prune(topk=0.1).

Providers: gradkit; reference = plain torch at its best (precomputed int32
indices, per-tensor index_select into a preallocated output); gradiend 0.2.3
(when importable) and gradiend accelerated by gradkit.compat.gradiend.

With ``--device cuda`` the gradients, outputs and kernels live on the GPU (gather,
scatter, the copy-bandwidth baseline, top-k and mask kernels); prune, save/load and
hash are host-side operations of the map and stay on the CPU.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from typing import Dict

import torch

from gradkit import ParamMap

FAMILY = "parammap"


def gpt2_shapes(n_layer: int = 4, d: int = 512, vocab: int = 50257, n_pos: int = 1024) -> Dict[str, tuple]:
    s = {"transformer.wte.weight": (vocab, d), "transformer.wpe.weight": (n_pos, d)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        s.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
                  p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
                  p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                  p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
                  p + "mlp.c_fc.weight": (d, 4 * d), p + "mlp.c_fc.bias": (4 * d,),
                  p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,)})
    s.update({"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)})
    return s


class ShapeModel(torch.nn.Module):
    """A module holding parameters with the given dotted names and shapes (no forward needed)."""

    def __init__(self, shapes: Dict[str, tuple], seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name, shape in shapes.items():
            mod = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part)
            p = torch.nn.Parameter(torch.empty(shape))
            p.grad = torch.randn(shape, generator=g)
            mod.register_parameter(leaf, p)


def masks_for(shapes: Dict[str, tuple], density: float, seed: int = 1) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g) < density for n, s in shapes.items()}


def run(rec, quick: bool = False) -> None:
    logging.getLogger("gradiend").setLevel(logging.ERROR)
    dev = torch.device(rec.device)
    shapes = gpt2_shapes()
    model = ShapeModel(shapes).to(dev)  # moves the .grad tensors too
    n_params = sum(p.numel() for p in model.parameters())
    masks = masks_for(shapes, 0.05)
    mask_spec = {n: {"shape": s, "repr": "mask", "mask": masks[n]} for n, s in shapes.items()}
    all_spec = {n: {"shape": s, "repr": "all"} for n, s in shapes.items()}
    pm = ParamMap(mask_spec)
    wl = f"gpt2-4x512 {n_params / 1e6:.1f}M/{len(shapes)}t"
    wl_mask = wl + " mask5%"
    print(f"[{FAMILY}] workload: {wl}, 5% mask selects {pm.input_dim} entries", flush=True)
    dt = "float32"

    try:
        from gradiend.model.param_mapped import ParamMappedGradiendModel
        from gradkit.compat.gradiend import accelerate
        have_gradiend = True
    except ImportError:
        have_gradiend = False
        print("  (gradiend not importable: peer rows skipped)")

    # ---------------------------------------------------------------- gather
    out = torch.empty(pm.input_dim, device=dev)
    t_gather = rec.time(lambda: pm.gather(model, out=out))
    rec.add(FAMILY, "gather", "gradkit", wl_mask, dt, t_gather)
    rec.add(FAMILY, "gather", "gradkit (alloc)", wl_mask, dt, rec.time(lambda: pm.gather(model)))
    idx32 = [masks[n].reshape(-1).nonzero().reshape(-1).int().to(dev) for n in shapes]
    params = [p for _, p in model.named_parameters()]
    offs = [0]
    for ix in idx32:
        offs.append(offs[-1] + ix.numel())
    ideal_out = torch.empty(offs[-1], device=dev)

    def ideal_gather():
        for p, ix, a, b in zip(params, idx32, offs[:-1], offs[1:]):
            torch.index_select(p.grad.reshape(-1), 0, ix, out=ideal_out[a:b])
        return ideal_out

    assert torch.equal(ideal_gather(), pm.gather(model))
    rec.add(FAMILY, "gather", "reference", wl_mask, dt, rec.time(ideal_gather))
    if have_gradiend:
        gm = ParamMappedGradiendModel(pm.input_dim, 1, mask_spec, device=dev)
        assert torch.equal(gm.extract_gradients(model), pm.gather(model))
        rec.add(FAMILY, "gather", "gradiend", wl_mask, dt, rec.time(lambda: gm.extract_gradients(model)))
        gm_fast = accelerate(copy.deepcopy(gm))
        rec.add(FAMILY, "gather", "gradiend+gradkit", wl_mask, dt,
                rec.time(lambda: gm_fast.extract_gradients(model)))

    # Bandwidth check (issue 3's GPU target: gather/scatter at >= 80% of device-to-device copy
    # bandwidth on the bytes they must move). The copy runs on buffers larger than any cache;
    # gather must move 12 bytes per selected entry (4 read, 4 written, a 4-byte position read).
    big_src = torch.randn(64 << 20, dtype=torch.float32, device=dev)
    big_dst = torch.empty_like(big_src)
    t_copy = rec.time(lambda: big_dst.copy_(big_src))
    rec.add(FAMILY, "copy 256MB", "reference", "256 MiB", dt, t_copy, note="bandwidth baseline")
    copy_bw = 2 * big_src.numel() * 4 / t_copy["p50"]
    frac = (pm.input_dim * 12 / t_gather["p50"]) / copy_bw
    rec.add(FAMILY, "gather bw / copy bw", "gradkit", wl_mask, dt, {"p20": frac, "p50": frac, "p80": frac, "n": 1},
            metric="fraction", note=f"copy {copy_bw / 1e9:.1f} GB/s; gather moves 12 B per selected entry")
    del big_src, big_dst

    # first call on a fresh map: building the selection plan is part of the cost
    rec.add(FAMILY, "gather_first_call", "gradkit", wl_mask, dt, rec.time(lambda: ParamMap(mask_spec).gather(model)),
            note="ParamMap construction + first gather")
    if have_gradiend:
        rec.add(FAMILY, "gather_first_call", "gradiend", wl_mask, dt,
                rec.time(lambda: ParamMappedGradiendModel(pm.input_dim, 1, mask_spec, lazy_init=True,
                                                          device=dev).extract_gradients(model)),
                note="lazy model construction + first extract_gradients (compiles its selectors)")

    # ---------------------------------------------------------------- scatter
    flat = pm.gather(model)
    rec.add(FAMILY, "scatter", "gradkit", wl_mask, dt, rec.time(lambda: pm.scatter(flat)))
    grads = {n: p.grad for n, p in model.named_parameters()}
    dst = {n: torch.zeros(s, device=dev) for n, s in shapes.items()}
    rec.add(FAMILY, "scatter_add", "gradkit", wl_mask, dt,
            rec.time(lambda: pm.scatter(flat, out=dst, mode="add")))
    rec.add(FAMILY, "scatter_into", "gradkit", wl_mask, dt,
            rec.time(lambda: pm.scatter(flat, out=dst, mode="write")), note="into preallocated full tensors")
    idx64 = [ix.long() for ix in idx32]
    host_only = dev.type != "cpu"  # prune / save / hash are host-side map operations

    def ideal_scatter():
        res = {}
        for (n, s), ix, a, b in zip(shapes.items(), idx64, offs[:-1], offs[1:]):
            full = torch.zeros(s, device=dev)
            full.view(-1).index_copy_(0, ix, flat[a:b])
            res[n] = full
        return res

    def ideal_scatter_add():
        for (n, _), ix, a, b in zip(shapes.items(), idx64, offs[:-1], offs[1:]):
            dst[n].view(-1).index_add_(0, ix, flat[a:b])

    def ideal_scatter_into():
        for (n, _), ix, a, b in zip(shapes.items(), idx64, offs[:-1], offs[1:]):
            dst[n].view(-1).index_copy_(0, ix, flat[a:b])

    rec.add(FAMILY, "scatter", "reference", wl_mask, dt, rec.time(ideal_scatter))
    rec.add(FAMILY, "scatter_into", "reference", wl_mask, dt, rec.time(ideal_scatter_into))
    rec.add(FAMILY, "scatter_add", "reference", wl_mask, dt, rec.time(ideal_scatter_add))
    if have_gradiend:
        # gradiend's forward(dict) = select + concat, its encoder/decoder, then the scatter back.
        # With the network stubbed to return the input, forward(dict) - flatten_gradient_dict = its scatter part.
        core = type(gm).__mro__[1]
        real_forward = core.forward
        core.forward = lambda self, x, return_encoded=False: (x, x[:1]) if return_encoded else x
        try:
            t_fwd = rec.time_raw(lambda: gm(grads))
            t_sel = rec.time_raw(lambda: gm.flatten_gradient_dict(grads))
            t_fast = rec.time_raw(lambda: gm_fast(grads))
        finally:
            core.forward = real_forward
        # a difference of medians; percentiles of a difference are not differences of percentiles
        d50 = max(t_fwd["p50"] - t_sel["p50"], 0.0)
        part = {"p20": d50, "p50": d50, "p80": d50}
        rec.add(FAMILY, "scatter", "gradiend", wl_mask, dt, {**part, "n": t_fwd["n"]},
                note="forward(dict) minus flatten_gradient_dict, encoder/decoder stubbed")
        rec.add(FAMILY, "forward_dict_io", "gradiend", wl_mask, dt, t_fwd, note="encoder/decoder stubbed")
        rec.add(FAMILY, "forward_dict_io", "gradiend+gradkit", wl_mask, dt, t_fast, note="encoder/decoder stubbed")

    if host_only:
        _kernels(rec, n_params, dev, dt)
        return

    # ---------------------------------------------------------------- prune (all map, topk=0.1)
    pm_all = ParamMap(all_spec)
    imp = torch.rand(pm_all.input_dim, generator=torch.Generator().manual_seed(2))
    wl_all = wl + " all"
    rec.add(FAMILY, "prune_topk0.1", "gradkit", wl_all, dt, rec.time(lambda: pm_all.prune(topk=0.1, importance=imp)))

    def ideal_prune():  # plain torch: topk + sort of the kept positions
        kept = torch.topk(imp, k=-(-pm_all.input_dim // 10), sorted=False).indices.sort().values
        return kept

    rec.add(FAMILY, "prune_topk0.1", "reference", wl_all, dt, rec.time(ideal_prune),
            note="torch.topk + sort only (no map rebuild)")
    if have_gradiend and not quick:
        ga = ParamMappedGradiendModel(pm_all.input_dim, 1, all_spec, device=torch.device("cpu"))
        ga_fast = accelerate(copy.deepcopy(ga))
        r1 = ga.prune(topk=0.1, importance=imp, return_mask=True)[1]
        r2 = ga_fast.prune(topk=0.1, importance=imp, return_mask=True)[1]
        # float32 rand over 38.9M entries has ties at the cut: torch.topk keeps an arbitrary subset of
        # them, gradkit the lowest positions. Everything away from the tied value must agree.
        kth = imp[r2].min()
        diff = r1 ^ r2
        assert r1.sum() == r2.sum() and bool((imp[diff] == kth).all()), "accelerated prune differs from gradiend's"
        del r1, r2
        rec.add(FAMILY, "prune_topk0.1", "gradiend", wl_all, dt,
                rec.time(lambda: ga.prune(topk=0.1, importance=imp), slow_reps=2))
        rec.add(FAMILY, "prune_topk0.1", "gradiend+gradkit", wl_all, dt,
                rec.time(lambda: ga_fast.prune(topk=0.1, importance=imp), slow_reps=2))
        del ga, ga_fast

    # ---------------------------------------------------------------- save + load, hash
    tmp = tempfile.mkdtemp(prefix="gradkit-bench-")
    try:
        d = os.path.join(tmp, "gk")

        def gk_save_load():
            pm.save(d)
            return ParamMap.load(d)

        assert gk_save_load().hash == pm.hash
        rec.add(FAMILY, "save+load", "gradkit", wl_mask, dt, rec.time(gk_save_load))
        if have_gradiend:
            d2 = os.path.join(tmp, "gr")

            def gr_save_load():
                gm.save_pretrained(d2)
                return ParamMappedGradiendModel.from_pretrained(d2)

            rec.add(FAMILY, "save+load", "gradiend", wl_mask, dt, rec.time(gr_save_load, slow_reps=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def fresh_hash():
        return ParamMap._from_entries(list(pm._entries)).hash  # new map: no cached plan or digest

    rec.add(FAMILY, "hash", "gradkit", wl_mask, dt, rec.time(fresh_hash), note="cold: builds the position plan")
    if have_gradiend:
        rec.add(FAMILY, "hash", "gradiend", wl_mask, dt, rec.time(lambda: gm.param_map_hash))

    _kernels(rec, n_params, dev, dt)


def _kernels(rec, n_params: int, dev: torch.device, dt: str) -> None:
    """The selection kernels alone: exact top-k and mask -> positions."""
    from gradkit import ops

    big = torch.rand(n_params, generator=torch.Generator().manual_seed(3)).to(dev)

    k = n_params // 10
    rec.add(FAMILY, "topk_select 10%", "gradkit", f"{n_params / 1e6:.1f}M", dt, rec.time(lambda: ops.topk_select(big, k)))
    rec.add(FAMILY, "topk_select 10%", "reference", f"{n_params / 1e6:.1f}M", dt,
            rec.time(lambda: torch.topk(big, k, sorted=False)), note="torch.topk (positions unsorted)")
    bm = big < 0.05
    rec.add(FAMILY, "mask_to_indices", "gradkit", f"{n_params / 1e6:.1f}M", dt,
            rec.time(lambda: ops.mask_to_indices(bm, torch.int32)))
    rec.add(FAMILY, "mask_to_indices", "reference", f"{n_params / 1e6:.1f}M", dt, rec.time(lambda: bm.nonzero()),
            note="torch.nonzero (int64)")
