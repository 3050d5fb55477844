"""bergson compatibility audit: bergson directories gradkit refused or misjudged, and parity of search with
bergson 2.5.1's ``Attributor`` on indexes written with bergson's own storage functions.

* Older bergson wrote ``base_dtype`` as ``np.dtype(dtype).str`` (``"<f2"``, ``"<f4"``, ``"<V2"`` for bfloat16)
  next to the structured ``dtype``; bergson 2.5.1 still reads such an index, gradkit refused it.
* bergson's ``create_index`` / ``create_token_index`` of 0 rows leave a 1-byte ``gradients.bin`` (numpy's memmap);
  bergson reads it as 0 rows, gradkit refused it (and with it a sharded export holding an empty shard).
* ``projection=`` a bergson ``GradientProcessor`` (or its config) was refused as a different projection even when
  bergson's own check says it matches (gradkit compared every field, normalizers and Hessians included).
"""
import json
import re
import warnings

import numpy as np
import pytest
import torch

# installed wherever the suite runs (scripts/install-peers.sh): a broken install fails, it does not skip
import bergson  # noqa: E402,F401
import ml_dtypes  # noqa: E402

from bergson import Attributor  # noqa: E402
from bergson.config import InversionConfig  # noqa: E402
from bergson.data import create_index, create_token_index, load_gradients  # noqa: E402
from bergson.gradients import GradientProcessor  # noqa: E402
from bergson.utils.utils import tensor_to_numpy  # noqa: E402

from gradkit.index import GradientIndex, IndexFormatError, Precondition, UncheckedProjectionWarning  # noqa: E402

SIZES = {"z.mlp": 6, "a.attn": 4, "m.out": 5}  # deliberately not in alphabetical order
D = sum(SIZES.values())


def _split(q):
    return dict(zip(SIZES, q.split(list(SIZES.values()), 1)))


def _old_style(root, x: np.ndarray, sizes):
    """An index as bergson before 2.x wrote it: packed structured dtype and base_dtype as np.dtype(...).str."""
    root.mkdir()
    x.tofile(root / "gradients.bin")
    dt = x.dtype
    spec = {"names": list(sizes), "formats": [f"({s},){dt.str}" for s in sizes.values()],
            "itemsize": dt.itemsize * sum(sizes.values())}
    (root / "info.json").write_text(json.dumps({"num_grads": len(x), "dtype": spec, "grad_sizes": sizes,
                                                "base_dtype": dt.str}))


def test_old_base_dtype_str_opens(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, D, generator=g)
    q = torch.randn(3, D, generator=g)
    for dt in (np.float16, np.float32, ml_dtypes.bfloat16):
        arr = x.numpy().astype(dt)
        root = tmp_path / np.dtype(dt).name
        _old_style(root, arr, SIZES)
        assert json.loads((root / "info.json").read_text())["base_dtype"] in ("<f2", "<f4", "<V2")
        ix = GradientIndex.open(root)
        want = torch.from_numpy(arr.astype(np.float32))
        assert ix.dtype == {"float16": torch.float16, "float32": torch.float32,
                            "bfloat16": torch.bfloat16}[np.dtype(dt).name]
        assert list(ix.modules.items()) == list(SIZES.items())
        assert torch.equal(ix.get(range(12)), want)
        if dt is not ml_dtypes.bfloat16:  # bergson 2.5.1 maps "<V2" as raw void, the others as numbers
            assert np.array_equal(np.asarray(load_gradients(root), dtype=np.float32), want.numpy())
        s, i = ix.search(_split(q), 5, modules=["a.attn"])
        ref = q[:, 6:10] @ want[:, 6:10].T
        assert torch.equal(i, ref.topk(5).indices)
        torch.testing.assert_close(s, ref.topk(5).values, rtol=1e-5, atol=1e-5)
    # what gradkit cannot map stays refused, naming the file
    for bad in (">f4", "int16", "<c8", 7):
        root = tmp_path / f"bad-{bad}"
        root.mkdir()
        x.numpy().astype(np.float32).tofile(root / "gradients.bin")
        (root / "info.json").write_text(json.dumps({"num_grads": 12, "grad_sizes": SIZES, "base_dtype": bad}))
        with pytest.raises(IndexFormatError, match=rf"^open: unsupported bergson dtype {re.escape(repr(bad))} in "
                                                   r".*info\.json \(expected float16, bfloat16, float32 or float64"):
            GradientIndex.open(root)


