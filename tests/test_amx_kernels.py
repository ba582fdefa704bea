"""The AMX int8 tile kernels (``amx`` + ``schedule_amx``) against float64 torch.

Runs where the host has AMX-INT8 and the OS grants tile state; elsewhere the integer classes keep
the packed dot-product kernels, which ``test_dot_kernels`` covers. Operands include the
containers' extreme products (-128 * -128, -32768 * -32768), shapes
cover strides 1-3, asymmetric padding, channel counts that are not whole 4-channel groups or
whole 64-channel chunks, output channels that are not whole 16-channel blocks, ragged output
widths and ragged GEMM rows.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import tvm
from tvm import te, tirx

from marvin_compile import amx
from marvin_compile.dot_isa import dot_isa
from marvin_compile.passes.schedule_cpu import schedule_prim_func
from marvin_compile.target import resolve_target
from tests.guard_pages import at_page_end

TARGET = resolve_target("cpu")
HOST = dot_isa(TARGET)
pytestmark = pytest.mark.skipif(HOST is None or not HOST.amx, reason="host CPU or OS lacks AMX-INT8")


def _operands(rng, shape, container: str) -> np.ndarray:
    info = np.iinfo(container)
    v = rng.integers(info.min, info.max + 1, size=shape, dtype=np.int64)
    v.flat[: min(3, v.size)] = [info.min, info.min, info.max][: min(3, v.size)]
    return v.astype(container)


def _compile(funcs: dict[str, tirx.PrimFunc]):
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    return tvm.compile(mod, target=TARGET)


def _stages(g: amx.Geometry, n, matmul: bool, levels: amx.Levels | None, combined: bool = False):
    """The TE stages around the tile kernel at batch (matmul: rows) ``n``: x, its packing, the
    unpacking's inputs and its output."""
    acc = "int32" if g.container == "int8" else "int64"
    xs = te.placeholder((n, g.c) if matmul else (n, *g.source), g.container, name="x")
    pack = amx.pack_matmul_input(xs, g) if matmul else amx.pack_conv_input(xs, g)
    if levels is None:
        ys = te.placeholder(amx.output_shape(g, n, None, combined), "int32", name="y")
        out = amx.unpack_matmul(ys, n, g, acc) if matmul else amx.unpack_conv(ys, g, acc)
        return xs, pack, [ys], out
    ys = te.placeholder(amx.output_shape(g, n, levels), g.container, name="y")
    qp = te.placeholder((4,), "float32", name="qp")
    return xs, pack, [ys, qp], amx.unpack_levels(ys, g, n, qp[1])


@functools.cache
def _library(
    g: amx.Geometry,
    w_shape: tuple[int, ...],
    matmul: bool,
    levels: amx.Levels | None,
    batch: int | None = None,
    combined: bool = False,
):
    """pack x, pack w, the tile kernel and the unpacking, compiled once per geometry for any batch
    (``batch``: for that one only, as a library specialized to it; ``combined``: int16's sums
    combined in the kernel)."""
    n = tirx.Var("n", "int64") if batch is None else batch
    xs, pack, unpack_in, out = _stages(g, n, matmul, levels, combined)
    ws = te.placeholder(w_shape, g.container, name="w")
    wp = amx.pack_weight(ws, g)
    with TARGET:
        return _compile(
            {
                "pack_x": schedule_prim_func(te.create_prim_func([xs, pack])),
                "pack_w": schedule_prim_func(te.create_prim_func([ws, wp])),
                "dot": amx.tile_kernel(g, levels, batch, combined),
                "unpack": schedule_prim_func(te.create_prim_func([*unpack_in, out])),
            }
        ), wp


