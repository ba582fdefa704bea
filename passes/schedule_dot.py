"""Schedule of the packed integer kernels (``te_dot``): register-blocked, tensorized, parallel.

The reduction block ``marvin_dot`` is tiled so that ``ob_block x w_block`` accumulator vectors
stay in registers (a ``local`` cache, fully unrolled) while the reduction walks the packed
channels and the kernel window; its innermost (lanes, depth) loops become one dot-product
instruction (``dot_isa``). The tile sizes are the design space the autotuner searches; without
tuning, the defaults below fill about half of the vector register file.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

from marvin_compile.dot_isa import DotISA, dot_isa
from marvin_compile.te_dot import DOT_BLOCK

ACCUMULATOR_REGISTERS = 16  # of 32 zmm / 16 ymm: the rest hold operands


def has_dot_block(func: tirx.PrimFunc) -> bool:
    sch = Schedule(func)
    try:
        sch.get_sblock(DOT_BLOCK)
    except Exception:  # noqa: BLE001 - TVM raises its own ScheduleError
        return False
    return True


def _intrinsic(sch: Schedule, block, isa: DotISA) -> str:
    a_dtype = sch.get(block).reads[0].source.dtype
    return isa.intrinsic("int8" if a_dtype == "uint8" else "int16")


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def default_tiles(ob: int, w: int, lanes: int) -> tuple[int, int]:
    """(ob_block, w_block): as many accumulators as the budget allows, w first (operand reuse)."""
    budget = ACCUMULATOR_REGISTERS if lanes == 16 else ACCUMULATOR_REGISTERS // 2 + 4
    w_block = _largest_divisor(w, budget)
    ob_block = _largest_divisor(ob, max(1, budget // w_block))
    return ob_block, w_block


def _parallel_injective(sch: Schedule, block, parallel_axes: int) -> None:
    loops = sch.get_loops(block)
    outer = sch.fuse(*loops[:parallel_axes]) if parallel_axes > 1 else loops[0]
    sch.parallel(outer)


def schedule_dot(sch: Schedule, isa: DotISA, tune: bool = False) -> None:
    """Schedule a ``te_dot`` PrimFunc in place; ``tune`` samples the tiles (meta_schedule space)."""
    block = sch.get_sblock(DOT_BLOCK)
    intrin = _intrinsic(sch, block, isa)
    n, ob, h, w, oi, cb, kh, kw, p = sch.get_loops(block)
    ob_extent, w_extent = int(sch.get(ob).extent), int(sch.get(w).extent)
    if tune:
        ob_tiles = sch.sample_perfect_tile(ob, n=2, max_innermost_factor=4)
        w_tiles = sch.sample_perfect_tile(w, n=2, max_innermost_factor=16)
    else:
        ob_block, w_block = default_tiles(ob_extent, w_extent, isa.lanes)
        ob_tiles, w_tiles = [None, ob_block], [None, w_block]
    obo, obi = sch.split(ob, ob_tiles)
    wo, wi = sch.split(w, w_tiles)
    sch.reorder(n, obo, h, wo, cb, kh, kw, obi, wi, oi, p)
    cache = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(cache, wo)
    sch.vectorize(sch.get_loops(cache)[-1])
    sch.parallel(sch.fuse(n, obo, h))
    init = sch.decompose_reduction(block, cb)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(oi, intrin)
    sch.unroll(obi)
    sch.unroll(wi)
    for name, axes in (("dot_pack_x", 2), ("dot_pack_w", 2), ("dot_unpack", 2)):
        _parallel_injective(sch, sch.get_sblock(name), axes)


def schedule_dot_func(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """The default (untuned) schedule of one packed kernel for ``target``."""
    isa = dot_isa(target)
    if isa is None:
        raise ValueError(f"target {target} has no integer dot-product instructions")
    sch = Schedule(func)
    schedule_dot(sch, isa)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
