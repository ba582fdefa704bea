"""A generic CPU schedule for the fused kernels: parallel outer loops, vectorized inner loop.

TVM's default CPU pipeline compiles unscheduled loop nests (one thread, scalar code). This rule
gives every reduction kernel (conv, matmul, gradient products) the classic shape: parallel over
the leading spatial axis, producers (padding) computed per parallel iteration, the reduction
loops, then the last spatial axis split and vectorized innermost (a short row no wide vector
divides: vectorized whole, the reduction loops outside it); injective kernels (quantize,
requantize) are flattened, parallelized and vectorized. Packed dot-product kernels get their own
schedules (``schedule_dot``; ``schedule_dot_grad`` for the weight gradient; ``schedule_amx`` for the
layout stages around the AMX tile kernel; ``schedule_norm`` for batch norm's per-channel sums).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

from marvin_compile.passes.schedule_amx import has_amx_block, schedule_amx
from marvin_compile.passes.schedule_dot import has_dot_block, schedule_dot_func, scheduled
from marvin_compile.passes.schedule_dot_grad import has_dot_dw_block, schedule_dot_dw
from marvin_compile.passes.schedule_norm import has_channel_sums_block, schedule_channel_sums
from marvin_compile.passes.utils import MAX_VECTOR, lanes_for, parallel, schedule_injective, static_extent

if TYPE_CHECKING:
    from marvin_compile.tuning import TuningDatabase

SPATIAL, REDUCE = 0, 2  # IterVar kinds
ROW_MIN = 8  # a shorter row vectorized whole ran slower (LeNet-5's second pool, 5 wide: 5.7 -> 11 us)


def _schedule_reduction(sch: Schedule, blocks: list, block) -> None:
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    spatial = [lp for lp, k in zip(loops, kinds, strict=True) if k == SPATIAL]
    reduce = [lp for lp, k in zip(loops, kinds, strict=True) if k == REDUCE]
    if len(spatial) + len(reduce) != len(loops) or not spatial or not reduce:
        return
    extent = static_extent(sch.get(spatial[-1]).extent)
    lanes = lanes_for(extent) if extent is not None and len(spatial) > 1 else None
    inner = None
    if lanes is not None and lanes <= 2 and ROW_MIN <= extent <= MAX_VECTOR:
        # a row no wide vector divides (a max pool's 14 outputs): one vector of the whole row,
        # the window outside it (LeNet-5's first pool at batch 64: 35 -> 27 us)
        sch.reorder(*spatial[:-1], *reduce, spatial[-1])
        inner = spatial[-1]
    elif lanes is not None:
        outer, inner = sch.split(spatial[-1], factors=[None, lanes])
        sch.reorder(*spatial[:-1], outer, *reduce, inner)
    else:
        sch.reorder(*spatial, *reduce)
    parallel(sch, spatial[0], block)
    for producer in blocks[: blocks.index(block)]:
        sch.compute_at(producer, spatial[0])
    if inner is not None:
        sch.vectorize(inner)
    sch.decompose_reduction(block, reduce[0])


def schedule_prim_func(func: tirx.PrimFunc, tuning: TuningDatabase | None = None) -> tirx.PrimFunc:
    if has_dot_block(func):
        tuned = None if tuning is None else tuning.schedule(func)
        return tuned if tuned is not None else schedule_dot_func(func, tvm.target.Target.current())
    if has_dot_dw_block(func):
        return scheduled(func, tvm.target.Target.current(), schedule_dot_dw)
    if has_amx_block(func):
        return schedule_amx(func)
    if has_channel_sums_block(func):
        return schedule_channel_sums(func)
    sch = Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = [b for b in blocks if any(iv.iter_type == REDUCE for iv in sch.get(b).iter_vars)]
    if len(reductions) == 1:
        _schedule_reduction(sch, blocks, reductions[0])
    elif not reductions:
        for block in blocks:  # a fused chain (bias quantize + requantize, say): each on its own
            schedule_injective(sch, block)
    else:
        return func
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


@tvm.transform.module_pass(opt_level=0, name="ScheduleCPU")
class ScheduleCPU:
    """Schedule every unscheduled PrimFunc: packed kernels with their tuned tile when ``tuning``
    has one (else their default), everything else by the generic parallel/vectorize rule."""

    def __init__(self, tuning: TuningDatabase | None = None) -> None:
        self.tuning = tuning

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        out = tvm.IRModule(dict(mod.functions.items()))
        for gv, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc) and not (func.attrs and "tirx.is_scheduled" in func.attrs):
                out[gv] = schedule_prim_func(func, self.tuning)
        return out