def _run(
    g: amx.Geometry,
    x: np.ndarray,
    w: np.ndarray,
    matmul: bool,
    levels: amx.Levels | None = None,
    requant: tuple[np.ndarray, ...] = (),
    static: bool = False,
    combined: bool = False,
) -> np.ndarray:
    """pack x and w, the tile kernel, unpack: the exact int64 product, or with ``levels`` the
    kernel's requantized levels scaled back (``requant``: the kernel's bias, fl, qp arguments; the
    unpacking takes the last, qp; ``static``: compiled for this batch only; ``combined``: int16's
    sums combined in the kernel, exact where the product fits int32)."""
    lib, wp = _library(g, w.shape, matmul, levels, x.shape[0] if static else None, combined)
    _, pack, unpack_in, out = _stages(g, x.shape[0], matmul, levels, combined)  # the buffers at this batch
    dev = tvm.cpu()

    def empty(t: te.Tensor) -> tvm.runtime.Tensor:
        return tvm.runtime.empty([int(d) for d in t.shape], t.dtype, dev)

    # operands end right before an unmapped page, a conv's x CONV_X_SLACK bytes before it: its
    # packing's column loads may pass x's ends by the padding plus the plane's slack (amx._phase_pixel)
    xt = at_page_end(x, slack=0 if matmul else CONV_X_SLACK)
    buffers = [xt, empty(pack), at_page_end(w), empty(wp)]
    y, result = empty(unpack_in[0]), empty(out)
    args = [tvm.runtime.tensor(a, dev) for a in requant]
    lib["pack_x"](buffers[0], buffers[1])
    lib["pack_w"](buffers[2], buffers[3])
    lib["dot"](buffers[1], buffers[3], *args, y)
    lib["unpack"](y, *args[-1:], result)
    return result.numpy()


CONV_X_SLACK = 256  # bytes past a conv's x that stay mapped in the tests: a few columns' overshoot
CONVS = [  # (n, c, h, w, o, kh, kw, stride, padding)
    (2, 16, 9, 9, 32, 3, 3, (1, 1), (1, 1, 1, 1)),
    (3, 8, 7, 11, 20, 3, 3, (2, 2), (1, 1, 1, 1)),  # ragged widths, O not a 16-block, stride 2
    (1, 70, 6, 6, 16, 1, 1, (1, 1), (0, 0, 0, 0)),  # channels past one 64-channel chunk
    (2, 13, 10, 10, 17, 5, 3, (1, 3), (2, 0, 1, 1)),  # odd channels, stride 3, asymmetric pad
    (1, 64, 8, 8, 64, 3, 3, (1, 1), (1, 1, 1, 1)),  # ResNet-20's last stage at batch 1
    (2, 16, 9, 9, 24, 1, 1, (2, 2), (0, 0, 0, 0)),  # a 1 x 1 stride-2 shortcut: one phase image of four
    (2, 8, 7, 9, 16, 1, 3, (2, 2), (0, 1, 0, 1)),  # one phase row, two phase columns
    (1, 80, 5, 5, 16, 3, 3, (1, 1), (1, 1, 1, 1)),  # whole groups padded to two chunks: clamped
    (1, 64, 3, 33, 16, 3, 3, (1, 1), (1, 1, 1, 1)),  # rows of 33 pixels: int16 packed as words
]


CONTAINERS = pytest.mark.parametrize("container", ["int8", "int16"])


@CONTAINERS
@pytest.mark.parametrize("shape", CONVS, ids=lambda s: "x".join(map(str, s[:7])) + f"s{s[7][0]}{s[7][1]}")
def test_conv_is_exact(shape, container: str) -> None:
    """int16 over its full range too: byte products, int64 sum, no int32 bound."""
    n, c, h, w, o, kh, kw, stride, padding = shape
    rng = np.random.default_rng(0)
    x, wt = _operands(rng, (n, c, h, w), container), _operands(rng, (o, c, kh, kw), container)
    g = amx.Geometry(c, h, w, o, kh, kw, stride, padding, container)
    top, left, bottom, right = padding
    xpad = torch.from_numpy(np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right))))
    ref = torch.nn.functional.conv2d(xpad, torch.from_numpy(wt.astype(np.float64)), stride=stride)
    np.testing.assert_array_equal(_run(g, x, wt, matmul=False), ref.numpy().astype(np.int64))


