"""Session 35 audit of how gradkit installs and runs from an installed (non-editable) copy: the sdist's file
list, setup.py's CUDA decision, the runtime dependency list, the version string, and what the extension loader
and `gradkit bench` tell a user whose gradkit is not a source checkout.

Every check runs on copies of the package / build files in tmp_path (nothing is built or installed), in a
subprocess where the interpreter must not see the checkout."""
from __future__ import annotations

import ast
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "python", "gradkit")
_IGNORE = shutil.ignore_patterns("*.so", "*.pyd", "*.o", "__pycache__", "*.pyc", "*.egg-info")


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "GRADKIT_REQUIRE_EXT", "GRADKIT_NO_CUDA", "GRADKIT_BACKEND")}
    env.update(extra)
    return env


def _run(code, cwd, timeout=120, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _copy_build_files(dst, *, cuda=True, manifest=True):
    """setup.py, pyproject.toml, README.md, MANIFEST.in, csrc/ and python/gradkit/ (sources only) into dst."""
    for f in ("setup.py", "pyproject.toml", "README.md") + (("MANIFEST.in",) if manifest else ()):
        if os.path.exists(os.path.join(ROOT, f)):
            shutil.copy(os.path.join(ROOT, f), dst / f)
    shutil.copytree(os.path.join(ROOT, "csrc"), dst / "csrc", ignore=_IGNORE)
    if not cuda:
        shutil.rmtree(dst / "csrc" / "cuda")
    shutil.copytree(PKG, dst / "python" / "gradkit", ignore=_IGNORE)


def _build_meta(tmp_path, hook, out):
    """setuptools' PEP 517 ``hook`` (build_sdist, prepare_metadata_for_build_wheel) run on a copy of the build
    files in tmp_path/src, writing into tmp_path/out; the path of what it made."""
    src = tmp_path / "src"
    src.mkdir()
    _copy_build_files(src)
    (tmp_path / out).mkdir()
    r = _run(f"""
        from setuptools import build_meta
        print(build_meta.{hook}({str(tmp_path / out)!r}))
        """, cwd=src)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path / out / r.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------- sdist

def test_sdist_carries_every_kernel_source_and_header(tmp_path):
    """Fixed: without a MANIFEST.in the sdist held only the .cpp files setup.py listed for the machine that made
    it: none of csrc/*.h, csrc/cpu/*.h (every .cpp #includes them: a wheel built from the sdist, e.g.
    `pip install gradkit-0.1.0.tar.gz` or `python -m build`, failed to compile) and, made on a machine without
    CUDA, none of csrc/cuda/*.cu / *.cuh (a CUDA user building it got a CPU-only extension). MANIFEST.in grafts
    csrc/."""
    sdist = _build_meta(tmp_path, "build_sdist", "dist")
    src = tmp_path / "src"
    with tarfile.open(sdist) as tf:
        members = {m.split("/", 1)[1] for m in tf.getnames() if "/" in m}
    wanted = {os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/")
              for d, _, fs in os.walk(src / "csrc") for f in fs}
    assert any(w.endswith(".h") for w in wanted) and any(w.endswith(".cu") for w in wanted)
    missing = sorted(wanted - members)
    assert not missing, f"the sdist lacks {missing}"
    assert not [m for m in members if m.endswith((".so", ".o", ".pyc"))], "binaries in the sdist"
    assert "python/gradkit/kernels/triton/__init__.py" in members and "python/gradkit/obs/driver.py" in members


# ---------------------------------------------------------------------------------------------- setup.py's CUDA choice

def _setup_exts(src, monkeypatch, capsys, cuda):
    """Run src/setup.py in this process with setuptools.setup stubbed: [(name, sources)] of what it would build,
    and what it printed. cuda: pretend torch is a CUDA build and CUDA_HOME is set."""
    import runpy

    import setuptools
    import torch
    from torch.utils import cpp_extension

    got = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: got.update(kw))
    monkeypatch.delenv("GRADKIT_NO_CUDA", raising=False)
    if cuda:
        monkeypatch.setattr(torch.version, "cuda", "12.8")
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/opt/fake-cuda")
    monkeypatch.chdir(src)
    capsys.readouterr()
    runpy.run_path(str(src / "setup.py"), run_name="__main__")
    return [(e.name, sorted(e.sources)) for e in got["ext_modules"]], capsys.readouterr().out


