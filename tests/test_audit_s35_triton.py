"""Audit (session 35) of the Triton launchers (gradkit/kernels/triton/*), on CPU tensors under the Triton
interpreter, against the references and the native ops' rules.

Found: the in-place launchers did not refuse (or work around) arguments that share memory, where the native
kernels do (csrc/overlap.h): on a GPU their programs race, under the interpreter (programs in order) a later
program reads what an earlier one wrote. projection_matrix_ wrote an expand()ed out and could not store the
float8 dtypes the op accepts (Triton has no float8_e8m0fnu; fnuz float8 does not compile for NVIDIA GPUs).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from gradkit.kernels.reference import adamw as RA  # noqa: E402
from gradkit.kernels.reference import parammap as RPM  # noqa: E402
from gradkit.kernels.reference import projection as RP  # noqa: E402
from gradkit.kernels.triton import adamw as TA  # noqa: E402
from gradkit.kernels.triton import interpreting  # noqa: E402
from gradkit.kernels.triton import parammap as TPM  # noqa: E402
from gradkit.kernels.triton import projection as TP  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreting(), reason="needs the Triton interpreter (TRITON_INTERPRET=1)")


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Two elements per program: many programs, run in order by the interpreter."""
    for key in ("gather", "scatter", "zero"):
        monkeypatch.setitem(TPM.BLOCKS, key, 2)


# ============================================================================ projection_matrix_


FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
          torch.float8_e8m0fnu]


def test_projection_matrix_float8_out_goes_through_float32(monkeypatch):
    """DEFECT: out dtypes the op accepts but Triton cannot store on an NVIDIA GPU reached the kernel as its pointer
    type (float8_e8m0fnu: KeyError in Triton itself; the fnuz float8 types: 'type fp8e4b8 not supported in this
    architecture' when compiled for CUDA). Now the kernel only ever gets a float32 / float64 / float16 / bfloat16
    out (checked by intercepting its launches), and the values are the reference's (fp32 cast to out's dtype)."""
    seen = []
    real = TP._matrix_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(out, *a, **kw):
                seen.append(out.dtype)
                return real[grid](out, *a, **kw)
            return launch

    monkeypatch.setattr(TP, "_matrix_kernel", Spy())
    monkeypatch.setattr(TP, "_STAGE_ELEMS", 3 * 40)  # column slices of the float32 buffer
    for dt in FLOAT8:
        for kind in (0, 1):
            got, want = torch.empty(3, 70, dtype=dt), torch.empty(3, 70, dtype=dt)
            TP.projection_matrix_(got, 5, kind, 3, 2, 61)
            RP.projection_matrix_(want, 5, kind, 3, 2, 61)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (dt, kind)
    assert seen and set(seen) == {torch.float32}


def test_projection_matrix_refuses_an_expanded_out():
    """DEFECT: an out covering an element twice (expand()ed) was written (one address per column, its rows' entries
    in program order; on a GPU in any order); the native op and torch's copy_ refuse it. Now a RuntimeError naming
    out, before anything is written."""
    base = torch.full((1, 5), 7.0)
    with pytest.raises(RuntimeError, match=r"^out: unsupported operation: more than one element"):
        TP.projection_matrix_(base.expand(3, 5), 1, 0, 16, 0, 0)
    assert torch.equal(base, torch.full((1, 5), 7.0))
    ok = torch.empty(4, 9)[:, ::2]  # a strided, non-overlapping out is fine
    TP.projection_matrix_(ok, 1, 0, 16, 0, 0)
    assert torch.equal(ok, RP.matrix_values(4, 5, 1, 0, 16))


# ============================================================================ scatter_segments_ / gather_segments_out