FOLDED = [  # (n, c, h, w, o, kh, kw, stride, padding): stride-1 columns, whole 4-channel groups
    (2, 16, 9, 9, 32, 3, 3, (1, 1), (1, 1, 1, 1)),  # ResNet-20's first stage, small
    (8, 16, 12, 12, 16, 3, 3, (1, 1), (1, 1, 1, 1)),  # parallel chunks that start mid-image
    (3, 8, 7, 11, 20, 3, 3, (2, 1), (1, 1, 1, 1)),  # row stride 2: two phase rows
    (2, 4, 10, 9, 17, 3, 5, (1, 1), (2, 0, 1, 3)),  # asymmetric padding, 5 columns of 4 channels
    (1, 12, 6, 7, 16, 1, 4, (1, 1), (0, 2, 0, 1)),  # one kernel row, an even kernel width
    (2, 32, 8, 8, 32, 3, 3, (1, 1), (1, 1, 1, 1)),  # 96 channels: two chunks, the second half padding
    (2, 16, 4, 32, 16, 3, 3, (1, 1), (1, 1, 1, 1)),  # 32-pixel rows: int16 packed as words
]


@CONTAINERS
@pytest.mark.parametrize("shape", FOLDED, ids=lambda s: "x".join(map(str, s[:7])) + f"s{s[7][0]}{s[7][1]}")
def test_folded_conv_is_exact(shape, container: str) -> None:
    """Kernel columns folded into the channels (``amx.Fold``): the packing's source rows, the
    kernel's per-image copy per tap, the reordered weight, against float64 torch."""
    n, c, h, w, o, kh, kw, stride, padding = shape
    rng = np.random.default_rng(3)
    x, wt = _operands(rng, (n, c, h, w), container), _operands(rng, (o, c, kh, kw), container)
    g = amx.conv_geometry([n, c, h, w], [o, c, kh, kw], list(stride), list(padding), container)
    assert g is not None and g.fold is not None and g.kw == 1 and g.c == kw * c
    top, left, bottom, right = padding
    xpad = torch.from_numpy(np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right))))
    ref = torch.nn.functional.conv2d(xpad, torch.from_numpy(wt.astype(np.float64)), stride=stride)
    np.testing.assert_array_equal(_run(g, x, wt, matmul=False), ref.numpy().astype(np.int64))


def test_folding_needs_stride_1_columns_whole_groups_and_fewer_products() -> None:
    def fold(c: int, kw: int, stride: int = 1):
        return amx.conv_geometry([1, c, 16, 16], [16, c, 3, kw], [1, stride], [1, 1, 1, 1]).fold

    assert fold(16, 3) == amx.Fold(16, 16, 1)  # 3 products a kernel row, not 9
    assert fold(32, 3) == amx.Fold(32, 16, 1)  # 96 channels in two chunks: 2 products, not 3
    assert fold(16, 3, stride=2) is None and fold(12, 1) is None
    assert fold(64, 3) is None  # 3 chunks of 64 either way
    assert fold(10, 3) is None  # taps would split 4-channel groups


PATCHES = [  # (n, c, h, w, o, kh, kw, stride, padding): fewer than 8 channels, fractional groups
    (2, 1, 32, 32, 6, 5, 5, (1, 1), (0, 0, 0, 0)),  # LeNet-5's first conv: 25 taps, one product
    (3, 6, 14, 14, 16, 5, 5, (1, 1), (0, 0, 0, 0)),  # LeNet-5's second: 150 channels, three chunks
    (2, 3, 9, 9, 16, 3, 3, (1, 1), (1, 1, 1, 1)),  # ResNet-20's stem (an RGB image), small
    (2, 3, 11, 10, 20, 3, 4, (2, 2), (1, 0, 2, 1)),  # stride 2, asymmetric padding, even width
    (1, 5, 12, 12, 16, 7, 7, (2, 3), (3, 3, 3, 3)),  # 245 channels: four chunks, the last padding
]


