"""bergson parity: indexes written by bergson 2.5.1 open with GradientIndex.open and search gives
the same top-k as bergson's own query path (``bergson.Attributor``).

* A real bergson build: ``bergson.collection.collect_gradients`` (bergson's collector + Builder
  + on-disk storage) on a tiny randomly initialised GPT-2 (transformers config, no download),
  queried with bergson's Attributor: plain inner product, cosine, reverse, a module subset,
  one-sided (H^-1) and two-sided (H^-1/2 + unit norm) preconditioning with bergson's dense
  preconditioner saved by bergson's GradientProcessor.
* bergson's storage functions directly: per-token (``create_token_index`` + ``offsets.npy``),
  bfloat16 (``create_index`` with bergson's own bf16 conversion), a directory of ``*shard*``
  sub-indexes, and the older structured-dtype info.json (bergson 2.5.1 still reads it, through
  ``load_gradients``' legacy branch, but no longer writes it: it is written here by hand).
"""
import json
import re
import shutil

import numpy as np
import pytest
import torch

# the peers are installed wherever the suite runs (scripts/setup-env.sh): a broken install fails, it does not skip
import bergson  # noqa: E402,F401
import transformers  # noqa: E402,F401

from bergson import Attributor  # noqa: E402
from bergson.config import InversionConfig  # noqa: E402
from bergson.data import TokenGradients, create_index, create_token_index, load_gradients  # noqa: E402
from bergson.gradients import GradientProcessor  # noqa: E402
from bergson.utils.utils import tensor_to_numpy  # noqa: E402

from gradkit.index import GradientIndex, IndexFormatError, Precondition  # noqa: E402

# the parity searches pass bergson-style queries without a projection config on purpose
pytestmark = pytest.mark.filterwarnings("ignore::gradkit.index.UncheckedProjectionWarning")


