"""Packed backward products of the low-bit training step on the x86 dot-product intrinsics.

- ``conv2d_input_grad`` / ``linear_input_grad`` (dx) are forward packed kernels (``te_dot``) of
  rearranged operands, so ``schedule_dot`` schedules them unchanged: dx of a conv2d is a stride-1
  convolution of g with the weight transposed to [C, O, KH, KW] and flipped in space, one group of
  output channels per stride phase (``input_grad_weight``; the caller interleaves them); dx of a
  Linear is ``g @ w`` (``te_dot.matmul`` of the weight transposed). On AMX machines the same
  rearranged operands feed the tile kernel (``amx``) instead.
- ``conv2d_weight_grad`` / ``linear_weight_grad`` (dw) reduce over the (symbolic) batch and the
  output positions: ``marvin_dot_dw`` sums one chunk of samples (int16: of ``dw_rows`` output
  rows) in int32 on the dot instructions
  (lanes = output channels of the gradient, rows = the im2col rows C*KH*KW of the input, read in
  place from the packed input, depth = samples), ``dot_fold`` adds the chunks up in int64. The
  chunk length (``dw_chunk``) is what has to keep int32 exact; the caller checks that bound.

Padding (spatial, channels, samples beyond the batch) is zero in the gradient operand, so padded
products vanish. With vpdpbusd the input carries the +128 offset and ``dot_grad_sum`` holds the
``128 * sum(g)`` to subtract per chunk; TVM may widen before subtracting, so the caller keeps the
uncorrected chunk sums (|x + 128| < 2**8) inside int32 as well.
"""

from __future__ import annotations

from tvm import te, tirx

from marvin_compile import te_dot
from marvin_compile.dot_isa import DotISA
from marvin_compile.te_dot import (
    OFFSET,
    cast_to,
    ceil_div,
    masked,
    operand,
    operand_of,
    pack_word,
    packed_steps,
    pad_value,
)

DW_BLOCK = "marvin_dot_dw"
DW_CHUNK = 128  # products per int32 partial sum aimed at: amortises the int64 fold of a chunk


def input_grad_phase(kernel: int, stride: int, pad: int, size: int, out: int) -> tuple[int, int, int, int]:
    """Along one axis, the stride-1 convolution of g that gives every phase of dx: (top padding,
    taps, bottom padding, outputs per phase). Phase ph (dx rows s*a + ph) takes the kernel taps
    i = r + s*m, r = (ph + pad) mod s, from g rows a + (ph + pad) // s - m; each phase's taps are
    placed, flipped, in one kernel of the returned size."""
    live = []
    for ph in range(stride):
        r, q = (ph + pad) % stride, (ph + pad) // stride
        if r < kernel:
            live.append((q, ceil_div(kernel - r, stride)))
    top = max(0, *(m - 1 - q for q, m in live))
    taps = max(q for q, _ in live) + top + 1
    rows = ceil_div(size, stride)
    return top, taps, rows - 1 - out - top + taps, rows


def input_grad_geometry(
    w_shape: list[int],
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[int, int, int, int],
) -> tuple[list[int], tuple[int, int, int, int]]:
    """The shape [SH*SW*C, O, TH, TW] of ``input_grad_weight``'s phase weight and the padding of
    its stride-1 convolution of g."""
    o, c, kh, kw = (int(d) for d in w_shape)
    (sh, sw), (top, left) = strides, padding[:2]
    t, th, b, _ = input_grad_phase(kh, sh, top, in_hw[0], out_hw[0])
    lf, tw, rt, _ = input_grad_phase(kw, sw, left, in_hw[1], out_hw[1])
    return [sh * sw * c, o, th, tw], (t, lf, b, rt)


def transposed(w: te.Tensor) -> te.Tensor:
    """A Linear weight [O, K] as [K, O]: dx = g @ w is a product by the transposed weight."""
    o, k = (int(d) for d in w.shape)
    return te.compute((k, o), lambda i, j: w[j, i], name="dot_transpose_w")


