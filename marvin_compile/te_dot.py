"""Packed conv/matmul kernels shaped for the x86 dot-product intrinsics (``dot_isa``).

One PrimFunc per layer call, four stages:

- ``dot_pack_x``: the quantized input in ``[N, C/d, H+pad, W+pad]`` int32 words of ``d`` channels
  each (d = the intrinsic's reduction depth; ``pack_word``), zero padding folded in (for vpdpbusd
  the operand is ``x + 128`` as uint8, a non-negative int8 input, container ``uint8``, is its own
  unsigned byte); the float classes' depth is 1, their word the value;
- ``dot_pack_w``: the weight in ``[O/L, C/d, KH, KW, L, d]`` (L = the intrinsic's lanes), so one
  instruction reads one contiguous 64-byte row.
  A conv whose channels leave the depth part-empty (``folds_taps``: LeNet-5's one-channel conv1)
  packs (kernel column, channel) pairs into it instead: ``[N, C*KW/d, H+pad, W_out]`` and
  ``[O/L, C*KW/d, KH, 1, L, d]``, the input's columns unfolded over the taps of a kernel row.
  In training the weight changes every step and is packed in the kernel (O(weights) per call);
  a deployed kernel takes it packed (``PackedWeight``, from ``pack_weight`` on the constant
  weight, folded at build time);
- ``marvin_dot``: the reduction (int32; float32 for the float32 class), tensorized by
  ``passes/schedule_dot``. Its lanes hold output channels (``[N, O/L, OH, OW, L]``, one broadcast
  input word against a row of L weights), or, for a conv read at unit stride whose rows pad to
  whole vectors with few lanes wasted (``pixel_lanes``: ResNet-20's stride-1 layers, LeNet-5's
  conv1), output pixels (``[N, O, OH, OW]`` with OW padded, L input words of a row against one
  broadcast weight word): the same packed operands either way;
- ``dot_unpack``: back to NCHW (or rows x features) in the class's accumulator dtype, minus the
  ``128 * sum(w)`` offset correction for vpdpbusd: a transpose of the tile for channel lanes, an
  element-wise pass for pixel lanes.

A matmul ``[M, K] x [K, O]`` is the same kernel with rows as the width axis, blocked by
``ROW_BLOCK`` (a symbolic batch pads rows up to a whole block; a static batch below one block,
batch 1, is a block of its own size).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx

from marvin_compile.dot_isa import (
    BIASED_INT8,
    DotISA,
    int16_lanes_add,
    int16_pair_word,
    int16_word_sum,
    lane_of,
)

DOT_BLOCK = "marvin_dot"
ROW_BLOCK = 8  # matmul rows per register block
OFFSET = 128  # vpdpbusd takes an unsigned operand: x + 128 in [0, 255] for int8 x


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PackedWeight:
    """A weight in the kernel's layout: ``data`` [O/L, C/d, KH, KW, L, d] (KH = KW = 1 for a
    matmul; [O/L, C*KW/d, KH, 1, L, d] where ``folds_taps``), the per-output sums vpdpbusd's offset
    correction needs (else None), and the unpacked weight's shape."""

    data: te.Tensor
    sums: te.Tensor | None
    shape: tuple[int, ...]

    @property
    def out_features(self) -> int:
        return self.shape[0]


def folds_taps(channels: int, kernel_width: int, depth: int) -> bool:
    """Whether a conv's reduction depth holds (kernel column, channel) pairs rather than channels
    alone: where that takes fewer dot instructions (a one-channel 5x5 conv on vpdpbusd: 2 per
    kernel row instead of 5, each 4-deep one then holding 1 live channel)."""
    return ceil_div(channels * kernel_width, depth) < ceil_div(channels, depth) * kernel_width


