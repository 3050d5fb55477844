"""Audit (s34): every place gradkit reads a file a user may have received from someone else.

Readers covered: ``GradientIndex.open`` (gradkit's ``index.json`` + shards; bergson's ``info.json``,
``gradients.bin``, ``offsets.npy``, ``processor_config.yaml``), ``ParamMap.load``, ``load_goldenparams``,
``prune_model``'s checkpoint (``progress.json`` + per-layer safetensors) and ``gradkit bench``.

Rule under test: nothing is unpickled; hostile input gets a clear error (IndexFormatError / ValueError /
CheckpointError naming the file) before any work, never a crash, hang, huge allocation or a read outside the
directory given, and the user's model and files are left as they were.

Anything that may hang or allocate runs in a child process (RLIMIT_AS capped, with a timeout); every case of
that kind is run by ONE child (module fixture ``_child``) to keep the file's runtime low.
"""
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from gradkit.golden import load_goldenparams
from gradkit.index import GradientIndex, IndexFormatError, _MAX_HEADER_BYTES
from gradkit.obs.driver import CheckpointError, prune_model
from gradkit.parammap import ParamMap
from gradkit.testing import random_batches, tiny_gpt

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "python" / "gradkit"
SIZES = {"a": 3, "b": 2}
D = 5
CAP = 1280 << 20  # the child's address-space cap (importing torch + gradkit maps ~650 MB)


# ============================================================================ fixtures


def _gk_index(path, per_token=False, n=4):
    g = torch.Generator().manual_seed(0)
    with GradientIndex.create(path, SIZES, dtype=torch.float32, per_token=per_token) as w:
        if per_token:
            w.append(torch.randn(5, D, generator=g), [2, 3])
        else:
            w.append(torch.randn(n, D, generator=g))
    return json.loads((Path(path) / "index.json").read_text())


def _bergson_index(path, per_token=False, n=5):
    """bergson's layout written by hand (what bergson.data.create_index / create_token_index write)."""
    path = Path(path)
    path.mkdir(parents=True)
    np.random.default_rng(0).standard_normal((n, D)).astype(np.float32).tofile(path / "gradients.bin")
    info = {"num_grads": n, "grad_sizes": SIZES, "base_dtype": "float32"}
    if per_token:
        info.update(attribute_tokens=True, num_items=2)
        np.save(path / "offsets.npy", np.array([0, 2, n], dtype=np.int64))
    (path / "info.json").write_text(json.dumps(info))
    return path


def _data():
    return random_batches(2, batch=2, seq=8, seed=0)