@pytest.fixture(scope="module")
def bergson_run(tmp_path_factory):
    """A per-example index built by bergson's own pipeline on a tiny random GPT-2."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from bergson.collection import collect_gradients
    from bergson.config.config import IndexConfig

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    rng = np.random.default_rng(0)
    ds = Dataset.from_dict({"input_ids": [rng.integers(0, 64, size=12).tolist() for _ in range(24)],
                            "length": [12] * 24})
    root = tmp_path_factory.mktemp("bergson")
    icfg = IndexConfig(run_path=str(root / "run"), projection_dim=4, token_batch_size=64)
    collect_gradients(model, ds, GradientProcessor(projection_dim=4, projection_seed=0), icfg)
    part = root / "run.part"  # collect_gradients writes here
    assert (part / "gradients.bin").exists() and (part / "info.json").exists()
    # an unfinished build: refused until renamed, however it is named on open
    for p in (part, str(part), part / ".." / "run.part"):
        with pytest.raises(IndexFormatError, match=r"^path: .*run\.part'? is a bergson index whose build did not "
                                                   r"finish \(it lies in 'run\.part'"):
            GradientIndex.open(p)
    path = root / "run"
    shutil.move(part, path)  # what bergson's CLI (bergson.build.build) does once the build is done
    return path


def _queries(index_path, n=5, seed=1):
    mm = load_gradients(index_path)
    info = json.loads((index_path / "info.json").read_text())
    g = torch.Generator().manual_seed(seed)
    base = torch.from_numpy(np.array(mm[:n], dtype=np.float32))
    q = base + 0.3 * base.std() * torch.randn(base.shape, generator=g)
    out, lo = {}, 0
    for name, d in info["grad_sizes"].items():
        out[name] = q[:, lo:lo + d].contiguous()
        lo += d
    return out


def _same_topk(ours, theirs, rtol=1e-4):
    (s1, i1), (s2, i2) = ours, theirs
    assert torch.equal(i1, i2.to(torch.int64))
    torch.testing.assert_close(s1, s2.float(), rtol=rtol, atol=1e-6 * float(s2.abs().max()) + 1e-7)


def test_bergson_built_index_same_topk(bergson_run):
    ix = GradientIndex.open(bergson_run)
    assert ix.layout == "bergson" and len(ix) == 24 and ix.dtype == torch.float32
    assert ix.projection["projection_dim"] == 4 and ix.projection["projection_seed"] == 0
    q = _queries(bergson_run)
    mods = list(ix.modules)
    for unit_norm in (False, True):
        att = Attributor(bergson_run, unit_norm=unit_norm)
        for reverse in (False, True):
            for modules in (None, {mods[1], mods[3]}):
                theirs = att.search(q, 6, modules=modules, reverse=reverse)
                ours = ix.search(q, 6, unit_norm=unit_norm, reverse=reverse,
                                 modules=sorted(modules) if modules else None, batch_rows=7)
                _same_topk(ours, (theirs.values, theirs.indices))
    # a query projected with other settings is refused
    with pytest.raises(ValueError, match=r"^projection: the queries were projected with \{.*'projection_seed': 1.*\} "
                                         r"but the index with \{.*'projection_seed': 0.*\}; scores across different "
                                         r"projections are meaningless$"):
        ix.search(q, 3, projection={**ix.projection, "projection_seed": 1})


def test_bergson_preconditioned_same_topk(bergson_run, tmp_path):
    ix = GradientIndex.open(bergson_run)
    g = torch.Generator().manual_seed(2)
    hess = {}
    for name, d in ix.modules.items():
        a = torch.randn(d, 2 * d, generator=g)
        hess[name] = a @ a.T / (2 * d)
    GradientProcessor(projection_dim=4, projection_seed=0, hessians=hess).save(tmp_path / "hess")
    inv = InversionConfig(inversion="absolute_damped_inverse", damping_factor=0.1)
    q = _queries(bergson_run, seed=3)
    for unit_norm, mode in ((False, "query"), (True, "both")):
        att = Attributor(bergson_run, unit_norm=unit_norm, hessian_path=tmp_path / "hess", inversion_cfg=inv)
        theirs = att.search(q, 5)
        ours = ix.search(q, 5, unit_norm=unit_norm, precondition=Precondition(hess, mode=mode, damping=0.1))
        # bergson inverts by eigh, gradkit otherwise; both fp32 on a well-conditioned, damped H: measured 5e-7
        # relative (rtol 2e-3 was 4000x that), so 2e-5
        _same_topk(ours, (theirs.values, theirs.indices), rtol=2e-5)


def test_bergson_storage_per_token_bf16_and_shards(tmp_path):
    sizes = {"m1": 5, "m2": 3}
    g = torch.Generator().manual_seed(4)
    # per-token, written by bergson's create_token_index
    counts = np.array([3, 0, 2, 4])
    mm, offsets = create_token_index(tmp_path / "tok", counts, sizes, np.float16)
    x = torch.randn(int(counts.sum()), 8, generator=g).half()
    mm[:] = x.numpy()
    mm.flush()
    ix = GradientIndex.open(tmp_path / "tok")
    tg = TokenGradients(tmp_path / "tok")
    assert ix.per_token and ix.offsets.tolist() == offsets.tolist() and ix.num_examples == len(tg) == 4
    assert torch.equal(ix.get(range(len(ix))), torch.from_numpy(np.asarray(tg.mmap, dtype=np.float32)))
    assert ix.example_of([0, 3, 5, 8]).tolist() == [0, 2, 3, 3]
    # bfloat16 through bergson's own conversion
    xb = torch.randn(11, 8, generator=g).bfloat16()
    mmb = create_index(tmp_path / "bf", 11, sizes, np.dtype(tensor_to_numpy(xb[:1]).dtype))
    mmb[:] = tensor_to_numpy(xb)
    mmb.flush()
    ixb = GradientIndex.open(tmp_path / "bf")
    assert ixb.dtype == torch.bfloat16 and torch.equal(ixb.get(range(11)), xb.float())
    q = torch.randn(3, 8, generator=g)
    s, i = ixb.search(q, 4)
    want = (q @ xb.float().T).topk(4)
    assert torch.equal(i, want.indices)
    torch.testing.assert_close(s, want.values, rtol=1e-6, atol=1e-6)  # fp32 dots of 8 bf16-exact entries
    # a directory of shard sub-indexes (bergson's sharded export): rows in sorted shard order
    parts = [torch.randn(n, 8, generator=g) for n in (4, 6)]
    for j, p in enumerate(parts):
        m = create_index(tmp_path / "sh" / f"shard-{j:02d}", len(p), sizes, np.float32)
        m[:] = p.numpy()
        m.flush()
    ixs = GradientIndex.open(tmp_path / "sh")
    assert len(ixs) == 10 and torch.equal(ixs.get(range(10)), torch.cat(parts))


def test_legacy_structured_dtype(tmp_path):
    """Older bergson stores describe rows as a structured dtype (a field per module)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 8, generator=g)
    spec = {"names": ["m1", "m2"], "formats": ["(5,)<f4", "(3,)<f4"], "offsets": [0, 20], "itemsize": 32}
    root = tmp_path / "old"
    root.mkdir()
    x.numpy().astype("<f4").tofile(root / "gradients.bin")
    (root / "info.json").write_text(json.dumps({"num_grads": 7, "grad_sizes": {"m1": 5, "m2": 3}, "dtype": spec}))
    ix = GradientIndex.open(root)
    assert torch.equal(ix.get(range(7)), x)
    assert np.array_equal(np.asarray(load_gradients(root)), x.numpy())  # bergson reads it the same way
    # padded records (a field layout with gaps) only gradkit maps: module columns by field offset
    pad = np.zeros((7, 10), dtype="<f4")
    pad[:, 0:5], pad[:, 6:9] = x[:, :5].numpy(), x[:, 5:].numpy()
    root2 = tmp_path / "old2"
    root2.mkdir()
    pad.tofile(root2 / "gradients.bin")
    spec2 = {"names": ["m1", "m2"], "formats": ["(5,)<f4", "(3,)<f4"], "offsets": [0, 24], "itemsize": 40}
    (root2 / "info.json").write_text(json.dumps({"num_grads": 7, "grad_sizes": {"m1": 5, "m2": 3},
                                                 "dtype": spec2}))
    ix2 = GradientIndex.open(root2)
    assert torch.equal(ix2.get(range(7)), x)
    q = torch.randn(2, 8, generator=g)
    for kw in ({}, {"unit_norm": True}, {"modules": ["m2"]}):
        a, b = ix.search(q, 3, **kw), ix2.search(q, 3, **kw)
        assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0])