@CONTAINERS
@pytest.mark.parametrize("shape", PATCHES, ids=lambda s: "x".join(map(str, s[:7])) + f"s{s[7][0]}{s[7][1]}")
def test_window_conv_is_exact(shape, container: str) -> None:
    """A conv of a few channels as a 1 x 1 conv over its kernel windows (``Geometry.of_patches``):
    the window packing (int32 words) and the reordered weight, against float64 torch; int16 and
    windows of several chunks too, which ``conv_geometry`` leaves to the dot-product kernels."""
    n, c, h, w, o, kh, kw, stride, padding = shape
    rng = np.random.default_rng(5)
    x, wt = _operands(rng, (n, c, h, w), container), _operands(rng, (o, c, kh, kw), container)
    g = amx.Geometry.of_patches(amx.Geometry(c, h, w, o, kh, kw, stride, padding, container))
    assert g.words and (g.kh, g.kw, g.c) == (1, 1, c * kh * kw)
    top, left, bottom, right = padding
    xpad = torch.from_numpy(np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right))))
    ref = torch.nn.functional.conv2d(xpad, torch.from_numpy(wt.astype(np.float64)), stride=stride)
    np.testing.assert_array_equal(_run(g, x, wt, matmul=False), ref.numpy().astype(np.int64))


def test_windows_for_int8_convs_of_fractional_groups_in_one_chunk() -> None:
    def patches(c: int, k: int = 3, container: str = "int8"):
        g = amx.conv_geometry([1, c, 16, 16], [16, c, k, k], [1, 1], [1, 1, 1, 1], container)
        return None if g is None else g.patches

    assert patches(1, 5) is not None and patches(3) is not None and patches(6) is not None
    assert patches(6, 5) is None  # 150 window channels: three chunks (measured slower)
    assert patches(3, container="int16") is None  # four byte products (measured slower)
    assert patches(4) is None and patches(8) is None  # whole groups: folded (Fold) or plain tiles
    assert patches(1, 1) is None and patches(1, 2) is None  # 1 or 4 channels in all: below the tiles'


def test_words_for_kernel_windows_and_long_int16_rows_at_stride_1() -> None:
    def words(c: int, size: int, container: str, stride: int = 1) -> bool:
        return amx.conv_geometry([1, c, size, size], [16, c, 3, 3], [stride] * 2, [1] * 4, container).words

    assert words(3, 8, "int8")  # kernel windows
    assert words(16, 32, "int16") and words(64, 32, "int16")  # folded and not
    assert not words(32, 16, "int16") and not words(16, 32, "int8") and not words(16, 32, "int16", 2)


@pytest.mark.parametrize("n", [1, 64])
def test_static_batch_runs_small_work_on_one_thread(n: int) -> None:
    """A kernel specialized to a batch whose tile work is below SERIAL_TILE_STEPS has no parallel
    loop (waking the thread pool costs more than it shares), a larger one keeps it; both exact."""
    c, h, o = 16, 12, 32
    g = amx.Geometry(c, h, h, o, 3, 3, (1, 1), (1, 1, 1, 1), "int8")
    steps = 9 * n * (g.out_blocks // 2) * (g.plane[2] // amx.PAIR)
    assert (steps < amx.SERIAL_TILE_STEPS) == (n == 1)
    assert ("T.parallel" in amx.tile_kernel(g, None, n).script()) == (n > 1)
    rng = np.random.default_rng(n)
    x, wt = _operands(rng, (n, c, h, h), "int8"), _operands(rng, (o, c, 3, 3), "int8")
    xpad = torch.from_numpy(np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1))))
    ref = torch.nn.functional.conv2d(xpad, torch.from_numpy(wt.astype(np.float64)))
    np.testing.assert_array_equal(_run(g, x, wt, matmul=False, static=True), ref.numpy().astype(np.int64))


@pytest.mark.parametrize(
    "shape", CONVS[1:4], ids=lambda s: "x".join(map(str, s[:7])) + f"s{s[7][0]}{s[7][1]}"
)
def test_narrow_weight_conv_is_exact(shape) -> None:
    """int16 activations over their full range times weights whose levels fit a byte (a deployed
    layer's, checked at build time): two byte products into two sums, odd and even numbers of
    16-channel output blocks."""
    n, c, h, w, o, kh, kw, stride, padding = shape
    rng = np.random.default_rng(2)
    x, wt = _operands(rng, (n, c, h, w), "int16"), _operands(rng, (o, c, kh, kw), "int8").astype(np.int16)
    g = amx.Geometry(c, h, w, o, kh, kw, stride, padding, "int16", narrow=True)
    top, left, bottom, right = padding
    xpad = torch.from_numpy(np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right))))
    ref = torch.nn.functional.conv2d(xpad, torch.from_numpy(wt.astype(np.float64)), stride=stride)
    np.testing.assert_array_equal(_run(g, x, wt, matmul=False), ref.numpy().astype(np.int64))


