"""Integer conv/matmul and conv weight gradients on Intel AMX tiles: implicit GEMMs, no im2col.

One AMX instruction multiplies a 16 x 64 int8 tile by a 64 x 16 int8 tile into a 16 x 16 int32
tile: 16384 multiply-adds (an AVX-512 ``vpdpbusd`` does 64). Measured here (Xeon, Emerald
Rapids) a plain tile loop reaches 380-600 GMAC/s on two cores, against 100-150 for float32.

Conv/matmul (``tile_kernel``): output channels are the tile rows and output pixels the tile
columns, so the result lands in NCHW.

- A (weights, ``pack_weight``): ``[parts, O/16, KH, KW, chunks, 16, 4 * rows]``, one tile per
  (output-channel block, kernel tap, channel chunk): 16 output channels x ``4 * rows`` channels;
- B (activations, ``pack_conv_input``): ``[N, parts, C/4, phases, Hq, Wq, 4]``, four channels per
  4-byte group and the padded image split into ``stride x stride`` phase images (those the taps
  read: ``Geometry.phase_grid``), so for any
  kernel tap the 16 output pixels ``f .. f + 15`` (flattened over the phase image's width ``Wq``)
  read 64 contiguous bytes per channel group, and channel groups are one plane apart (the tile's
  row stride). The taps are 16-pixel windows shifted by ``(kh // sh) * Wq + kw // sw``;
- C: ``[N, sums, O16, F]`` int32 with ``F`` the output rows flattened over ``Wq`` (columns past
  the output width are computed and dropped), so unpacking (``unpack_conv``) is a contiguous crop.
  A deployed layer requantizes in the kernel instead (``Levels``): each task's C tiles go to a
  scratch, and ``[N, O16, F]`` receives the layer's levels in its own container.

int8 operands are signed (``tdpbssd``), so no offset or correction is needed. int16 operands
are split into a signed high byte and an unsigned low byte, ``v = 256 * hi + lo`` (``parts`` = 2);
the four byte products run on ``tdpbssd``, ``tdpbsud``, ``tdpbusd`` and ``tdpbuud`` into three
int32 sums (high x high, the two cross terms, low x low), combined in int64 when unpacking:
``65536 * hh + 256 * cross + ll``. Each sum stays below 2**31 for reductions up to
``MAX_REDUCTION``, so int16 is exact at every word length, with no float64 detour. Where the
caller knows the product fits int32 (the word length's bound), the kernel combines the sums
itself through a scratch, in wrapping uint32 (``_Combine``), and writes one: C is
``[N, 1, O16, F]``. Where a
deployed layer's int16 weight levels all fit a byte (``Geometry.narrow``, checked on the frozen
weights), only x is split: ``tdpbssd`` (high byte) and ``tdpbsud`` (low byte) into two sums,
``256 * high + low``, half the tile work and a third less output.

Where a stride-1 conv has few channels, one tap fills a fraction of the tile's 64-byte depth
(16 channels: a quarter). Its kernel columns are then folded into the channels (``Fold``): tap
``j`` of channel ``c`` becomes channel ``j * C + c`` of a one-column kernel, so one product takes a
whole kernel row (3 products an output block instead of 9). The packing writes the source's own
groups, ``kw - 1`` columns wider; the kernel copies them per tap into a per-image folded plane
(``_fold_image``) that stays in cache. It applies wherever it takes fewer products: ResNet-20's
16 channels (the tile loop 1.3x (int8) to 2x (int16) faster) and 32 channels (96 channels in two
chunks: 2 products a kernel row instead of 3; the layer 1.25x faster), not 64 (3 chunks either way).

An int8 conv of a few channels (LeNet-5's 1, an RGB image's 3) becomes a 1 x 1 conv over its
kernel windows (``Geometry.of_patches``): one tile product a window. Its packing, and int16's on
rows of 32 pixels or more, writes B as int32 words, each a pixel's 4-byte channel group built in
registers with the quantizer inlined (``Geometry.words``); elsewhere 4 x 4 byte blocks measured
faster. Fewer than 16 output channels (LeNet-5's 6) take C tiles of only their rows (``out_rows``).

A matmul ``[M, K] x [O, K]^T`` is the same kernel on a ``[1, K, 1, M]`` image with a 1 x 1
kernel; its unpack transposes ``[O16, M]`` back. int8 is exact wherever the int8 class's int32
bound holds.

Weight gradient (``dw_kernel``, int8): ``dw[o, c, i, j] = sum_n sum_f g[n, o, f] x[n, c, f + tap]``
with the input channels as tile rows (A: 64 consecutive pixels of a channel of the phase image,
``pack_dw_input``) and the gradient's channels as columns (B: ``[N, F/4, O16, 4]``,
``pack_dw_grad``), int32 sums per chunk of images (``dw_images``), added up in int64
(``fold_dw``).

Linux grants AMX tile state only on request (``arch_prctl(ARCH_REQ_XCOMP_PERM)``), once per
process; every kernel asks at entry (a cheap no-op once granted), so a deployed library runs in
any process, not only in ours.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from tvm import te, tirx

from marvin_compile.dot_isa import ARCH_REQ_XCOMP_PERM, SYS_ARCH_PRCTL, XFEATURE_XTILEDATA
from marvin_compile.te_dot import cast_to, ceil_div
from marvin_compile.te_ops import output_draw, requantized_level

TILE = 16  # tile rows (output channels) and int32 columns (output pixels)
GROUP = 4  # int8 channels per 4-byte group of a B-tile row
PAIR = 2 * TILE  # output pixels per int8 task (two B tiles); flat output is padded to it
KERNEL, DW_KERNEL = "marvin_amx_dot", "marvin_amx_dw"
WORKERS = 64  # parallel chunks of tasks at most: each configures its tiles once
CHUNK_TASKS = 16  # tasks per chunk at least: a tile configuration costs about as much as a task
MIN_CHANNELS = 8  # below, most of each tile multiplies padding: vpdpbusd is faster
INT32_MAX = 2**31 - 1
MAX_REDUCTION = 2**14  # int16: a cross sum adds two products below 2**16 per term: < 2**31
CONTAINERS = ("int8", "int16")
MIN_INT16_CHANNELS = 32  # int16 on tiles at every word length from this many input channels
DW_STEP = 64  # dw: output pixels per product (one 64-byte A-tile row, 16 four-pixel B-tile rows)
DW_IMAGES = 16  # dw: images per int32 partial sum at most (chunks of work for the threads)
WINDOWS = "amx_windows"  # a word packing's block attribute: 1 where it packs kernel windows
WORD_ROW = 32  # int16 input rows of at least this many pixels are packed as words (Geometry.words)
MAX_FOLDED_PLANE = 2**19  # bytes: a folded conv's per-image plane, well inside a core's L2
# fewer tile steps in all (a step: the loads and products of one tap and chunk; a task's epilogue
# counts as one more): one thread
SERIAL_TILE_STEPS = 2048


@dataclass(frozen=True)
class Fold:
    """A stride-1 conv's kernel columns folded into its channels: tap ``j`` of source channel
    ``c`` is channel ``j * channels + c`` of a one-column kernel over the output width, so one tile
    product takes all ``kw`` taps of a kernel row (16 channels, 3 x 3: 3 products an output block,
    not 9 of a third of the tile's depth). The packing reads the source input (``channels`` x
    ``width``, left padding ``left``) at the shifted columns; the weight packing reorders to match."""

    channels: int
    width: int
    left: int


@dataclass(frozen=True)
class Geometry:
    """Static shape of one AMX conv; a matmul has ``h = 1``, a 1 x 1 kernel and its rows along
    the (symbolic) width, so ``w`` is None. With ``fold`` (``Fold``): the folded conv's."""

    c: int
    h: int
    w: int | None
    o: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    container: str = "int8"
    narrow: bool = False  # int16 with weight levels in [-128, 127] (a deployed layer's, checked)
    fold: Fold | None = None
    patches: Geometry | None = None  # the conv whose kernel windows are this 1 x 1 conv's channels

    @staticmethod
    def of_patches(conv: Geometry) -> Geometry:
        """``conv`` as a 1 x 1 conv over its output grid whose channels are the kernel windows
        (im2col): tap ``t`` of channel ``c`` is channel ``t * C + c``. For convs whose channels
        fill a fraction of a 4-channel group, where neither the tiles nor ``Fold`` suit (LeNet-5's
        first conv, 1 channel; an RGB image's 3): one tile product takes a whole window of up to
        64 bytes (LeNet-5: 25 taps, one product an output block, where the dot-product kernel padded
        every tap's one channel to a 4-byte group). The packing writes the windows as words
        (``words``), ``kh * kw`` times the input's bytes (LeNet-5 at batch 64: 1.4 MB)."""
        oh, ow = conv.out_hw
        c = conv.c * conv.kh * conv.kw
        return Geometry(
            c, oh, ow, conv.o, 1, 1, (1, 1), (0, 0, 0, 0), conv.container, conv.narrow, patches=conv
        )

    def __post_init__(self) -> None:
        if self.narrow and self.container != "int16":
            raise ValueError(f"narrow weights are an int16 geometry's, not {self.container}'s")

    @property
    def source(self) -> tuple[int, int, int | None]:
        """(channels, height, width) of the input the packing reads: with ``fold`` or ``patches``,
        its source's."""
        g = self.packed_input if self.patches is None else self.patches
        return g.c, g.h, g.w

    @property
    def packed_input(self) -> Geometry:
        """The geometry the input packing reads with: this one, or a folded conv's source
        (``Fold``): the source channels, columns from its left padding, the folded rows and phases."""
        if self.fold is None:
            return self
        top, _, bottom, _ = self.padding
        f = self.fold
        return Geometry(
            f.channels,
            self.h,
            f.width,
            self.o,
            self.kh,
            1,
            self.stride,
            (top, f.left, bottom, 0),
            self.container,
        )

    @property
    def words(self) -> bool:
        """Whether the packing writes int32 words, a row of them one vector of four loads, shifts
        and ORs, with the quantizer in registers (``pack_conv_input``), rather than 4 x 4 byte
        blocks that LLVM's SLP vectorizer shuffles. Measured: kernel windows (``patches``; quantize
        and pack) 2-7x faster; int16 at stride 1 on rows of 32 pixels, where both bytes share the
        loads, 2x (ResNet-20's 16-channel int16 layer 1.18x -> 1.54x torch); not on shorter rows
        (the 32-channel layer at 16 x 16: 1.51x -> 1.38x), int8 (0.6-1.1x) or stride 2 (0.66x)."""
        if self.patches is not None:
            return True
        width = self.source[2]
        return self.parts == 2 and self.stride == (1, 1) and width is not None and width >= WORD_ROW

    @property
    def taps(self) -> int:
        """Kernel columns folded into the channels (``Fold``): 1 where there is no fold."""
        return 1 if self.fold is None else self.c // self.fold.channels

    @property
    def folded_plane_bytes(self) -> int:
        """The tile kernel's per-image folded plane (``Fold``): what each worker keeps in cache."""
        hq, wq, _ = self.plane
        return self.parts * self.groups * self.phases * hq * wq * GROUP

    @property
    def parts(self) -> int:
        """Bytes per activation value: int16 splits into a high and a low byte."""
        return CONTAINERS.index(self.container) + 1

    @property
    def w_parts(self) -> int:
        """Bytes per weight value: one for int8 and for narrow int16 weights."""
        return 1 if self.narrow else self.parts

    @property
    def sums(self) -> int:
        """int32 partial sums per output: int16's high, cross and low products; with narrow
        weights, the high and the low byte of x times w."""
        if self.parts == 1:
            return 1
        return 2 if self.narrow else 3

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
    def phase_grid(self) -> tuple[int, int]:
        """Phase images per row and column that the taps read: the stride, capped by the kernel
        (a 1 x 1 stride-2 conv reads one of the four)."""
        return min(self.kh, self.stride[0]), min(self.kw, self.stride[1])

    @property
    def phases(self) -> int:
        rows, cols = self.phase_grid
        return rows * cols

    def phase(self, i, j):
        """The phase image kernel tap (i, j) reads."""
        return (i % self.stride[0]) * self.phase_grid[1] + j % self.stride[1]

    @property
    def out_hw(self) -> tuple[int, int]:
        top, left, bottom, right = self.padding
        return (
            (self.h + top + bottom - self.kh) // self.stride[0] + 1,
            (self.w + left + right - self.kw) // self.stride[1] + 1,
        )

    @property
    def plane(self) -> tuple[int, int, int]:
        """(rows, width Wq, flat outputs F) of a phase image for the forward tiles, F in whole
        tasks: int8's pixel pairs; int16's single tiles (``_plan``), with its rows in 2-pixel steps,
        which leaves less padding to multiply (ResNet-20's 8 x 8 layers: 80 outputs, not 96)."""
        return self.plane_for(PAIR) if self.parts == 1 else self.plane_for(TILE, 2)

    def plane_for(self, multiple: int, align: int = GROUP) -> tuple[int, int, int]:
        """(rows, width Wq, flat outputs F): wide enough for every tap of every output pixel
        (rounded to ``align`` pixels: the packing moves ``align`` x 4 blocks), F rounded up to
        ``multiple``, tall enough that the last block's shifted windows stay inside."""
        sh, sw = self.stride
        oh, ow = self.out_hw
        wq = ceil_div(max(ow + (self.kw - 1) // sw, ceil_div(self.w + self.padding[1], sw)), align) * align
        flat = ceil_div(oh * wq, multiple) * multiple
        reach = flat + (self.kh - 1) // sh * wq + (self.kw - 1) // sw
        hq = ceil_div(reach, wq)
        if sh == 1 and hq == self.padding[0] + self.h + 1:
            hq += 1  # one padding row below the image made LLVM emit the packing scalar (8x slower)
        return hq, wq, flat


def _suits(c: int, reduction: int, container: str) -> bool:
    """Tiles pay off from 8 channels; int16's int32 partial sums bound the reduction."""
    return (
        c >= MIN_CHANNELS and container in CONTAINERS and (container == "int8" or reduction <= MAX_REDUCTION)
    )


def _products(channels: int) -> int:
    """Tile products per kernel tap for this many channels: one per 64-channel chunk."""
    return ceil_div(ceil_div(channels, GROUP), TILE)


def conv_geometry(
    x_shape: list,
    w_shape: list[int],
    strides: list[int],
    padding: list[int],
    container: str = "int8",
    narrow: bool = False,
    fold: bool = True,
) -> Geometry | None:
    """The AMX geometry of a conv2d layer, or None where the tiles do not suit it (``narrow``: int16
    weights known to fit a byte). A stride-1 kernel's columns are folded into the channels
    (``Fold``) where that takes fewer tile products. An int8 conv whose channels fill fractional
    4-channel groups and whose kernel windows fit one 64-byte chunk becomes a 1 x 1 conv over its
    windows (``Geometry.of_patches``; measured: LeNet-5's first conv 1.3x -> 2.0x torch, its second
    (150 window bytes: 3 chunks) and int16 (four byte products) slower). ``fold``: either is allowed
    (dw keeps the kernel's taps)."""
    o, c, kh, kw = (int(v) for v in w_shape)
    h, w = int(x_shape[2]), int(x_shape[3])
    top, left, bottom, right = (int(p) for p in padding)
    foldable = fold and strides[1] == 1 and kw > 1 and c % GROUP == 0  # taps of whole channel groups
    if foldable and _products(kw * c) < kw * _products(c):
        if not _suits(kw * c, c * kh * kw, container):
            return None
        ow = w + left + right - kw + 1
        folded = Fold(c, w, left)
        g = Geometry(kw * c, h, ow, o, kh, 1, (strides[0], 1), (top, 0, bottom, 0), container, narrow, folded)
        if g.folded_plane_bytes <= MAX_FOLDED_PLANE:
            return g
    conv = Geometry(c, h, w, o, kh, kw, tuple(strides), tuple(padding), container, narrow)
    windows = c * kh * kw
    if (
        fold
        and container == "int8"
        and c % GROUP
        and _products(windows) == 1
        and _suits(windows, windows, container)
    ):
        return Geometry.of_patches(conv)  # taps of fractional groups: the windows as channels
    return conv if _suits(c, c * kh * kw, container) else None


def matmul_geometry(w_shape: list[int], container: str = "int8", rows: int | None = None) -> Geometry | None:
    """The AMX geometry of a matmul by ``w`` [O, K], or None where the tiles do not suit it: also
    where its rows are a static handful (``rows``; a library for batch 1, say), which the tiles
    would pad to 32, in three calls (pack, tiles, unpack) where the packed kernel takes one."""
    o, k = (int(v) for v in w_shape)
    if not _suits(k, k, container) or (rows is not None and rows < TILE):
        return None
    return Geometry(k, 1, None, o, 1, 1, (1, 1), (0, 0, 0, 0), container)


def always(g: Geometry | None) -> bool:
    """Whether a layer runs on tiles at every word length: int8; int16 convs with narrow weights
    (two byte products: 2.3x faster than vpdpwssd on ResNet-20's 16-channel layers); and int16
    convs from 32 input channels (8+ rows per tile), where even the four byte products measured
    faster than vpdpwssd where int32 sums would do (``BENCHMARKS.md``). Other int16 layers (fewer
    channels, and matmuls, whose input transpose costs more than the tiles save) take the tiles
    only above their int32 bound."""
    if g is None:
        return False
    return g.parts == 1 or g.narrow or (g.w is not None and g.rows * GROUP >= MIN_INT16_CHANNELS)


def _clamp(index: tirx.PrimExpr, size) -> tirx.PrimExpr:
    """An index kept inside [0, size): the packing loads even where it takes the padding."""
    return tirx.max(tirx.min(index, size - 1), 0)


def _zero_outside(value: tirx.PrimExpr, inside: tirx.PrimExpr) -> tirx.PrimExpr:
    """``value`` (loaded at clamped indices) where ``inside``, else 0. Under a plain Select's
    condition the simplifier drops the clamps as redundant, and the loads ran past the operand;
    ``likely`` keeps them (the simplifier does not take it as a fact). ``te_dot.masked``'s bit
    mask keeps them too, but made this packing 11% slower (ResNet-20 at batch 64)."""
    return tirx.Select(tirx.likely(inside), value, tirx.const(0, "int8"))


def _part(value: tirx.PrimExpr, part, parts: int) -> tirx.PrimExpr:
    """Byte ``part`` of an operand of ``parts`` bytes as int8: the value (one byte: int8, or a
    narrow int16 weight), or int16's high byte (part 0, the arithmetic shift keeps its sign) or low
    byte (part 1, its unsigned bits). The cast keeps the low 8 bits, so one shift by
    ``8 - 8 * part`` serves both."""
    if parts == 1:
        return cast_to("int8", value)
    shift = tirx.Cast("int32", 8 - 8 * part)
    return tirx.Cast("int8", tirx.shift_right(tirx.Cast("int32", value), shift))


def _phase_pixel(x: te.Tensor, g: Geometry, b, part, c, ph, i, j) -> tirx.PrimExpr:
    """Byte ``part`` of channel ``c`` at pixel (i, j) of phase image ``ph`` of the zero-padded
    input ``x`` (NCHW), as int8."""
    sh, sw = g.stride
    cols = g.phase_grid[1]
    hi, wi = i * sh + ph // cols - g.padding[0], j * sw + ph % cols - g.padding[1]
    return _pixel(x, g, b, part, c, hi, wi)


def _window_pixel(x: te.Tensor, g: Geometry, b, part, c, i, j) -> tirx.PrimExpr:
    """Byte ``part`` of channel ``c`` of output pixel (i, j)'s kernel window (``patches``), as int8:
    tap ``c // C`` of source channel ``c % C``. Channels past the taps (group and chunk padding)
    read the last tap: they meet zero weights."""
    s = g.patches
    top, left, bottom, right = s.padding
    tap = tirx.min(c // s.c, s.kh * s.kw - 1)
    hi = i * s.stride[0] + tap // s.kw - top
    wi = j * s.stride[1] + tap % s.kw - left
    value = _part(x[b, c % s.c, _clamp(hi, s.h), wi], part, g.parts)
    # only the padded sides need a test: an output pixel's window stays inside the others, and the
    # pixels past the output grid (computed and dropped) may read anything inside x (row clamp)
    sides = [(top, hi >= 0), (bottom, hi < s.h), (left, wi >= 0), (right, wi < s.w)]
    inside = [test for pad, test in sides if pad]
    return _zero_outside(value, tirx.all(*inside)) if inside else value


def _pixel(x: te.Tensor, g: Geometry, b, part, c, hi, wi) -> tirx.PrimExpr:
    """Byte ``part`` of channel ``c`` at (hi, wi) of ``x`` (NCHW), zero outside the image."""
    inside = tirx.all(c < g.c, hi >= 0, hi < g.h, wi >= 0, wi < g.w)
    # the column is not clamped, so 4 pixels stay one load for the SLP vectorizer: only at the two
    # ends of x do the loads leave it, by at most the padding plus the plane's slack (4 * stride
    # + right elements: 7 at stride 2), bytes glibc's allocator keeps mapped around every block
    # (no channel clamp where the groups hold only real channels: it would cost a min per lane)
    value = x[b, c if g.groups * GROUP == g.c else _clamp(c, g.c), _clamp(hi, g.h), wi]
    return _zero_outside(_part(value, part, g.parts), inside)


def pack_conv_input(x: te.Tensor, g: Geometry) -> te.Tensor:
    """``x`` NCHW -> ``[N, parts, C/4, phases, Hq, Wq, 4]``, zero padding and slack included.
    Folded (``Fold``): the source's own channel groups, ``kw - 1`` columns wider (``fold_width``);
    the tile kernel copies them per tap into the folded plane of each image it works on, which
    stays in cache, where a folded packing would write (and the kernel read) ``kw`` times as much.
    With ``patches``: the kernel windows. Where ``Geometry.words``, the same bytes as int32 words
    (``[N, parts, C/4, phases, Hq, Wq]``, each a pixel's channel group, little-endian)."""
    hq, _, _ = g.plane
    source = g.packed_input

    def byte(b, part, c, ph, i, j) -> tirx.PrimExpr:
        if g.patches is not None:
            return _window_pixel(x, g, b, part, c, i, j)
        return _phase_pixel(x, source, b, part, c, ph, i, j)

    shape = (x.shape[0], g.parts, source.groups, g.phases, hq, fold_width(g))
    if not g.words:

        def block(b, part, cg, ph, i, j, q):
            return byte(b, part, cg * GROUP + q, ph, i, j)

        return te.compute((*shape, GROUP), block, name="amx_pack_x")

    def word(b, part, cg, ph, i, j):
        value = None
        for q in range(GROUP):
            u = tirx.Cast("int32", tirx.Cast("uint8", byte(b, part, cg * GROUP + q, ph, i, j)))
            value = u if value is None else tirx.bitwise_or(value, tirx.shift_left(u, 8 * q))
        return value

    return te.compute(shape, word, name="amx_pack_x", attrs={WINDOWS: int(g.patches is not None)})


def fold_width(g: Geometry) -> int:
    """The packed input's row width: the plane's, plus the taps a folded kernel row spans."""
    wq = g.plane[1]
    return wq if g.fold is None else ceil_div(wq + g.taps - 1, GROUP) * GROUP


def pack_matmul_input(x: te.Tensor, g: Geometry) -> te.Tensor:
    """``x`` [M, K] -> ``[1, parts, K/4, 1, 1, M32, 4]``: rows padded to whole pixel pairs."""
    m = x.shape[0]

    def f(_b, part, cg, _p, _i, r, q):
        c = cg * GROUP + q
        inside = tirx.all(r < m, c < g.c)
        value = x[_clamp(r, m), _clamp(c, g.c)]
        return _zero_outside(_part(value, part, g.parts), inside)

    return te.compute((1, g.parts, g.groups, 1, 1, _pairs(m), GROUP), f, name="amx_pack_x")


def _pairs(m: tirx.PrimExpr) -> tirx.PrimExpr:
    return (m + PAIR - 1) // PAIR * PAIR


def pack_weight(w: te.Tensor, g: Geometry) -> te.Tensor:
    """``w`` [O, C, KH, KW] (or [O, K]) -> the A-tile layout ``[parts, O/16, KH, KW, chunks, 16,
    4 * rows]``, zero past O and C."""
    conv = len(w.shape) == 4

    def f(part, ob, i, j, ch, r, k):
        oc, c = ob * TILE + r, ch * g.rows * GROUP + k
        inside = tirx.all(oc < g.o, c < g.c)
        oc, c = _clamp(oc, g.o), _clamp(c, g.c)
        if g.fold is not None:  # channel c: tap c // C of source channel c % C
            value = w[oc, c % g.fold.channels, i, c // g.fold.channels]
        elif g.patches is not None:  # channel c: window tap c // C of source channel c % C
            p = g.patches
            value = w[oc, c % p.c, c // p.c // p.kw, c // p.c % p.kw]
        else:
            value = w[oc, c, i, j] if conv else w[oc, c]
        return _zero_outside(_part(value, part, g.w_parts), inside)

    shape = (g.w_parts, g.out_blocks, g.kh, g.kw, g.chunks, TILE, g.rows * GROUP)
    return te.compute(shape, f, name="amx_pack_w")


@dataclass(frozen=True)
class Levels:
    """Requantize's integer half, run in the tile kernel (nearest rounding: deployment, and
    training variants whose int16 sums would leave the kernel as three): the bias
    added on the 2**-2fl grid, rounded and shifted to the layer's 2**-fl grid, clamped to its word
    length, and stored as the level in the layer's container. The product then leaves the kernel
    as 1-2 bytes an element, not as 4-12 bytes of int32 sums: the layers are memory bound."""

    bias: bool
    acc: str  # the product's accumulator: int32 / int64
    dtype: str  # the level's container: int8 / int16
    stochastic: bool = False  # rounding: the output site's hash of (seed, element), as te_ops.requantize


def output_shape(
    g: Geometry, n: tirx.PrimExpr, levels: Levels | None = None, combined: bool = False
) -> list[tirx.PrimExpr]:
    """The tile output ``[N, sums, O16, F]`` (with ``levels``: ``[N, O16, F]``; ``combined``: one
    sum, see ``tile_kernel``); for a matmul ``n`` is M and F is M32."""
    images, flat = (1, _pairs(n)) if g.w is None else (n, g.plane[2])
    sums = [] if levels is not None else [1 if combined else g.sums]
    return [images, *sums, g.out_blocks * TILE, flat]


def _combine_sums(sums: list[tirx.PrimExpr], dtype: str = "int64") -> tirx.PrimExpr:
    """The value of a product from its int32 partial sums, most significant first, one byte
    apart: the sum itself (int8), ``256 * high + low`` (narrow weights) or int16's
    ``65536 * hh + 256 * cross + ll``. In int64, or in uint32 (``dtype``), whose wrap-around (no
    signed overflow for LLVM to assume away) leaves the exact int32 bits of a product that fits."""
    value = tirx.Cast(dtype, sums[0])
    for s in sums[1:]:
        value = tirx.shift_left(value, tirx.const(8, dtype)) + tirx.Cast(dtype, s)
    return value


def _combine(y: te.Tensor, b, oc, f, acc: str) -> tirx.PrimExpr:
    sums = int(y.shape[1])
    if sums == 1:  # int8, or int16's sums combined in the kernel
        return cast_to(acc, y[b, 0, oc, f])
    return cast_to(acc, _combine_sums([y[b, s, oc, f] for s in range(sums)]))


def unpack_conv(y: te.Tensor, g: Geometry, acc: str) -> te.Tensor:
    """Tile output -> NCHW in ``acc``: drop the padded channels and the columns past OW."""
    oh, ow = g.out_hw
    wq = g.plane[1]
    return te.compute(
        (y.shape[0], g.o, oh, ow),
        lambda b, oc, i, j: _combine(y, b, oc, i * wq + j, acc),
        name="amx_unpack",
    )


def unpack_matmul(y: te.Tensor, m: tirx.PrimExpr, g: Geometry, acc: str) -> te.Tensor:
    return te.compute((m, g.o), lambda r, oc: _combine(y, 0, oc, r, acc), name="amx_unpack")


def unpack_levels(y: te.Tensor, g: Geometry, rows: tirx.PrimExpr, step: tirx.PrimExpr) -> te.Tensor:
    """Levels (``Levels``) -> the layer's float32 values, ``level * step``, NCHW (a matmul's
    [M, O]): the padded channels and the columns past OW dropped."""
    if g.w is None:
        return te.compute(
            (rows, g.o), lambda r, oc: tirx.Cast("float32", y[0, oc, r]) * step, name="amx_unpack"
        )
    oh, ow = g.out_hw
    wq = g.plane[1]
    return te.compute(
        (y.shape[0], g.o, oh, ow),
        lambda b, oc, i, j: tirx.Cast("float32", y[b, oc, i * wq + j]) * step,
        name="amx_unpack",
    )


LEVELS_WIDTH = "marvin.levels_width"  # a conv's levels unpacking: its plane width Wq (PrimFunc attribute)


def max_pool_levels(
    y: te.Tensor,
    step: tirx.PrimExpr,
    out: tuple[int, int, int],
    wq: int,
    size: tuple[int, int],
    stride: tuple[int, int],
) -> te.Tensor:
    """Levels (``Levels``, ``[N, O16, F]`` over rows of ``wq``) of a conv's output ``out`` =
    (O, OH, OW) -> ``max_pool2d(relu(level * step))`` (no padding): the max of each window's
    levels, then ReLU and the positive scale, which commute with it. A conv - ReLU - max pool
    (LeNet-5's) then writes only the pooled float32 values, where the unpacking wrote the whole
    output for the pool to read again. An element-wise unpacking like ``unpack_levels``, the
    window's taps unrolled."""
    o, oh, ow = out
    ph, pw = (oh - size[0]) // stride[0] + 1, (ow - size[1]) // stride[1] + 1

    def f(b, oc, i, j):
        taps = [
            y[b, oc, (i * stride[0] + ri) * wq + j * stride[1] + rj]
            for ri in range(size[0])
            for rj in range(size[1])
        ]
        level = functools.reduce(tirx.max, taps)
        return tirx.max(tirx.Cast("float32", level) * step, tirx.const(0.0, "float32"))

    return te.compute((y.shape[0], o, ph, pw), f, name="amx_unpack")


def _amx(name: str, *args) -> tirx.PrimExpr:
    return tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


def _address(buffer: tirx.Buffer, indices: list) -> tirx.PrimExpr:
    return tirx.address_of(tirx.BufferLoad(buffer, indices))


def _tile(i: int) -> tirx.PrimExpr:
    return tirx.const(i, "uint8")


def _config(rows: int, out_rows: int = TILE) -> list[tirx.Stmt]:
    """A 64-byte tile configuration (palette 1) for products of ``4 * rows`` bytes: tiles 0-3
    accumulate (``out_rows`` x 16 int32), 4-5 hold A (``out_rows`` x 4*rows bytes), 6-7 hold B
    (rows x 64 bytes)."""
    cfg = tirx.decl_buffer((64,), "uint8", name="tilecfg", scope="local")
    shapes = [(out_rows, 4 * TILE)] * 4 + [(out_rows, GROUP * rows)] * 2 + [(rows, GROUP * TILE)] * 2
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
    folded: tirx.Buffer | None = None  # a folded conv's per-worker plane of one image (``Fold``)


def _operands(g: Geometry, levels: Levels | None, batch: int | None, combined: bool) -> _Operands:
    w_shape = (g.w_parts, g.out_blocks, g.kh, g.kw, g.chunks, TILE, g.rows * GROUP)
    wp = tirx.decl_buffer(w_shape, "int8", name="wp")
    if g.w is None:  # matmul: M rows along the width of one image
        images, flat = 1, tirx.Var("m32", "int64") if batch is None else _pairs(batch)
        xp = tirx.decl_buffer((1, g.parts, g.groups, 1, 1, flat, GROUP), "int8", name="xp")
        wq, plane_bytes = flat, flat * GROUP
    else:
        images = tirx.Var("n", "int64") if batch is None else batch
        hq, wq, flat = g.plane
        shape = (images, g.parts, g.packed_input.groups, g.phases, hq, fold_width(g), GROUP)
        words = g.words  # int32 words of 4 bytes (``pack_conv_input``)
        xp = tirx.decl_buffer(shape[:-1] if words else shape, "int32" if words else "int8", name="xp")
        plane_bytes = g.phases * hq * wq * GROUP
    out_type = "int32" if levels is None else levels.dtype  # output_shape's, with the matmul's own F
    y = tirx.decl_buffer([images, *output_shape(g, images, levels, combined)[1:-1], flat], out_type, name="y")
    folded = None
    if g.fold is not None:
        shape = (g.parts, g.groups, g.phases, hq, wq, GROUP)
        folded = tirx.decl_buffer(shape, "int8", name="folded", scope="global")
    return _Operands(xp, wp, y, images, wq, flat, plane_bytes, folded)


def _fold_image(g: Geometry, ops: _Operands, b: tirx.PrimExpr) -> tirx.Stmt:
    """Image ``b``'s folded plane (``Fold``) from its packed rows: channel group ``gi`` is source
    group ``gi % (C/4)``'s rows shifted by tap ``gi // (C/4)``; 4-byte pixels, a row one vector."""
    per_tap = g.packed_input.groups
    hq, wq, _ = g.plane
    src = tirx.decl_buffer(ops.xp.shape[:6], "int32", name="xp_pixels", data=ops.xp.data)
    dst = tirx.decl_buffer(ops.folded.shape[:-1], "int32", name="folded_pixels", data=ops.folded.data)
    part, gi, ph, i, j = (tirx.Var(v, "int64") for v in ("part", "gi", "ph", "i", "j"))
    tap = tirx.min(gi // per_tap, g.taps - 1)  # groups past the taps (chunk padding) meet zero weights
    value = tirx.BufferLoad(src, [b, part, gi % per_tap, ph, i, j + tap])
    body = tirx.For(j, 0, wq, tirx.ForKind.VECTORIZED, tirx.BufferStore(dst, value, [part, gi, ph, i, j]))
    for var, extent in ((i, hq), (ph, g.phases), (gi, g.groups), (part, g.parts)):
        body = tirx.For(var, 0, extent, tirx.ForKind.SERIAL, body)
    return tirx.SeqStmt(
        [tirx.DeclBuffer(src, data=ops.xp.data), tirx.DeclBuffer(dst, data=ops.folded.data), body]
    )


def _scratch() -> tirx.Buffer:
    """A worker's C tiles, stored for an epilogue that reads them back."""
    return tirx.decl_buffer((4, TILE, TILE), "int32", name="ctiles", scope="local")


@dataclass(frozen=True)
class _Combine:
    """int16's three sums combined in the kernel into the product's int32, where the caller knows
    the product fits (``tile_kernel``'s ``combined``): the kernel writes 4 bytes an output, not 12,
    and the unpacking reads a third as much."""

    scratch: tirx.Buffer

    @property
    def params(self) -> list[tirx.Buffer]:
        return []

    def block(self, g: Geometry, ops: _Operands, slots: list[int], b, oc0, f0) -> tirx.Stmt:
        """One 16 x 16 block (``slots``: the scratch slots of its sums, most significant first);
        the 16 columns are one vector."""
        r, s = tirx.Var("r", "int64"), tirx.Var("s", "int64")
        parts = [tirx.BufferLoad(self.scratch, [slot, r, s]) for slot in slots]
        value = tirx.Cast("int32", _combine_sums(parts, "uint32"))
        return _block_loops(g, r, s, tirx.BufferStore(ops.y, value, [b, 0, oc0 + r, f0 + s]))


@dataclass(frozen=True)
class _Requantize:
    """The buffers of the in-kernel requantize (``Levels``): bias [O] (acc), fl (int32 scalar),
    qp (float32: [2**fl, 2**-fl, level min, level max]), with stochastic rounding the seed (uint32
    scalar), and a per-worker scratch for the C tiles."""

    levels: Levels
    bias: tirx.Buffer | None
    fl: tirx.Buffer
    qp: tirx.Buffer
    seed: tirx.Buffer | None
    scratch: tirx.Buffer

    @staticmethod
    def of(g: Geometry, levels: Levels) -> _Requantize:
        bias = tirx.decl_buffer((g.o,), levels.acc, name="bias") if levels.bias else None
        fl = tirx.decl_buffer((), "int32", name="fl")
        qp = tirx.decl_buffer((4,), "float32", name="qp")
        seed = tirx.decl_buffer((), "uint32", name="seed") if levels.stochastic else None
        return _Requantize(levels, bias, fl, qp, seed, _scratch())

    @property
    def params(self) -> list[tirx.Buffer]:
        return [b for b in (self.bias, self.fl, self.qp, self.seed) if b is not None]

    def block(self, g: Geometry, ops: _Operands, slots: list[int], b, oc0, f0) -> tirx.Stmt:
        """One 16 x 16 block of levels from its C tiles (``slots``: their scratch slots, most
        significant sum first): ``te_ops.requantized_level`` as ``te_ops.requantize`` computes it,
        stochastic rounding included (the hash of the element's index in the unpacked output,
        NCHW or a matmul's [M, O]). The 16 columns are one vector."""
        acc = self.levels.acc
        r, s = tirx.Var("r", "int64"), tirx.Var("s", "int64")
        parts = [tirx.BufferLoad(self.scratch, [slot, r, s]) for slot in slots]
        value = cast_to(acc, parts[0] if len(parts) == 1 else _combine_sums(parts))
        oc = oc0 + r
        bias = None if self.bias is None else tirx.BufferLoad(self.bias, [_clamp(oc, g.o)])
        lo, hi = (tirx.BufferLoad(self.qp, [k]) for k in (2, 3))
        draw = None
        if self.seed is not None:
            f = f0 + s
            if g.w is None:  # a matmul's output [M, O]: row f
                index, shape = [f, oc], [ops.flat, g.o]
            else:
                oh, ow = g.out_hw
                index, shape = [b, oc, f // ops.wq, f % ops.wq], [ops.images, g.o, oh, ow]
            draw = output_draw(self.seed, index, shape)
        level = requantized_level(value, acc, bias, tirx.BufferLoad(self.fl, []), lo, hi, draw)
        return _block_loops(
            g, r, s, tirx.BufferStore(ops.y, tirx.Cast(self.levels.dtype, level), [b, oc, f0 + s])
        )


@dataclass(frozen=True)
class _Plan:
    """One task's tile traffic. Tiles 0-3 accumulate, 4-5 hold A (weights), 6-7 hold B."""

    a: list[tuple[int, int, int]]  # (tile, byte part, A block offset)
    b: list[tuple[int, int, int]]  # (tile, byte part, B block offset)
    products: list[tuple[str, int, int, int]]  # (instruction, C tile, A tile, B tile)
    stores: list[tuple[int, int, int, int]]  # (C tile, partial sum, A block, B block)

    @property
    def pixels(self) -> int:
        return TILE * len({m for *_, m in self.b})


def _plan(g: Geometry, na: int, nb: int) -> _Plan:
    """int8: ``na`` A-tile blocks x ``nb`` B-tile blocks of C tiles, each loaded A and B tile
    feeding up to two products. Narrow int16 weights: ``na`` A-tile blocks x one B block, whose
    high and low byte tiles make two sums (``tdpbssd``, ``tdpbsud``: the low byte is unsigned).
    int16: one block, its high/low byte tiles' four products into three sums."""
    if g.narrow:
        blocks = [(q, p) for q in range(na) for p in range(2)]
        return _Plan(
            a=[(4 + q, 0, q) for q in range(na)],
            b=[(6 + p, p, 0) for p in range(2)],
            products=[(("tdpbssd", "tdpbsud")[p], q * 2 + p, 4 + q, 6 + p) for q, p in blocks],
            stores=[(q * 2 + p, p, q, 0) for q, p in blocks],
        )
    if g.parts == 1:
        blocks = [(q, m) for q in range(na) for m in range(nb)]
        return _Plan(
            a=[(4 + q, 0, q) for q in range(na)],
            b=[(6 + m, 0, m) for m in range(nb)],
            products=[("tdpbssd", q * 2 + m, 4 + q, 6 + m) for q, m in blocks],
            stores=[(q * 2 + m, 0, q, m) for q, m in blocks],
        )
    return _Plan(
        a=[(4, 0, 0), (5, 1, 0)],
        b=[(6, 0, 0), (7, 1, 0)],
        products=[("tdpbssd", 0, 4, 6), ("tdpbsud", 1, 4, 7), ("tdpbusd", 1, 5, 6), ("tdpbuud", 2, 5, 7)],
        stores=[(s, s, 0, 0) for s in range(3)],
    )


def _task(
    g: Geometry, ops: _Operands, plan: _Plan, b, ob0, f0, epilogue: _Requantize | _Combine | None
) -> tirx.Stmt:
    """One task's C tiles: zeroed, accumulated over kernel taps x channel chunks, stored (with an
    ``epilogue``: through a scratch, requantized into levels or combined into one sum)."""
    sh, sw = g.stride
    i, j, ch = (tirx.Var(v, "int64") for v in ("i", "j", "ch"))
    loads = []
    for tile, part, q in plan.a:
        src = tirx.address_of(tirx.BufferLoad(ops.wp, [part, ob0 + q, i, j, ch, 0, 0]))
        loads.append(_amx("tileloadd64", _tile(tile), src, tirx.const(g.rows * GROUP, "int64")))
    phase = g.phase(i, j)
    for tile, part, m in plan.b:
        col = f0 + m * TILE + (i // sh) * ops.wq + j // sw
        if ops.folded is None:
            src = _address(ops.xp, [b, part, ch * g.rows, phase, 0, col, 0][: len(ops.xp.shape)])
        else:
            src = _address(ops.folded, [part, ch * g.rows, phase, 0, col, 0])
        loads.append(_amx("tileloadd64", _tile(tile), src, tirx.Cast("int64", ops.plane_bytes)))
    dots = [_amx(op, _tile(c), _tile(a), _tile(bt)) for op, c, a, bt in plan.products]
    reduce = tirx.SeqStmt([tirx.Evaluate(e) for e in loads + dots])
    for var, extent in ((ch, g.chunks), (j, g.kw), (i, g.kh)):
        reduce = tirx.For(var, 0, extent, tirx.ForKind.SERIAL, reduce)
    zero = [tirx.Evaluate(_amx("tilezero", _tile(c))) for c, *_ in plan.stores]
    if epilogue is not None:
        return tirx.SeqStmt([*zero, reduce, *_through_scratch(g, ops, plan, epilogue, b, ob0, f0)])
    row_bytes = tirx.Cast("int64", ops.flat * 4)
    store = []
    for c, part, q, m in plan.stores:
        dst = tirx.address_of(tirx.BufferLoad(ops.y, [b, part, (ob0 + q) * TILE, f0 + m * TILE]))
        store.append(tirx.Evaluate(_amx("tilestored64", _tile(c), dst, row_bytes)))
    return tirx.SeqStmt([*zero, reduce, *store])


def _through_scratch(
    g: Geometry, ops: _Operands, plan: _Plan, epilogue: _Requantize | _Combine, b, ob0, f0
) -> list[tirx.Stmt]:
    """The C tiles stored to the scratch (slot = tile), then each block's levels to ``y``."""
    stmts = [
        tirx.Evaluate(
            _amx("tilestored64", _tile(c), _address(epilogue.scratch, [c, 0, 0]), tirx.const(64, "int64"))
        )
        for c, *_ in plan.stores
    ]
    for q, m in sorted({(q, m) for *_, q, m in plan.stores}):
        slots = [c for c, _, bq, bm in sorted(plan.stores, key=lambda st: st[1]) if (bq, bm) == (q, m)]
        stmts.append(epilogue.block(g, ops, slots, b, (ob0 + q) * TILE, f0 + m * TILE))
    return stmts


def _block_loops(g: Geometry, r: tirx.Var, s: tirx.Var, store: tirx.Stmt) -> tirx.Stmt:
    """``store`` over a 16 x 16 output block: its real rows (``out_rows``), the 16 columns one vector."""
    vector = tirx.For(s, 0, TILE, tirx.ForKind.VECTORIZED, store)
    return tirx.For(r, 0, out_rows(g), tirx.ForKind.SERIAL, vector)


def out_rows(g: Geometry) -> int:
    """Rows of the C (and A) tiles: fewer than 16 output channels (LeNet-5's first conv: 6) take
    only theirs, so no product, store or epilogue works on the padding rows (left unwritten in
    the output, which its unpacking never reads)."""
    return min(g.o, TILE)


@functools.cache
def tile_kernel(
    g: Geometry, levels: Levels | None = None, batch: int | None = None, combined: bool = False
) -> tirx.PrimFunc:
    """The AMX tile loop for one geometry, written scheduled. A task is one image's block of
    output channels x pixels (``_plan``); parallel chunks of consecutive tasks (which share their
    weight tiles, ``_parallel_tasks``) each configure the tiles once. Its parameters: xp, wp, then with
    ``levels`` bias (if any), fl and qp, and last the output. ``batch``: the batch (a matmul's rows)
    where it is static, so a small one runs on one thread (``_parallel_tasks``). ``combined``: the
    caller knows every product fits int32, and int16's sums leave the kernel as one (``_Combine``)."""
    ops = _operands(g, levels, batch, combined)
    epilogue = _Requantize.of(g, levels) if levels is not None else _Combine(_scratch()) if combined else None
    na = 2 if g.w_parts == 1 and g.out_blocks % 2 == 0 else 1
    plan = _plan(g, na, 2)
    spans = ops.flat // plan.pixels
    per_image = (g.out_blocks // na) * spans
    tasks = ops.images * per_image

    def task(t: tirx.PrimExpr, first: tirx.PrimExpr) -> tirx.Stmt:
        b, rest = t // per_image, t % per_image
        body = _task(g, ops, plan, b, rest // spans * na, rest % spans * plan.pixels, epilogue)
        if ops.folded is None:
            return body
        fresh = tirx.Or(t == first, rest == 0)  # a chunk's first task, or a new image
        return tirx.SeqStmt([tirx.IfThenElse(fresh, _fold_image(g, ops, b), None), body])

    steps = g.kh * g.kw * g.chunks
    config = _config(g.rows, out_rows(g)) + ([] if ops.folded is None else [tirx.AllocBuffer(ops.folded)])
    if epilogue is None:
        return _scheduled([ops.xp, ops.wp, ops.y], _parallel_tasks(tasks, task, config, steps))
    prologue = [*config, tirx.AllocBuffer(epilogue.scratch)]
    body = _parallel_tasks(tasks, task, prologue, steps)
    return _scheduled([ops.xp, ops.wp, *epilogue.params, ops.y], body)


def _parallel_tasks(
    tasks: tirx.PrimExpr,
    task: Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.Stmt],
    config: list[tirx.Stmt],
    steps: int,
) -> tirx.Stmt:
    """Tile state granted, then parallel chunks of consecutive tasks, each configuring the tiles
    once (``task``: of the task and its chunk's first task): up to ``WORKERS`` of them, of at least
    ``CHUNK_TASKS`` tasks (a small batch has few tasks,
    and a configuration per task cost ResNet-20 at batch 1 a tenth of its time). A static task count
    of fewer than ``SERIAL_TILE_STEPS`` steps in all (``steps`` per task, plus one for its stores or
    requantize: LeNet-5's first conv has one step a task; run serial at batch 64, the model took
    0.70 ms, parallel 0.58) runs as one chunk on the calling thread. Loops start at 0: a task loop
    starting at a task-dependent offset computed wrong sums here (TVM 0.27)."""
    worker, k = tirx.Var("worker", "int64"), tirx.Var("k", "int64")
    tasks = tirx.const(tasks, "int64") if isinstance(tasks, int) else tasks
    grant = tirx.Evaluate(
        tirx.call_extern("int64", "syscall", SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    )

    def chunk(first: tirx.PrimExpr, count: tirx.PrimExpr) -> tirx.Stmt:
        own = tirx.For(k, 0, count, tirx.ForKind.SERIAL, task(first + k, first))
        return tirx.SeqStmt([*config, own, tirx.Evaluate(_amx("tilerelease"))])

    if isinstance(tasks, tirx.IntImm) and tasks.value * (steps + 1) < SERIAL_TILE_STEPS:
        return tirx.SeqStmt([grant, chunk(tirx.const(0, "int64"), tasks)])
    chunks = tirx.min(WORKERS, (tasks + CHUNK_TASKS - 1) // CHUNK_TASKS)
    start, stop = worker * tasks // chunks, (worker + 1) * tasks // chunks
    body = tirx.IfThenElse(stop > start, chunk(start, stop - start), None)
    return tirx.SeqStmt([grant, tirx.For(worker, 0, chunks, tirx.ForKind.PARALLEL, body)])


def _scheduled(buffers: list[tirx.Buffer], body: tirx.Stmt) -> tirx.PrimFunc:
    func = tirx.PrimFunc(buffers, body)
    return func.with_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})


def dw_images(g: Geometry) -> int:
    """Images per int32 partial sum of dw: each adds ``F`` terms of magnitude below 2**14 (int8)
    or 2**16 (int16's cross terms: two byte products) (0: not even one image fits, the tiles
    cannot take this layer's dw)."""
    term = 2**14 if g.parts == 1 else 2**16
    return min(DW_IMAGES, INT32_MAX // (g.plane_for(DW_STEP)[2] * term))


def pack_dw_input(x: te.Tensor, g: Geometry) -> te.Tensor:
    """``x`` NCHW -> ``[N, parts, C16, phases, Hq, Wq]``: channel planes of the phase images, so a
    16-channel x 64-pixel window of any tap is one A tile."""
    n = x.shape[0]
    hq, wq, _ = g.plane_for(DW_STEP)

    def f(b, part, c, ph, i, j):
        return _phase_pixel(x, g, b, part, c, ph, i, j)

    shape = (n, g.parts, ceil_div(g.c, TILE) * TILE, g.phases, hq, wq)
    return te.compute(shape, f, name="amx_pack_dw_x")


def pack_dw_grad(gr: te.Tensor, g: Geometry) -> te.Tensor:
    """``g`` [N, O, OH, OW] -> ``[N, parts, F/4, O16, 4]``, output pixels flattened over ``Wq``
    (zero past the output width and height, so those products vanish): the B-tile layout."""
    n = gr.shape[0]
    _, wq, flat = g.plane_for(DW_STEP)
    oh, ow = g.out_hw

    def f(b, part, fg, o, q):
        pixel = fg * GROUP + q
        i, j = pixel // wq, pixel % wq
        inside = tirx.all(o < g.o, i < oh, j < ow)
        value = gr[b, _clamp(o, g.o), _clamp(i, oh), _clamp(j, ow)]
        return _zero_outside(_part(value, part, g.parts), inside)

    return te.compute((n, g.parts, flat // GROUP, g.out_blocks * TILE, GROUP), f, name="amx_pack_dw_g")


def fold_dw(part: te.Tensor, g: Geometry) -> te.Tensor:
    """The per-chunk int32 sums ``[chunks, sums, KH, KW, C16, O16]`` added up in int64 -> dw
    [O, C, KH, KW] (int16: ``65536 * hh + 256 * cross + ll`` per chunk)."""
    r = te.reduce_axis((0, part.shape[0]), name="chunk")
    return te.compute(
        (g.o, g.c, g.kh, g.kw),
        lambda o, c, i, j: te.sum(_combine_sums([part[r, s, i, j, c, o] for s in range(g.sums)]), axis=r),
        name="amx_fold_dw",
    )


def dw_chunks(n: tirx.PrimExpr, g: Geometry) -> tirx.PrimExpr:
    return (n + dw_images(g) - 1) // dw_images(g)


def dw_partial_shape(g: Geometry, n: tirx.PrimExpr) -> list[tirx.PrimExpr]:
    """The kernel's output: int32 partial sums ``[chunks, sums, KH, KW, C16, O16]``."""
    return [dw_chunks(n, g), g.sums, g.kh, g.kw, ceil_div(g.c, TILE) * TILE, g.out_blocks * TILE]


@functools.cache
def dw_kernel(g: Geometry) -> tirx.PrimFunc:
    """dw's AMX tile loop, written scheduled. A task is one kernel tap and a block of C tiles
    (``_plan``: int8 two 16-channel blocks of x, the A tiles, by two of g, the B tiles; int16 one
    by one, its byte products in three sums) over one chunk of images (``dw_images``), stored
    per chunk for ``fold_dw``."""
    n = tirx.Var("n", "int64")
    hq, wq, flat = g.plane_for(DW_STEP)
    cb, ob = ceil_div(g.c, TILE), g.out_blocks
    xp = tirx.decl_buffer((n, g.parts, cb * TILE, g.phases, hq, wq), "int8", name="xp")
    gp = tirx.decl_buffer((n, g.parts, flat // GROUP, ob * TILE, GROUP), "int8", name="gp")
    chunks = tirx.Var("chunks", "int64")  # dw_chunks(n, g)
    part = tirx.decl_buffer((chunks, g.sums, g.kh, g.kw, cb * TILE, ob * TILE), "int32", name="part")
    pair = g.parts == 1
    ma, mb = (2 if pair and cb % 2 == 0 else 1), (2 if pair and ob % 2 == 0 else 1)
    plan = _plan(g, ma, mb)
    blocks = (cb // ma) * (ob // mb)
    per_chunk = g.kh * g.kw * blocks
    sh, sw = g.stride
    plane_bytes = tirx.const(g.phases * hq * wq, "int64")
    g_row, part_row = tirx.const(ob * TILE * GROUP, "int64"), tirx.const(ob * TILE * 4, "int64")
    image, step = tirx.Var("image", "int64"), tirx.Var("step", "int64")

    def task(t: tirx.PrimExpr, _first: tirx.PrimExpr) -> tirx.Stmt:
        chunk, rest = t // per_chunk, t % per_chunk
        first = chunk * dw_images(g)
        b = first + image
        tap, block = rest // blocks, rest % blocks
        c0, o0 = block // (ob // mb) * ma, block % (ob // mb) * mb
        i, j = tap // g.kw, tap % g.kw
        phase = g.phase(i, j)
        col = step * DW_STEP + (i // sh) * wq + j // sw
        loads = [
            _amx(
                "tileloadd64", _tile(tile), _address(xp, [b, p, (c0 + a) * TILE, phase, 0, col]), plane_bytes
            )
            for tile, p, a in plan.a
        ]
        loads += [
            _amx(
                "tileloadd64",
                _tile(tile),
                _address(gp, [b, p, step * (DW_STEP // GROUP), (o0 + q) * TILE, 0]),
                g_row,
            )
            for tile, p, q in plan.b
        ]
        dots = [_amx(op, _tile(c), _tile(at), _tile(bt)) for op, c, at, bt in plan.products]
        inner = tirx.SeqStmt([tirx.Evaluate(e) for e in loads + dots])
        inner = tirx.For(step, 0, flat // DW_STEP, tirx.ForKind.SERIAL, inner)
        images = tirx.For(image, 0, tirx.min(n, first + dw_images(g)) - first, tirx.ForKind.SERIAL, inner)
        zero = [tirx.Evaluate(_amx("tilezero", _tile(c))) for c, *_ in plan.stores]
        store = [
            tirx.Evaluate(
                _amx(
                    "tilestored64",
                    _tile(c),
                    _address(part, [chunk, s, i, j, (c0 + a) * TILE, (o0 + q) * TILE]),
                    part_row,
                )
            )
            for c, s, a, q in plan.stores
        ]
        return tirx.SeqStmt([*zero, images, *store])

    config = _config(DW_STEP // GROUP)  # every tile 16 x 64 bytes
    steps = (flat // DW_STEP) * dw_images(g)  # at most, per task
    return _scheduled([xp, gp, part], _parallel_tasks(chunks * per_chunk, task, config, steps))