def test_legacy_structured_dtype_padding_ignored(tmp_path):
    """Padding between (and after) the fields of a structured record is not part of any module: whatever bytes it
    holds, cosine and preconditioned searches give what the same rows with zero padding give."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 8, generator=g)
    spec = {"names": ["m1", "m2"], "formats": ["(5,)<f4", "(3,)<f4"], "offsets": [0, 28], "itemsize": 48}
    info = {"num_grads": 40, "grad_sizes": {"m1": 5, "m2": 3}, "dtype": spec}
    ixs = []
    for name in ("zero", "junk", "nonfinite"):
        pad = np.zeros((40, 12), dtype="<f4")
        if name != "zero":  # large, varying junk in the padding columns 5, 6 and 10, 11
            pad[:, [5, 6, 10, 11]] = 1e3 * torch.randn(40, 4, generator=g).numpy()
        if name == "nonfinite":
            pad[::7, 6], pad[::5, 11] = np.nan, np.inf
        pad[:, 0:5], pad[:, 7:10] = x[:, :5].numpy(), x[:, 5:].numpy()
        root = tmp_path / name
        root.mkdir()
        pad.tofile(root / "gradients.bin")
        (root / "info.json").write_text(json.dumps(info))
        ixs.append(GradientIndex.open(root))
    clean, junk, nonfinite = ixs
    assert torch.equal(junk.get(range(40)), x) and torch.equal(nonfinite.get(range(40)), x)
    q = torch.randn(3, 8, generator=g)
    a = torch.randn(8, 8, generator=g)
    hess = a @ a.T / 8 + torch.eye(8)
    xn = x.double() / x.double().norm(dim=1, keepdim=True)
    for kw in ({"unit_norm": True}, {"unit_norm": True, "reverse": True}, {"unit_norm": True, "modules": ["m2"]},
               {"precondition": Precondition(hess, mode="both")}, {"precondition": hess, "unit_norm": True},
               {"precondition": Precondition({"m2": hess[:3, :3]}, mode="both"), "modules": ["m2"]}, {}):
        want = clean.search(q, 10, **kw)
        for other in (junk, nonfinite):
            got = other.search(q, 10, **kw)
            assert torch.equal(want[1], got[1]), (other.path.name, kw)
            torch.testing.assert_close(want[0], got[0], rtol=0, atol=1e-6)
    s, i = junk.search(q, 10, unit_norm=True)
    want = (q.double() / q.double().norm(dim=1, keepdim=True)) @ xn.T
    assert torch.equal(i, want.topk(10).indices)
    torch.testing.assert_close(s.double(), want.topk(10).values, rtol=0, atol=1e-6)


def test_truncated_bergson_index_refused(tmp_path):
    m = create_index(tmp_path / "t", 5, {"m": 4}, np.float32)
    m[:] = 1.0
    m.flush()
    del m
    f = tmp_path / "t" / "gradients.bin"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 4)
    with pytest.raises(IndexFormatError,
                       match=r"^open: .*gradients\.bin is truncated: 76 bytes, info\.json says 5 rows = 80 bytes$"):
        GradientIndex.open(tmp_path / "t")


def test_unfinished_bergson_build_refused(tmp_path, monkeypatch):
    """bergson sizes gradients.bin and writes info.json before any row exists; only the rename of
    '<run>.part' to '<run>' says the build finished. An index under a '.part' directory is refused
    (naming the path) unless allow_incomplete=True."""
    sizes = {"m1": 4, "m2": 2}
    run_part = tmp_path / "run.part"
    mm = create_index(run_part, 6, sizes, np.float32)  # no row written yet: every row is zeros
    del mm
    with pytest.raises(IndexFormatError, match=rf"^path: {re.escape(repr(str(run_part)))} is a bergson index whose "
                                               r"build did not finish \(it lies in 'run\.part'.*rows not written yet "
                                               r"read as zeros.*allow_incomplete=True"):
        GradientIndex.open(run_part)
    # the same directory reached through a relative path
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IndexFormatError, match=r"^path: 'run\.part' is a bergson index whose build did not finish"):
        GradientIndex.open("run.part")
    monkeypatch.undo()
    # opt-in: the rows as they are on disk (zeros where bergson has not written yet)
    ix = GradientIndex.open(run_part, allow_incomplete=True)
    assert ix.layout == "bergson" and len(ix) == 6 and torch.equal(ix.get(range(6)), torch.zeros(6, 6))
    # an index in a sub-directory of a '.part' run, and a sharded export inside one: refused too
    sub = tmp_path / "run2.part" / "index"
    m = create_index(sub, 3, sizes, np.float32)
    m[:] = 1.0
    m.flush()
    del m
    with pytest.raises(IndexFormatError, match=r"^path: .*run2\.part/index' is a bergson index whose build did not "
                                               r"finish \(it lies in 'run2\.part'"):
        GradientIndex.open(sub)
    for j in range(2):
        m = create_index(tmp_path / "run3.part" / f"shard-{j:02d}", 2, sizes, np.float32)
        del m
    with pytest.raises(IndexFormatError, match=r"^path: .*run3\.part' is a bergson index whose build did not finish"):
        GradientIndex.open(tmp_path / "run3.part")
    assert len(GradientIndex.open(tmp_path / "run3.part", allow_incomplete=True)) == 4
    # renamed the way bergson's CLI does once the build is done: opens without the opt-in
    shutil.move(tmp_path / "run2.part", tmp_path / "run2")
    assert torch.equal(GradientIndex.open(tmp_path / "run2" / "index").get(range(3)), torch.ones(3, 6))
    # a symlink with a finished-looking name that points into a '.part' run is refused as well
    (tmp_path / "link").symlink_to(run_part, target_is_directory=True)
    with pytest.raises(IndexFormatError, match=r"^path: .*link' is a bergson index whose build did not finish"):
        GradientIndex.open(tmp_path / "link")
    with pytest.raises(TypeError, match=r"^allow_incomplete: expected a bool, got str 'yes'$"):
        GradientIndex.open(run_part, allow_incomplete="yes")
