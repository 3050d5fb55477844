"""gradkit._io.read_regular: the check that a file is regular is made on the open descriptor, not on the path
before opening it. A FIFO (or device) put in a checked file's place between a path check and the open used to
make the load block for ever (no writer) or never end; a file that grew after its size was read is still
bounded by the limit; and the read allocates by the file's size, not by the limit."""
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from gradkit import _io


def test_a_fifo_swapped_in_after_a_path_check_is_refused_not_read(tmp_path):
    # os.stat lies (says "regular", as it would have said just before the swap): the old check-then-open blocked
    # in open() on a FIFO without a writer; run in a child so a regression fails on the timeout instead of hanging
    fifo = tmp_path / "cfg.json"
    os.mkfifo(fifo)
    code = textwrap.dedent(f"""
        import os, stat, sys
        from gradkit import _io
        real = os.stat
        class Fake:
            st_mode = stat.S_IFREG | 0o644
            st_size = 10
        os.stat = lambda p, *a, **k: Fake() if os.fspath(p) == {str(fifo)!r} else real(p, *a, **k)
        try:
            _io.read_regular({str(fifo)!r}, 1 << 20, "open")
        except ValueError as e:
            print("REFUSED", e)
            sys.exit(0)
        sys.exit(3)
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "REFUSED open: " in r.stdout and "is not a regular file" in r.stdout


def test_a_file_grown_after_fstat_stays_bounded_by_the_limit(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    p.write_bytes(bytes(range(100)))
    real = os.fstat

    class Small:  # fstat as it was before 90 more bytes were appended
        def __init__(self, st):
            self.st_mode, self.st_size = st.st_mode, 10

    monkeypatch.setattr(_io.os, "fstat", lambda fd: Small(real(fd)))
    with pytest.raises(ValueError, match=r"f\.bin is more than the 50 bytes"):
        _io.read_regular(p, 50, "open")
    assert _io.read_regular(p, 200, "open") == bytes(range(100))  # under the limit: all of it


def test_sizes_and_errors(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * 64)
    assert _io.read_regular(p, 64, "w") == b"x" * 64
    assert _io.read_regular(p, _io.NO_LIMIT, "w") == b"x" * 64  # no up-front allocation of the limit
    with pytest.raises(OSError, match=r"^w: .*f\.bin is 64 bytes, more than the 63"):
        _io.read_regular(p, 63, "w", OSError)
    with pytest.raises(ValueError, match=r"^w: cannot read .*missing"):
        _io.read_regular(tmp_path / "missing", 10, "w")
    with pytest.raises(ValueError, match=r"^w: .* is not a regular file"):
        _io.read_regular(tmp_path, 10, "w")
    if os.path.exists("/dev/zero"):
        with pytest.raises(ValueError, match="is not a regular file"):
            _io.read_regular("/dev/zero", 10, "w")


def test_open_regular_closes_what_it_refuses(tmp_path):
    """open_regular (torch.load of a GoldenParams file reads through it): the open file of a regular file, a clear
    error otherwise, and no descriptor left open by a refusal."""
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    with _io.open_regular(p, "path") as f:
        assert f.read() == b"abc"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    before = len(os.listdir("/proc/self/fd"))
    for bad in (fifo, tmp_path):
        with pytest.raises(ValueError, match=r"^path: .* is not a regular file"):
            _io.open_regular(bad, "path")
    assert len(os.listdir("/proc/self/fd")) == before


def test_goldenparams_file_swapped_for_a_fifo_is_refused(tmp_path):
    from gradkit.golden import load_goldenparams

    fifo = tmp_path / "g.pt"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"^path: .*g\.pt is not a regular file"):
        load_goldenparams(str(fifo))


def test_parammap_save_reads_an_existing_config_through_read_regular(tmp_path, monkeypatch):
    """ParamMap.save merges into an existing config.json: read as load() reads it. A FIFO in its place after the
    isfile check (isfile made to say yes, as it would have just before the swap) is refused, not waited on; a
    config that is not JSON is refused and left as it was; one over 64 MiB is refused unread."""
    import torch
    from gradkit.parammap import ParamMap

    pm = ParamMap({"w": {"shape": (3,), "repr": "mask", "mask": torch.tensor([True, False, True])}})
    d = tmp_path / "m"
    d.mkdir()
    cfg = d / "config.json"
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match=r"^directory: .*config\.json is not valid JSON .*refusing to overwrite it$"):
        pm.save(d)
    assert cfg.read_text() == "{not json"
    with open(cfg, "wb") as f:
        f.truncate((1 << 26) + 1)
    with pytest.raises(ValueError, match=r"config\.json is 67108865 bytes, more than the 67108864 .*refusing"):
        pm.save(d)
    cfg.unlink()
    os.mkfifo(cfg)
    real = os.path.isfile
    monkeypatch.setattr(os.path, "isfile", lambda p: True if os.fspath(p) == str(cfg) else real(p))
    stop = threading.Event()

    def writer():  # a regression opens the FIFO and blocks: feed it, so the test fails instead of hanging
        while not stop.wait(0.05):
            try:
                fd = os.open(cfg, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while nothing reads it
            except OSError:
                continue
            os.write(fd, b"{}")
            os.close(fd)
            return

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        with pytest.raises(ValueError, match=r"^directory: .*config\.json is not a regular file; refusing to "
                                             "overwrite"):
            pm.save(d)  # before: open() blocked on the FIFO until a writer came
    finally:
        stop.set()
        t.join()
    monkeypatch.undo()
    cfg.unlink()
    pm.save(d)
    assert ParamMap.load(d).names == pm.names
