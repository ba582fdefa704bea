"""Operands that end right before an unmapped page: a kernel loading past their end faults the test."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import tvm

_REGIONS: list[mmap.mmap] = []  # kept for the process: TVM tensors point into them


def at_page_end(arr: np.ndarray, slack: int = 0) -> tvm.runtime.Tensor:
    """``arr`` copied to end right before a PROT_NONE page (within 63 bytes of it: TVM wants the
    start 64-byte aligned; ``slack``: that many bytes more, for a documented overshoot), as a CPU
    tensor."""
    body = -(-(arr.nbytes + slack) // mmap.PAGESIZE) * mmap.PAGESIZE
    region = mmap.mmap(-1, body + mmap.PAGESIZE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(base + body), mmap.PAGESIZE, 0) == 0
    start = (body - arr.nbytes - slack) // 64 * 64
    view = np.frombuffer(region, np.uint8, arr.nbytes, start).view(arr.dtype).reshape(arr.shape)
    view[...] = arr
    _REGIONS.append(region)
    return tvm.runtime.from_dlpack(view)