def test_empty_bergson_index_and_empty_shard(tmp_path):
    m = create_index(tmp_path / "empty", 0, SIZES, np.float32)
    del m
    assert (tmp_path / "empty" / "gradients.bin").stat().st_size == 1  # numpy's memmap of 0 rows
    assert load_gradients(tmp_path / "empty").shape == (0, D)  # bergson reads it
    ix = GradientIndex.open(tmp_path / "empty")
    assert len(ix) == 0 and ix.num_examples == 0 and ix.dim == D
    with pytest.raises(ValueError, match=r"^k: 1 is larger than the index \(0 rows\)$"):
        ix.search(torch.randn(2, D), 1)
    # a per-token index whose examples have no token
    mt, offs = create_token_index(tmp_path / "tok0", np.array([0, 0]), SIZES, np.float16)
    del mt
    it = GradientIndex.open(tmp_path / "tok0")
    assert it.per_token and len(it) == 0 and it.num_examples == 2 and it.offsets.tolist() == [0, 0, 0]
    # a sharded export with an empty shard: the other shards' rows, in order
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(n, D, generator=g) for n in (5, 0, 4)]
    for j, p in enumerate(parts):
        mm = create_index(tmp_path / "sh" / f"shard-{j:02d}", len(p), SIZES, np.float32)
        if len(p):
            mm[:] = p.numpy()
            mm.flush()
        del mm
    ixs = GradientIndex.open(tmp_path / "sh")
    allx = torch.cat(parts)
    assert len(ixs) == 9 and torch.equal(ixs.get(range(9)), allx)
    q = torch.randn(2, D, generator=g)
    s, i = ixs.search(q, 9, reverse=True)
    assert torch.equal(i, (q @ allx.T).topk(9, largest=False).indices)
    # a 0-row index of any other size is still refused
    (tmp_path / "empty" / "gradients.bin").write_bytes(b"\0\0")
    with pytest.raises(IndexFormatError, match=r"^open: .*gradients\.bin has 2 bytes, info\.json says 0 rows = 0 "
                                               r"bytes$"):
        GradientIndex.open(tmp_path / "empty")


def _index_with_processor(root, proc, n=10, seed=2):
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    mm = create_index(root, n, SIZES, np.float32)
    mm[:] = x.numpy()
    mm.flush()
    del mm
    proc.save(root)
    return x


