"""Triton kernels for CUDA tensors, one module per family (run on CPU tensors under TRITON_INTERPRET=1)."""


def interpreting() -> bool:
    """True when Triton runs its interpreter: Triton's own reading of TRITON_INTERPRET (kernels then pick
    interpreter-safe modes, e.g. fp32 dots instead of bf16 ones)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


def _first_tensor(args, kwargs):
    import torch

    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, torch.Tensor):
                    return t
    return None


def on_tensor_device(fn):
    """Decorator for a launcher: the device of its first tensor argument (or first tensor of a list argument),
    when a CUDA one, is made current for the call. Triton launches on the current device (and that device's
    current stream), not on the tensors' device, so without it a tensor on another GPU than the current one is
    handed to a kernel running on the wrong device (the CUDA C++ kernels take a CUDAGuard for the same reason).
    CPU tensors (the interpreter): no change. Idempotent."""
    import functools

    if getattr(fn, "_gk_on_tensor_device", False):
        return fn

    @functools.wraps(fn)
    def launcher(*args, **kwargs):
        t = _first_tensor(args, kwargs)
        if t is not None and t.is_cuda:
            import torch

            with torch.cuda.device(t.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    launcher._gk_on_tensor_device = True
    return launcher


def op_check(family: str, name: str):
    """The op's argument check, ``check_<name>`` (schema arguments, raising as the C++ kernels' checks do):
    from gradkit.ops.<family> where that module exists (projection, search, obs), else from gradkit.ops; None
    when there is none (tests/test_triton_checks.py requires one for every launcher)."""
    import importlib

    try:
        mod = importlib.import_module(f"gradkit.ops.{family}")
    except ModuleNotFoundError:
        mod = importlib.import_module("gradkit.ops")
    return getattr(mod, f"check_{name}", None)


def cuda_kernel(family: str, name: str):
    """What gradkit._ext.register_triton_for_cuda registers as ``gradkit::<name>``'s CUDA kernel: the op's check
    (op_check), then ``gradkit.kernels.triton.<family>.<name>`` on its tensors' GPU. Direct torch.ops calls skip
    the Python wrappers, and the launchers themselves check little (the kernels read by pointer and size): without
    the check a bad call would read or write out of bounds where the C++ kernels raise. Raises LookupError when the
    op has no check."""
    import functools
    import importlib

    fn = getattr(importlib.import_module(f"gradkit.kernels.triton.{family}"), name)
    check = op_check(family, name)
    if check is None:
        raise LookupError(f"gradkit::{name}: no check_{name} for its Triton launcher")

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        check(*args, **kwargs)
        return fn(*args, **kwargs)

    return on_tensor_device(checked)
