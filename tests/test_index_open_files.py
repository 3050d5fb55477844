"""GradientIndex.open reads each data file (gradkit's shards and token count files, bergson's gradients.bin and
offsets.npy) through one open descriptor: it is checked to be a regular file, sized and read or mapped through
that same descriptor. Before, a path was stat'ed and then opened again by name, so a FIFO in place of a token
count file of 0 examples (size 0, which passed the size check) made open() block for ever in np.fromfile, and a
file swapped or cut between the check and the read was read as something the check had not seen."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from gradkit.index import GradientIndex, IndexFormatError, _read_npy_ints

SIZES = {"a": 3, "b": 2}


def _gk(path, per_token, rows=5):
    g = torch.Generator().manual_seed(0)
    with GradientIndex.create(path, SIZES, dtype=torch.float32, per_token=per_token) as w:
        if rows:
            w.append(torch.randn(rows, 5, generator=g), [2, 3] if per_token else None)
    return Path(path)


def _bergson(path, per_token):
    path.mkdir(parents=True)
    np.random.default_rng(0).standard_normal((5, 5)).astype(np.float32).tofile(path / "gradients.bin")
    info = {"num_grads": 5, "grad_sizes": SIZES, "base_dtype": "float32"}
    if per_token:
        info["attribute_tokens"] = True
        np.save(path / "offsets.npy", np.array([0, 2, 5], dtype=np.int64))
    (path / "info.json").write_text(json.dumps(info))
    return path


def test_a_fifo_in_place_of_any_data_file_is_refused_not_waited_on(tmp_path):
    cases = {
        "empty token file": (_gk(tmp_path / "e", True, rows=0), "shards/r00000.tokens.bin"),
        "token file": (_gk(tmp_path / "t", True), "shards/r00000.tokens.bin"),
        "shard": (_gk(tmp_path / "s", False), "shards/r00000-000000.bin"),
        "gradients.bin": (_bergson(tmp_path / "g", False), "gradients.bin"),
        "offsets.npy": (_bergson(tmp_path / "o", True), "offsets.npy"),
    }
    for name, (d, rel) in cases.items():
        assert (d / rel).is_file(), (name, sorted(p.name for p in d.rglob("*")))
        (d / rel).unlink()
        os.mkfifo(d / rel)
    # in a child: a regression blocks in open() on a FIFO without a writer, and fails here on the timeout
    code = textwrap.dedent(f"""
        import json
        from gradkit.index import GradientIndex, IndexFormatError
        out = {{}}
        for name, d in {json.dumps({n: str(d) for n, (d, _) in cases.items()})}.items():
            try:
                GradientIndex.open(d)
                out[name] = "opened"
            except IndexFormatError as e:
                out[name] = str(e)
            print(json.dumps(out), flush=True)
        """)
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"GradientIndex.open blocked on a FIFO; finished before it: {e.stdout}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    for name, (d, rel) in cases.items():
        assert out[name] == f"open: {d / rel} is not a regular file", (name, out[name])


def test_a_token_file_cut_after_its_size_was_read_is_refused(tmp_path, monkeypatch):
    d = _gk(tmp_path / "t", True)
    tf = d / "shards" / "r00000.tokens.bin"
    assert tf.stat().st_size == 16
    os.truncate(tf, 8)  # cut after the fstat below reported the full size
    real = os.fstat

    class Was:
        def __init__(self, st):
            self.st_mode, self.st_size = st.st_mode, 16

    monkeypatch.setattr(os, "fstat", lambda fd: Was(real(fd)) if os.readlink(f"/proc/self/fd/{fd}") == str(tf)
                        else real(fd))
    with pytest.raises(IndexFormatError, match=r"token count file .*r00000\.tokens\.bin is truncated: 8 of 16 bytes"):
        GradientIndex.open(d)


@pytest.mark.parametrize("arr", [np.array([0, 2, 5], "<i8"), np.array([0, 2, 5], ">i8"), np.array([0, 1], "<u4"),
                                 np.arange(7, dtype="<i2"), np.array([0, 3], "<i8").reshape(1, 2)],
                         ids=["i8", "big-endian", "u4", "i2", "2-d"])
def test_offsets_are_parsed_as_numpy_reads_them(tmp_path, arr):
    p = tmp_path / "offsets.npy"
    np.save(p, arr)
    got = _read_npy_ints(p, arr.size)
    want = np.load(p, allow_pickle=False)
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)


def test_offsets_in_npy_format_2_and_fortran_order(tmp_path):
    p = tmp_path / "offsets.npy"
    arr = np.asfortranarray(np.arange(6, dtype="<i8").reshape(2, 3))
    with open(p, "wb") as f:
        np.lib.format.write_array(f, arr, version=(2, 0))
    got = _read_npy_ints(p, 6)
    assert np.array_equal(got, arr) and np.array_equal(got, np.load(p))


@pytest.mark.parametrize("claim, data, msg", [
    ((10 ** 15,), 1, r"claims 1000000000000000 entries of 8 bytes but 8 bytes of data follow"),
    ((3,), 2, r"claims 3 entries of 8 bytes but 16 bytes of data follow"),
    ((1,), 2, r"claims 1 entries of 8 bytes but 16 bytes of data follow"),
])
def test_offsets_header_and_data_must_agree(tmp_path, claim, data, msg):
    p = tmp_path / "offsets.npy"
    with open(p, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": claim})
        f.write(np.zeros(data, "<i8").tobytes())
    with pytest.raises(IndexFormatError, match=r"offsets\.npy is not a plain numpy array \(its header " + msg):
        _read_npy_ints(p, 3)


@pytest.mark.parametrize("content, msg", [
    (b"\x93NUMPY\x09\x00", r"format version 9|version"),
    (b"not numpy at all", r"not a plain numpy array"),
    (b"", r"not a plain numpy array"),
])
def test_offsets_that_are_not_npy_are_refused(tmp_path, content, msg):
    p = tmp_path / "offsets.npy"
    p.write_bytes(content)
    with pytest.raises(IndexFormatError, match=msg):
        _read_npy_ints(p, 3)


def test_offsets_larger_than_the_rows_allow_are_refused_unread(tmp_path):
    p = tmp_path / "offsets.npy"
    np.save(p, np.zeros(20000, "<i8"))  # 160 kB: more than 3 offsets and a header can take
    with pytest.raises(IndexFormatError, match=r"offsets\.npy is \d+ bytes, more than the 65560"):
        _read_npy_ints(p, 3)


def test_bergson_per_token_index_still_opens_and_maps_rows(tmp_path):
    d = _bergson(tmp_path / "b", True)
    ix = GradientIndex.open(d)
    assert ix.per_token and len(ix) == 5
    want = np.fromfile(d / "gradients.bin", np.float32).reshape(5, 5)
    s, i = ix.search(torch.from_numpy(want[3:4].copy()), 1)
    assert i.flatten().tolist() == [3]
