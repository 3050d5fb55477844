"""Op wrappers, validation and fake impls for the search family (schemas in csrc/ops.cpp)."""
from __future__ import annotations

__all__: list = []