def test_bergson_processor_as_projection(tmp_path):
    hess = {n: torch.eye(d) for n, d in SIZES.items()}  # a processor with tensors in it
    x = _index_with_processor(tmp_path / "p", GradientProcessor(projection_dim=4, projection_seed=0))
    ix = GradientIndex.open(tmp_path / "p")
    q = x[:3] + 0.1
    want = (q @ x.T).topk(4)
    same = GradientProcessor(projection_dim=4, projection_seed=0, hessians=hess, reshape_to_square=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked: no UncheckedProjectionWarning either
        for proj in (same, GradientProcessor.load_config(tmp_path / "p"),
                     {**ix.projection, "normalizers": {}, "reshape_to_square": False}):
            s, i = ix.search(q, 4, projection=proj)
            assert torch.equal(i, want.indices)
    # a real difference (bergson's check_projection_matches refuses it too) is still refused
    other = GradientProcessor(projection_dim=4, projection_seed=1, hessians=hess)
    with pytest.raises(ValueError, match=r"^projection: the queries were projected with \{.*'projection_seed': 1.*\} "
                                         r"but the index with \{.*'projection_seed': 0.*\}; scores across different "
                                         r"projections are meaningless$"):
        ix.search(q, 4, projection=other)
    for proj in (GradientProcessor(projection_dim=None), {"kind": "rademacher", "seed": 0, "p": 2}):
        with pytest.raises(ValueError, match=r"^projection: the queries were projected with "):
            ix.search(q, 4, projection=proj)
    with pytest.warns(UncheckedProjectionWarning):
        ix.search(q, 4)
    # an index saved without a projection: a processor that projects nothing matches, whatever its other settings
    _index_with_processor(tmp_path / "np", GradientProcessor(projection_dim=None))
    inp = GradientIndex.open(tmp_path / "np")
    assert inp.projection is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inp.search(q, 2, projection=GradientProcessor(projection_dim=0, projection_seed=5))
    with pytest.raises(ValueError, match=r"^projection: the queries were projected with \{.*'projection_dim': 4"):
        inp.search(q, 2, projection=same)
    # an older processor_config.yaml without the settings bergson defaults on load
    old = tmp_path / "old"
    _index_with_processor(old, GradientProcessor(projection_dim=4, projection_seed=0))
    (old / "processor_config.yaml").write_text("projection_dim: 4\nprojection_seed: 0\nprojection_target: per_module\n")
    io = GradientIndex.open(old)
    assert io.projection == {"projection_dim": 4, "projection_seed": 0, "projection_target": "per_module",
                             "projection_type": "normal", "include_bias": False, "projection_scale": "row_norm",
                             "projection_version": 1}
    loaded = GradientProcessor.load_config(old)  # bergson's reading of the same file
    io.search(q, 2, projection=loaded)
    with pytest.raises(ValueError, match=r"^projection: .*'projection_version': 2.*'projection_version': 1"):
        io.search(q, 2, projection=same)  # version 2 matrices against version 1 ones


def test_parity_with_attributor(tmp_path):
    """dtype x per-token x unit_norm x reverse x module subsets, and two-sided preconditioning with bergson's
    default inversion mapped to gradkit's absolute damping, against bergson's Attributor."""
    g = torch.Generator().manual_seed(3)
    for tdt, per_token in ((torch.float16, True), (torch.bfloat16, False), (torch.float32, True)):
        x = (torch.randn(24, D, generator=g) * torch.rand(24, 1, generator=g) * 3).to(tdt)
        x[5] = 0
        npdt = np.dtype(tensor_to_numpy(x[:1]).dtype)
        root = tmp_path / f"{tdt}-{per_token}"
        if per_token:
            mm, _ = create_token_index(root, np.array([4, 0, 9, 11]), SIZES, npdt)
        else:
            mm = create_index(root, 24, SIZES, npdt)
        mm[:] = tensor_to_numpy(x)
        mm.flush()
        del mm
        GradientProcessor(projection_dim=None).save(root)
        ix = GradientIndex.open(root)
        q = torch.randn(3, D, generator=g)
        for un in (False, True):
            att = Attributor(root, unit_norm=un)
            for rev in (False, True):
                for mods in (None, {"a.attn"}, {"z.mlp", "m.out"}):
                    theirs = att.search(_split(q.clone()), 5, modules=mods, reverse=rev)  # bergson divides in place
                    s, i = ix.search(_split(q), 5, unit_norm=un, reverse=rev, modules=sorted(mods) if mods else None)
                    assert torch.equal(i, theirs.indices), (tdt, per_token, un, rev, mods)
                    torch.testing.assert_close(s, theirs.values, rtol=1e-4, atol=1e-5)
    # two-sided: bergson's unit_norm + Hessian is Precondition(mode="both"); damped_inverse's c * mean eigenvalue
    hess = {}
    for n, d in SIZES.items():
        a = torch.randn(d, 3 * d, generator=g)
        hess[n] = 2.5 * a @ a.T / d
    GradientProcessor(projection_dim=None, hessians=hess).save(tmp_path / "hess")
    c = 0.1
    q = torch.randn(3, D, generator=g)
    for un, mode in ((True, "both"), (False, "query")):
        att = Attributor(root, unit_norm=un, hessian_path=tmp_path / "hess", inversion_cfg=InversionConfig(
            inversion="damped_inverse", damping_factor=c))
        theirs = att.search(_split(q.clone()), 6)
        # one damping per module: each matrix pre-damped by c * its mean eigenvalue (trace / d for a PSD matrix)
        damped = {n: h + c * float(h.trace()) / h.shape[0] * torch.eye(h.shape[0]) for n, h in hess.items()}
        s, i = ix.search(_split(q), 6, unit_norm=un, precondition=Precondition(damped, mode=mode))
        assert torch.equal(i, theirs.indices), (un, mode)
        # fp32 on both sides, bergson's eigh-based inverse against gradkit's: measured 2.8e-7 relative (scores ~3)
        torch.testing.assert_close(s, theirs.values, rtol=2e-5, atol=1e-5)


def test_fp32_gram_rounding_asymmetry_accepted(tmp_path):
    """An fp32 Gram matrix whose two triangles differ by rounding (a @ a.T from BLAS, or a GPU-accumulated bergson
    Hessian) was refused as 'not symmetric'; bergson's inversion (eigh) takes it. A real asymmetry is refused."""
    from bergson.hessians.inversion import invert_psd_matrix

    g = torch.Generator().manual_seed(4)
    a = torch.randn(6, 18, generator=g)
    h = (2.5 * (a @ a.T) / 6).float()
    h = (h + h.T) / 2
    h[0, 1] = 1e-3
    h[1, 0] = 1e-3 + 2 * torch.finfo(torch.float32).eps * float(h.abs().max())  # rounding-level asymmetry
    assert not torch.equal(h, h.T)
    x = torch.randn(30, 6, generator=g)
    mm = create_index(tmp_path / "i", 30, {"m": 6}, np.float32)
    mm[:] = x.numpy()
    mm.flush()
    del mm
    ix = GradientIndex.open(tmp_path / "i")
    q = torch.randn(4, 6, generator=g)
    for mode, power in (("query", -1.0), ("both", -0.5)):
        s, i = ix.search(q, 8, precondition=Precondition(h, mode=mode, damping=0.1))
        hp = invert_psd_matrix(h, inversion="absolute_damped_inverse", damping_factor=0.1, power=power)
        qq, xx = q @ hp, x
        if mode == "both":
            xx = x @ hp
            qq, xx = qq / qq.norm(dim=1, keepdim=True), xx / xx.norm(dim=1, keepdim=True)
        want = (qq @ xx.T).topk(8)
        assert torch.equal(i, want.indices), mode
        torch.testing.assert_close(s, want.values, rtol=1e-4, atol=1e-5)
    bad = h.clone()
    bad[1, 0] += 0.01 * float(h.abs().max())
    with pytest.raises(ValueError, match=r"^precondition: matrix for the full matrix: is not symmetric \(max "):
        ix.search(q, 2, precondition=bad)


# ---- session 32 audit ------------------------------------------------------------------------------------------------
def test_non_finite_values_in_a_module_left_out_do_not_decide_the_score(tmp_path):
    """A selection with a hole (z.mlp and m.out, not a.attn between them) was read as one column window with the
    query zeroed on a.attn: a NaN / Inf there made 0 * NaN = NaN and the row ranked last, although bergson scores it
    on the selected modules only. bergson indexes can hold such values (gradkit's refuse them on append)."""
    x = torch.zeros(4, D)
    x[:, 0] = torch.tensor([5.0, 1.0, 2.0, 3.0])  # z.mlp: row 0 best
    x[0, 7] = float("nan")  # a.attn (columns 6..9) of row 0
    x[3, 8] = float("inf")  # and of row 3
    mm = create_index(tmp_path / "b", 4, SIZES, np.float32)
    mm[:] = x.numpy()
    mm.flush()
    del mm
    GradientProcessor(projection_dim=None).save(tmp_path / "b")
    ix = GradientIndex.open(tmp_path / "b")
    q = torch.zeros(1, D)
    q[0, 0], q[0, 12] = 1.0, 0.5
    theirs = Attributor(tmp_path / "b").search(_split(q.clone()), 4, modules={"z.mlp", "m.out"})
    for rev in (False, True):
        s, i = ix.search(q, 4, modules=["z.mlp", "m.out"], reverse=rev)
        want = torch.tensor([[0, 3, 2, 1]]) if not rev else torch.tensor([[1, 2, 3, 0]])
        assert torch.equal(i, want), (rev, i)
        assert torch.equal(s, (x[want[0]][:, 0] * 1.0)[None])
    assert torch.equal(ix.search(q, 4, modules=["z.mlp", "m.out"])[1], theirs.indices)
    # a selection without a hole reads its window as before; the NaN row then scores NaN, ranked last, as bergson
    s, i = ix.search(q, 4, modules=["z.mlp", "a.attn"])
    assert i[0, -1].item() in (0, 3)


def test_older_processor_config_without_target_or_seed_gets_bergsons_defaults(tmp_path):
    """bergson reads a processor_config.yaml that leaves out projection_target / projection_seed with its
    GradientProcessor defaults ('per_module', None) and accepts a processor with those values; gradkit refused it
    (its defaults covered only the four settings _read_config fills)."""
    old = tmp_path / "old"
    x = _index_with_processor(old, GradientProcessor(projection_dim=4))
    (old / "processor_config.yaml").write_text("projection_dim: 4\nprojection_type: rademacher\n")
    proc = GradientProcessor(projection_dim=4, projection_type="rademacher", projection_scale="row_norm",
                             projection_version=1)
    proc.check_saved_projection(old, "index")  # bergson: accepted
    ix = GradientIndex.open(old)
    assert ix.projection["projection_target"] == "per_module" and ix.projection["projection_seed"] is None
    q = x[:2] + 0.1
    assert torch.equal(ix.search(q, 3, projection=proc)[1], (q @ x.T).topk(3).indices)
    with pytest.raises(ValueError, match=r"^projection: .*'projection_target': 'global'"):
        ix.search(q, 3, projection=GradientProcessor(projection_dim=4, projection_type="rademacher",
                                                     projection_scale="row_norm", projection_version=1,
                                                     projection_target="global"))


def test_sharded_export_projection_and_layout_checked_across_shards(tmp_path):
    """Session 33: a sharded bergson export took its projection config from the first shard only (a config kept
    at the top of the export, or a second shard projected with another seed, went unseen), and the column map
    of structured shards came from the last shard (a shard with the fields placed differently read wrong
    columns)."""
    sizes = {"m1": 5, "m2": 3}
    g = torch.Generator().manual_seed(3)
    root = tmp_path / "sh"
    for j in range(2):
        m = create_index(root / f"shard-{j:02d}", 3, sizes, np.float32)
        m[:] = torch.randn(3, 8, generator=g).numpy()
        m.flush()
    cfg = "projection_dim: 4\nprojection_type: rademacher\nprojection_seed: {}\nprojection_target: per_module\n"
    # a config only at the top of the export is read
    (root / "processor_config.yaml").write_text(cfg.format(0))
    ix = GradientIndex.open(root)
    assert ix.projection is not None and ix.projection["projection_seed"] == 0
    # the same config in each shard too: agrees
    for j in range(2):
        (root / f"shard-{j:02d}" / "processor_config.yaml").write_text(cfg.format(0))
    assert GradientIndex.open(root).projection == ix.projection
    # a shard projected with another seed: refused, naming both files
    (root / "shard-01" / "processor_config.yaml").write_text(cfg.format(1))
    with pytest.raises(IndexFormatError, match=r"shard-01.*processor_config.*projected differently"):
        GradientIndex.open(root)

    # structured shards with the fields in another order: refused (the first shard's map would misread it)
    x = torch.randn(2, 8, generator=g)
    for j, (o1, o2) in enumerate([(0, 20), (12, 0)]):
        d = tmp_path / "st" / f"shard-{j}"
        d.mkdir(parents=True)
        x.numpy().astype("<f4").tofile(d / "gradients.bin")
        spec = {"names": ["m1", "m2"], "formats": ["(5,)<f4", "(3,)<f4"], "offsets": [o1, o2], "itemsize": 32}
        (d / "info.json").write_text(json.dumps({"num_grads": 2, "grad_sizes": sizes, "dtype": spec}))
    with pytest.raises(IndexFormatError, match="different dtype or row layout"):
        GradientIndex.open(tmp_path / "st")


def test_processor_config_without_pyyaml_is_a_clear_error_not_a_skipped_check(tmp_path, monkeypatch):
    """Session 35: with pyyaml missing, open() read a bergson index's projection as None and then accepted queries
    of any projection unchecked (no warning). pyyaml is a declared dependency now; without it open() says so."""
    root = tmp_path / "b"
    _index_with_processor(root, GradientProcessor(projection_dim=4))
    monkeypatch.setitem(__import__("sys").modules, "yaml", None)  # `import yaml` raises ImportError
    with pytest.raises(ImportError, match=r"^open: reading .*processor_config\.yaml.* needs pyyaml"):
        GradientIndex.open(root)
