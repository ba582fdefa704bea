"""Schedule of the packed integer kernels (``te_dot``): register-blocked, tensorized, parallel.

The reduction block ``marvin_dot`` is tiled so that its accumulator vectors stay in registers (a
per-tile cache, fully unrolled) while the reduction walks the packed channels and the kernel
window: ``ob_block x w_block`` (vectors of output channels x pixels) where channels are on the
lanes, ``o_block x h_block x v_block`` (channels x rows x vectors of a row) where pixels are
(``te_dot.pixel_lanes``). The innermost (lanes, depth) loops become one dot-product instruction
(``dot_isa``). The tile sizes are the design space the autotuner searches; without tuning, the
defaults below hold as many accumulators as stay in registers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

from marvin_compile.dot_isa import DotISA, dot_isa
from marvin_compile.passes.utils import parallel, schedule_injective, static_extent, vectorize_loop
from marvin_compile.te_dot import DOT_BLOCK, INT16_SUMS_ATTR

STACK_BYTES = 1024  # TVM puts a buffer this large or larger in the heap workspace
REGISTERS = {16: 32, 8: 16}  # vector registers by lanes: zmm0-31 (AVX-512), ymm0-15 (AVX2)
MAX_OB_BLOCK = 4


def find_block(sch: Schedule, name: str):
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM raises its own ScheduleError
        return None


def has_dot_block(func: tirx.PrimFunc) -> bool:
    return find_block(Schedule(func), DOT_BLOCK) is not None


def intrinsic_for(sch: Schedule, block, isa: DotISA, rows: bool = False) -> str:
    """By the packed weight's dtype (the activation is an int32 word for every integer class; int8
    weights are the four-deep byte products') and the loops' index dtype; ``rows``: the pixel-lane
    form."""
    stmt = sch.get(block)
    weight = str(stmt.reads[1].source.dtype)
    container = "uint8" if weight == "int8" else weight
    index = str(stmt.iter_vars[-1].var.ty.dtype)
    return isa.intrinsic(container, index, rows=rows, int16_sums=INT16_SUMS_ATTR in stmt.annotations)


def pixel_lanes_block(sch: Schedule, block) -> bool:
    """Whether a ``te_dot`` reduction has output pixels on its lanes (``te_dot.pixel_lanes``): its
    output is NCHW, 4-D, where the channel-lane form's has a fifth axis of lanes."""
    return len(sch.get(block).writes[0].source.shape) == 4


def one_tap(sch: Schedule, block) -> bool:
    """Whether a ``te_dot`` reduction has a 1x1 window (its last reduction axes are the kernel's
    rows, columns and the word's depth): a conv's packing then reads each input element once (a
    matmul's always does; ``schedule_pack_x`` keeps its quantizer a stage of its own regardless)."""
    rows, cols = sch.get(block).iter_vars[-3:-1]
    return int(rows.dom.extent) == 1 and int(cols.dom.extent) == 1


def accumulator_bytes(sch: Schedule, block) -> int:
    return tvm.DataType(sch.get(block).writes[0].source.dtype).bits // 8