def _run_levels(g: amx.Geometry, x: np.ndarray, w: np.ndarray, bias, fl: int, matmul: bool) -> np.ndarray:
    """The tile kernel with the in-kernel requantize (``amx.Levels``), at ``fl``, clamped to the
    container."""
    acc = "int32" if g.container == "int8" else "int64"
    info = np.iinfo(g.container)
    qp = np.array([2.0**fl, 2.0**-fl, info.min, info.max], np.float32)
    requant = ([] if bias is None else [bias.astype(acc)]) + [np.array(fl, np.int32), qp]
    return _run(g, x, w, matmul, amx.Levels(bias is not None, acc, g.container), tuple(requant))


def _requantized_reference(acc: np.ndarray, bias, fl: int, container: str, axis: int) -> np.ndarray:
    """te_ops.requantize in numpy int64: (acc + bias * 2**fl + 2**(fl-1)) >> fl, clamped, scaled."""
    total = acc.astype(np.int64)
    if bias is not None:
        shape = [1] * acc.ndim
        shape[axis] = -1
        total = total + bias.astype(np.int64).reshape(shape) * 2**fl
    info = np.iinfo(container)
    level = np.clip((total + (2 ** (fl - 1) if fl else 0)) >> fl, info.min, info.max)
    return (level * 2.0**-fl).astype(np.float32)


@pytest.mark.parametrize(
    "kind,fl,with_bias,shape",
    [
        ("int8", 4, True, CONVS[0]),
        ("int8", 0, False, CONVS[1]),
        ("int16", 9, True, CONVS[1]),
        ("int16", 9, True, CONVS[3]),
        ("narrow", 12, True, CONVS[4]),
        ("narrow", 3, False, CONVS[2]),  # one 16-channel output block
    ],
    ids=lambda v: "x".join(map(str, v[:7])) if isinstance(v, tuple) else str(v),
)
def test_conv_levels_in_kernel_match_requantize(kind: str, fl: int, with_bias: bool, shape) -> None:
    """The tile kernel's own requantize (deployment) gives te_ops.requantize's levels: bias on the
    2**-2fl grid, round half up, shift, clamp at the container's ends, for each kernel family."""
    n, c, h, w, o, kh, kw, stride, padding = shape
    container = "int8" if kind == "int8" else "int16"
    rng = np.random.default_rng(3)
    x = _operands(rng, (n, c, h, w), container)
    wt = _operands(rng, (o, c, kh, kw), "int8" if kind == "narrow" else container).astype(container)
    bias = rng.integers(-(2**20), 2**20, size=o) if with_bias else None
    g = amx.Geometry(c, h, w, o, kh, kw, stride, padding, container, narrow=kind == "narrow")
    top, left, bottom, right = padding
    xpad = torch.from_numpy(np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right))))
    acc = torch.nn.functional.conv2d(xpad, torch.from_numpy(wt.astype(np.float64)), stride=stride).numpy()
    want = _requantized_reference(acc.astype(np.int64), bias, fl, container, axis=1)
    np.testing.assert_array_equal(_run_levels(g, x, wt, bias, fl, matmul=False), want)


@pytest.mark.parametrize("container", ["int8", "int16"])
def test_matmul_levels_in_kernel_match_requantize(container: str) -> None:
    rng = np.random.default_rng(4)
    x, w = _operands(rng, (33, 64), container), _operands(rng, (10, 64), container)
    bias = rng.integers(-1000, 1000, size=10)
    want = _requantized_reference((x.astype(np.int64) @ w.astype(np.int64).T), bias, 6, container, axis=1)
    got = _run_levels(amx.matmul_geometry([10, 64], container), x, w, bias, 6, matmul=True)
    np.testing.assert_array_equal(got, want)


