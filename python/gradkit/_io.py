"""Crash-safe directory writes: a save either fully replaces the files it names or
leaves the previous directory exactly as it was.

How: the new files are written into a hidden staging directory beside the target
(``.<name>.gradkit-XXXX``), together with hard links to every other file the target
already holds (so a model directory keeps its weights). The staging directory is
then swapped in with one atomic ``renameat2(RENAME_EXCHANGE)`` (or a plain
``rename`` when the target does not exist yet), and the old contents are removed.
A crash before the swap leaves the target untouched (plus a hidden staging
directory); there is no moment at which the target holds a mix of old and new
files. Where the file system cannot exchange directories, the files are moved in
one by one with ``os.replace``, ``config.json`` last, and the weaker guarantee is
that a crash in that window is detected on load by the checksums gradkit stores. The same
one-by-one move, from a staging directory inside the target, is used where no directory can
be swapped: a target that is a mount point (a container's volume: rename gives EBUSY, and the
parent is another file system), or one whose parent is not writable. The target keeps its mode,
group and owner (where permitted); a new one gets the mode ``mkdir`` gives under the umask.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import struct
import shutil
import stat as _stat
import zlib
from typing import Callable, Dict

import torch

_AT_FDCWD = -100


NO_LIMIT = 1 << 62  # read_regular's limit for files of any size (weights, checkpoints)


def open_regular(path, what: str, err=ValueError):
    """``path`` (symlinks followed) opened for binary reading, once the open descriptor shows a regular file: a FIFO
    would block a read for ever and a device (a link to /dev/zero) never end. The file is opened first, without
    blocking (a FIFO opens at once), and checked with fstat, so a FIFO or device put in its place after a separate
    path check cannot make a read block for ever or never end. ``err(message naming the file)`` otherwise."""
    try:
        fspath = os.fspath(path)
    except TypeError:  # None, an int (os.open would take a descriptor number), ...: named, not torch's / os's text
        raise TypeError(f"{what}: expected a path (str, bytes or os.PathLike), got {type(path).__name__}") from None
    try:
        fd = os.open(fspath, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (OSError, RuntimeError, ValueError) as e:  # ValueError: an embedded NUL byte
        raise err(f"{what}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise err(f"{what}: cannot read {path}: {e.strerror or e}") from None
    if not _stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise err(f"{what}: {path} is not a regular file")
    return os.fdopen(fd, "rb")


def read_regular(path, limit: int, what: str, err=ValueError) -> bytes:
    """The bytes of the regular file ``path`` (checked on the open file: :func:`open_regular`), refused beyond
    ``limit`` bytes (read with that bound, so a file growing after the check cannot make it read more)."""
    with open_regular(path, what, err) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise err(f"{what}: {path} is {size} bytes, more than the {limit} a file of this kind can hold")
        try:
            # sized by the file, not the limit (a buffered read allocates what it is asked for up front)
            data = f.read(size + 1)
            if len(data) > size:  # it grew after the fstat: the rest, still bounded by the limit
                data += f.read(max(limit + 1 - len(data), 0))
        except OSError as e:
            raise err(f"{what}: cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise err(f"{what}: {path} is more than the {limit} bytes a file of this kind can hold")
    return data


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(f"the key {dup!r} appears twice in one object (JSON readers differ on which value counts)")
    return out


def parse_json(data: bytes, path, what: str, err=ValueError):
    """JSON text of ``path`` (UTF-8) parsed; damaged, too deeply nested or too large -> ``err`` naming the file.
    An object holding one key twice is damaged too (Python keeps the last value, other readers the first)."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (RecursionError, MemoryError):
        raise err(f"{what}: {path} is nested too deeply or too large to be a file of this kind") from None
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, a duplicate key, an integer of > 4300 digits
        raise err(f"{what}: {path} is not valid JSON ({e}); the file is damaged") from None


_RENAME_EXCHANGE = 2


