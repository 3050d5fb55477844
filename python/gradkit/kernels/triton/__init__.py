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
