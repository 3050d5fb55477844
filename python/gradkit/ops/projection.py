"""Op wrappers, validation and fake impls for the projection family (schemas in csrc/ops.cpp).

Entry ``(row, col)`` of a projection matrix R (k x D) is a pure function of ``(seed, row, col)``
(see ``gradkit.kernels.reference.projection`` for the exact definition): Rademacher entries
``+-1/sqrt(k)`` are bit-identical on every backend, Gaussian ``N(0,1)/sqrt(k)`` within 1 ulp of fp32.

* ``projection_matrix(rows, cols, seed, kind, k, row0, col0, dtype, device)`` -> (rows, cols):
  ``R[row0:row0+rows, col0:col0+cols]`` (a new tensor; ``projection_matrix_`` fills one).
* ``project_flat(x, k, seed, kind, col0)``: x (B, Dc) fp32/fp16/bf16/fp64 ->
  ``x @ R[:, col0:col0+Dc]^T`` (B, k) fp32, R generated inside the matrix-product tiles.

``kind``: 0 = Rademacher, 1 = Gaussian. ``seed``: a non-negative 63-bit integer.
NaN / Inf in x propagate to the outputs they touch (no check: it would cost a pass over x). Finite x
near float32's limit: a sum past its range is +-inf; the Triton Rademacher kernel sums the +-1 products
and applies 1/sqrt(k) once at the end, so it reaches inf sooner (at sqrt(k) times smaller sums) than
the reference and the CPU kernel. (The CPU sign-table path sums the same way, and projects rows whose outputs
are not finite again through its GEMM path, which multiplies by the scaled entries: on CPU whether a row's
outputs overflow does not depend on its batch; their float32 rounding may, by a few ulps, since the path taken
and the blocking depend on B.) float64 x: rows holding finite values past float32's range, or whose largest
entry is nonzero and under 2^-100, are divided by a power of two before the kernels convert them to float32 and
their outputs multiplied back (csrc/project_wide.h), so +v and -v cancel instead of meeting as inf - inf = NaN,
and tiny values are not flushed to zero; other rows are untouched.
"""
from __future__ import annotations

import torch

from gradkit import _ext
from gradkit.ops import (_check_typed, _check_writable, _fake_check, _impl, _int, _native, _wrote, gpu_auto,
                         gpu_composite, loop_vmap_staticmethod, register_loop_vmap, transforms_active, triton_family)

__all__ = ["PROJECTION_OPS", "projection_matrix", "projection_matrix_", "project_flat", "factored_project"]

PROJECTION_OPS = ("projection_matrix_", "project_flat", "factored_project")
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_SEED = 2 ** 63


def _check_gen(seed, kind, k) -> tuple:
    seed, kind, k = _int(seed, "seed"), _int(kind, "kind"), _int(k, "k")
    if k <= 0:
        raise ValueError(f"k: must be positive, got {k}")
    if not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed: must be a non-negative 63-bit integer, got {seed}")
    if kind not in (0, 1):
        raise ValueError(f"kind: expected 0 (rademacher) or 1 (gaussian), got {kind}")
    return seed, kind, k


def check_projection_matrix_(out, seed, kind, k, row0, col0) -> tuple:
    """projection_matrix_'s checks (the op wrapper's and the Triton launcher's: the CPU / CUDA C++ kernels check
    the same in C++); returns (seed, kind, k, row0, col0) as ints."""
    seed, kind, k = _check_gen(seed, kind, k)
    row0, col0 = _int(row0, "row0"), _int(col0, "col0")
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a tensor, got {type(out).__name__}")
    if out.dim() != 2:
        raise ValueError(f"out: expected a 2-D tensor (rows, cols), got shape {tuple(out.shape)}")
    if not out.dtype.is_floating_point:
        raise TypeError(f"out: expected a floating dtype, got {out.dtype}")
    if row0 < 0:
        raise ValueError(f"row0: must be non-negative, got {row0}")
    if col0 < 0:
        raise ValueError(f"col0: must be non-negative, got {col0}")
    if row0 + out.shape[0] >= _MAX_SEED or col0 + out.shape[1] >= _MAX_SEED:
        raise ValueError("row0/col0: the range must stay below 2^63")
    if out.numel():
        _check_writable([out], "out")
    return seed, kind, k, row0, col0