def _model():
    return tiny_gpt(n_layer=1, d_model=16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A finished prune_model checkpoint of a tiny model (copy it before changing it)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = tmp_path_factory.mktemp("ck") / "ck"
        prune_model(_model(), _data(), checkpoint_dir=str(d), progress=False)
    finally:
        torch.set_num_threads(old)
    return d


def _layer_file(ck):
    st = json.loads((ck / "progress.json").read_text())
    name = sorted(st["layers"])[0]
    return st, name, ck / st["layers"][name]["file"]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    cur = model.state_dict()
    return set(cur) == set(snap) and all(torch.equal(cur[k], snap[k]) for k in snap)


def _resume(ck):
    """prune_model resuming from ``ck``: (exception or None, model unchanged?)."""
    model = _model()
    snap = _state(model)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prune_model(model, _data(), checkpoint_dir=str(ck), progress=False)
        err = None
    except Exception as e:  # noqa: BLE001 - the test looks at it
        err = e
    finally:
        torch.set_num_threads(old)
    return err, _same(model, snap)


@pytest.fixture(scope="module")
def pm_dir(tmp_path_factory):
    pm = ParamMap({"fc.weight": {"shape": (4, 8), "repr": "indices", "indices": torch.tensor([3, 1, 7])},
                   "fc.bias": {"shape": (4,), "repr": "all"},
                   "x": {"shape": (64,), "repr": "mask", "mask": torch.arange(64) % 3 == 0}})
    d = tmp_path_factory.mktemp("pm") / "map"
    pm.save(str(d))
    return d


def _edit_cfg(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


# ============================================================================ the child: hangs and allocations

_CHILD = textwrap.dedent(r"""
    import json, os, resource, stat, sys, threading, time
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
    import torch
    torch.set_num_threads(1)
    from gradkit.index import GradientIndex
    from gradkit.parammap import ParamMap
    from gradkit.golden import load_goldenparams
    from gradkit.obs.driver import prune_model
    from gradkit.testing import random_batches, tiny_gpt

    CALLS = {
        "index": lambda a: GradientIndex.open(a),
        "pm": lambda a: ParamMap.load(a),
        "golden": lambda a: load_goldenparams(a),
        "prune": lambda a: prune_model(tiny_gpt(n_layer=1, d_model=16), random_batches(2, batch=2, seq=8, seed=0),
                                       checkpoint_dir=a, progress=False),
    }
    out = {}
    for case in json.loads(open(sys.argv[1]).read()):
        box = {}
        def go(case=case, box=box):
            try:
                CALLS[case["call"]](case["arg"])
                box["r"] = {"exc": None, "valueerror": False, "msg": ""}
            except BaseException as e:
                box["r"] = {"exc": type(e).__name__, "valueerror": isinstance(e, ValueError), "msg": str(e)[:400]}
        t0 = time.time()
        th = threading.Thread(target=go, daemon=True)
        th.start()
        th.join(case["limit"])
        hung = th.is_alive()
        fifo = case.get("fifo")
        if hung and fifo:  # unblock a reader waiting for a writer: open the FIFO for writing and close it
            for _ in range(100):
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
                th.join(0.05)
                if not th.is_alive():
                    break
        r = dict(box.get("r", {"exc": "still running", "valueerror": False, "msg": ""}))
        r.update(hung=hung, seconds=round(time.time() - t0, 2))
        out[case["name"]] = r
        print(json.dumps({case["name"]: r}), flush=True)
        if th.is_alive():
            break  # a runaway case (memory / CPU): the later cases would only measure it
    with open(sys.argv[3], "w") as f:
        json.dump(out, f)
    os._exit(0)
""")



def _special(target: Path, kind: str):
    """Replace ``target`` by a FIFO or by a symlink to /dev/zero (an endless file of size 0)."""
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    else:
        os.symlink("/dev/zero", target)


# which loader, which of its files: (call, setup(tmp) -> (arg, target))
def _s_index(t):
    _gk_index(t / "ix")
    return t / "ix", t / "ix" / "index.json"


def _s_info(t):
    _bergson_index(t / "b")
    return t / "b", t / "b" / "info.json"


def _s_offsets(t):
    _bergson_index(t / "b", per_token=True)
    return t / "b", t / "b" / "offsets.npy"


def _s_yaml(t):
    _bergson_index(t / "b")
    (t / "b" / "processor_config.yaml").write_text("projection_dim: 4\n")
    return t / "b", t / "b" / "processor_config.yaml"


def _s_pm_cfg(t, src):
    shutil.copytree(src, t / "m")
    return t / "m", t / "m" / "config.json"


def _s_pm_file(t, src):
    shutil.copytree(src, t / "m")
    return t / "m", t / "m" / "mapping_indices.safetensors"


def _s_progress(t, ck):
    shutil.copytree(ck, t / "ck")
    return t / "ck", t / "ck" / "progress.json"


def _s_layer(t, ck):
    shutil.copytree(ck, t / "ck")
    return t / "ck", _layer_file(t / "ck")[2]


def _s_golden(t):
    p = t / "g.pt"
    torch.save({"masks": {"w": torch.rand(4, 4) > 0.5}}, p)
    return p, p


_LOADERS = {  # name: (call, setup, needs)
    "index.json": ("index", _s_index, None),
    "bergson info.json": ("index", _s_info, None),
    "bergson offsets.npy": ("index", _s_offsets, None),
    "bergson processor_config.yaml": ("index", _s_yaml, None),
    "parammap config.json": ("pm", _s_pm_cfg, "pm"),
    "parammap mapping_indices.safetensors": ("pm", _s_pm_file, "pm"),
    "prune progress.json": ("prune", _s_progress, "ck"),
    "prune layer .safetensors": ("prune", _s_layer, "ck"),
    "goldenparams .pt": ("golden", _s_golden, None),
}
# /dev/zero where it is read whole (the others read a magic number first and refuse it)
_ZERO = ["index.json", "bergson info.json", "parammap config.json", "parammap mapping_indices.safetensors",
         "prune progress.json", "prune layer .safetensors"]


@pytest.fixture(scope="module")
def _child(tmp_path_factory, ckpt, pm_dir):
    base = tmp_path_factory.mktemp("child")
    cases = []
    for kind in ("fifo", "zero"):
        for name, (call, setup, needs) in _LOADERS.items():
            if kind == "zero" and name not in _ZERO:
                continue
            t = base / f"{kind}-{len(cases)}"
            t.mkdir()
            extra = {"pm": (pm_dir,), "ck": (ckpt,), None: ()}[needs]
            arg, target = setup(t, *extra)
            _special(target, kind)
            cases.append({"name": f"{kind}:{name}", "call": call, "arg": str(arg), "limit": 3.0 if kind == "fifo"
                          else 5.0, "fifo": str(target) if kind == "fifo" else None, "target": target.name})
    # offsets.npy whose header claims 10**15 elements (8 bytes of data follow)
    t = base / "offs-huge"
    t.mkdir()
    arg, target = _s_offsets(t)
    with open(target, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (10 ** 15,)})
        f.write(np.zeros(1, "<i8").tobytes())
    cases.append({"name": "offsets-huge-shape", "call": "index", "arg": str(arg), "limit": 5.0,
                  "target": "offsets.npy"})
    # a goldenparams file holding a sparse mask of 2**31 entries with 2 set (a few hundred bytes on disk)
    p = base / "huge-sparse.pt"
    torch.save({"masks": {"w": torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.tensor([True, True]),
                                                          (2 ** 31,), check_invariants=False)}}, p)
    cases.append({"name": "golden-huge-sparse", "call": "golden", "arg": str(p), "limit": 8.0, "target": p.name})
    # a 64 MiB index.json whose parse needs ~1.5 GB: it was under the header size bound (2**28) and now (2**25,
    # session 34) is refused before it is parsed
    t = base / "bomb"
    _gk_index(t)
    h = (t / "index.json").read_text()
    with open(t / "index.json", "w") as f:
        f.write(h.rstrip()[:-1] + ', "pad": [' + "{}," * ((64 << 20) // 3) + "{}]}")
    assert (t / "index.json").stat().st_size > _MAX_HEADER_BYTES
    cases.append({"name": "header-bomb", "call": "index", "arg": str(t), "limit": 8.0, "target": "index.json"})
    spec, res, script = base / "cases.json", base / "out.json", base / "child.py"
    spec.write_text(json.dumps(cases))
    script.write_text(_CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        r = subprocess.run([sys.executable, str(script), str(spec), str(CAP), str(res)], capture_output=True,
                           text=True, timeout=120, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired as e:  # pragma: no cover - reported by every test that needs it
        pytest.fail(f"the child timed out: {e.stdout}")
    out = {}
    for line in r.stdout.splitlines():
        try:
            out.update(json.loads(line))
        except ValueError:
            pass
    return {c["name"]: (c, out.get(c["name"])) for c in cases}, r


def _child_result(_child, name):
    cases, r = _child
    case, res = cases[name]
    if res is None:
        pytest.fail(f"{name}: no result from the child (rc {r.returncode}; stderr {r.stderr[-2000:]})")
    return case, res


# DEFECT: every reader opens the file a header names without checking that it is a regular file, and reads
# it whole without a bound: a FIFO makes GradientIndex.open / ParamMap.load / prune_model(resume) /
# load_goldenparams block for ever in open() (index.py:241 _read_json, index.py:1724 np.load, index.py:1811
# the yaml, parammap.py:752 and :775, obs/driver.py:755 and :806, golden.py:344 torch.load), and a symlink to
# /dev/zero (size 0, endless) is read until MemoryError (_read_json's size check sees 0 bytes).
@pytest.mark.parametrize("name", [f"fifo:{n}" for n in _LOADERS] + [f"zero:{n}" for n in _ZERO])
def test_a_fifo_or_device_in_place_of_a_file_is_refused_promptly(_child, name):
    case, res = _child_result(_child, name)
    assert not res["hung"], f"{name}: blocked reading {case['target']} ({res})"
    assert res["exc"] not in (None, "MemoryError"), f"{name}: {res}"
    assert res["valueerror"] and case["target"] in res["msg"], \
        f"{name}: expected a ValueError (IndexFormatError / CheckpointError) naming {case['target']}, got {res}"


# DEFECT: index.py:1724 np.load(offsets.npy) allocates the array its header claims before reading it: an
# offsets.npy of 136 bytes claiming 10**15 elements raises MemoryError ("Unable to allocate 7.11 PiB"; one
# claiming 3*10**8 allocates 2.4 GB); only ValueError is turned into IndexFormatError.
def test_offsets_npy_whose_header_claims_a_huge_shape_is_refused(_child):
    case, res = _child_result(_child, "offsets-huge-shape")
    assert not res["hung"] and res["exc"] == "IndexFormatError" and "offsets.npy" in res["msg"], res


# DEFECT: golden.py:135-140 Bitmask.from_coo (via load_goldenparams) makes a dense bool tensor of the mask's
# whole shape (8x the bitmask it then packs): a results file of a few hundred bytes holding a sparse mask of
# shape (2**31,) with 2 entries needs 2 GiB ("DefaultCPUAllocator: can't allocate memory", a RuntimeError not
# naming the file; uncapped, shape 2**33 touches 8 GiB).
def test_goldenparams_huge_sparse_mask_needs_no_dense_copy(_child):
    case, res = _child_result(_child, "golden-huge-sparse")
    assert not res["hung"], res
    assert res["exc"] is None or (res["valueerror"] and case["target"] in res["msg"]), res


# DEFECT: index.py:241 _read_json bounds a header at _MAX_HEADER_BYTES = 2**28 bytes, but json.loads of a
# header of 64 MiB of "{}," needs ~1.5 GB of Python objects (about 24x): MemoryError, not IndexFormatError
# (a 256 MiB header, still accepted by the bound, needs ~6 GB).
def test_header_whose_parse_needs_gigabytes_is_refused(_child):
    case, res = _child_result(_child, "header-bomb")
    assert not res["hung"] and res["exc"] == "IndexFormatError" and "index.json" in res["msg"], res


# DEFECT: index.py:1812 -> _bergson_settings->_projection_dict (index.py:308) json.dumps-es whatever value a
# processor_config.yaml gives a projection setting: yaml.safe_load builds a 20-line "billion laughs" alias
# tree cheaply (shared lists), json.dumps then expands its 10**9 leaves: minutes of CPU and MemoryError
# (21 s to MemoryError under a 2 GB cap) instead of a refusal of the non-scalar setting.
def test_bergson_processor_config_alias_bomb_is_refused_promptly(tmp_path):
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"] + \
        [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)] + \
        ["projection_dim: 4", "projection_type: *l8"]
    p = _bergson_index(tmp_path / "b")
    (p / "processor_config.yaml").write_text("\n".join(lines) + "\n")
    assert len((p / "processor_config.yaml").read_bytes()) < 1000
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({CAP}, {CAP}))
        from gradkit.index import GradientIndex, IndexFormatError
        try:
            ix = GradientIndex.open({str(p)!r})
            print("RESULT opened", ix.projection)
        except IndexFormatError as e:
            print("RESULT IndexFormatError", e)
    """)
    try:  # the child is killed at the timeout
        # (60 s: importing torch on a loaded 2-core CI machine takes a while; the old code ran past 21 s to a
        # MemoryError under the address-space cap, so it fails either way)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        pytest.fail("GradientIndex.open of a 20-line processor_config.yaml still running after 60 s")
    assert "RESULT" in r.stdout, (r.stdout, r.stderr[-1500:])


# ============================================================================ DEFECTS (in process)


def _deep(path):
    path.write_text("[" * 100000 + "]" * 100000)


# DEFECT: the JSON readers catch JSONDecodeError / ValueError only; json's recursion limit raises
# RecursionError for a 200 kB file of nested brackets: index.py:242 (_read_json, index.json and bergson's
# info.json), parammap.py:753 (config.json), obs/driver.py:756 (progress.json; it catches OSError, ValueError).
@pytest.mark.parametrize("which", ["index.json", "info.json", "config.json", "progress.json"])
def test_deeply_nested_json_header_is_refused_naming_the_file(tmp_path, ckpt, pm_dir, which):
    if which == "index.json":
        _gk_index(tmp_path / "d")
        _deep(tmp_path / "d" / which)
        with pytest.raises(IndexFormatError, match=r"index\.json"):
            GradientIndex.open(tmp_path / "d")
    elif which == "info.json":
        _bergson_index(tmp_path / "d")
        _deep(tmp_path / "d" / which)
        with pytest.raises(IndexFormatError, match=r"info\.json"):
            GradientIndex.open(tmp_path / "d")
    elif which == "config.json":
        shutil.copytree(pm_dir, tmp_path / "d")
        _deep(tmp_path / "d" / which)
        with pytest.raises(ValueError, match=r"config\.json"):
            ParamMap.load(str(tmp_path / "d"))
    else:
        shutil.copytree(ckpt, tmp_path / "d")
        _deep(tmp_path / "d" / which)
        err, same = _resume(tmp_path / "d")
        assert same
        assert isinstance(err, CheckpointError) and "progress.json" in str(err), repr(err)


# DEFECT: index.py:1645-1649 sums each rank's int64 token counts with numpy (wrapping at 2**63) and
# _set_offsets (index.py:1659) checks only that no count is negative: counts [2**62, 2**62, 2**62, 2**62 + 5]
# wrap to 5 = the rows, so the index opens with offsets [0, 2**62, -2**63, -2**62, 5] and example_of maps
# every row to example 3 (search results are then attributed to the wrong examples).
def test_token_counts_that_overflow_int64_are_refused(tmp_path):
    p = tmp_path / "tok"
    h = _gk_index(p, per_token=True)
    np.array([2 ** 62, 2 ** 62, 2 ** 62, 2 ** 62 + 5], dtype="<i8").tofile(p / "shards" / "r00000.tokens.bin")
    h["token_files"][0]["examples"] = 4
    h["examples"] = 4
    (p / "index.json").write_text(json.dumps(h))
    try:
        ix = GradientIndex.open(p)
    except IndexFormatError as e:
        assert "tokens.bin" in str(e) or "token" in str(e)
        return
    pytest.fail(f"opened with offsets {ix.offsets.tolist()}; example_of(rows) = {ix.example_of(range(5)).tolist()}")


# DEFECT: index.py:1613 `f.parent.resolve() != sd` keeps a listed shard's *name* inside shards/, but a shard
# file that is a symlink is followed wherever it points: an index received as an archive reads (and exposes
# through get() / search scores) any file of the right size outside the index directory. The same in
# parammap.py:775: mapping files must be "a plain file name", but a symlink of that name to a file elsewhere
# is read.
def test_shard_symlinked_outside_the_index_is_refused(tmp_path):
    p = tmp_path / "ix"
    _gk_index(p)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4 * D, dtype=np.float32).tobytes())  # 80 bytes: what the header asks for
    shard = p / "shards" / "r00000-000000.bin"
    shard.unlink()
    os.symlink(secret, shard)
    try:
        ix = GradientIndex.open(p)
    except IndexFormatError as e:
        assert "r00000-000000.bin" in str(e)
        return
    pytest.fail(f"read {secret} through the shard symlink: get(0) = {ix.get([0]).tolist()}")


def test_parammap_file_symlinked_outside_the_directory_is_refused(tmp_path, pm_dir):
    d = tmp_path / "m"
    shutil.copytree(pm_dir, d)
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(d / "mapping_indices.safetensors", elsewhere)
    os.symlink(elsewhere, d / "mapping_indices.safetensors")
    with pytest.raises(ValueError, match=r"mapping_indices\.safetensors"):
        ParamMap.load(str(d))


# DEFECT: GradientIndex.open lets file-system errors through instead of IndexFormatError: a `shards` symlink
# loop raises RuntimeError("Symlink loop from ...") from Path.resolve (index.py:1607, even with no shard
# listed), and an index.json that is a directory IsADirectoryError from open() (index.py:241: _read_json
# catches the stat's OSError, not the open's).
@pytest.mark.parametrize("what", ["shards symlink loop", "index.json is a directory"])
def test_file_system_oddities_give_index_format_error(tmp_path, what):
    p = tmp_path / "ix"
    h = _gk_index(p)
    if what == "shards symlink loop":
        shutil.rmtree(p / "shards")
        os.symlink("shards", p / "shards")
        h.update(count=0, examples=0, shards=[])
        (p / "index.json").write_text(json.dumps(h))
        name = "shards"
    else:
        (p / "index.json").unlink()
        (p / "index.json").mkdir()
        name = "index.json"
    with pytest.raises(IndexFormatError, match=re.escape(name)):
        GradientIndex.open(p)


# DEFECT: index.py:1682 _load_bergson passes info.json's grad_sizes to _check_modules unwrapped: a bad
# grad_sizes raises a bare ValueError about an argument "modules" the caller never passed
# ("modules['a']: dim must be a positive int, got 0", "modules: expected at least one module"), naming
# neither info.json nor grad_sizes (gradkit's own header is wrapped: IndexFormatError naming index.json).
@pytest.mark.parametrize("sizes", [{"a": 0, "b": 5}, {}, {"a": 3.0, "b": 2}, {"a": -3, "b": 8}],
                         ids=["zero", "empty", "float", "negative"])
def test_bergson_bad_grad_sizes_name_info_json(tmp_path, sizes):
    p = _bergson_index(tmp_path / "b")
    info = json.loads((p / "info.json").read_text())
    info["grad_sizes"] = sizes
    (p / "info.json").write_text(json.dumps(info))
    with pytest.raises(IndexFormatError, match=r"info\.json.*grad_sizes|grad_sizes.*info\.json"):
        GradientIndex.open(p)


# DEFECT: obs/driver.py:799 `crc = int(e["crc32"])` catches KeyError, TypeError, ValueError: a progress.json
# whose crc32 is the JSON literal Infinity (which json.load accepts) raises OverflowError ("cannot convert
# float infinity to integer") instead of CheckpointError naming the checkpoint.
def test_progress_json_with_infinite_crc_is_a_checkpoint_error(tmp_path, ckpt):
    ck = tmp_path / "ck"
    shutil.copytree(ckpt, ck)
    st, name, _ = _layer_file(ck)
    st["layers"][name]["crc32"] = float("inf")
    (ck / "progress.json").write_text(json.dumps(st))
    err, same = _resume(ck)
    assert same
    assert isinstance(err, CheckpointError) and "progress.json" in str(err), repr(err)


# DEFECT: ParamMap.load (parammap.py:750-757) turns only FileNotFoundError and JSONDecodeError into ValueError:
# a path that is a file raises NotADirectoryError, a config.json that is a directory IsADirectoryError, a
# config.json that is not UTF-8 a UnicodeDecodeError naming no file, and an entry of shape [2**40, 2**40]
# "ValueError: Overflow when unpacking long long" (from _finish, parammap.py:190, outside the per-entry try),
# none naming the file as the docstring promises ("a truncated or edited file raises ValueError naming it").
@pytest.mark.parametrize("what", ["path is a file", "config.json is a directory", "config.json not utf-8",
                                  "shape past int64"])
def test_parammap_load_bad_input_is_a_value_error_naming_the_file(tmp_path, pm_dir, what):
    d = tmp_path / "m"
    shutil.copytree(pm_dir, d)
    arg = d
    if what == "path is a file":
        arg = tmp_path / "afile"
        arg.write_text("{}")
    elif what == "config.json is a directory":
        (d / "config.json").unlink()
        (d / "config.json").mkdir()
    elif what == "config.json not utf-8":
        (d / "config.json").write_bytes(b"\xff\xfe{}")
    else:
        def big(cfg):
            cfg["mapping"]["param_map"][1]["shape"] = [2 ** 40, 2 ** 40]
            cfg["mapping"]["param_map"][1]["num_selected"] = 2 ** 80
        _edit_cfg(d, big)
    with pytest.raises(ValueError) as ei:
        ParamMap.load(str(arg))
    assert str(arg) in str(ei.value), repr(ei.value)


# DEFECT: parammap.py:831-834 ParamMap.load takes the map's hash from config.json when entries_sha256 (a
# digest of the entry list, recomputable by anyone) and the crc32 set match: an edited config.json can give a
# map any hash, e.g. another map's, and then `loaded == other` is True for different selections (and a
# non-string "hash" makes .hash return it, e.g. a float). The hash is documented as depending "only on names,
# shapes and the selected positions".
def test_parammap_hash_of_a_loaded_map_cannot_be_forged(tmp_path, pm_dir):
    d = tmp_path / "m"
    shutil.copytree(pm_dir, d)
    other = ParamMap({"fc.weight": {"shape": (4, 8), "repr": "all"}})
    _edit_cfg(d, lambda c: c["mapping"]["gradkit"].__setitem__("hash", other.hash))
    try:
        pm = ParamMap.load(str(d))
    except ValueError as e:
        assert "config.json" in str(e)
        return
    fresh = ParamMap.load(str(pm_dir))
    assert pm.hash == fresh.hash, "the loaded map's hash is the forged one"
    assert pm != other


# DEFECT: golden.py:344 load_goldenparams lets torch.load's own errors through: a results file holding a tensor
# subclass raises pickle.UnpicklingError ("Weights only load failed ... Unsupported global"), a directory
# IsADirectoryError, and a mask on the meta device RuntimeError("Tensor.item() cannot be called on meta
# tensors"); the first and last name neither the file nor the argument.
class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("what", ["tensor subclass", "meta tensor", "directory"])
def test_goldenparams_bad_file_is_refused_naming_the_path(tmp_path, what):
    p = tmp_path / "res.pt"
    if what == "tensor subclass":
        torch.save({"masks": {"w": (torch.rand(3) > 0.5).as_subclass(_Sub)}}, p)
    elif what == "meta tensor":
        torch.save({"masks": {"w": torch.zeros(3, dtype=torch.bool, device="meta")}}, p)
    else:
        p.mkdir()
    with pytest.raises((ValueError, TypeError)) as ei:
        load_goldenparams(str(p))
    assert str(p) in str(ei.value), repr(ei.value)


# DEFECT: `gradkit bench --out PATH` (cli.py:20 -> benchmarks/run.py:28-36) never checks --out before running:
# with PATH an existing file every family is benchmarked first, then harness.write_jsonl's os.makedirs raises
# FileExistsError("[Errno 17] File exists") and the results are lost.
def test_bench_out_that_is_a_file_is_refused_before_any_benchmark(tmp_path):
    out = tmp_path / "afile"
    out.write_text("mine")
    code = textwrap.dedent(f"""
        import sys, types
        ran = []
        stub = types.ModuleType("bench_parammap")
        stub.run = lambda rec, quick=False: ran.append(1)
        sys.modules["bench_parammap"] = stub
        from gradkit.cli import main
        try:
            rc = main(["bench", "--family", "parammap", "--quick", "--threads", "1", "--out", {str(out)!r}])
            err = None
        except BaseException as e:
            rc, err = None, type(e).__name__ + ": " + str(e)
        print("RESULT", repr((rc, err, len(ran))))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    m = re.search(r"RESULT (.*)", r.stdout)
    assert m, r.stdout + r.stderr
    rc, err, ran = eval(m.group(1))  # noqa: S307 - our own repr of a tuple of str/int/None
    assert out.read_text() == "mine"
    assert ran == 0, f"the benchmark ran before --out was refused (rc {rc}, {err})"
    assert rc == 2 or (err and "out" in err), (rc, err)


# ============================================================================ passing checks


def test_no_reader_enables_pickle_or_an_unsafe_yaml_loader():
    src = "\n".join(p.read_text() for p in PKG.rglob("*.py"))
    assert not re.search(r"allow_pickle\s*=\s*True", src)
    assert not re.search(r"weights_only\s*=\s*False", src)
    assert not re.search(r"yaml\.(unsafe_)?load\(|yaml\.full_load|Loader\s*=\s*yaml\.(Unsafe|Full)?Loader", src)
    assert not re.search(r"^\s*(import pickle|import dill|import marshal|from pickle)", src, re.M)
    assert not re.search(r"\bnp\.load\((?![^)]*allow_pickle=False)", src)
    assert not re.search(r"\btorch\.load\((?![^)]*weights_only=True)", src)


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_offsets_npy_object_array_is_refused_without_unpickling(tmp_path):
    p = _bergson_index(tmp_path / "b", per_token=True)
    flag = tmp_path / "PWNED"
    np.save(p / "offsets.npy", np.array([0, 2, 5, _Boom(str(flag))], dtype=object), allow_pickle=True)
    with pytest.raises(IndexFormatError, match=r"offsets\.npy is not a plain numpy array"):
        GradientIndex.open(p)
    assert not flag.exists()


def test_processor_config_yaml_python_tags_are_not_executed(tmp_path):
    p = _bergson_index(tmp_path / "b")
    flag = tmp_path / "PWNED"
    (p / "processor_config.yaml").write_text(f"projection_dim: !!python/object/apply:os.system ['touch {flag}']\n"
                                              f"other: !!python/object/new:builtins.open ['{flag}', 'w']\n")
    ix = GradientIndex.open(p)  # a damaged config only loses the projection check (index.py:1813-1814)
    assert ix.projection is None and not flag.exists()


def test_goldenparams_pickled_code_is_never_run(tmp_path):
    flag = tmp_path / "PWNED"
    p = tmp_path / "res.pt"
    torch.save({"masks": {"w": torch.ones(2, dtype=torch.bool)}, "x": _Boom(str(flag))}, p)
    with pytest.raises(Exception):
        load_goldenparams(str(p))
    assert not flag.exists()


@pytest.mark.parametrize("change, field", [
    (lambda h: h.update(count=float("nan")), "count"),
    (lambda h: h.update(count=-1), "count"),
    (lambda h: h.update(count=10 ** 18), "header says"),
    (lambda h: h.update(dim=float("inf")), "dim"),
    (lambda h: h.update(dim=6), "dim"),
    (lambda h: h.update(modules=[["a", 0], ["b", 5]]), "dim must be a positive int"),
    (lambda h: h.update(modules=[["a", float("nan")], ["b", 2]]), "dim must be a positive int"),
    (lambda h: h.update(modules=[["a", 10 ** 18], ["b", 2]], dim=10 ** 18 + 2), "more than a row can hold"),  # s35: refused on the header itself
    (lambda h: h["shards"][0].update(rows=-4), "rows"),
    (lambda h: h["shards"][0].update(rows=10 ** 18), "truncated"),
    (lambda h: h.update(nonfinite_rows=float("inf")), "nonfinite_rows"),
    (lambda h: h.update(world_size=0), "world_size"),
    (lambda h: h.update(dtype=["float32"]), "malformed"),
    (lambda h: h.update(dtype="object"), "unsupported dtype"),
    (lambda h: h.update(shards="x" * 10), "shards"),
    (lambda h: h.update(complete="false"), "complete"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_absurd_header_values_are_refused_naming_the_field(tmp_path, change, field):
    p = tmp_path / "ix"
    h = _gk_index(p)
    change(h)
    (p / "index.json").write_text(json.dumps(h))  # NaN / Infinity as the JSON literals json.load accepts
    with pytest.raises(IndexFormatError, match=re.escape(field)):
        GradientIndex.open(p)


@pytest.mark.parametrize("name, ok", [
    ("shards/../shards/r00000-000000.bin", True),  # still the shards directory
    ("../ix2/shards/r00000-000000.bin", False),
    ("/etc/passwd", False),
    ("ABSOLUTE", False),
    ("shards/sub/r00000-000000.bin", False),
    ("index.json", False),
])
def test_shard_names_escaping_the_index_are_refused(tmp_path, name, ok):
    p = tmp_path / "ix"
    h = _gk_index(p)
    _gk_index(tmp_path / "ix2")
    if name == "ABSOLUTE":
        name = str(tmp_path / "ix2" / "shards" / "r00000-000000.bin")
    h["shards"][0]["file"] = name
    (p / "index.json").write_text(json.dumps(h))
    if ok:
        assert len(GradientIndex.open(p)) == 4
    else:
        with pytest.raises(IndexFormatError, match="unexpected shard file name"):
            GradientIndex.open(p)


@pytest.mark.parametrize("name", ["../r00000.tokens.bin", "/tmp/r00000.tokens.bin", "shards/x.bin"])
def test_token_file_names_escaping_the_index_are_refused(tmp_path, name):
    p = tmp_path / "tok"
    h = _gk_index(p, per_token=True)
    shutil.copy(p / "shards" / "r00000.tokens.bin", tmp_path / "r00000.tokens.bin")
    h["token_files"][0]["file"] = name
    (p / "index.json").write_text(json.dumps(h))
    with pytest.raises(IndexFormatError, match="unexpected token file name"):
        GradientIndex.open(p)


@pytest.mark.parametrize("kind", ["fifo", "zero", "dir", "loop"])
def test_shard_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    p = tmp_path / "ix"
    _gk_index(p)
    s = p / "shards" / "r00000-000000.bin"
    s.unlink()
    if kind == "fifo":
        os.mkfifo(s)
    elif kind == "zero":
        os.symlink("/dev/zero", s)
    elif kind == "dir":
        s.mkdir()
    else:
        os.symlink(s.name, s)
    with pytest.raises(IndexFormatError, match=r"r00000-000000\.bin"):
        GradientIndex.open(p)


def test_header_over_the_size_bound_is_refused_without_reading_it(tmp_path):
    p = tmp_path / "ix"
    _gk_index(p)
    with open(p / "index.json", "r+b") as f:
        f.truncate(_MAX_HEADER_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(IndexFormatError, match=r"index\.json is \d+ bytes, more than"):
        GradientIndex.open(p)
    b = _bergson_index(tmp_path / "b")
    os.truncate(b / "info.json", 2 << 30)  # "a 2 GB header"
    with pytest.raises(IndexFormatError, match=r"info\.json is \d+ bytes, more than"):
        GradientIndex.open(b)


def test_path_that_is_a_file_is_refused_by_the_directory_readers(tmp_path):
    f = tmp_path / "afile"
    f.write_text("{}")
    with pytest.raises(IndexFormatError, match=r"is not a directory"):
        GradientIndex.open(f)
    model = _model()
    snap = _state(model)
    with pytest.raises(CheckpointError, match=r"checkpoint_dir: .* exists and is not a directory"):
        prune_model(model, _data(), checkpoint_dir=str(f), progress=False)
    assert _same(model, snap) and f.read_text() == "{}"


@pytest.mark.parametrize("change, msg", [
    ({"num_grads": 10 ** 18}, "truncated"),
    ({"grad_sizes": {"a": 10 ** 18, "b": 2}}, "more than a row can hold"),  # s35: refused on the header itself
    ({"num_grads": -1}, "num_grads"),
    ({"num_grads": float("nan")}, "num_grads"),
    ({"base_dtype": "object"}, "unsupported bergson dtype"),
    ({"base_dtype": ">f4"}, "unsupported bergson dtype"),
    ({"base_dtype": None, "dtype": {"names": ["a", "b"], "formats": ["(3,)<f4", "(2,)<f4"], "itemsize": 10 ** 18}},
     "malformed"),
    ({"base_dtype": None, "dtype": {"names": ["a", "b"], "formats": ["O", "O"]}}, "unsupported element dtype"),
    ({"base_dtype": None, "dtype": {"names": ["a", "b"], "formats": ["(10000000000000,)<f4", "(2,)<f4"]}},
     "malformed"),
], ids=lambda v: "" if isinstance(v, dict) else v)
def test_absurd_bergson_header_values_are_refused_naming_the_file(tmp_path, change, msg):
    p = _bergson_index(tmp_path / "b")
    info = json.loads((p / "info.json").read_text())
    info.update(change)
    if info.get("base_dtype") is None:
        info.pop("base_dtype")
    (p / "info.json").write_text(json.dumps(info))
    with pytest.raises((ValueError, TypeError), match=re.escape(msg)) as ei:  # TypeError: num_grads NaN (a float)
        GradientIndex.open(p)
    assert "info.json" in str(ei.value) or "gradients.bin" in str(ei.value)


@pytest.mark.parametrize("offs", [[0, 2, 4], [0, 3, 2, 5], [1, 2, 5], [[0, 2, 5]], [0.0, 2.0, 5.0], []],
                         ids=["short", "decreasing", "not-from-0", "2-D", "float", "empty"])
def test_bad_bergson_offsets_are_refused(tmp_path, offs):
    p = _bergson_index(tmp_path / "b", per_token=True)
    np.save(p / "offsets.npy", np.array(offs))
    with pytest.raises(IndexFormatError, match=r"offsets\.npy"):
        GradientIndex.open(p)


def test_bergson_uint64_offsets_that_wrap_are_refused(tmp_path):
    p = _bergson_index(tmp_path / "b", per_token=True, n=4)
    np.save(p / "offsets.npy", np.array([0, 5, 3, 4], dtype=np.uint64))  # np.diff wraps: no negative step
    with pytest.raises(IndexFormatError):
        GradientIndex.open(p)


def _restamp(ck, name, raw):
    st = json.loads((ck / "progress.json").read_text())
    (ck / st["layers"][name]["file"]).write_bytes(raw)
    st["layers"][name]["crc32"] = zlib.crc32(raw)
    (ck / "progress.json").write_text(json.dumps(st))


@pytest.mark.parametrize("what", ["truncated", "extended", "header 2**60", "float64", "shape", "no weight",
                                  "file ../", "file absolute", "entry not an object", "layers not a dict"])
def test_hostile_checkpoint_is_refused_before_the_model_changes(tmp_path, ckpt, what):
    from gradkit._io import write_safetensors
    from safetensors.torch import load as st_load

    ck = tmp_path / "ck"
    shutil.copytree(ckpt, ck)
    st, name, f = _layer_file(ck)
    raw = f.read_bytes()
    w = st_load(raw)["weight"]
    tmp = str(tmp_path / "x.safetensors")
    if what == "truncated":
        _restamp(ck, name, raw[:-7])
    elif what == "extended":
        _restamp(ck, name, raw + b"\0" * 16)
    elif what == "header 2**60":
        _restamp(ck, name, struct.pack("<Q", 1 << 60) + b"{}")
    elif what in ("float64", "shape", "no weight"):
        t = {"float64": {"weight": w.double()}, "shape": {"weight": w.reshape(-1)[:-1].clone()},
             "no weight": {"bias": w}}[what]
        write_safetensors(tmp, t)
        _restamp(ck, name, Path(tmp).read_bytes())
    elif what.startswith("file"):
        st["layers"][name]["file"] = "../" + f.name if what == "file ../" else str(f)
        (ck / "progress.json").write_text(json.dumps(st))
    elif what == "entry not an object":
        st["layers"][name] = [1, 2]
        (ck / "progress.json").write_text(json.dumps(st))
    else:
        st["layers"] = [name]
        (ck / "progress.json").write_text(json.dumps(st))
    before = {q.name: q.read_bytes() for q in ck.iterdir()}
    err, same = _resume(ck)
    assert same, "the model was changed"
    assert isinstance(err, CheckpointError), repr(err)
    assert "progress.json" in str(err) or ".safetensors" in str(err)
    assert {q.name: q.read_bytes() for q in ck.iterdir()} == before  # the user's checkpoint is left alone


@pytest.mark.parametrize("what", ["header 2**60", "truncated", "name ../", "name absolute", "not safetensors",
                                  "out of range", "float indices", "2-D indices", "duplicate", "mask values",
                                  "crc"])
def test_hostile_parammap_files_are_refused_naming_the_file(tmp_path, pm_dir, what):
    from gradkit._io import write_safetensors

    d = tmp_path / "m"
    shutil.copytree(pm_dir, d)
    fi = d / "mapping_indices.safetensors"

    def restamp(fn, tensors=None, raw=None):
        if tensors is not None:
            write_safetensors(str(d / fn), tensors)
        else:
            (d / fn).write_bytes(raw)
        crc = zlib.crc32((d / fn).read_bytes())
        _edit_cfg(d, lambda c: c["mapping"]["gradkit"]["crc32"].__setitem__(fn, f"{crc:08x}"))

    if what == "header 2**60":
        restamp(fi.name, raw=struct.pack("<Q", 1 << 60) + b"{}")
    elif what == "truncated":
        restamp(fi.name, raw=fi.read_bytes()[:-3])
    elif what == "name ../":
        _edit_cfg(d, lambda c: c["mapping"].__setitem__("indices_file", "../m/" + fi.name))
    elif what == "name absolute":
        _edit_cfg(d, lambda c: c["mapping"].__setitem__("indices_file", str(fi)))
    elif what == "not safetensors":
        _edit_cfg(d, lambda c: c["mapping"].__setitem__("indices_file", "mapping_indices.bin"))
    elif what == "out of range":
        restamp(fi.name, {"L0": torch.tensor([3, 1, 32], dtype=torch.int32)})
    elif what == "float indices":
        restamp(fi.name, {"L0": torch.tensor([3.0, 1.0, 7.0])})
    elif what == "2-D indices":
        restamp(fi.name, {"L0": torch.tensor([[3, 1, 7]], dtype=torch.int32)})
    elif what == "duplicate":
        restamp(fi.name, {"L0": torch.tensor([3, 1, 3], dtype=torch.int32)})
    elif what == "mask values":
        m = torch.zeros(64, dtype=torch.uint8)
        m[::3] = 2
        restamp("mapping_masks.safetensors", {"L2": m})
    else:
        (fi).write_bytes(fi.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ValueError) as ei:
        ParamMap.load(str(d))
    assert "mapping_indices" in str(ei.value) or "mapping_masks" in str(ei.value) or "config.json" in str(ei.value)


@pytest.mark.parametrize("what", ["out of range", "negative", "not a dict", "mask not a tensor", "no masks key",
                                  "masks not a dict"])
def test_hostile_goldenparams_contents_are_refused(tmp_path, what):
    p = tmp_path / "res.pt"
    v = torch.tensor([True, True])
    obj = {
        "out of range": {"masks": {"w": torch.sparse_coo_tensor(torch.tensor([[0, 5]]), v, (3,),
                                                                 check_invariants=False)}},
        "negative": {"masks": {"w": torch.sparse_coo_tensor(torch.tensor([[-1, 1]]), v, (3,),
                                                             check_invariants=False)}},
        "not a dict": [1, 2],
        "mask not a tensor": {"masks": {"w": "x"}},
        "no masks key": {"other": {}},
        "masks not a dict": {"masks": [torch.ones(2, dtype=torch.bool)]},
    }[what]
    torch.save(obj, p)
    with pytest.raises((ValueError, TypeError), match=r"coo: indices outside|" + re.escape(str(p))):
        load_goldenparams(str(p))