@CONTAINERS
@pytest.mark.parametrize("rows", [1, 5, 33, 130])
@pytest.mark.parametrize("k,o", [(400, 120), (64, 10), (9, 33)])
def test_matmul_is_exact(rows: int, k: int, o: int, container: str) -> None:
    rng = np.random.default_rng(rows)
    x, w = _operands(rng, (rows, k), container), _operands(rng, (o, k), container)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    got = _run(amx.matmul_geometry([o, k], container), x, w, matmul=True)
    np.testing.assert_array_equal(got, ref.astype(np.int64))


@pytest.mark.parametrize("shape", [CONVS[0], CONVS[3], CONVS[4]], ids=["16x9", "13x10s13", "64x8"])
def test_int16_sums_combined_in_kernel_are_exact_where_the_product_fits_int32(shape) -> None:
    """Training's int16 kernel at word lengths whose products fit int32: the three byte-product
    sums leave the kernel as one int32, exact though ``65536 * hh`` alone passes 2**31."""
    n, c, h, w, o, kh, kw, stride, padding = shape
    bound = int((2**31 // (c * kh * kw)) ** 0.5)  # |x|, |w| <= bound: every sum fits int32
    rng = np.random.default_rng(1)
    x = rng.integers(-bound, bound + 1, (n, c, h, w)).astype(np.int16)
    wt = rng.integers(-bound, bound + 1, (o, c, kh, kw)).astype(np.int16)
    x[0], wt[0] = -bound, -bound  # output channel 0 of image 0 near +2**31 where no padding enters
    g = amx.Geometry(c, h, w, o, kh, kw, stride, padding, "int16")
    top, left, bottom, right = padding
    xpad = torch.from_numpy(np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right))))
    ref = torch.nn.functional.conv2d(xpad, torch.from_numpy(wt.astype(np.float64)), stride=stride).numpy()
    assert np.abs(ref).max() < 2**31 and np.abs(ref).max() > 2**30
    got = _run(g, x, wt, matmul=False, combined=True)
    np.testing.assert_array_equal(got, ref.astype(np.int64))


def test_int16_matmul_sums_combined_in_kernel_are_exact() -> None:
    k = 8
    x, w = np.full((3, k), -16383, np.int16), np.full((16, k), 16383, np.int16)
    x[1] = 16383
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    got = _run(amx.matmul_geometry([16, k], "int16"), x, w, matmul=True, combined=True)
    np.testing.assert_array_equal(got, ref.astype(np.int64))


def test_worst_case_int16_reduction_is_exact() -> None:
    """The longest reduction int16 takes on tiles, every product (-32768)**2: 2**44 in total."""
    k = amx.MAX_REDUCTION
    x, w = np.full((3, k), -32768, np.int16), np.full((16, k), -32768, np.int16)
    got = _run(amx.matmul_geometry([16, k], "int16"), x, w, matmul=True)
    np.testing.assert_array_equal(got, np.full((3, 16), k * 2**30, np.int64))


DW_CONVS = [  # (n, c, h, w, o, kh, kw, stride, padding)
    (3, 16, 9, 9, 32, 3, 3, (1, 1), (1, 1, 1, 1)),
    (19, 8, 7, 11, 20, 3, 3, (2, 2), (1, 1, 1, 1)),  # ragged, two chunks of images, stride 2
    (40, 16, 32, 32, 16, 3, 3, (1, 1), (1, 1, 1, 1)),  # ResNet-20's first stage, three chunks
    (2, 13, 10, 10, 17, 5, 3, (1, 3), (2, 0, 1, 1)),
    (4, 16, 9, 9, 32, 1, 1, (2, 2), (0, 0, 0, 0)),  # one phase image of four
]


@CONTAINERS
@pytest.mark.parametrize("shape", DW_CONVS, ids=lambda s: "x".join(map(str, s[:7])) + f"s{s[7][0]}{s[7][1]}")
def test_weight_gradient_is_exact(shape, container: str) -> None:
    """dw = sum over images and pixels of g x, int32 per chunk of images, int64 over chunks; int16
    over its full range, as byte products."""
    n, c, h, w, o, kh, kw, stride, padding = shape
    g = amx.Geometry(c, h, w, o, kh, kw, stride, padding, container)
    rng = np.random.default_rng(1)
    x, gr = _operands(rng, (n, c, h, w), container), _operands(rng, (n, o, *g.out_hw), container)
    _check_weight_gradient(g, x, gr)