def test_setup_cpu_torch_builds_cpu_kernels_and_says_why(tmp_path, monkeypatch, capsys):
    """A CPU torch (this machine's) builds gradkit._C from the C++ sources only and says why CUDA was skipped."""
    _copy_build_files(tmp_path)
    exts, out = _setup_exts(tmp_path, monkeypatch, capsys, cuda=False)
    assert [e[0] for e in exts] == ["gradkit._C"]
    assert exts[0][1] and not [s for s in exts[0][1] if s.endswith(".cu")]
    assert "skipping CUDA kernels: torch" in out and "CPU build" in out


def test_setup_cuda_torch_without_cuda_sources_names_the_reason(tmp_path, monkeypatch, capsys):
    """Fixed: a CUDA torch with CUDA_HOME but no csrc/cuda/*.cu (an sdist made before MANIFEST.in) built a
    CPU-only extension and printed `skipping CUDA kernels: None`. It now names the missing sources."""
    _copy_build_files(tmp_path, cuda=False)
    exts, out = _setup_exts(tmp_path, monkeypatch, capsys, cuda=True)
    assert not [s for s in exts[0][1] if s.endswith(".cu")]
    assert "skipping CUDA kernels: None" not in out
    assert "skipping CUDA kernels: no CUDA sources in" in out


def test_setup_cuda_torch_with_cuda_home_compiles_the_cuda_sources(tmp_path, monkeypatch, capsys):
    _copy_build_files(tmp_path)
    exts, out = _setup_exts(tmp_path, monkeypatch, capsys, cuda=True)
    cu = sorted(s for s in exts[0][1] if s.endswith(".cu"))
    assert cu == sorted(f"csrc/cuda/{f}" for f in os.listdir(tmp_path / "csrc" / "cuda") if f.endswith(".cu"))
    assert "building CUDA kernels" in out


# ---------------------------------------------------------------------------------------------- metadata vs code

def _pyproject():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_version_string_is_one_version():
    meta = _pyproject()["project"]
    tree = ast.parse(open(os.path.join(PKG, "__init__.py")).read())
    versions = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
                and any(getattr(t, "id", None) == "__version__" for t in n.targets)]
    assert versions == [meta["version"]]


# import name -> distribution name
_DIST = {"yaml": "pyyaml"}
# optional imports, each behind a guard that names what to install: the "triton" extra (only the Triton kernel
# modules import it; gradkit imports those guarded), faiss (search(backend="faiss")), the GRADIEND compat layer's peer
_OPTIONAL = {"triton": ("kernels/triton/",), "faiss": ("index.py",), "gradiend": ("compat/gradiend.py",)}


def _requires(tmp_path, monkeypatch, capsys):
    """setup.py's install_requires (pyproject.toml declares the dependencies dynamic)."""
    import runpy

    import setuptools

    _copy_build_files(tmp_path)
    got = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: got.update(kw))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(tmp_path / "setup.py"), run_name="__main__")
    capsys.readouterr()
    return got["install_requires"]


def test_the_wheel_requires_the_torch_minor_release_it_was_compiled_against(tmp_path):
    """Fixed: the metadata said torch>=2.10, so a wheel compiled against torch 2.13 let pip install or upgrade any
    torch under it, and gradkit._C (torch's C++ ABI changes between releases) then failed to load: a warning and
    the slow reference kernels. The metadata setuptools writes for the wheel now pins the build's minor release,
    local labels (+cpu, +cu128) matching; the other dependencies are unchanged."""
    import torch

    meta = (_build_meta(tmp_path, "prepare_metadata_for_build_wheel", "meta") / "METADATA").read_text()
    reqs = sorted(line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")
                  and "extra ==" not in line)
    major, minor = torch.__version__.split(".")[:2]
    assert reqs == sorted(["numpy", "safetensors>=0.4", "tqdm", "pyyaml", f"torch=={major}.{minor}.*"]), reqs


def test_torch_requirement_strings():
    import runpy

    import setuptools

    ns = {}
    saved = setuptools.setup
    setuptools.setup = lambda **kw: ns.update(kw)
    try:
        mod = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="not_main")
    finally:
        setuptools.setup = saved
    req = mod["torch_requirement"]
    assert req("2.13.0+cpu") == "torch==2.13.*" and req("2.13.1") == "torch==2.13.*"
    assert req("2.14.0a0+git1234") == "torch==2.14.*" and req("3.0.0+cu128") == "torch==3.0.*"


