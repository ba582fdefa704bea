"""Kernel classes: which integer containers and accumulator compute a word length exactly.

The mapping from word length to class is data (``KERNEL_CLASSES``), not code: a later tuner may
reorder it per device. Accumulators are chosen from the worst-case bound
``K * 2**(wl_x-1) * 2**(wl_w-1)`` plus the shifted bias, so integer kernels never overflow.
"""

from __future__ import annotations

from dataclasses import dataclass

from marvin_compile.fixed_point import check_precision


@dataclass(frozen=True)
class KernelClass:
    """A compiled-variant family: every wl in [min_wl, max_wl] runs the same code, fl at runtime."""

    name: str
    min_wl: int
    max_wl: int
    container: str  # dtype holding quantized inputs and weights ("float32" for the float class)

    @property
    def is_integer(self) -> bool:
        return self.container != "float32"

    def accumulator(self, reduction: int) -> str:
        """The narrowest accumulator that cannot overflow for a reduction of length K."""
        if not self.is_integer:
            return "float32"
        product = 2 ** (self.max_wl - 1) * 2 ** (self.max_wl - 1)
        bias = 2 ** (self.max_wl - 1) * 2 ** (self.max_wl - 1)  # |b| << fl with fl < wl
        bound = reduction * product + bias + 2**self.max_wl  # + rounding offset
        for acc in ("int32", "int64"):
            if bound < 2 ** (int(acc[3:]) - 1):
                return acc
        raise OverflowError(f"reduction length {reduction} overflows int64 for class {self.name}")


KERNEL_CLASSES: tuple[KernelClass, ...] = (
    KernelClass("int8", 2, 8, "int8"),
    KernelClass("int16", 9, 16, "int16"),
    KernelClass("float32", 17, 32, "float32"),
)
CLASS_BY_NAME = {k.name: k for k in KERNEL_CLASSES}


def class_for_wl(wl: int) -> KernelClass:
    """The kernel class that serves word length wl."""
    check_precision(wl, 0)
    for k in KERNEL_CLASSES:
        if k.min_wl <= wl <= k.max_wl:
            return k
    raise AssertionError(f"no kernel class covers wl={wl}")  # classes cover 2..32