def pack_weight(w: te.Tensor, isa: DotISA, container: str) -> PackedWeight:
    """``w`` [O, C, KH, KW] (conv) or [O, K] (matmul), integer, in the kernel's layout."""
    shape = tuple(int(d) for d in w.shape)
    conv = len(shape) == 4
    o, c = shape[0], shape[1]
    kh, kw = shape[2:] if conv else (1, 1)
    lanes, depth = isa.lanes, isa.depth(container)
    dtype = isa.weight_dtype(container)
    fold = conv and folds_taps(c, kw, depth)

    def f(ob, cb, i, j, oi, p):
        oc, cc = ob * lanes + oi, cb * depth + p
        ocl = tirx.min(oc, o - 1)
        if fold:  # cc runs over (column, channel) pairs
            inside = tirx.all(oc < o, cc < c * kw)
            ccl = tirx.min(cc, c * kw - 1)
            value = w[ocl, ccl % c, i, ccl // c]
        else:
            inside = tirx.all(oc < o, cc < c)
            ccl = tirx.min(cc, c - 1)
            value = w[ocl, ccl, i, j] if conv else w[ocl, ccl]
        return masked(cast_to(dtype, value), inside, tirx.const(0, dtype))

    groups = ceil_div(c * kw, depth) if fold else ceil_div(c, depth)
    packed = te.compute(
        (ceil_div(o, lanes), groups, kh, 1 if fold else kw, lanes, depth), f, name="dot_pack_w"
    )
    return PackedWeight(packed, weight_sums(w, isa, container), shape)


def int16_sums_fit(levels: np.ndarray, input_max: int, depth: int = 4) -> bool:
    """Whether the byte chain's int16 accumulators (``int16_sums``) hold their exact sums for
    every input in ``[0, input_max]`` against these integer weights (``[O, C, KH, KW]`` or ``[O,
    K]``): an accumulator sums the products at one pair position of the words (``q``: the
    reduction index's place in its word, halved) for one output, so the largest it reaches is
    ``input_max * max(sum of its positive weights, -(sum of its negative ones))``. Every partial
    sum is inside that bound too, each instruction's pair sum included, so ``vpmaddubsw`` never
    saturates (inputs up to 255: a signed int8 activation as ``x + 128``, ``BIASED_INT8``)."""
    place = _places(levels, input_max, depth)
    return input_max * _largest_sum(levels, (place % depth) // 2) < 2**15


def pair_sums_fit(levels: np.ndarray, input_max: int, depth: int = 4) -> bool:
    """Whether no ``vpmaddubsw`` pair sum saturates for inputs in ``[0, input_max]``: each is
    two neighbours of one word against their weights, at most ``input_max`` times their weights'
    larger same-sign sum. Always so below 128 (2 * 127 * 128 < 2**15); above, only for weights
    well inside a byte (the byte chain without int16 sums, ``int16_sums_fit``)."""
    place = _places(levels, input_max, depth)
    if levels.ndim == 4:  # a pair is one word's two neighbours: one kernel row (and column) apart
        _, c, kh, kw = levels.shape
        tap = np.arange(kh)[None, :, None] * kw + (
            0 if folds_taps(c, kw, depth) else np.arange(kw)[None, None, :]
        )
        key = tap * levels.shape[1] * kw + place // 2
    else:
        key = place // 2
    return input_max * _largest_sum(levels, key) < 2**15


def _places(levels: np.ndarray, input_max: int, depth: int) -> np.ndarray:
    """The place of each reduction element among the packed words' elements (``[C, KH, KW]`` or
    ``[K]``): a (kernel column, channel) pair where taps fold in, else the channel."""
    if not 0 < input_max <= 255:
        raise ValueError(f"the byte chain takes inputs in [0, 255], not up to {input_max}")
    if levels.ndim == 4:
        _, c, kh, kw = levels.shape
        channel, column = np.arange(c)[:, None, None], np.arange(kw)[None, None, :]
        place = column * c + channel if folds_taps(c, kw, depth) else channel + 0 * column
        return np.broadcast_to(place, (c, kh, kw))
    return np.arange(levels.shape[1])


def _largest_sum(levels: np.ndarray, group: np.ndarray) -> int:
    """The largest same-sign sum of one output's weights over the elements of one ``group``."""
    w = levels.reshape(levels.shape[0], -1).astype(np.int64)
    keys = np.broadcast_to(group, levels.shape[1:]).reshape(-1)
    order = np.argsort(keys, kind="stable")
    starts = np.flatnonzero(np.diff(keys[order], prepend=keys[order][0] - 1))  # each group's first
    w = w[:, order]
    return int(max(np.add.reduceat(np.clip(s * w, 0, None), starts, axis=1).max() for s in (1, -1)))


def weight_sums(w: te.Tensor, isa: DotISA, container: str) -> te.Tensor | None:
    """``sum_k w[o, k]`` when the operand is offset (vpdpbusd's x + 128), else None."""
    if not isa.offset(container):
        return None
    r = [te.reduce_axis((0, n), name=f"r{i}") for i, n in enumerate(w.shape[1:])]
    return te.compute(
        (w.shape[0],), lambda oc: te.sum(tirx.Cast("int32", w[(oc, *r)]), axis=r), name="dot_weight_sum"
    )


def operand(value: tirx.PrimExpr, isa: DotISA, container: str) -> tirx.PrimExpr:
    """The packed activation element: ``x + 128`` for vpdpbusd's signed int8, the byte itself for a
    non-negative int8 (``max`` keeps a negative level, which the layer's ReLU-fed input cannot
    hold, from reading as 256 minus it)."""
    dtype = isa.operand_dtype(container)
    if isa.offset(container):
        return tirx.Cast("uint8", tirx.Cast("int32", value) + OFFSET)
    if dtype == "uint8":
        return tirx.Cast("uint8", tirx.max(value, tirx.const(0, dtype_of(value))))
    return cast_to(dtype, value)


def dtype_of(value) -> str:
    """The dtype of a PrimExpr or a TE tensor element."""
    return value.dtype if isinstance(value, te.TensorSlice) else str(value.ty)


def cast_to(dtype: str, value) -> tirx.PrimExpr:
    """Cast unless ``value`` (a PrimExpr or a TE tensor element) already has ``dtype``."""
    return value if dtype_of(value) == dtype else tirx.Cast(dtype, value)


def masked(value: tirx.PrimExpr, inside: tirx.PrimExpr, pad: tirx.PrimExpr) -> tirx.PrimExpr:
    """``value`` where ``inside``, else ``pad``, by a bit mask rather than a Select. Packing loads at
    clamped indices: under a Select the simplifier drops a clamp its condition proves redundant,
    and the vectorized Select loads both sides, so the loads ran past the operand (a weight that
    ended right before an unmapped page faulted). A bit mask (not a 0/1 factor: 0 * NaN is NaN)
    also clears what a padded conv's unclamped column loads next to its input's ends."""
    dtype = tvm.DataType(dtype_of(value))
    bits = f"{'uint' if dtype.type_code == tvm.DataTypeCode.UINT else 'int'}{dtype.bits}"
    ones = tirx.const(2**dtype.bits - 1 if bits.startswith("u") else -1, bits)
    mask = tirx.Select(inside, ones, tirx.const(0, bits))  # constants only: nothing to simplify away
    as_bits = bits != str(dtype)
    v = tirx.reinterpret(bits, value) if as_bits else value
    out = v & mask
    if not (isinstance(pad, tirx.IntImm | tirx.FloatImm) and pad.value == 0):
        out = out | ((tirx.reinterpret(bits, pad) if as_bits else pad) & ~mask)
    return tirx.reinterpret(str(dtype), out) if as_bits else out


def pad_value(isa: DotISA, container: str) -> tirx.PrimExpr:
    return tirx.const(OFFSET if isa.offset(container) else 0, isa.operand_dtype(container))


def pack_word(element: Callable[[int], tirx.PrimExpr], isa: DotISA, container: str) -> tirx.PrimExpr:
    """The int32 word of the ``depth`` operand elements ``element(p)`` (already masked), element 0 in
    the low bits, as ``dot_isa.lane_of`` reads it: built in registers from contiguous loads, stored
    whole (storing elements into their slots one by one took 12% of a 16-channel conv). The top
    element goes in sign-extended, so no shift leaves int32; a float class's word is its value."""
    depth = isa.depth(container)
    if depth == 1:
        return element(0)
    bits = tvm.DataType(isa.operand_dtype(container)).bits
    word = tirx.Cast("int32", tirx.Cast(f"int{bits}", element(depth - 1))) << (bits * (depth - 1))
    for p in range(depth - 1):
        word = word | (tirx.Cast("int32", tirx.Cast(f"uint{bits}", element(p))) << (bits * p))
    return word


def pixel_lanes(out_channels: int, out_width: int, stride: int, lanes: int) -> bool:
    """Whether a conv puts output pixels on the vector lanes (one broadcast weight word per output
    channel against a row of packed input words) rather than output channels: where the packed
    input is read at unit stride and rows padded to whole vectors waste no more lanes than channels
    padded to them would (LeNet-5's 6-channel conv1: rows of 28 in 32 lanes rather than 6 channels
    in 8). Its sums are then NCHW rows already, where the channel-lane tile had to be transposed to
    store them (17% of ResNet-20's deployed 16-channel layer)."""
    padded_rows = ceil_div(out_width, lanes) * lanes * out_channels
    return stride == 1 and padded_rows <= ceil_div(out_channels, lanes) * lanes * out_width


INT16_SUMS_ATTR = "marvin.int16_sums"  # a reduction block's annotation: it sums int16 pairs


def _reduction(out_shape, word, weight, axes, isa: DotISA, container: str, int16_sums: bool) -> te.Tensor:
    """``sum over axes and the word's depth of operand * weight``, ``word(out)`` / ``weight(out,
    p)`` reading the packed operands at an output index. With ``int16_sums`` each output is an
    int32 word of two int16 sums (``int16_pair_word``), one per pair of a word's four elements,
    accumulated with ``int16_lanes_add``: the byte chain's int16 accumulators (``dot_isa``), which
    ``int16_word_sum`` adds up once the reduction is done."""
    if container == BIASED_INT8 and not int16_sums:
        raise ValueError(f"{BIASED_INT8} operands run only with int16 sums (int32 pair sums would saturate)")
    if not int16_sums:
        p = te.reduce_axis((0, isa.depth(container)), name="p")
        dtype = isa.product_dtype(container)
        return te.compute(
            out_shape,
            lambda *o: te.sum(
                operand_of(word(o), p, isa, container) * cast_to(dtype, weight(o, p)), axis=[*axes, p]
            ),
            name=DOT_BLOCK,
        )
    add = te.comm_reducer(int16_lanes_add, lambda dtype: tirx.const(0, dtype), name="int16_lanes_add")
    unit = te.reduce_axis((0, 1), name="p")  # the word's depth, taken whole: the loop the schedule tiles

    def pair_sums(*o):
        def product(k: int) -> tirx.PrimExpr:
            return operand_of(word(o), k, isa, container) * cast_to("int32", weight(o, k))

        return add(int16_pair_word(product(0) + product(1), product(2) + product(3)), axis=[*axes, unit])

    return te.compute(out_shape, pair_sums, name=DOT_BLOCK, attrs={INT16_SUMS_ATTR: 1})


def _reduce_rows(
    xp, wp, out_shape, stride_h, kh, kw, isa: DotISA, container: str, int16_sums: bool = False
) -> te.Tensor:
    """The pixel-lane reduction: ``[N, O, OH, OW]`` from ``xp`` read along its rows."""
    lanes = isa.lanes
    cb = te.reduce_axis((0, int(wp.shape[1])), name="cb")
    i = te.reduce_axis((0, kh), name="kh")
    j = te.reduce_axis((0, kw), name="kw")
    return _reduction(
        out_shape,
        lambda o: xp[o[0], cb, o[2] * stride_h + i, o[3] + j],
        lambda o, p: wp[o[1] // lanes, cb, i, j, o[1] % lanes, p],
        [cb, i, j],
        isa,
        container,
        int16_sums,
    )


def _reduce(
    xp, wp, out_shape, stride, kh, kw, isa: DotISA, container: str, int16_sums: bool = False
) -> te.Tensor:
    """The channel-lane reduction: ``[N, O/L, OH, OW, L]``."""
    cb = te.reduce_axis((0, int(wp.shape[1])), name="cb")
    i = te.reduce_axis((0, kh), name="kh")
    j = te.reduce_axis((0, kw), name="kw")
    sh, sw = stride
    return _reduction(
        out_shape,
        lambda o: xp[o[0], cb, o[2] * sh + i, o[3] * sw + j],
        lambda o, p: wp[o[1], cb, i, j, o[4], p],
        [cb, i, j],
        isa,
        container,
        int16_sums,
    )


def summed(y: te.Tensor, index: tuple, int16_sums: bool) -> tirx.PrimExpr:
    """The reduction's sum at ``index``: with ``int16_sums`` its word's two int16 sums added."""
    if not int16_sums:
        return y[index]
    return int16_word_sum(y[index])


def operand_of(word: tirx.PrimExpr, p: tirx.PrimExpr, isa: DotISA, container: str) -> tirx.PrimExpr:
    """Element ``p`` of a packed word in the product dtype (``pack_word``'s inverse)."""
    if isa.depth(container) == 1:
        return cast_to(isa.product_dtype(container), word)
    return lane_of(word, p, isa.operand_dtype(container))


def _correct(y: tirx.PrimExpr, wsum: te.Tensor | None, oc, acc: str) -> tirx.PrimExpr:
    if wsum is not None:
        y = y - OFFSET * wsum[oc]
    return cast_to(acc, y)


def packed_steps(
    kernel: tuple[int, int], strides: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(the packing's row and column steps through the input, the strides left to the reduction).
    A 1x1 kernel reads only every stride-th row and column: its packing takes just those (and
    quantizes just those), and the reduction reads them at unit stride (ResNet-20's strided
    shortcuts read a quarter of their input; at batch 64 the 16->32 one took 0.35 ms, mostly
    quantizing and packing; its dw at batch 128 took 1.8 ms packing all of x, 1.2 ms these)."""
    (kh, kw), (sh, sw) = kernel, strides
    steps = (sh, sw) if kh == kw == 1 else (1, 1)
    return steps, (sh // steps[0], sw // steps[1])


def conv2d(
    x: te.Tensor,
    w: te.Tensor | PackedWeight,
    strides: tuple[int, int],
    padding: tuple[int, int, int, int],
    isa: DotISA,
    container: str,
    acc: str,
    int16_sums: bool = False,
) -> te.Tensor:
    """NCHW x OIHW -> NCHW in ``acc`` (int32, or int64 for the int16 class), groups 1, dilation 1;
    ``int16_sums``: the byte chain's pair sums accumulate in int16 (only where ``int16_sums_fit``)."""
    n, c, h, wd = x.shape
    wpk = w if isinstance(w, PackedWeight) else pack_weight(w, isa, container)
    o, _, kh, kw = wpk.shape
    top, left, bottom, right = padding
    sh, sw = strides
    depth, lanes = isa.depth(container), isa.lanes
    oh = (int(h) + top + bottom - kh) // sh + 1
    ow = (int(wd) + left + right - kw) // sw + 1
    (step_h, step_w), (sh, sw) = packed_steps((kh, kw), (sh, sw))
    hp, wp_ = (oh - 1) * sh + kh, (ow - 1) * sw + kw
    pad = pad_value(isa, container)
    fold = folds_taps(int(c), kw, depth)

    def element(b, cb, i, j, p):
        cc, hi, wi = cb * depth + p, i * step_h - top, j * step_w - left
        if fold:  # j is the output column, cc a (kernel column, channel) pair
            pair = tirx.min(cc, c * kw - 1)
            cc, wi = pair % c, j * sw + pair // c - left
            inside = tirx.all(cb * depth + p < c * kw, hi >= 0, hi < h, wi >= 0, wi < wd)
        else:
            inside = tirx.all(cc < c, hi >= 0, hi < h, wi >= 0, wi < wd)
        # Channel and row are clamped into x, the column is not, so that a row stays one vector
        # load: only at the two ends of x do the loads leave it, by at most ``left`` / ``right``
        # elements, bytes glibc's allocator keeps mapped around every block (the column clamp
        # made the loads gathers: LeNet-5 at batch 64 took 0.63 -> 0.78 ms). A 1x1 conv's column
        # is clamped too: its packing reads the caller's input itself (the quantizer inlined,
        # ``schedule_pack_x``), and unpadded (ResNet's shortcuts) the clamp simplifies away
        col = tirx.max(tirx.min(wi, wd - 1), 0) if kh == kw == 1 else wi
        value = x[b, tirx.min(cc, c - 1), tirx.max(tirx.min(hi, h - 1), 0), col]
        return masked(operand(value, isa, container), inside, pad)

    def pack_x(b, cb, i, j):
        return pack_word(lambda p: element(b, cb, i, j, p), isa, container)

    groups = int(wpk.data.shape[1])
    taps = 1 if fold else kw
    rows = pixel_lanes(o, ow, 1 if fold else sw, lanes)
    # rows padded to whole vectors read past each packed row into the next (sums of padding
    # columns, never unpacked), past the last one into a spare row
    spare = int(rows and ow % lanes != 0)
    xp = te.compute((n, groups, hp + spare, ow if fold else wp_), pack_x, name="dot_pack_x")
    if rows:
        out_rows = (n, o, oh, ceil_div(ow, lanes) * lanes)
        y = _reduce_rows(xp, wpk.data, out_rows, sh, kh, taps, isa, container, int16_sums)
        return te.compute(
            (n, o, oh, ow),
            lambda *i: _correct(summed(y, i, int16_sums), wpk.sums, i[1], acc),
            name="dot_unpack",
        )
    out_shape = (n, ceil_div(o, lanes), oh, ow, lanes)
    y = _reduce(xp, wpk.data, out_shape, (sh, 1 if fold else sw), kh, taps, isa, container, int16_sums)
    return te.compute(
        (n, o, oh, ow),
        lambda b, oc, i, j: _correct(
            summed(y, (b, oc // lanes, i, j, oc % lanes), int16_sums), wpk.sums, oc, acc
        ),
        name="dot_unpack",
    )


def matmul(
    x: te.Tensor, w: te.Tensor | PackedWeight, isa: DotISA, container: str, acc: str, int16_sums: bool = False
) -> te.Tensor:
    """``x [M, K]`` times ``w [O, K]`` transposed -> ``[M, O]`` in ``acc`` (``int16_sums``: as in
    ``conv2d``)."""
    m, k = x.shape
    wpk = w if isinstance(w, PackedWeight) else pack_weight(w, isa, container)
    o = wpk.out_features
    depth, lanes = isa.depth(container), isa.lanes
    # a static batch below a block (batch 1) is one block of its rows: no products of padding rows
    rows = int(m) if isinstance(m, tirx.IntImm) and int(m) < ROW_BLOCK else ROW_BLOCK
    blocks = (m + rows - 1) // rows
    pad = pad_value(isa, container)

    def element(b, cb, j, p):
        row, cc = b * rows + j, cb * depth + p
        inside = tirx.all(row < m, cc < k)
        return masked(operand(x[te.min(row, m - 1), te.min(cc, k - 1)], isa, container), inside, pad)

    def pack_x(b, cb, _i, j):
        return pack_word(lambda p: element(b, cb, j, p), isa, container)

    xp = te.compute((blocks, ceil_div(int(k), depth), 1, rows), pack_x, name="dot_pack_x")
    out_shape = (blocks, ceil_div(o, lanes), 1, rows, lanes)
    y = _reduce(xp, wpk.data, out_shape, (1, 1), 1, 1, isa, container, int16_sums)
    return te.compute(
        (m, o),
        lambda row, oc: _correct(
            # min(): row // rows < blocks always, but TVM cannot prove it for a symbolic M
            summed(y, (te.min(row // rows, blocks - 1), oc // lanes, 0, row % rows, oc % lanes), int16_sums),
            wpk.sums,
            oc,
            acc,
        ),
        name="dot_unpack",
    )
