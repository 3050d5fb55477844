"""Without triton installed (its optional extra): GRADKIT_BACKEND=triton says what is missing, and `gradkit info`
does not claim Triton kernels. Run in a subprocess where `import triton` fails."""
import os
import subprocess
import sys
import textwrap

_BLOCK = "import sys; sys.modules['triton'] = None\n"  # `import triton` raises ModuleNotFoundError


def _run(code: str, **env):
    e = {**os.environ, **env}
    e.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", _BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          env=e, timeout=120)


def test_triton_backend_without_triton_names_what_is_missing():
    r = _run("""
        import torch
        from gradkit import ops
        try:
            ops.gather_segments([torch.ones(3)], [None])
        except ModuleNotFoundError as e:
            print("ERR", e)
        """, GRADKIT_BACKEND="triton")
    assert r.returncode == 0, r.stderr
    assert "ERR GRADKIT_BACKEND=triton: the Triton kernels need triton, which is not installed" in r.stdout


def test_info_without_triton_says_so():
    r = _run("from gradkit.cli import main; main(['info'])")
    assert r.returncode == 0, r.stderr
    assert "triton: not installed" in r.stdout
    assert "Triton project_flat" not in r.stdout
    r = _run("from gradkit.cli import main; main(['info'])", GRADKIT_BACKEND="triton")
    assert "triton is not installed: every op will refuse" in r.stdout, r.stdout
