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
