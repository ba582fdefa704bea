"""Schedule of the packed weight-gradient kernel (``te_dot_grad``): tiled, tensorized, parallel.

One parallel task per register tile of dw (``ob_block`` output-channel vectors x ``row_block``
im2col rows, the forward's tile shapes). Inside a task, every chunk (of samples, and for int16 of
output rows: ``te_dot_grad.dw_rows``) is summed into the
tile in int32 on the dot instructions (the tile stays in registers, as in ``schedule_dot``), then
folded into the int64 result; tasks never share an output, so the batch reduction needs no atomics.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import Schedule

from marvin_compile.dot_isa import DotISA
from marvin_compile.passes.schedule_dot import (
    accumulator_bytes,
    default_tiles,
    find_block,
    intrinsic_for,
    schedule_pack_x,
    schedule_unpack,
)
from marvin_compile.te_dot_grad import DW_BLOCK


def has_dot_dw_block(func: tirx.PrimFunc) -> bool:
    return find_block(Schedule(func), DW_BLOCK) is not None


def schedule_dot_dw(sch: Schedule, isa: DotISA) -> None:
    """Schedule a ``te_dot_grad`` weight-gradient PrimFunc in place."""
    part, fold = sch.get_sblock(DW_BLOCK), sch.get_sblock("dot_fold")
    intrin = intrinsic_for(sch, part, isa)
    ob, row, oi, qc, hc = sch.get_loops(fold)
    extents = int(sch.get(ob).extent), int(sch.get(row).extent)
    ob_block, row_block = default_tiles(*extents, isa.lanes, accumulator_bytes(sch, part))
    obo, obi = sch.split(ob, [None, ob_block])
    ro, ri = sch.split(row, [None, row_block])
    sch.reorder(obo, ro, qc, hc, obi, ri, oi)
    sch.compute_at(part, hc, preserve_unit_loops=True)
    *_, pob, prow, poi, t, oh, ow, p = sch.get_loops(part)
    sch.reorder(t, oh, ow, pob, prow, poi, p)
    # Parallel and vectorized while both are still complete reductions (before the inits split off).
    sch.parallel(sch.fuse(obo, ro))
    sch.vectorize(oi)
    sch.unroll(obi)
    sch.unroll(ri)
    init = sch.decompose_reduction(part, t)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(poi, intrin)
    sch.unroll(pob)
    sch.unroll(prow)
    fold_init = sch.decompose_reduction(fold, qc)
    sch.vectorize(sch.get_loops(fold_init)[-1])
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        name = sch.get(block).name_hint
        if any(sch.get(c).name_hint == "dot_unpack" for c in sch.get_producers(block)):
            sch.reverse_compute_inline(block)  # the rescale to float32
        elif name == "dot_grad_sum":
            _schedule_sum(sch, block)
        elif name == "dot_pack_g":
            _schedule_pack_g(sch, block)
    schedule_pack_x(sch, sch.get_sblock("dot_pack_x"))
    schedule_unpack(sch, sch.get_sblock("dot_unpack"))


def _schedule_pack_g(sch: Schedule, block) -> None:
    """The gradient quantizer inlined into the packing, vectorized along the gradient's contiguous
    axis (output columns; channels for a Linear): one pass over g, its hash computed in vectors.
    A conv's gradient is read a whole channel plane at a time, one contiguous stream (row by row
    across a block's lanes x depth planes at once, the loads missed: AVX2 int8 dw at 16 channels
    took 15% longer)."""
    for producer in sch.get_producers(block):
        sch.compute_inline(producer)
    q, ob, i, j, oi, p = sch.get_loops(block)
    if int(sch.get(j).extent) > 1:
        sch.reorder(q, ob, oi, p, i, j)
        inner = j
    else:
        sch.reorder(q, ob, i, j, p, oi)
        inner = oi
    sch.parallel(sch.fuse(q, ob))
    sch.vectorize(inner)


def _schedule_sum(sch: Schedule, block) -> None:
    """The offset correction's gradient sums: parallel over chunks x channel blocks, lanes vectorized."""
    qc, hc, ob, oi, *reduce = sch.get_loops(block)
    sch.reorder(qc, hc, ob, *reduce, oi)
    sch.parallel(sch.fuse(qc, hc, ob))
    sch.vectorize(oi)
    init = sch.decompose_reduction(block, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])
