"""Int8 conv/matmul on Intel AMX tiles (``tdpbssd``): an implicit GEMM with output channels as
tile rows and output pixels as tile columns, so the result lands in NCHW.

One AMX instruction multiplies a 16 x 64 int8 tile by a 64 x 16 int8 tile into a 16 x 16 int32
tile: 16384 multiply-adds, 16 times an AVX-512 ``vpdpbusd``. Measured here (Xeon, Emerald Rapids)
a plain tile loop reaches 380-600 GMAC/s on two cores, against 100-150 for float32. Layouts:

- A (weights, ``pack_weight``): ``[O/16, KH, KW, chunks, 16, 4 * rows]``, one tile per
  (output-channel block, kernel tap, channel chunk): 16 output channels x ``4 * rows`` channels;
- B (activations, ``pack_conv_input``): ``[N, C/4, phases, Hq, Wq, 4]``, four channels per 4-byte
  group and the padded image split into ``stride x stride`` phase images, so for any kernel tap
  the 16 output pixels ``f .. f + 15`` (flattened over the phase image's width ``Wq``) read 64
  contiguous bytes per channel group, and channel groups are one plane apart (the tile's row
  stride). No im2col: the taps are 16-pixel windows shifted by ``(kh // sh) * Wq + kw // sw``;
- C: ``[N, O16, F]`` int32 with ``F`` the output rows flattened over ``Wq`` (columns past the
  output width are computed and dropped), so unpacking (``unpack_conv``) is a contiguous crop.

Operands are signed (``tdpbssd``), so no offset or correction is needed. A matmul ``[M, K] x
[O, K]^T`` is the same kernel on a ``[1, K, 1, M]`` image with a 1 x 1 kernel; its unpack
transposes ``[O16, M]`` back. The product is exact wherever the int8 class's int32 bound holds.

Linux grants AMX tile state only on request (``arch_prctl(ARCH_REQ_XCOMP_PERM)``), once per
process; every kernel asks at entry (a cheap no-op once granted), so a deployed library runs in
any process, not only in ours.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tvm import te, tirx

from marvin_compile.dot_isa import ARCH_REQ_XCOMP_PERM, SYS_ARCH_PRCTL, XFEATURE_XTILEDATA
from marvin_compile.te_dot import cast_to, ceil_div

TILE = 16  # tile rows (output channels) and int32 columns (output pixels)
GROUP = 4  # int8 channels per 4-byte group of a B-tile row
PAIR = 2 * TILE  # output pixels per task: two B tiles
KERNEL = "marvin_amx_dot"
WORKERS = 64  # parallel chunks of tasks: each configures its tiles once
MIN_CHANNELS = 8  # below, most of each tile multiplies padding: vpdpbusd is faster


@dataclass(frozen=True)
class Geometry:
    """Static shape of one AMX conv; a matmul has ``h = 1``, a 1 x 1 kernel and its rows along
    the (symbolic) width, so ``w`` is None."""

    c: int
    h: int
    w: int | None
    o: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right

    @property
    def groups(self) -> int:
        """Channel groups, padded to whole 16-group chunks above one chunk."""
        g = ceil_div(self.c, GROUP)
        return g if g <= TILE else ceil_div(g, TILE) * TILE

    @property
    def rows(self) -> int:  # channel groups per tile (B-tile rows)
        return min(self.groups, TILE)

    @property
    def chunks(self) -> int:
        return self.groups // self.rows

    @property
    def out_blocks(self) -> int:
        return ceil_div(self.o, TILE)

    @property
    def phases(self) -> int:
        return self.stride[0] * self.stride[1]

    @property
    def out_hw(self) -> tuple[int, int]:
        top, left, bottom, right = self.padding
        return (
            (self.h + top + bottom - self.kh) // self.stride[0] + 1,
            (self.w + left + right - self.kw) // self.stride[1] + 1,
        )

    @property
    def plane(self) -> tuple[int, int, int]:
        """(rows, width Wq, flat outputs F) of a phase image: wide enough for every tap of every
        output pixel (rounded to 4 pixels: the packing moves 4 x 4 blocks), tall enough that the
        last pixel pair's shifted windows stay inside."""
        sh, sw = self.stride
        oh, ow = self.out_hw
        wq = ceil_div(max(ow + (self.kw - 1) // sw, ceil_div(self.w + self.padding[1], sw)), GROUP) * GROUP
        flat = ceil_div(oh * wq, PAIR) * PAIR
        reach = flat + (self.kh - 1) // sh * wq + (self.kw - 1) // sw
        return ceil_div(reach, wq), wq, flat


def conv_geometry(
    x_shape: list, w_shape: list[int], strides: list[int], padding: list[int]
) -> Geometry | None:
    """The AMX geometry of a conv2d layer, or None where tiles would mostly multiply padding."""
    o, c, kh, kw = (int(v) for v in w_shape)
    if c < MIN_CHANNELS:
        return None
    g = Geometry(c, int(x_shape[2]), int(x_shape[3]), o, kh, kw, tuple(strides), tuple(padding))
    return g


def matmul_geometry(w_shape: list[int]) -> Geometry | None:
    o, k = (int(v) for v in w_shape)
    return None if k < MIN_CHANNELS else Geometry(k, 1, None, o, 1, 1, (1, 1), (0, 0, 0, 0))


def pack_conv_input(x: te.Tensor, g: Geometry) -> te.Tensor:
    """``x`` int8 NCHW -> ``[N, C/4, phases, Hq, Wq, 4]``, zero padding and slack included."""
    n = x.shape[0]
    hq, wq, _ = g.plane
    sh, sw = g.stride
    top, left = g.padding[0], g.padding[1]

    def f(b, cg, ph, i, j, q):
        c, hi, wi = cg * GROUP + q, i * sh + ph // sw - top, j * sw + ph % sw - left
        inside = tirx.all(c < g.c, hi >= 0, hi < g.h, wi >= 0, wi < g.w)
        return tirx.Select(inside, cast_to("int8", x[b, c, hi, wi]), tirx.const(0, "int8"))

    return te.compute((n, g.groups, g.phases, hq, wq, GROUP), f, name="amx_pack_x")


def pack_matmul_input(x: te.Tensor, g: Geometry) -> te.Tensor:
    """``x`` int8 [M, K] -> ``[1, K/4, 1, 1, M32, 4]``: rows padded to whole pixel pairs."""
    m = x.shape[0]

    def f(_b, cg, _p, _i, r, q):
        c = cg * GROUP + q
        inside = tirx.all(r < m, c < g.c)
        return tirx.Select(inside, cast_to("int8", x[tirx.min(r, m - 1), c]), tirx.const(0, "int8"))

    return te.compute((1, g.groups, 1, 1, _pairs(m), GROUP), f, name="amx_pack_x")


def _pairs(m: tirx.PrimExpr) -> tirx.PrimExpr:
    return (m + PAIR - 1) // PAIR * PAIR


def pack_weight(w: te.Tensor, g: Geometry) -> te.Tensor:
    """``w`` int8 [O, C, KH, KW] (or [O, K]) -> the A-tile layout ``[O/16, KH, KW, chunks, 16,
    4 * rows]``, zero past O and C."""
    conv = len(w.shape) == 4

    def f(ob, i, j, ch, r, k):
        oc, c = ob * TILE + r, ch * g.rows * GROUP + k
        inside = tirx.all(oc < g.o, c < g.c)
        value = w[oc, c, i, j] if conv else w[oc, c]
        return tirx.Select(inside, cast_to("int8", value), tirx.const(0, "int8"))

    shape = (g.out_blocks, g.kh, g.kw, g.chunks, TILE, g.rows * GROUP)
    return te.compute(shape, f, name="amx_pack_w")


def output_shape(g: Geometry, n: tirx.PrimExpr) -> list[tirx.PrimExpr]:
    """The tile output ``[N, O16, F]``; for a matmul ``n`` is M and the output ``[1, O16, M32]``."""
    if g.w is None:
        return [1, g.out_blocks * TILE, _pairs(n)]
    return [n, g.out_blocks * TILE, g.plane[2]]


def unpack_conv(y: te.Tensor, g: Geometry, acc: str) -> te.Tensor:
    """``[N, O16, F]`` -> NCHW in ``acc``: drop the padded channels and the columns past OW."""
    oh, ow = g.out_hw
    wq = g.plane[1]
    return te.compute(
        (y.shape[0], g.o, oh, ow), lambda b, oc, i, j: cast_to(acc, y[b, oc, i * wq + j]), name="amx_unpack"
    )


def unpack_matmul(y: te.Tensor, m: tirx.PrimExpr, g: Geometry, acc: str) -> te.Tensor:
    return te.compute((m, g.o), lambda r, oc: cast_to(acc, y[0, oc, r]), name="amx_unpack")


def _amx(name: str, *args) -> tirx.PrimExpr:
    return tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


def _tile(i: int) -> tirx.PrimExpr:
    return tirx.const(i, "uint8")


def _config(g: Geometry) -> list[tirx.Stmt]:
    """A 64-byte tile configuration (palette 1): tiles 0-3 accumulate (16 x 16 int32), 4-5 hold
    A (16 x 4*rows bytes), 6-7 hold B (rows x 64 bytes)."""
    cfg = tirx.decl_buffer((64,), "uint8", name="tilecfg", scope="local")
    shapes = [(TILE, 4 * TILE)] * 4 + [(TILE, GROUP * g.rows)] * 2 + [(g.rows, GROUP * TILE)] * 2
    values = {0: 1}
    for t, (rows, colsb) in enumerate(shapes):
        values[16 + 2 * t] = colsb  # little-endian uint16, colsb < 256
        values[48 + t] = rows
    stmts = [tirx.AllocBuffer(cfg)]
    stmts += [tirx.BufferStore(cfg, tirx.const(values.get(i, 0), "uint8"), [i]) for i in range(64)]
    stmts.append(tirx.Evaluate(_amx("ldtilecfg", tirx.address_of(tirx.BufferLoad(cfg, [0])))))
    return stmts


@dataclass(frozen=True)
class _Operands:
    """The kernel's buffers and the B-side geometry they imply (a matmul's width is symbolic)."""

    xp: tirx.Buffer
    wp: tirx.Buffer
    y: tirx.Buffer
    images: tirx.PrimExpr
    wq: tirx.PrimExpr  # phase-image width: a tap's shift per kernel row
    flat: tirx.PrimExpr  # output columns per image
    plane_bytes: tirx.PrimExpr  # B-tile row stride: one channel group


def _operands(g: Geometry) -> _Operands:
    lanes = g.out_blocks * TILE
    wp = tirx.decl_buffer((g.out_blocks, g.kh, g.kw, g.chunks, TILE, g.rows * GROUP), "int8", name="wp")
    if g.w is None:  # matmul: M rows along the width of one image
        flat = tirx.Var("m32", "int64")
        xp = tirx.decl_buffer((1, g.groups, 1, 1, flat, GROUP), "int8", name="xp")
        y = tirx.decl_buffer((1, lanes, flat), "int32", name="y")
        return _Operands(xp, wp, y, 1, flat, flat, flat * GROUP)
    n = tirx.Var("n", "int64")
    hq, wq, flat = g.plane
    xp = tirx.decl_buffer((n, g.groups, g.phases, hq, wq, GROUP), "int8", name="xp")
    y = tirx.decl_buffer((n, lanes, flat), "int32", name="y")
    return _Operands(xp, wp, y, n, wq, flat, g.phases * hq * wq * GROUP)


def _task(g: Geometry, ops: _Operands, b, ob0, f0, nb: int) -> tirx.Stmt:
    """One C block: output channels ``ob0 .. ob0 + nb`` (16-blocks) x pixels ``f0 .. f0 + 32``,
    zeroed, accumulated over kernel taps x channel chunks, stored."""
    sh, sw = g.stride
    i, j, ch = (tirx.Var(v, "int64") for v in ("i", "j", "ch"))
    loads = []
    for q in range(nb):
        src = tirx.address_of(tirx.BufferLoad(ops.wp, [ob0 + q, i, j, ch, 0, 0]))
        loads.append(_amx("tileloadd64", _tile(4 + q), src, tirx.const(g.rows * GROUP, "int64")))
    phase = (i % sh) * sw + j % sw
    for m in range(2):
        col = f0 + m * TILE + (i // sh) * ops.wq + j // sw
        src = tirx.address_of(tirx.BufferLoad(ops.xp, [b, ch * g.rows, phase, 0, col, 0]))
        loads.append(_amx("tileloadd64", _tile(6 + m), src, tirx.Cast("int64", ops.plane_bytes)))
    dots = [
        _amx("tdpbssd", _tile(q * 2 + m), _tile(4 + q), _tile(6 + m)) for q in range(nb) for m in range(2)
    ]
    reduce = tirx.SeqStmt([tirx.Evaluate(e) for e in loads + dots])
    for var, extent in ((ch, g.chunks), (j, g.kw), (i, g.kh)):
        reduce = tirx.For(var, 0, extent, tirx.ForKind.SERIAL, reduce)
    zero = [tirx.Evaluate(_amx("tilezero", _tile(c))) for c in range(2 * nb)]
    store = []
    for q in range(nb):
        for m in range(2):
            dst = tirx.address_of(tirx.BufferLoad(ops.y, [b, (ob0 + q) * TILE, f0 + m * TILE]))
            row_bytes = tirx.Cast("int64", ops.flat * 4)
            store.append(tirx.Evaluate(_amx("tilestored64", _tile(q * 2 + m), dst, row_bytes)))
    return tirx.SeqStmt([*zero, reduce, *store])


@functools.cache
def tile_kernel(g: Geometry) -> tirx.PrimFunc:
    """The AMX tile loop for one geometry, written scheduled. Tasks are (image, pair of
    output-channel blocks, pair of 16-pixel blocks): a 2 x 2 block of C tiles, so every loaded A
    and B tile feeds two products. ``WORKERS`` parallel chunks of consecutive tasks (which share
    their weight tiles) each configure the tiles once."""
    ops = _operands(g)
    nb = 2 if g.out_blocks % 2 == 0 else 1
    pairs = ops.flat // PAIR
    per_image = (g.out_blocks // nb) * pairs
    tasks = ops.images * per_image
    t, worker = tirx.Var("t", "int64"), tirx.Var("worker", "int64")
    rest = t % per_image
    body = _task(g, ops, t // per_image, rest // pairs * nb, rest % pairs * PAIR, nb)
    start, stop = worker * tasks // WORKERS, (worker + 1) * tasks // WORKERS
    own = tirx.For(t, start, stop - start, tirx.ForKind.SERIAL, body)
    chunk = tirx.SeqStmt([*_config(g), own, tirx.Evaluate(_amx("tilerelease"))])
    grant = tirx.call_extern("int64", "syscall", SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    parallel = tirx.For(worker, 0, WORKERS, tirx.ForKind.PARALLEL, tirx.IfThenElse(stop > start, chunk, None))
    func = tirx.PrimFunc([ops.xp, ops.wp, ops.y], tirx.SeqStmt([tirx.Evaluate(grant), parallel]))
    return func.with_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