def projection_matrix_(out: torch.Tensor, seed: int, kind: int, k: int, row0: int = 0, col0: int = 0) -> torch.Tensor:
    """Fill ``out`` (rows, cols), any float dtype, with ``R[row0:row0+rows, col0:col0+cols]``
    (values defined in fp32, scale ``1/sqrt(k)``, then cast to out's dtype). Returns ``out``."""
    seed, kind, k, row0, col0 = check_projection_matrix_(out, seed, kind, k, row0, col0)
    if out.numel():
        fn = _impl("projection_matrix_", "projection")
        fn(out, seed, kind, k, row0, col0)
        _wrote([out], fn)
    return out


def projection_matrix(rows: int, cols: int, seed: int, kind: int, k: int, row0: int = 0, col0: int = 0,
                      dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """A new (rows, cols) tensor holding ``R[row0:row0+rows, col0:col0+cols]`` (scale 1/sqrt(k))."""
    rows, cols = _int(rows, "rows"), _int(cols, "cols")
    if rows < 0:
        raise ValueError(f"rows: must be non-negative, got {rows}")
    if cols < 0:
        raise ValueError(f"cols: must be non-negative, got {cols}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype}")
    _check_gen(seed, kind, k)
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    return projection_matrix_(out, seed, kind, k, row0, col0)


def check_project_flat(x, k, seed, kind, col0) -> tuple:
    """project_flat's checks (the op wrapper's and the Triton launcher's); returns (seed, kind, k, col0)."""
    seed, kind, k = _check_gen(seed, kind, k)
    col0 = _int(col0, "col0")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor (B, D), got shape {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x: expected float32/float16/bfloat16/float64, got {x.dtype}")
    if col0 < 0:
        raise ValueError(f"col0: must be non-negative, got {col0}")
    if col0 + x.shape[1] >= _MAX_SEED:
        raise ValueError("col0: col0 + D must stay below 2^63")
    return seed, kind, k, col0


def project_flat(x: torch.Tensor, k: int, seed: int, kind: int = 0, col0: int = 0) -> torch.Tensor:
    """``x (B, Dc) @ R[:, col0:col0+Dc]^T`` -> (B, k) fp32 (fp32 accumulation; R never stored).

    CUDA tensors under the default backend run the Triton kernel (tensor cores): bf16 / fp16 x exactly
    (+-1 products, fp32 sums); fp32 x as three bf16 parts, relative error against float64 of 1e-5 to a few
    1e-4 on an H200, growing with D per program (the CUDA C++ kernel, ``GRADKIT_BACKEND=native``: about
    3e-6, 7x slower; benchmarks/GPU-NOTES.md)."""
    seed, kind, k, col0 = check_project_flat(x, k, seed, kind, col0)
    fn = _impl("project_flat", "projection")
    if kind == 0 and x.dtype != torch.float64 and gpu_auto(x):
        tri = triton_family("projection")
        if tri is not None:  # H200: 1.27 ms (bf16 x) / 2.24 ms (fp32 x) against the CUDA C++ kernel's 15.3
            fn = tri.project_flat
    if _needs_wrap(fn, x) or transforms_active():
        return _ProjectFlatFn.apply(fn, x, k, seed, kind, col0)
    return fn(x, k, seed, kind, col0)


def check_factored_project(a, g, lt, rt, rb, mask, T) -> int:
    """factored_project's checks (the op wrapper's and the Triton launcher's; csrc/factored_checks.h for the
    C++ kernels); returns T as an int."""
    _check_typed((("a", a),), (torch.float32, torch.bfloat16, torch.float16))
    _check_typed((("g", g),), a.dtype, ("a", a.device))
    _check_typed((("lt", lt), ("rt", rt)), torch.float32, ("a", a.device))
    for nm, t in (("a", a), ("g", g), ("lt", lt), ("rt", rt)):
        if t.dim() != 2:
            raise ValueError(f"{nm}: expected a 2-D tensor, got shape {tuple(t.shape)}")
    T = _int(T, "T")
    N, I = a.shape
    if g.shape[0] != N:
        raise ValueError(f"g: expected {N} rows (those of a), got {g.shape[0]}")
    O = g.shape[1]
    if lt.shape[0] != O or lt.shape[1] < 1:
        raise ValueError(f"lt: expected shape ({O}, p >= 1), got {tuple(lt.shape)}")
    p = lt.shape[1]
    if tuple(rt.shape) != (I, p):
        raise ValueError(f"rt: expected shape ({I}, {p}), got {tuple(rt.shape)}")
    if T < 1 or N % T:
        raise ValueError(f"T: expected >= 1 dividing the {N} rows, got {T}")
    if rb is not None:  # a wrong type or dtype is a TypeError, as in the C++ checks (csrc/factored_checks.h)
        _check_typed((("rb", rb),), torch.float32)
        if tuple(rb.shape) != (p,):
            raise ValueError(f"rb: expected a float32 tensor of shape ({p},), got {tuple(rb.shape)}")
        if rb.device != a.device:
            raise ValueError(f"rb: on {rb.device} but a is on {a.device}")
    if mask is not None:
        _check_typed((("mask", mask),), torch.bool)
        if tuple(mask.shape) != (N,):
            raise ValueError(f"mask: expected a bool tensor of shape ({N},), got {tuple(mask.shape)}")
        if mask.device != a.device:
            raise ValueError(f"mask: on {mask.device} but a is on {a.device}")
    return T


def factored_project(a: torch.Tensor, g: torch.Tensor, lt: torch.Tensor, rt: torch.Tensor,
                     rb: torch.Tensor | None = None, mask: torch.Tensor | None = None, T: int = 1) -> torch.Tensor:
    """Projected per-example gradients of a Linear layer, G never formed: (B, p, p) float32.

    a (N, I), g (N, O) float32, bfloat16 or float16 (the same dtype; half precision is widened exactly to
    float32 as it is read: the same bits as passing ``a.float(), g.float()``), N = B * T tokens
    example-major (unit column stride; any row stride);
    lt = L^T (O, p), rt = R^T (I, p) float32; rb (p,) float32 or None: the bias column's projection,
    added to every token's ``a_t R^T``; mask (N,) bool or None: False tokens contribute nothing (NaN
    there included). ``out[b] = sum_t (g_t L^T)^T (a_t R^T + rb) = L G_b R^T`` with
    ``G_b = sum_t g_t a_t^T`` (+ the bias column).
    """
    T = check_factored_project(a, g, lt, rt, rb, mask, T)
    if gpu_composite(a):  # H200: cuBLAS products 0.07 ms, CUDA C++ kernel 0.91, Triton 0.10 (1000^2, 64 x 128, p 16)
        from gradkit.kernels import composite

        if transforms_active():  # one call per example under vmap, as the op (and the bits of a loop)
            return _FactoredFn.apply(composite.factored_project, a, g, lt, rt, rb, mask, T)
        return composite.factored_project(a, g, lt, rt, rb, mask, T)  # plain torch: autograd as it is
    fn = _impl("factored_project", "projection")
    if _needs_wrap(fn, a, g, lt, rt, rb) or transforms_active():
        return _FactoredFn.apply(fn, a, g, lt, rt, rb, mask, T)
    return fn(a, g, lt, rt, rb, mask, T)


# ---- autograd ---------------------------------------------------------------------------------------
# project_flat is linear in x: grad_x = grad_out @ R[:, col0:col0+D], R generated again in column chunks
# (at most _GRAD_CHUNK_ELEMS entries of R at a time, never the whole k x D matrix). factored_project is
# bilinear: with U = g lt, V = a rt (+ rb) (masked tokens zero) and out[b] = U_b^T V_b,
# dU_b = V_b grad_b^T and dV_b = U_b grad_b. seed, kind, k, col0, mask and T get no gradient.
_GRAD_CHUNK_ELEMS = 1 << 22


def _needs_wrap(fn, *ts) -> bool:
    """True where fn is not a dispatcher op (whose autograd is registered below) and a gradient is wanted."""
    if _native(fn):
        return False
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def _project_flat_grad(grad: torch.Tensor, D: int, dtype: torch.dtype, k: int, seed: int, kind: int,
                       col0: int) -> torch.Tensor:
    wd = torch.float64 if dtype == torch.float64 else torch.float32
    grad = grad.to(wd)
    step = max(1, _GRAD_CHUNK_ELEMS // max(k, 1))
    if D == 0:
        return grad.new_zeros((grad.shape[0], D), dtype=dtype)
    # each column chunk's product written into the result, rounded to dtype there (session 43: the products were
    # collected and torch.cat()-ed, so grad_x was resident twice at the peak; the same bits: each entry is one
    # product, rounded once)
    gx = grad.new_empty((grad.shape[0], D), dtype=dtype)
    for c in range(0, D, step):
        cc = min(step, D - c)
        r = projection_matrix(k, cc, seed, kind, k, 0, col0 + c, dtype=wd, device=grad.device)
        gx[:, c:c + cc].copy_(grad @ r)
        del r  # one chunk of R at a time
    return gx


def _factored_grads(grad, a, g, lt, rt, rb, mask, T, need):
    """(grad_a, grad_g, grad_lt, grad_rt, grad_rb), None where need[i] is False."""
    N, p = a.shape[0], lt.shape[1]
    B = N // T
    af, gf = a.float(), g.float()
    if mask is not None:  # where, not a product: NaN in masked tokens must not reach the sums
        keep = mask[:, None]
        af = torch.where(keep, af, 0.0)
        gf = torch.where(keep, gf, 0.0)
    u = gf @ lt
    v = af @ rt
    if rb is not None:
        v = v + rb
    if mask is not None:
        v = torch.where(mask[:, None], v, 0.0)
    grad = grad.float()
    du = torch.bmm(v.view(B, T, p), grad.transpose(1, 2)).reshape(N, p)
    dv = torch.bmm(u.view(B, T, p), grad).reshape(N, p)
    if mask is not None:
        du = torch.where(mask[:, None], du, 0.0)
        dv = torch.where(mask[:, None], dv, 0.0)
    ga = (dv @ rt.T).to(a.dtype) if need[0] else None
    gg = (du @ lt.T).to(g.dtype) if need[1] else None
    glt = (gf.T @ du) if need[2] else None
    grt = (af.T @ dv) if need[3] else None
    grb = dv.sum(0) if (need[4] and rb is not None) else None
    return ga, gg, glt, grt, grb


class _ProjectFlatFn(torch.autograd.Function):
    """Autograd around a project_flat that is not the dispatcher op (Triton, reference backends), and around the
    dispatcher op inside torch.func transforms (``gradkit.ops.transforms_active``: torch.func refuses the op's own
    registered autograd). A separate ``setup_context``, as torch.func wants it, and a ``vmap`` running ``fn`` once per
    example (the bits of a loop, on every backend)."""

    @staticmethod
    def forward(fn, x, k, seed, kind, col0):
        return fn(x.detach(), k, seed, kind, col0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, x, k, seed, kind, col0 = inputs
        ctx.meta = (int(x.shape[1]), x.dtype, int(k), seed, kind, col0)

    @staticmethod
    def backward(ctx, grad):
        return None, _project_flat_grad(grad, *ctx.meta), None, None, None, None

    @staticmethod
    def jvp(ctx, _fn, x_t, _k, _seed, _kind, _col0):  # linear in x: the tangent projected
        D, dtype, k, seed, kind, col0 = ctx.meta
        return project_flat(x_t.to(dtype), k, seed, kind, col0)


class _FactoredFn(torch.autograd.Function):
    """Autograd around a factored_project that is not the dispatcher op, and around the dispatcher op inside
    torch.func transforms and around a GPU composite there (as :class:`_ProjectFlatFn`)."""

    @staticmethod
    def forward(fn, a, g, lt, rt, rb, mask, T):
        d = lambda t: None if t is None else t.detach()  # noqa: E731
        return fn(d(a), d(g), d(lt), d(rt), d(rb), mask, T)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, a, g, lt, rt, rb, mask, T = inputs
        ctx.save_for_backward(a, g, lt, rt, rb, mask)
        ctx.T = T

    @staticmethod
    def backward(ctx, grad):
        a, g, lt, rt, rb, mask = ctx.saved_tensors
        gs = _factored_grads(grad, a, g, lt, rt, rb, mask, ctx.T, ctx.needs_input_grad[1:6])
        return (None, *gs, None, None)


_ProjectFlatFn.vmap = loop_vmap_staticmethod(_ProjectFlatFn, "project_flat")
_FactoredFn.vmap = loop_vmap_staticmethod(_FactoredFn, "factored_project")


def _factored_project_fake(a, g, lt, rt, rb, mask, T):
    _fake_check(check_factored_project, a, g, lt, rt, rb, mask, T)
    return a.new_empty((a.shape[0] // T, lt.shape[1], lt.shape[1]), dtype=torch.float32)


def _projection_matrix_fake(out, seed, kind, k, row0, col0):
    _fake_check(check_projection_matrix_, out, seed, kind, k, row0, col0)
    return None


def _project_flat_fake(x, k, seed, kind, col0):
    _fake_check(check_project_flat, x, k, seed, kind, col0)
    return x.new_empty((x.shape[0], k), dtype=torch.float32)


if _ext.LOADED:
    torch.library.register_fake("gradkit::projection_matrix_", _projection_matrix_fake,
                                _stacklevel=_ext.ops_package_stacklevel())
    torch.library.register_fake("gradkit::project_flat", _project_flat_fake, _stacklevel=_ext.ops_package_stacklevel())
    if _ext.has_op("factored_project"):
        torch.library.register_fake("gradkit::factored_project", _factored_project_fake,
                                    _stacklevel=_ext.ops_package_stacklevel())

    def _project_flat_setup(ctx, inputs, output):
        x, k, seed, kind, col0 = inputs
        ctx.meta = (int(x.shape[1]), x.dtype, int(k), seed, kind, col0)

    def _project_flat_backward(ctx, grad):
        return _project_flat_grad(grad, *ctx.meta), None, None, None, None

    torch.library.register_autograd("gradkit::project_flat", _project_flat_backward, setup_context=_project_flat_setup)

    if _ext.has_op("factored_project"):
        def _factored_setup(ctx, inputs, output):
            a, g, lt, rt, rb, mask, T = inputs
            ctx.save_for_backward(a, g, lt, rt, rb, mask)
            ctx.T = T

        def _factored_backward(ctx, grad):
            a, g, lt, rt, rb, mask = ctx.saved_tensors
            gs = _factored_grads(grad, a, g, lt, rt, rb, mask, ctx.T, ctx.needs_input_grad[:5])
            return (*gs, None, None)

        torch.library.register_autograd("gradkit::factored_project", _factored_backward,
                                        setup_context=_factored_setup)

    # torch.func.vmap: one op call per example, the bits of a loop over the batch (project_flat's float32 rounding
    # may depend on its row count, so the examples' rows are not run as one batch)
    register_loop_vmap(("project_flat", "factored_project"))

    # Triton is the GPU kernel where the extension was built without CUDA C++.
    _ext.register_triton_for_cuda("projection", PROJECTION_OPS)