def max_accumulators(lanes: int, acc_bytes: int = 4) -> int:
    """Accumulators of ``lanes`` elements that stay in registers: below TVM's stack-allocation limit
    (a heap workspace may alias the operands, so LLVM keeps it in memory) and leaving operand
    registers (an 8-byte accumulator takes two vector registers)."""
    return min((STACK_BYTES - 1) // (acc_bytes * lanes), (REGISTERS[lanes] - 4) * 4 // acc_bytes)


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def default_tiles(
    ob: int, w: int, lanes: int, acc_bytes: int = 4, channels_first: bool = False
) -> tuple[int, int]:
    """(ob_block, w_block): the most accumulators that fit, then wider w (it reuses each weight
    vector), or with ``channels_first`` more output-channel vectors (each broadcast input word serves
    them all: on AVX2 a broadcast is a load of its own, where AVX-512's vpdpbusd takes it for free;
    at 2 x 5 instead of 1 x 10 LeNet-5's conv2 ran 13% faster, ResNet-20's 16->32 strided conv 14%)."""
    budget = max_accumulators(lanes, acc_bytes)
    pairs = [(o, x) for o in _divisors(ob, MAX_OB_BLOCK) for x in _divisors(w, budget) if o * x <= budget]
    return max(pairs, key=lambda p: (p[0] * p[1], p[0] if channels_first else p[1]))


def dot_signature(func: tirx.PrimFunc) -> str:
    """What a register tile depends on: the reduction block's operand and accumulator buffers and
    its loop extents (the symbolic batch as ``n``). A tuned kernel's tile applies to every kernel
    with this signature: the training variant, and the deployed one that takes its weight packed
    and has the layer's ReLU or residual add fused in, or sums int16 pairs."""
    sch = Schedule(func)
    block = sch.get(sch.get_sblock(DOT_BLOCK))

    def dims(shape) -> str:
        return ",".join(str(int(d)) if isinstance(d, tirx.IntImm) else "n" for d in shape)

    buffers = [f"{r.source.dtype}[{dims(r.source.shape)}]" for r in (*block.reads, *block.writes)]
    loops = [f"{int(iv.iter_type)}:{dims([iv.dom.extent])}" for iv in block.iter_vars]
    if INT16_SUMS_ATTR in block.annotations:  # one step a word where its int32 twin walks 4 bytes:
        loops[-1] = f"{int(block.iter_vars[-1].iter_type)}:4"  # the same operands, the same tile
    return ";".join(buffers + loops)


def schedule_dot(
    sch: Schedule, isa: DotISA, tune: bool = False, tiles: tuple[int, ...] | None = None
) -> None:
    """Schedule a ``te_dot`` PrimFunc in place: register tile ``tiles`` ((ob_block, w_block), or
    (o_block, h_block, v_block) for pixel lanes), else the default; ``tune`` samples it instead
    (the meta_schedule design space)."""
    block = sch.get_sblock(DOT_BLOCK)
    rows = pixel_lanes_block(sch, block)
    reads_once = one_tap(sch, block)
    intrin = intrinsic_for(sch, block, isa, rows)
    if rows:
        cache, tile_loop = _tile_rows(sch, block, intrin, isa, tune, tiles)
    else:
        cache, tile_loop = _tile_channels(sch, block, intrin, isa, tune, tiles)
    _inline_neighbours(sch)
    schedule_pack_x(sch, sch.get_sblock("dot_pack_x"), reads_once)
    pack_w = find_block(sch, "dot_pack_w")  # absent when the kernel takes the weight packed
    if pack_w is not None:
        schedule_injective(sch, pack_w)
    unpack = sch.get_sblock("dot_unpack")
    if not unpack_in_tile(sch, unpack, cache, tile_loop):
        schedule_unpack(sch, unpack)


def _sampled(sch: Schedule, choices: list[int]):
    return sch.sample_categorical(choices, [1 / len(choices)] * len(choices))


def _tile_rows(sch: Schedule, block, intrin: str, isa: DotISA, tune: bool, tiles: tuple[int, ...] | None):
    """The pixel-lane register tile: ``o_block`` output channels x ``h_block`` rows x ``v_block``
    vectors of a row; each broadcast weight word serves ``h_block * v_block`` vectors, each
    input vector ``o_block`` channels. Returns the tile's cache and the loop it sits in."""
    n, o, h, w, cb, kh, kw, p = sch.get_loops(block)
    lanes = isa.lanes
    extents = [int(sch.get(o).extent), int(sch.get(h).extent), int(sch.get(w).extent) // lanes]
    budget = max_accumulators(lanes, accumulator_bytes(sch, block))
    # rows padded to whole vectors: a tile holds whole rows, so that its unpacking covers whole
    # output rows (a part of one would be a loop of a tile-dependent extent, not a vector)
    padded = int(sch.get(sch.get_sblock("dot_unpack")).iter_vars[-1].dom.extent) != extents[2] * lanes
    limits = (MAX_OB_BLOCK, budget, budget)
    choices = [_divisors(e, limit) for e, limit in zip(extents, limits, strict=True)]
    if padded:
        choices[2] = [extents[2]]
    if tune:
        factors = [_sampled(sch, c) for c in choices]
    else:
        factors = list(tiles or default_row_tiles(*choices, budget))
        if len(factors) != 3 or any(f not in c for f, c in zip(factors, choices, strict=True)):
            raise ValueError(f"row tile {factors} is not one of {choices}")
    # unit loops out of the bindings, or a row of one vector (v_w = vo * 8 + vi * 8 + lane) cannot be
    # blockized for tensorize
    oo, oi = sch.split(o, [None, factors[0]], preserve_unit_iters=False)
    ho, hi = sch.split(h, [None, factors[1]], preserve_unit_iters=False)
    vo, vi, lane = sch.split(w, [None, factors[2], lanes], preserve_unit_iters=False)
    # kernel taps outside the channel groups: LLVM unrolled the taps of a group and summed products
    # of different taps before accumulating them, spilling accumulators; over channel groups it
    # keeps one chain per accumulator (ResNet-20 int16 at 32 / 64 channels 10% / 8% faster, LeNet-5's
    # conv1 8%, the rest unchanged)
    sch.reorder(n, oo, ho, vo, kh, kw, cb, oi, hi, vi, lane, p)
    cache = sch.cache_write(block, 0, "global")  # a stack buffer LLVM keeps in registers (below)
    sch.reverse_compute_at(cache, vo, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(cache)[-1])
    # blockized before the images' int64 loop (a symbolic batch) is fused with the int32 ones: after,
    # the lanes' bindings were beyond blockize's analysis. Images outermost, so that one image's
    # packed input stays in cache while its tasks run (16-channel int16 with images inside the
    # tasks: 5.1 ms instead of 3.1)
    instruction = sch.blockize(lane)
    parallel(sch, sch.fuse(n, oo, ho), instruction)
    init = sch.decompose_reduction(instruction, kh)
    sch.vectorize(sch.get_loops(sch.get_child_blocks(init)[0])[-1])  # a row vector of zeros
    sch.tensorize(instruction, intrin)
    for loop in (oi, hi, vi):
        sch.unroll(loop)
    return cache, vo


def default_row_tiles(o: list[int], h: list[int], v: list[int], budget: int) -> tuple[int, int, int]:
    """(o_block, h_block, v_block) from their choices: the most accumulators that fit, then the
    fewest operand loads per step (o_block broadcasts + h_block * v_block vectors), then the most
    channels (each row vector loaded serves them all; at ResNet-20's shapes 4 x 1 x 2 / 4 x 2 x 1
    ran int16 3-5% and int8 0-5% faster than 2 x 1 x 4 / 2 x 2 x 2 / 2 x 4 x 1), then whole rows."""
    triples = [(a, b, c) for a in o for b in h for c in v if a * b * c <= budget] or [(1, 1, min(v))]
    return max(triples, key=lambda t: (t[0] * t[1] * t[2], -(t[0] + t[1] * t[2]), t[0], t[2]))


def _tile_channels(sch: Schedule, block, intrin: str, isa: DotISA, tune: bool, tiles: tuple[int, ...] | None):
    """The channel-lane register tile: ``ob_block`` vectors of output channels x ``w_block``
    output pixels. Returns the tile's cache and the loop it sits in."""
    n, ob, h, w, oi, cb, kh, kw, p = sch.get_loops(block)
    ob_extent, w_extent = int(sch.get(ob).extent), int(sch.get(w).extent)
    acc_bytes = accumulator_bytes(sch, block)
    if tune:  # the space: every divisor pair; tiles past the register budget measure slow
        budget = max_accumulators(isa.lanes, acc_bytes)
        ob_tiles = [None, _sampled(sch, _divisors(ob_extent, MAX_OB_BLOCK))]
        w_tiles = [None, _sampled(sch, _divisors(w_extent, budget))]
    else:
        # channel vectors first on AVX2, except for float64 sums: their two-register accumulators and
        # weight vectors spill at 4 x 1 (a 512^3 GEMM's wide kernel took 7.6 ms there, 3.4 at 1 x 4)
        channels_first = isa.name == "avx2" and acc_bytes == 4
        ob_block, w_block = tiles or default_tiles(
            ob_extent, w_extent, isa.lanes, acc_bytes, channels_first=channels_first
        )
        if ob_extent % ob_block or w_extent % w_block:
            raise ValueError(f"tile {ob_block}x{w_block} does not divide the loops {ob_extent}x{w_extent}")
        ob_tiles, w_tiles = [None, ob_block], [None, w_block]
    obo, obi = sch.split(ob, ob_tiles)
    wo, wi = sch.split(w, w_tiles)
    sch.reorder(n, obo, h, wo, cb, kh, kw, obi, wi, oi, p)
    # A small "global" buffer inside the tile: TVM lowers only those to a stack alloca, which
    # LLVM promotes to registers ("local" ones go to the heap workspace and stay in memory).
    cache = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(cache, wo, preserve_unit_loops=True)  # loop count independent of tiles
    sch.vectorize(sch.get_loops(cache)[-1])
    parallel(sch, sch.fuse(n, obo, h), block, unit=int(sch.get(oi).extent) * int(sch.get(p).extent))
    init = sch.decompose_reduction(block, cb)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(oi, intrin)
    sch.unroll(obi)
    sch.unroll(wi)
    return cache, wo


def schedule_pack_x(sch: Schedule, block, inline_quantizer: bool = False) -> None:
    """Parallel over images x channel groups; a conv's packing is vectorized along the row (each
    of the ``d`` channels a contiguous load, the words built in registers: 4.5x faster than
    element by element for ResNet-20's 16-channel int16 layer at batch 128). The input quantizer
    (fused in) stays a stage of its own: inlined into the packing it measured no faster (it would
    also quantize the padding, and each element again per word that holds it where ``folds_taps``),
    except with ``inline_quantizer`` (a 1x1 conv's packing, which reads each element once and a
    strided one only some: ResNet-20's 16->32 shortcut at batch 64 then quantizes a quarter), and
    where the quantizer only shifts integer levels into int16 (``IntegerActivations``: ResNet-20's
    16-channel int16 layers at batch 1 24 -> 22 us; into bytes, with a rounding shift and clamp, it
    measured 2-8% slower)."""
    quantizers = [p for p in sch.get_producers(block) if sch.get(p).name_hint != "root"]
    inline_quantizer = inline_quantizer or (
        bool(quantizers) and all(_int16_rescale(sch, q) for q in quantizers)
    )
    n, cb, i, j = sch.get_loops(block)
    if static_extent(sch.get(i).extent) == 1:
        # a matmul: along each row's words (stores strided by the row block), not across the block's
        # rows, whose loads LLVM gathered byte by byte (AMD's insertq) where the batch was static:
        # LeNet-5's fc1 at batch 64 took 0.127 ms (0.048 over a symbolic batch), now 0.040
        sch.reorder(n, i, j, cb)
        parallel(sch, sch.fuse(n, i, j), block)
        vectorize_loop(sch, cb)
    else:
        if inline_quantizer:
            for producer in quantizers:
                sch.compute_inline(producer)
            quantizers = []
        parallel(sch, sch.fuse(n, cb), block)
        if static_extent(sch.get(j).extent) is not None:
            vectorize_loop(sch, j)
    for producer in quantizers:  # at root, over the whole input: contiguous, vectorized
        schedule_injective(sch, producer)


def _int16_rescale(sch: Schedule, block) -> bool:
    """Whether ``block`` turns integer levels into int16 ones (``te_ops.rescale_levels``)."""
    b = sch.get(block)
    return all("int" in r.source.dtype for r in b.reads) and all(w.source.dtype == "int16" for w in b.writes)


def unpack_in_tile(sch: Schedule, unpack, tile, tile_loop) -> bool:
    """A conv's unpacking (requantize, the fused ReLU / residual add) moved into the register tile's
    loop, reading the tile where it was summed: the sums go straight to the output instead of
    through an int32 buffer of 16 lanes per pixel (LeNet-5's 6-channel conv1: 2.7x its output).
    Not where the unpacking also reads what the kernel computes per call besides the tile (the
    weight sums vpdpbusd's offset needs in training), nor for a matmul (rows padded to blocks)."""
    if len(sch.get_loops(unpack)) != 4:
        return False
    tile_name = sch.get(tile).name_hint
    if any(sch.get(p).name_hint not in (tile_name, "root") for p in sch.get_producers(unpack)):
        return False
    sch.reverse_compute_at(unpack, tile_loop, preserve_unit_loops=True)
    sch.compute_inline(tile)
    sch.vectorize(sch.get_loops(unpack)[-1])
    return True


def schedule_unpack(sch: Schedule, block) -> None:
    """Parallel over images x channels (conv) or rows (matmul), vectorized along the last axis:
    with requantize fused in, this is where the per-element epilogue math runs."""
    loops = sch.get_loops(block)
    outer = sch.fuse(*loops[:2]) if len(loops) == 4 else loops[0]
    parallel(sch, outer, block)
    vectorize_loop(sch, loops[-1])  # a matmul's row of 120 features: in vectors of 8


def _inline_neighbours(sch: Schedule) -> None:
    """Inline the element-wise stages around the kernel: the weight quantizer into the packing,
    consumers (requantize, and in a deployed model the ReLU or residual add FuseOps appended) into
    the unpack, in order, so a chain collapses into it. The input quantizer is placed by
    ``schedule_pack_x``."""
    ours = {"dot_pack_x", "dot_pack_w", "dot_weight_sum", DOT_BLOCK, "dot_unpack"}
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        name = sch.get(block).name_hint
        if name in ours or name.startswith(DOT_BLOCK):
            continue
        if any(sch.get(p).name_hint == "dot_unpack" for p in sch.get_producers(block)):
            sch.reverse_compute_inline(block)
        elif all(sch.get(c).name_hint != "dot_pack_x" for c in sch.get_consumers(block)):
            sch.compute_inline(block)  # the weight quantizer: O(weights), inlined into the packing


def scheduled(
    func: tirx.PrimFunc, target: tvm.target.Target, rule: Callable[[Schedule, DotISA], None]
) -> tirx.PrimFunc:
    """``func`` scheduled in place by ``rule`` with the target's dot-product family."""
    isa = dot_isa(target)
    if isa is None:
        raise ValueError(f"target {target} has no integer dot-product instructions")
    sch = Schedule(func)
    rule(sch, isa)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_dot_func(
    func: tirx.PrimFunc, target: tvm.target.Target, tiles: tuple[int, ...] | None = None
) -> tirx.PrimFunc:
    """One packed kernel scheduled for ``target`` with register tile ``tiles`` (default: untuned)."""
    return scheduled(func, target, functools.partial(schedule_dot, tiles=tiles))
