"""Make TVMScript parsing affordable in a process that has PyTorch loaded.

``@T.prim_func`` calls ``inspect.stack()``, which looks up the source file of every frame on the
stack and, per frame, scans all of ``sys.modules``: with torch imported that is 0.2-0.4 s per
parsed function, and meta_schedule's first task parses TVM's whole tensor-intrinsic library (251
functions: measured 108 s here). TVMScript only reads each frame object and the source line of the
third frame, so a stack that computes exactly that is equivalent and takes microseconds.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator

SOURCE_FRAMES = 3  # TVMScript reads code_context of frames[2] (is_defined_in_class)


def _stack(context: int = 1) -> list[inspect.FrameInfo]:
    frame, out = sys._getframe(1), []
    while frame is not None:
        if len(out) < SOURCE_FRAMES:
            info = inspect.getframeinfo(frame, context)
            out.append(inspect.FrameInfo(frame, *info[:5], positions=info.positions))
        else:
            code = frame.f_code
            out.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None))
        frame = frame.f_back
    return out


@contextlib.contextmanager
def fast_parsing() -> Iterator[None]:
    """Within the block, ``inspect.stack`` skips source lookups beyond the frames TVMScript reads."""
    original = inspect.stack
    inspect.stack = _stack
    try:
        yield
    finally:
        inspect.stack = original


def install_fast_parsing() -> None:
    """For a worker process of our own (meta_schedule's builder and runner pools): patch for good."""
    inspect.stack = _stack


def load_tensor_intrinsics() -> None:
    """Import TVM's tensor-intrinsic library (meta_schedule needs it) with fast parsing."""
    with fast_parsing():
        import tvm.s_tir.tensor_intrin  # noqa: F401