def input_grad_weight(
    w: te.Tensor,
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[int, int, int, int],
) -> tuple[te.Tensor, tuple[int, int, int, int]]:
    """dx of a conv2d (groups 1, dilation 1, each pad < kernel) as one stride-1 convolution of g:
    its weight [SH*SW*C, O, TH, TW] and padding. Output channel (ph*SW + pw)*C + c of that
    convolution holds dx[:, c, SH*a + ph, SW*b + pw].

    Each phase is a stride-1 correlation of g with the taps of w that reach it (flipped), so all
    phases are one conv of g with SH*SW*C output channels; no product with an inserted zero is
    computed, unlike the stride-dilated gradient. At stride 1 this is the plain flipped-kernel
    correlation and the layout is NCHW."""
    o, c, kh, kw = (int(d) for d in w.shape)
    (sh, sw), (top, left) = strides, padding[:2]
    shape, (t, lf, b, rt) = input_grad_geometry(list(w.shape), in_hw, out_hw, strides, padding)

    def tap(phase, u, stride, pad, shift, kernel):
        """(index into w, valid) of tap u of a phase's flipped kernel along one axis."""
        r, m = tirx.floormod(phase + pad, stride), tirx.floordiv(phase + pad, stride) + shift - u
        count = tirx.floordiv(kernel - r + stride - 1, stride)
        return te.max(te.min(r + stride * m, kernel - 1), 0), tirx.all(m >= 0, m < count)

    def weight(k, oc, u, v):
        ph, pw, ci = k // (sw * c), k // c % sw, k % c
        i, row_ok = tap(ph, u, sh, top, t, kh)
        j, col_ok = tap(pw, v, sw, left, lf, kw)
        return masked(w[oc, ci, i, j], tirx.all(row_ok, col_ok), tirx.const(0, w.dtype))

    return te.compute(shape, weight, name="dot_phase_w"), (t, lf, b, rt)


def conv2d_input_grad(
    g: te.Tensor,
    w: te.Tensor,
    in_hw: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[int, int, int, int],
    isa: DotISA,
    container: str,
    acc: str = "int32",
) -> te.Tensor:
    """dx of a conv2d phase by phase (``input_grad_weight``) as one packed conv (``te_dot.conv2d``),
    in ``acc`` [N, SH*SW*C, ceil(H/SH), ceil(W/SW)]."""
    out_hw = (int(g.shape[2]), int(g.shape[3]))
    phases, pad = input_grad_weight(w, in_hw, out_hw, strides, padding)
    return te_dot.conv2d(g, phases, (1, 1), pad, isa, container, acc)


def linear_input_grad(
    g: te.Tensor, w: te.Tensor, isa: DotISA, container: str, acc: str = "int32"
) -> te.Tensor:
    """dx [M, K] = g [M, O] @ w [O, K] (in ``acc``)."""
    return te_dot.matmul(g, transposed(w), isa, container, acc)


def dw_rows(isa: DotISA, container: str, out_hw: tuple[int, int]) -> int:
    """Output rows of one partial sum of dw. For the int16 container, the fewest that divide the
    output's height and give a packed sample block (``depth`` samples) at least ``DW_CHUNK``
    products: short int32 sums keep wide word lengths exact (ResNet-20's 32 x 32 maps in whole
    images: 2048 products, exact to wl 10; in two rows, 128: to wl 13, and with the gradient split
    to wl 16). Else whole images: int8 products sum exactly over far more, and each partial sum
    costs a fold (10% of int8 dw at 16 channels)."""
    depth, (oh, ow) = isa.depth(container), out_hw
    if container != "int16":
        return oh
    return next((r for r in range(1, oh + 1) if oh % r == 0 and depth * r * ow >= DW_CHUNK), oh)


def dw_chunk(isa: DotISA, container: str, out_hw: tuple[int, int]) -> int:
    """Products in one int32 partial sum of dw: ``dw_rows`` rows of whole packed sample blocks,
    about ``DW_CHUNK`` of them."""
    per_block = isa.depth(container) * dw_rows(isa, container, out_hw) * out_hw[1]
    return per_block * max(1, ceil_div(DW_CHUNK, per_block))


