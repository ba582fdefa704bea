"""Schedule of batch norm's per-channel sums (``te_norm``: the statistics, the weight gradients).

Parallel over (image, channel) planes; inside one, the plane's lane sums are the register tile (a
small stack buffer LLVM keeps in registers), each input vector loaded once for both sums. The
float64 combination over images and the final per-channel values are O(N x C), serial.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import Schedule

from marvin_compile.passes.schedule_dot import find_block
from marvin_compile.passes.utils import parallel
from marvin_compile.te_norm import LANE_SUMS, PLANE_SUMS


def has_channel_sums_block(func: tirx.PrimFunc) -> bool:
    return find_block(Schedule(func), LANE_SUMS) is not None


def schedule_channel_sums(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = Schedule(func)
    lane_sums, plane_sums = sch.get_sblock(LANE_SUMS), sch.get_sblock(PLANE_SUMS)
    image, channel, _, _ = sch.get_loops(plane_sums)
    planes = sch.fuse(image, channel)
    parallel(sch, planes, plane_sums)
    sch.compute_at(lane_sums, planes, preserve_unit_loops=True)
    t, lane, i = sch.get_loops(lane_sums)[-3:]
    sch.reorder(i, t, lane)
    sch.unroll(t)
    sch.vectorize(lane)
    init = sch.decompose_reduction(lane_sums, i)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