def test_scatter_inplace_refuses_destinations_that_share_memory():
    """DEFECT: dst tensors sharing an element (an expand()ed one, overlapping views of one buffer) were written by
    racing programs, or (non-contiguous dst) failed in torch's copy-back with a RuntimeError after dst[0] had been
    written. Now a ValueError naming the later dst (the native op's messages), before anything is written."""
    flat = torch.arange(1.0, 11.0)
    a = torch.zeros(4)
    with pytest.raises(ValueError, match=r"^dst\[1\]: more than one element of the written-to tensor"):
        TPM.scatter_segments_(flat, [None, None], [a, torch.zeros(1, 3).expand(2, 3)], 1.0, False)
    assert torch.equal(a, torch.zeros(4))
    buf = torch.zeros(6)
    with pytest.raises(ValueError, match=r"^dst\[1\]: shares memory with dst\[0\]"):
        TPM.scatter_segments_(torch.arange(1.0, 9.0), [None, None], [buf[:4], buf[2:]], 1.0, False)
    assert torch.equal(buf, torch.zeros(6))
    # the columns of one matrix are distinct elements: accepted, and written as the reference writes them
    w, ref = torch.zeros(3, 2), torch.zeros(3, 2)
    TPM.scatter_segments_(flat[:6], [None, None], [w[:, 0], w[:, 1]], 2.0, False)
    RPM.scatter_segments_(flat[:6], [None, None], [ref[:, 0], ref[:, 1]], 2.0, False)
    assert torch.equal(w, ref)


@pytest.mark.parametrize("index", [None, torch.tensor([0, 1, 2, 3])])
def test_scatter_inplace_reads_flat_before_writing(tiny_blocks, index):
    """DEFECT: flat sharing memory with a dst was read by later programs after earlier ones had overwritten it
    (buf = 1..8, dst = buf[2:6] = buf[0:4] gave 1 2 1 2 1 2, not 1 2 1 2 3 4). Now flat is read from a copy, as the
    native op does: the reference's values."""
    buf = torch.arange(1.0, 9.0)
    want = buf.clone()
    RPM.scatter_segments_(want[:4].clone(), [index], [want[2:6]], 1.0, False)
    TPM.scatter_segments_(buf[:4], [index], [buf[2:6]], 1.0, False)
    assert torch.equal(buf, want)
    assert torch.equal(buf, torch.tensor([1.0, 2, 1, 2, 3, 4, 7, 8]))


@pytest.mark.parametrize("accumulate", [False, True])
def test_gather_out_reads_sources_before_writing(tiny_blocks, accumulate):
    """DEFECT: a source sharing memory with out was read by later programs after earlier ones had written out
    (gather_segments_out(src=[buf[0:4]], out=buf[2:6])). Now that source is read from a copy: the reference's
    values (every value gathered, then written)."""
    buf = torch.arange(1.0, 9.0)
    want = buf.clone()
    RPM.gather_segments_out([want[:4].clone()], [None], want[2:6], accumulate)
    TPM.gather_segments_out([buf[:4]], [None], buf[2:6], accumulate)
    assert torch.equal(buf, want)


# ============================================================================ masked_adamw_


def _adamw_args(p, g, m, v):
    return (p, g, m, v, [None] * len(p), 0.1, 0.1, 0.9, 0.999, 1e-8, 0.0, [0.1] * len(p), [0.1] * len(p), False)


def test_adamw_refuses_tensors_that_share_memory():
    """DEFECT: a parameter listed twice got two steps (under the interpreter; a race on a GPU), a state tensor that
    is also a gradient was read after being written; the native op refuses both. Now a ValueError naming the
    written tensor, before any tensor is touched."""
    p, g = torch.ones(5), torch.ones(5)
    with pytest.raises(ValueError, match=r"^params\[1\]: shares memory with params\[0\]"):
        TA.masked_adamw_(*_adamw_args([p, p], [g, g.clone()], [torch.zeros(5), torch.zeros(5)],
                                      [torch.zeros(5), torch.zeros(5)]))
    assert torch.equal(p, torch.ones(5))
    m = torch.zeros(5)
    with pytest.raises(ValueError, match=r"^exp_avgs\[0\]: shares memory with grads\[0\]"):
        TA.masked_adamw_(*_adamw_args([p], [m], [m], [torch.zeros(5)]))
    assert torch.equal(p, torch.ones(5)) and torch.equal(m, torch.zeros(5))
    # distinct halves of one buffer are distinct tensors: accepted, and updated as the reference updates them
    buf, want = torch.ones(10), torch.ones(10)
    gs = [torch.full((5,), 0.5), torch.full((5,), -2.0)]
    TA.masked_adamw_(*_adamw_args([buf[:5], buf[5:]], gs, [torch.zeros(5), torch.zeros(5)],
                                  [torch.zeros(5), torch.zeros(5)]))
    RA.masked_adamw_(*_adamw_args([want[:5], want[5:]], gs, [torch.zeros(5), torch.zeros(5)],
                                  [torch.zeros(5), torch.zeros(5)]))
    assert torch.equal(buf, want)