def test_worst_case_int16_weight_gradient_chunk_is_exact() -> None:
    """Every term at the largest cross sum int16 allows (-32513 = -128 * 256 + 255: both cross
    products at -128 * 255) over whole chunks of 32 x 32 images: the int32 partial sums hold."""
    g = amx.Geometry(16, 32, 32, 16, 3, 3, (1, 1), (1, 1, 1, 1), "int16")
    x = np.full((2 * amx.dw_images(g), 16, 32, 32), -32513, np.int16)
    _check_weight_gradient(g, x, np.full((x.shape[0], 16, 32, 32), -32513, np.int16))


def _check_weight_gradient(g: amx.Geometry, x: np.ndarray, gr: np.ndarray) -> None:
    n, c, h, w = x.shape
    o, kh, kw, stride, padding, container = g.o, g.kh, g.kw, g.stride, g.padding, g.container
    oh, ow = g.out_hw

    def stages(batch):
        xs = te.placeholder((batch, c, h, w), container, name="x")
        gs = te.placeholder((batch, o, oh, ow), container, name="g")
        chunks = tirx.Var("chunks", "int64") if isinstance(batch, tirx.Var) else amx.dw_chunks(batch, g)
        parts = te.placeholder([chunks, *amx.dw_partial_shape(g, batch)[1:]], "int32")
        return xs, gs, amx.pack_dw_input(xs, g), amx.pack_dw_grad(gs, g), parts

    xs, gs, xp, gp, parts = stages(tirx.Var("n", "int64"))
    with TARGET:
        lib = _compile(
            {
                "pack_x": schedule_prim_func(te.create_prim_func([xs, xp])),
                "pack_g": schedule_prim_func(te.create_prim_func([gs, gp])),
                "dot": amx.dw_kernel(g),
                "fold": schedule_prim_func(te.create_prim_func([parts, amx.fold_dw(parts, g)])),
            }
        )
    _, _, xp, gp, parts = stages(n)
    dev = tvm.cpu()

    def empty(t: te.Tensor) -> tvm.runtime.Tensor:
        return tvm.runtime.empty([int(d) for d in t.shape], t.dtype, dev)

    xt, gt, xpt, gpt, pt = (
        tvm.runtime.tensor(x, dev),
        at_page_end(gr),
        empty(xp),
        empty(gp),
        empty(parts),
    )
    out = tvm.runtime.empty((o, c, kh, kw), "int64", dev)
    lib["pack_x"](xt, xpt)
    lib["pack_g"](gt, gpt)
    lib["dot"](xpt, gpt, pt)
    lib["fold"](pt, out)
    top, left, bottom, right = padding
    xpad = torch.from_numpy(np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right))))
    ref = torch.nn.grad.conv2d_weight(
        xpad, (o, c, kh, kw), torch.from_numpy(gr.astype(np.float64)), stride=stride
    )
    np.testing.assert_array_equal(out.numpy(), ref.numpy().astype(np.int64))


def test_layers_the_tiles_do_not_suit_keep_the_packed_kernels() -> None:
    """Below 8 input channels most of each tile row would multiply padding; int16's int32 partial
    sums bound its reduction; other containers have no tile instructions."""
    assert amx.conv_geometry([1, 3, 32, 32], [16, 3, 1, 1], [1, 1], [0, 0, 0, 0]) is None
    assert amx.matmul_geometry([10, 4]) is None
    assert amx.conv_geometry([1, 16, 32, 32], [16, 16, 3, 3], [1, 1], [1, 1, 1, 1]) is not None
    assert amx.matmul_geometry([10, amx.MAX_REDUCTION], "int16") is not None
    assert amx.matmul_geometry([10, amx.MAX_REDUCTION + 1], "int16") is None
    assert amx.matmul_geometry([10, 64], "int32") is None
