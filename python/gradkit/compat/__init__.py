"""Drop-in accelerators for the reference research libraries."""