def test_every_third_party_import_is_a_declared_dependency(tmp_path, monkeypatch, capsys):
    """Fixed: gradkit.index imports yaml (PyYAML) to read a bergson index's processor_config.yaml, but pyproject.toml
    did not declare pyyaml (a fresh `pip install` of gradkit does not have it). Without it the index's projection
    silently read as None: search(projection=<the matching processor>) was refused ("the index with None"), a
    query made without a projection was accepted against a projected index, and no UncheckedProjectionWarning was
    given. Every import of a package that is not declared must be one of the guarded optional ones."""
    import re

    assert "dependencies" in _pyproject()["project"]["dynamic"]
    deps = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in _requires(tmp_path, monkeypatch, capsys)}
    assert "torch" in deps
    bad = []
    for d, _, fs in os.walk(PKG):
        for f in fs:
            if not f.endswith(".py"):
                continue
            path = os.path.join(d, f)
            rel = os.path.relpath(path, PKG).replace(os.sep, "/")
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for n in names:
                    top = n.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("gradkit", "__future__"):
                        continue
                    if _DIST.get(top, top) in deps or rel.startswith(_OPTIONAL.get(top, ())):
                        continue
                    bad.append(f"{rel}:{node.lineno}: import {n}")
    assert not bad, f"imports of packages setup.py (install_requires) does not declare: {bad}"


# ---------------------------------------------------------------------------------------------- installed copy

def _installed_copy(tmp_path, with_ext=None):
    """A copy of python/gradkit in tmp_path/site, as pip installs it (no checkout around it); with_ext: the bytes
    of a gradkit/_C<suffix> to put there."""
    site = tmp_path / "site"
    shutil.copytree(PKG, site / "gradkit", ignore=_IGNORE)
    if with_ext is not None:
        (site / "gradkit" / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(with_ext)
    work = tmp_path / "elsewhere"
    work.mkdir()
    return site, work


def test_ext_that_does_not_load_says_which_file_and_to_rebuild_against_this_torch(tmp_path):
    """Fixed: an installed gradkit whose _C is there but does not load (built against another torch: its C++ ABI
    changes between releases) was told to `build it with pip install --no-build-isolation -e .` (an editable
    install of a checkout it may not have), without naming the file or the torch it has to match."""
    site, work = _installed_copy(tmp_path, with_ext=b"not an ELF file")
    r = _run("import gradkit", cwd=work, PYTHONPATH=str(site), GRADKIT_REQUIRE_EXT="1")
    assert r.returncode != 0
    err = r.stderr
    import torch

    assert str(site / "gradkit" / "_C") in err and "does not load" in err
    assert f"torch {torch.__version__}" in err and "--force-reinstall" in err


def test_copy_without_ext_says_it_has_none(tmp_path):
    """Without GRADKIT_REQUIRE_EXT a copy with no _C falls back to the references, and the warning names the copy
    and the (non-editable) build command."""
    site, work = _installed_copy(tmp_path)
    r = _run("import warnings; warnings.simplefilter('always'); import gradkit, gradkit._ext as e; "
             "print('LOADED', e.LOADED)", cwd=work, PYTHONPATH=str(site))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LOADED False" in r.stdout and "falling back" in r.stderr
    assert f"({site / 'gradkit'}) has no compiled extension" in r.stderr
    assert "pip install --no-build-isolation ." in r.stderr


def test_gradkit_bench_from_an_installed_copy_says_where_the_harness_is(tmp_path):
    """Fixed: `gradkit bench` from an installed copy only said `needs a source checkout (benchmarks/run.py not
    found next to the package)`: not where it looked, that an installed gradkit never has it, nor how to run the
    harness against the installed copy. It now says all three, with status 2 and nothing on stdout."""
    site = tmp_path / "site"
    (site / "gradkit").mkdir(parents=True)
    (site / "gradkit" / "__init__.py").write_text("")  # cli.main("bench") imports nothing else of gradkit
    shutil.copy(os.path.join(PKG, "cli.py"), site / "gradkit" / "cli.py")
    work = tmp_path / "elsewhere"
    work.mkdir()
    for args in (["bench", "--help"], ["bench", "--quick"]):
        r = _run(f"import sys; from gradkit.cli import main; sys.exit(main({args!r}))", cwd=work,
                 PYTHONPATH=str(site), timeout=60)
        assert r.returncode == 2 and r.stdout == "", (args, r.stdout, r.stderr)
        err = r.stderr
        assert "Traceback" not in err
        assert str(tmp_path / "benchmarks" / "run.py") in err  # where it looked
        assert "not part of an installed gradkit" in err and "python benchmarks/run.py" in err
        assert "pip install --no-build-isolation -e ." in err
