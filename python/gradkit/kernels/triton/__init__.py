"""Triton kernels for CUDA tensors, one module per family (run on CPU tensors under TRITON_INTERPRET=1)."""


def interpreting() -> bool:
    """True when Triton runs its interpreter: Triton's own reading of TRITON_INTERPRET (kernels then pick
    interpreter-safe modes, e.g. fp32 dots instead of bf16 ones)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)