def conv2d_weight_grad(
    x: te.Tensor,
    g: te.Tensor,
    kernel: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[int, int, int, int],
    isa: DotISA,
    container: str,
    split: int = 0,
) -> te.Tensor:
    """dw [O, C, KH, KW] (int64) of a conv2d (groups 1, dilation 1) from x [N, C, H, W], g [N, O, OH, OW]
    (``split``: see ``_weight_grad``)."""
    n, c, h, w = x.shape
    o, oh, ow = (int(d) for d in g.shape[1:])
    kh, kw = kernel
    acc = _weight_grad(
        lambda b, ci, i, j: x[b, ci, i, j],
        lambda b, k, i, j: g[b, k, i, j],
        (n, int(c), o),
        (int(h), int(w)),
        (oh, ow),
        kernel,
        strides,
        padding[:2],
        isa,
        container,
        split,
    )
    return te.compute(
        (o, int(c), kh, kw),
        lambda k, ci, i, j: _joined(acc, k, (ci * kh + i) * kw + j, o, isa.lanes, split),
        name="dot_unpack",
    )


def linear_weight_grad(x: te.Tensor, g: te.Tensor, isa: DotISA, container: str, split: int = 0) -> te.Tensor:
    """dw [O, K] = g^T [O, M] @ x [M, K] (int64): the conv case with 1 x 1 images and kernel."""
    m, k = x.shape
    o = int(g.shape[1])
    acc = _weight_grad(
        lambda b, ci, _i, _j: x[b, ci],
        lambda b, oc, _i, _j: g[b, oc],
        (m, int(k), o),
        (1, 1),
        (1, 1),
        (1, 1),
        (1, 1),
        (0, 0),
        isa,
        container,
        split,
    )
    lanes = isa.lanes
    return te.compute((o, int(k)), lambda oc, ci: _joined(acc, oc, ci, o, lanes, split), name="dot_unpack")