def _fsync_dir(path) -> None:
    """fsync a directory (a rename or a new name in it durable), where the platform allows; never raises."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths; False when the platform or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), b)


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, copy_function=_link_or_copy, symlinks=True)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _mkstage(base: str, where: str) -> str:
    """A new hidden staging directory ``.<base>.gradkit-XXXXXXXX`` in ``where``, made by ``mkdir`` with mode 0o777
    under the umask: the mode a directory made by the caller would have (``tempfile.mkdtemp``'s 0o700 became the
    target's mode when the stage was swapped in, so a group-shared model directory turned private)."""
    for _ in range(1000):
        path = os.path.join(where, f".{base}.gradkit-{secrets.token_hex(4)}")
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free staging directory name", where)  # pragma: no cover


def _copy_owner_and_mode(st: os.stat_result, path: str) -> None:
    """Give directory ``path`` the owner, group and mode ``st`` recorded (owner and group where permitted; the mode
    after them, since a change of owner clears set-id bits)."""
    for uid in ((st.st_uid, -1) if hasattr(os, "chown") else ()):
        try:
            os.chown(path, uid, st.st_gid)
            break
        except OSError:
            continue
    os.chmod(path, _stat.S_IMODE(st.st_mode))


def write_dir_atomic(target: str, writers: Dict[str, Callable[[str], None]],
                     remove: tuple = (), _hook: Callable[[str], None] | None = None, what: str = "path") -> None:
    """Replace the files ``writers`` names inside directory ``target`` atomically.

    writers: {file name: fn(path) writing that file}. Files of ``target`` that are
    neither written nor listed in ``remove`` are carried over unchanged.
    ``_hook(stage)`` is a test seam called between steps; ``what`` names the argument in errors.
    A symlink ``target`` is followed (the directory it names is replaced, the link stays).
    """
    try:
        target = os.fspath(target)
    except TypeError:
        raise TypeError(f"{what}: expected a path (str or os.PathLike), got {type(target).__name__}") from None
    if isinstance(target, bytes):
        target = os.fsdecode(target)
    target = os.path.realpath(target)  # a link to a directory: swapping the link itself replaced it by a plain copy
    parent, base = os.path.split(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"{what}: {target!r} exists and is not a directory")
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a regular file where a parent directory should be
        raise ValueError(f"{what}: cannot create {target!r}: a part of its parent {parent!r} is not a directory") \
            from None
    existed = os.path.isdir(target)
    # where no directory can be swapped in, the files are moved in one by one from a stage inside the target:
    # a mount point (renaming it gives EBUSY, and a stage beside it is on another file system: every carried file
    # was copied, not linked), or a target whose parent is not writable
    in_place = existed and os.path.ismount(target)
    stage = None
    if not in_place:
        try:
            stage = _mkstage(base, parent)
        except OSError as e:
            if not existed or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            in_place = True
    if in_place:
        stage = _mkstage(base, target)
        os.chmod(stage, 0o700)
    try:
        old_st = os.stat(target) if existed and not in_place else None
        if old_st is not None:
            for name in os.listdir(target):
                if name in writers or name in remove or name.startswith(f".{base}.gradkit-"):
                    continue  # (the last: a stage a killed in-place save left inside the target)
                _link_or_copy(os.path.join(target, name), os.path.join(stage, name))
        for name, write in writers.items():
            path = os.path.join(stage, name)
            write(path)
            fd = os.open(path, os.O_RDONLY)  # (fsync needs no write access: a writer may make its file read-only)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if _hook is not None:
                _hook(f"wrote:{name}")
        if old_st is not None:  # once filled (a read-only target's mode would refuse the new files)
            _copy_owner_and_mode(old_st, stage)
        _fsync_dir(stage)
        if _hook is not None:
            _hook("before-swap")
        if not existed:
            os.rename(stage, target)
        elif in_place or not _exchange(stage, target):  # after an exchange `stage` holds the old contents
            # Fallback without an atomic exchange: move files in, config.json last.
            names = sorted(writers, key=lambda n: n == "config.json")
            for name in names:
                os.replace(os.path.join(stage, name), os.path.join(target, name))
            for name in remove:
                p = os.path.join(target, name)
                if os.path.isfile(p):
                    os.remove(p)
            _fsync_dir(target)
        _fsync_dir(parent)
    finally:
        # Either the unfinished new files (error before the swap) or the old contents (after it).
        if os.path.isdir(stage) and not os.path.islink(stage):
            shutil.rmtree(stage, ignore_errors=True)


_ST_DTYPES = {"torch.int32": "I32", "torch.int64": "I64", "torch.uint8": "U8", "torch.bool": "BOOL",
              "torch.float32": "F32", "torch.float64": "F64", "torch.float16": "F16", "torch.bfloat16": "BF16"}


def write_safetensors(path: str, tensors: Dict[str, torch.Tensor]) -> int:
    """Write CPU tensors in the safetensors format, streaming each tensor's own memory (no
    serialised copy), and return the crc32 of the file's bytes. Readable by safetensors itself
    (and so by GRADIEND): 8-byte little-endian header size, a JSON header padded with spaces
    to 8 bytes, then the tensors back to back in header order."""

    header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
    views, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[str(t.dtype)], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        views.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b""))
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    crc = zlib.crc32(head)
    with open(path, "wb") as f:
        f.write(head)
        for v in views:
            crc = zlib.crc32(v, crc)
            f.write(v)
    return crc
