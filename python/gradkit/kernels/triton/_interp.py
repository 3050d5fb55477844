"""A faster Triton interpreter (TRITON_INTERPRET=1) for gradkit's own CPU runs of its Triton kernels: the test
suite, the AOT check's record phase and the GPU benchmark's CPU smoke run.

Triton 3.x's interpreter patches ``triton.language`` for each launch (``GridExecutor.__call__``: every builtin
replaced by an interpreted one, restored afterwards) and then again at *every call of a nested @triton.jit
function* inside the kernel (``InterpretedFunction.__call__``), once per program instance: an
``inspect.getmembers`` walk over ``tl``, ``tl.tensor``, ``tl.math`` and ``tl.core`` each time, whose scope is
then dropped. The launch's own patch is still in force there, so for a helper that sees the same language
modules the second walk changes nothing: in the AOT check's record phase it was ~40% of the time (60,205 nested
patches, 107 of 257 profiled seconds).

``fast_nested_calls()`` wraps the interpreter's ``_patch_lang`` so that a nested call whose language modules the
enclosing launch has already patched skips the walk; a launch (the outermost call) and a nested helper that sees
a language module the launch did not are patched exactly as before. Results are unchanged (tests/
test_triton_interp.py runs kernels with nested helpers both ways). Where the interpreter's internals differ from
what this expects (another Triton), it does nothing and returns False.
"""
from __future__ import annotations

import inspect

# active: the language modules the launch in progress patched, or None; orig: triton's own _patch_lang, once the
# wrapper is installed
_STATE = {"active": None, "orig": None}


def fast_nested_calls() -> bool:
    """Install the wrapper (once); True when it is in place."""
    if _STATE["orig"] is not None:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except Exception:  # noqa: BLE001 - no triton: nothing to speed up
        return False
    orig = getattr(interp, "_patch_lang", None)
    scope_cls = getattr(interp, "_LangPatchScope", None)
    if orig is None or scope_cls is None or not hasattr(scope_cls, "restore"):
        return False
    try:  # the two call sites this relies on: the launch patches and restores, a nested call patches
        launch = inspect.getsource(interp.GridExecutor.__call__)
        nested = inspect.getsource(interp.InterpretedFunction.__call__)
    except (AttributeError, OSError, TypeError):
        return False
    if "_patch_lang(self.fn)" not in launch or "restore()" not in launch or "_patch_lang(self.fn)" not in nested:
        return False

    seen = {}  # fn -> the language modules its globals hold (a module's imports do not change once loaded)

    def langs_of(fn):
        got = seen.get(fn)
        if got is None:
            got = seen[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                       if inspect.ismodule(v) and v in (tl, tl.core))
        return got

    def patch_lang(fn):
        active = _STATE["active"]
        mine = langs_of(fn)
        if active is not None and mine and mine <= active:
            return scope_cls()  # inside a launch that already patched these modules: nothing to do
        scope = orig(fn)
        if active is None:  # the launch: track its modules until its scope is restored
            _STATE["active"] = set(mine)
            restore = scope.restore

            def restore_and_end():
                _STATE["active"] = None
                restore()

            scope.restore = restore_and_end
        else:  # a nested helper that sees another language module: patched (as before), then known
            active |= mine
        return scope

    interp._patch_lang = patch_lang
    _STATE["orig"] = orig
    return True


def exact_bfloat16_casts() -> bool:
    """Make the interpreter round float32 -> bfloat16 conversions to nearest, ties to even, as the GPU does.

    Triton 3.x's interpreter converts float32 to bfloat16 by truncating the mantissa (``cast_impl`` passes no
    rounding mode to ``_convert_float``; its ``rtne`` mode rounds half up without carrying into the exponent), while
    on the GPU ``x.to(tl.bfloat16)`` is ``cvt.rn.bf16.f32``: round to nearest even, overflow to inf. So a kernel
    storing bfloat16 under TRITON_INTERPRET=1 gave other bits than on a GPU and than torch's ``.to(torch.bfloat16)``
    (session 43: ``projection_matrix_`` into a bfloat16 out gave 0.5742 for 1/sqrt(3), not 0.5781). The
    replacement converts with torch's float32 -> bfloat16 cast for the default and ``rtne`` modes and cuts the low 16
    bits for ``rtz`` (the interpreter's own ``rtz`` mangled subnormals); other conversions are unchanged. Where the interpreter's internals differ
    from what this expects (another Triton), it does nothing and returns False."""
    if _STATE.get("bf16"):
        return True
    try:
        import numpy as np
        import torch
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except Exception:  # noqa: BLE001 - no triton: nothing to fix
        return False
    builder = getattr(interp, "InterpreterBuilder", None)
    handle = getattr(interp, "TensorHandle", None)
    rounding = getattr(getattr(interp, "_ir", None), "ROUNDING_MODE", None)
    if builder is None or handle is None or rounding is None or not hasattr(builder, "cast_impl") \
            or not hasattr(builder, "create_fp_to_fp"):
        return False
    cast_orig, fp_orig = builder.cast_impl, builder.create_fp_to_fp

    def to_bf16(src):
        x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
        return handle(x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return to_bf16(src)
        return cast_orig(self, src, dst_type)

    def to_bf16_rtz(src):  # the float32 bits with the low 16 cut (the interpreter's own rtz mangles subnormals)
        x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
        cut = (x.view(torch.int32) >> 16).to(torch.int16)
        cut = torch.where(x.isnan(), x.to(torch.bfloat16).view(torch.int16), cut)  # NaN stays NaN
        return handle(cut.numpy().view(np.uint16), tl.bfloat16)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return to_bf16_rtz(src) if rounding_mode == rounding.RTZ else to_bf16(src)
        return fp_orig(self, src, dst_type, rounding_mode)

    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    _STATE["bf16"] = True
    return True