def _joined(acc: te.Tensor, k, r, o: int, lanes: int, split: int) -> tirx.PrimExpr:
    """dw[k, r] from ``_weight_grad``'s int64 sums: with ``split``, the high part's sum shifted
    back plus the low part's, ``ceil(O / L)`` lane blocks further on."""
    out = acc[k // lanes, r, k % lanes]
    if split:
        out = (out << split) + acc[k // lanes + ceil_div(o, lanes), r, k % lanes]
    return out


def _weight_grad(
    x_at, g_at, sizes, in_hw, out_hw, kernel, strides, padding, isa: DotISA, container: str, split: int = 0
):
    """int64 [O/L, C*KH*KW, L]: ``dot_fold`` over chunks of the int32 ``marvin_dot_dw`` sums.

    ``split`` (bits): each gradient level g enters as two, ``g >> split`` and ``g & (2**split - 1)``
    (``g = hi * 2**split + lo``), as twice the output channels (``[2 * ceil(O / L), ...]``): the
    products shrink to about ``2**split`` times the input's levels, so int32 chunks of dw stay exact
    at word lengths whose full products would not (the int16 class above its int32 bound; twice
    the dot products, where the float64 kernel runs at a quarter of the int16 instruction's rate).

    Index clamps keep every load inside its tensor (``te_dot.masked`` clears the padding)."""
    n, c, o = sizes
    (h, w), (oh, ow), (kh, kw), (sh, sw), (top, left) = in_hw, out_hw, kernel, strides, padding
    depth, lanes = isa.depth(container), isa.lanes
    rows = dw_rows(isa, container, (oh, ow))
    blocks = dw_chunk(isa, container, (oh, ow)) // (depth * rows * ow)  # sample blocks per chunk
    chunks = (n + blocks * depth - 1) // (blocks * depth)
    (step_h, step_w), (sh, sw) = packed_steps((kh, kw), (sh, sw))  # only those a 1x1 kernel reads
    hp, wp = (oh - 1) * sh + kh, (ow - 1) * sw + kw
    pad = pad_value(isa, container)

    def clamp(v, extent):
        return te.max(te.min(v, extent - 1), 0)

    def element(q, ci, i, j, p):
        b, hi, wi = q * depth + p, i * step_h - top, j * step_w - left
        inside = tirx.all(b < n, hi >= 0, hi < h, wi >= 0, wi < w)
        # the column unclamped, as in the forward's packing (``te_dot.conv2d``): a row stays one
        # vector load (clamped, the loads were gathers: 27% of int8 dw at 16 channels); a 1x1
        # kernel's clamped, as there
        col = clamp(wi, w) if kh == kw == 1 else wi
        value = operand(x_at(te.min(b, n - 1), ci, clamp(hi, h), col), isa, container)
        return masked(value, inside, pad)

    def pack_x(q, ci, i, j):
        return pack_word(lambda p: element(q, ci, i, j, p), isa, container)

    xp = te.compute((chunks * blocks, c, hp, wp), pack_x, name="dot_pack_x")
    gdtype = isa.weight_dtype(container)

    half = ceil_div(o, lanes) * lanes  # where the low parts start, with ``split``

    def pack_g(q, ob, i, j, oi, p):
        b, k = q * depth + p, ob * lanes + oi
        src = tirx.floormod(k, half) if split else k
        value = cast_to(gdtype, g_at(te.min(b, n - 1), te.min(src, o - 1), i, j))
        if split:
            low = tirx.const(2**split - 1, gdtype)
            value = tirx.Select(k < half, value >> tirx.const(split, gdtype), value & low)
        return masked(value, tirx.all(b < n, src < o), tirx.const(0, gdtype))

    lane_blocks = ceil_div(o, lanes) * (2 if split else 1)
    gp = te.compute((chunks * blocks, lane_blocks, oh, ow, lanes, depth), pack_g, name="dot_pack_g")
    t = te.reduce_axis((0, blocks), name="t")
    i = te.reduce_axis((0, rows), name="oh")
    j = te.reduce_axis((0, ow), name="ow")
    p = te.reduce_axis((0, depth), name="p")
    dtype = isa.product_dtype(container)
    taps, kind = kh * kw, (isa, container)
    part = te.compute(  # per chunk: blocks sample blocks x rows output rows
        (chunks, oh // rows, lane_blocks, c * taps, lanes),
        lambda qc, hc, ob, r, oi: te.sum(
            operand_of(
                xp[qc * blocks + t, r // taps, r // kw % kh + (hc * rows + i) * sh, r % kw + j * sw], p, *kind
            )
            * cast_to(dtype, gp[qc * blocks + t, ob, hc * rows + i, j, oi, p]),
            axis=[t, i, j, p],
        ),
        name=DW_BLOCK,
    )
    gsum = None
    if isa.offset(container):
        extents = (blocks, rows, ow, depth)
        t2, i2, j2, p2 = (te.reduce_axis((0, e), name=f"s{d}") for d, e in enumerate(extents))
        gsum = te.compute(
            (chunks, oh // rows, lane_blocks, lanes),
            lambda qc, hc, ob, oi: te.sum(
                tirx.Cast("int32", gp[qc * blocks + t2, ob, hc * rows + i2, j2, oi, p2]),
                axis=[t2, i2, j2, p2],
            ),
            name="dot_grad_sum",
        )
    qc = te.reduce_axis((0, chunks), name="qc")
    hc = te.reduce_axis((0, oh // rows), name="hc")

    def fold(ob, r, oi):
        chunk = part[qc, hc, ob, r, oi]
        if gsum is not None:  # the caller keeps the uncorrected sums in int32 too (TVM may widen first)
            chunk = chunk - OFFSET * gsum[qc, hc, ob, oi]
        return te.sum(tirx.Cast("int64", chunk), axis=[qc, hc])

    return te.compute((lane_blocks, c * taps, lanes), fold, name="dot_fold")
