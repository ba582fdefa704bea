"""Schedules of the layout stages around the AMX tile kernel (``amx``).

The tile kernels themselves are written scheduled. Around the conv/matmul one: ``amx_pack_x``
interleaves each group of four channels of the quantized NCHW input (and splits stride phases),
``amx_pack_w`` does the same for the weight in training, and ``amx_unpack`` crops the tile output
back to NCHW with requantize and any fused ReLU / residual add (in deployment it scales the
kernel's levels, and where the next layer's quantize-and-pack fused in, the quantizer is inlined
into it and the packing reads it; or a max pool of the levels, ``amx.max_pool_levels``). Around
the weight-gradient one:
``amx_pack_dw_x`` (channel planes of the phase images), ``amx_pack_dw_g`` (four-pixel groups per
channel) and ``amx_fold_dw`` (the int64 sum over chunks of images). Quantizers stay vectorized
stages of their own.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import Schedule

from marvin_compile.amx import GROUP, WINDOWS
from marvin_compile.passes.schedule_dot import find_block
from marvin_compile.passes.utils import parallel, schedule_injective, vectorize_loop, vectorize_row

AMX_BLOCKS = ("amx_pack_x", "amx_pack_w", "amx_unpack", "amx_pack_dw_x", "amx_pack_dw_g", "amx_fold_dw")


def has_amx_block(func: tirx.PrimFunc) -> bool:
    sch = Schedule(func)
    return any(find_block(sch, name) is not None for name in AMX_BLOCKS)


def schedule_amx(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = Schedule(func)
    if find_block(sch, "amx_unpack") is not None:  # first: it may feed the next layer's packing
        _unpack(sch)
    if find_block(sch, "amx_pack_x") is not None:
        _pack_x(sch, sch.get_sblock("amx_pack_x"))
    if find_block(sch, "amx_pack_w") is not None:
        _pack_w(sch)
    if find_block(sch, "amx_pack_dw_x") is not None:
        _pack_dw_x(sch, sch.get_sblock("amx_pack_dw_x"))
    if find_block(sch, "amx_pack_dw_g") is not None:
        _pack_dw_g(sch, sch.get_sblock("amx_pack_dw_g"))
    if find_block(sch, "amx_fold_dw") is not None:
        _fold_dw(sch, sch.get_sblock("amx_fold_dw"))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _pack_x(sch: Schedule, block) -> None:
    """Parallel over (image, byte part, channel group), then 4 x 4 blocks (pixels x channels)
    unrolled: 2 x 4 where the plane's width is not a multiple of 4 (``amx.Geometry.plane``).
    Words (``amx.Geometry.words``): ``_pack_words``."""
    if sch.get(block).writes[0].source.dtype == "int32":  # words (amx.Geometry.words)
        _pack_words(sch, block)
        return
    for producer in sch.get_producers(block):  # the quantizer: at root, contiguous, vectorized
        if not sch.get(producer).name_hint.startswith("amx_unpack"):  # scheduled, quantizer inlined
            _inline_producers(sch, producer)
            schedule_injective(sch, producer)
    *outer, _ph, _i, j, q = sch.get_loops(block)
    parallel(sch, sch.fuse(*outer), block)
    width = sch.get(j).extent  # a matmul's is symbolic, in whole pixel pairs
    pixels = 2 if isinstance(width, tirx.IntImm) and width.value % GROUP else GROUP
    _, ji = sch.split(j, factors=[None, pixels])
    sch.unroll(ji)  # 4 pixels x 4 channels: LLVM's SLP vectorizer turns them into one shuffle
    sch.unroll(q)


def _pack_words(sch: Schedule, block) -> None:
    """Words (``amx.Geometry.words``): the quantizer inlined (a few vector ops a value) where each
    value is read about once; kept at root for kernel windows, which read it ``kh * kw`` times
    (LeNet-5's first conv, inlined: 2.0x -> 1.25x torch). Parallel over (image, channel group),
    the byte parts inside a row (int16's two share its loads), rows vectorized."""
    windows = bool(sch.get(block).annotations.get(WINDOWS, 0))
    for producer in sch.get_producers(block):
        if not sch.get(producer).name_hint.startswith("amx_unpack"):  # scheduled, quantizer inlined
            _inline_producers(sch, producer)
            if windows:
                schedule_injective(sch, producer)
            else:
                sch.compute_inline(producer)
    b, part, cg, ph, i, j = sch.get_loops(block)
    sch.reorder(b, cg, ph, i, part, j)
    parallel(sch, sch.fuse(b, cg), block)
    vectorize_loop(sch, j)


def _inline_producers(sch: Schedule, block) -> None:
    """Injective ops fused in ahead of a block (a reshape, say) inlined into it."""
    for producer in sch.get_producers(block):
        _inline_producers(sch, producer)
        sch.compute_inline(producer)


def _pack_w(sch: Schedule) -> None:
    """Training packs the weight every call: O(weights), the quantizer inlined."""
    block = sch.get_sblock("amx_pack_w")
    for producer in sch.get_producers(block):
        sch.compute_inline(producer)
    schedule_injective(sch, block)


def _unpack(sch: Schedule) -> None:
    """Consumers (requantize, fused ReLU / add, the next layer's quantizer) inlined, in order; then
    parallel over (image, channel), vectorized along the output width (conv), or parallel over
    rows (matmul). The next layer's packing, where fused in, reads it. A second unpacking fused in
    (a residual add of two layers' outputs) is inlined into its consumer."""
    root = sch.get_sblock("root")
    first, *others = [b for b in sch.get_child_blocks(root) if sch.get(b).name_hint.startswith("amx_unpack")]
    for other in others:
        sch.compute_inline(other)
    for consumer in sch.get_child_blocks(root):
        if sch.get(consumer).name_hint == "amx_pack_x":
            break
        if any(sch.get(p).name_hint == sch.get(first).name_hint for p in sch.get_producers(consumer)):
            sch.reverse_compute_inline(consumer)
    loops = sch.get_loops(first)
    if len(loops) == 4:
        n, oc, _i, j = loops
        parallel(sch, sch.fuse(n, oc), first)
        vectorize_row(sch, j)
    else:
        parallel(sch, loops[0], first)


def _pack_dw_x(sch: Schedule, block) -> None:
    """Channel planes: parallel over (image, channel), the width (contiguous both sides) vectorized."""
    for producer in sch.get_producers(block):
        schedule_injective(sch, producer)
    n, part, c, _ph, _i, j = sch.get_loops(block)
    parallel(sch, sch.fuse(n, part, c), block)
    vectorize_row(sch, j)


def _pack_dw_g(sch: Schedule, block) -> None:
    """NCHW -> [N, F/4, O16, 4]: parallel over (image, pixel group), 4 x 4 blocks (channels x
    pixels) unrolled for LLVM's SLP vectorizer."""
    for producer in sch.get_producers(block):
        schedule_injective(sch, producer)
    n, part, fg, o, q = sch.get_loops(block)
    parallel(sch, sch.fuse(n, part, fg), block)
    _, oi = sch.split(o, factors=[None, GROUP])
    sch.unroll(oi)
    sch.unroll(q)


def _fold_dw(sch: Schedule, block) -> None:
    """The int64 sum over chunks, parallel over output channels; the rescale after it on its own."""
    for consumer in sch.get_consumers(block):
        schedule_injective(sch, consumer)
    parallel(sch, sch.get_loops(block)[0], block)
