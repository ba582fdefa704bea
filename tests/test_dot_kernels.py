"""The packed dot-product kernels (``te_dot`` + ``schedule_dot``) against float64 torch, per x86 ISA.

Every ISA the host can execute is checked, on operands that include the container's extreme
values, for shapes with odd channel counts, strides, ragged output widths and ragged rows. The
operands end right before an unreadable page (but a padded conv's input), so a load past their
end faults the test. Every ISA is also compiled, whatever the host, to check that its kernels reach
their dot-product instruction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import te

from marvin_compile import te_dot, te_dot_grad
from marvin_compile.dot_isa import BIASED_INT8, ISAS, dot_isa
from marvin_compile.passes.lower_integer import int32_max_wl
from marvin_compile.passes.schedule_dot import dot_signature, schedule_dot_func, scheduled
from marvin_compile.passes.schedule_dot_grad import schedule_dot_dw
from marvin_compile.target import resolve_target
from tests.guard_pages import at_page_end

MCPU = {"avx2": "znver3", "avx512": "skylake-avx512", "avx512_vnni": "icelake-server"}
ORDER = ["avx2", "avx512", "avx512_vnni"]
HOST = dot_isa(resolve_target("cpu"))
RUNNABLE = [] if HOST is None else ORDER[: ORDER.index(HOST.name) + 1]


def isa_params():
    return [
        pytest.param(name, marks=pytest.mark.skipif(name not in RUNNABLE, reason=f"host CPU lacks {name}"))
        for name in ORDER
    ]


def _build(name: str, make, *placeholders):
    target = tvm.target.Target({"kind": "llvm", "mcpu": MCPU[name], "num-cores": 2})
    out = make(*placeholders, ISAS[name])
    func = schedule_dot_func(te.create_prim_func([*placeholders, out]), target)
    return tvm.compile(tvm.IRModule({"main": func}), target=target)


def _operands(rng, container: str, shape):
    info = np.iinfo(container)
    v = rng.integers(info.min, info.max + 1, size=shape, dtype=np.int64)
    v.flat[: min(4, v.size)] = [info.min, info.max, info.min, 0][: min(4, v.size)]
    return v.astype(container)


def _inputs(rng, container: str, x_shape, w_shape):
    """x and w for a kernel of ``container``, in the dtypes its placeholders take. ``uint8`` is the
    non-negative int8 activation (a ReLU's output) against full-range int8 weights: the first
    image all 127 against output channels all -128 and all 127 (vpmaddubsw's pair sums at their
    extremes, -32512 and 32258, still inside int16), the rest random in [0, 127]."""
    if container != "uint8":
        return _operands(rng, container, x_shape), _operands(rng, container, w_shape)
    x, w = np.maximum(_operands(rng, "int8", x_shape), 0), _operands(rng, "int8", w_shape)
    x[0], w[0], w[-1] = 127, -128, 127
    return x, w


def _dtype(container: str) -> str:
    """The placeholders' dtype: a non-negative activation is quantized into int8 like any other."""
    return "int8" if container == "uint8" else container


def _scale(v: np.ndarray, wl: int) -> np.ndarray:
    """Restrict values to wl bits (the int16 class's fast path runs only where int32 suffices)."""
    return np.clip(v, -(2 ** (wl - 1)), 2 ** (wl - 1) - 1).astype(v.dtype)


CONVS = [  # (n, c, h, o, k, stride, pad); few channels fold kernel columns into the depth (folds_taps)
    (2, 3, 9, 10, 3, 1, 1),
    (2, 5, 8, 11, 3, 1, 1),  # rows of 8 at stride 1: pixels on AVX2's lanes (te_dot.pixel_lanes)
    (2, 9, 16, 7, 3, 1, 1),  # rows of 16: pixels on every ISA's lanes
    (2, 1, 16, 6, 5, 1, 2),  # folded taps, pixels on the lanes
    (2, 1, 32, 6, 5, 1, 0),  # LeNet-5's conv1: rows of 28 padded to whole vectors, x at a page end
    (2, 5, 7, 20, 1, 1, 0),  # rows of 7 padded, unfolded
    (2, 1, 12, 6, 5, 2, 2),
    (3, 16, 16, 32, 3, 2, 1),
    (2, 3, 21, 9, 3, 2, 0),  # strided, odd: folded taps where the depth holds 2 or 4
    (2, 4, 19, 6, 5, 3, 2),  # stride 3, 5 taps
    (1, 6, 14, 16, 5, 1, 0),
    (2, 16, 16, 32, 1, 2, 0),  # a strided 1x1 (ResNet's shortcut): only every other row and column packed
    (2, 5, 9, 7, 1, 2, 1),  # the same, padded, odd: packed rows and columns outside x are padding
]


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("container", ["int8", "int16", "uint8"])
@pytest.mark.parametrize("shape", CONVS, ids=lambda s: "n{}c{}h{}o{}k{}s{}p{}".format(*s))
def test_conv2d_exact(isa, container, shape):
    n, c, h, o, k, stride, pad = shape
    rng = np.random.default_rng(sum(shape))
    x, w = _inputs(rng, container, (n, c, h, h), (o, c, k, k))
    if container == "int16":
        wl = int32_max_wl(c * k * k)
        x, w = _scale(x, wl), _scale(w, wl)
    nv = tvm.tirx.Var("n", "int64")
    xp = te.placeholder((nv, c, h, h), _dtype(container), name="x")
    wp = te.placeholder((o, c, k, k), _dtype(container), name="w")

    def make(xt, wt, isa_):
        return te_dot.conv2d(xt, wt, (stride, stride), (pad,) * 4, isa_, container, "int32")

    lib = _build(isa, make, xp, wp)
    x64, w64 = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64))
    ref = torch.nn.functional.conv2d(x64, w64, stride=stride, padding=pad).numpy()
    out = tvm.runtime.tensor(np.zeros(ref.shape, np.int32))
    # a padded conv's packing may read ``pad`` elements beyond the ends of x (te_dot.conv2d): that x
    # gets an ordinary buffer, which malloc always follows with mapped bytes
    xt = at_page_end(x) if pad == 0 else tvm.runtime.tensor(x)
    lib["main"](xt, at_page_end(w), out)
    np.testing.assert_array_equal(out.numpy().astype(np.float64), ref)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("container", ["int8", "int16", "uint8"])
@pytest.mark.parametrize("rows", [1, 7, 8, 13])
def test_matmul_exact(isa, container, rows):
    k, o = 37, 21
    rng = np.random.default_rng(rows)
    x, w = _inputs(rng, container, (rows, k), (o, k))
    if container == "int16":
        x, w = _scale(x, int32_max_wl(k)), _scale(w, int32_max_wl(k))
    mv = tvm.tirx.Var("m", "int64")
    dtype = _dtype(container)
    xp, wp = te.placeholder((mv, k), dtype, name="x"), te.placeholder((o, k), dtype, name="w")
    lib = _build(isa, lambda xt, wt, isa_: te_dot.matmul(xt, wt, isa_, container, "int64"), xp, wp)
    out = tvm.runtime.tensor(np.zeros((rows, o), np.int64))
    lib["main"](at_page_end(x), at_page_end(w), out)
    np.testing.assert_array_equal(out.numpy(), x.astype(np.int64) @ w.astype(np.int64).T)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("shape", CONVS, ids=lambda s: "n{}c{}h{}o{}k{}s{}p{}".format(*s))
def test_full_range_int16_conv_on_float64_is_exact(isa, shape):
    """Above the int32 bound (here: every int16 value, K up to 144) the int16 class packs its
    operands as float64, whose integer-valued sums stay exact."""
    n, c, h, o, k, stride, pad = shape
    rng = np.random.default_rng(sum(shape) + 1)
    x, w = _operands(rng, "int16", (n, c, h, h)), _operands(rng, "int16", (o, c, k, k))
    x.flat[:8], w.flat[:8] = -(2**15), -(2**15)  # products of 2**30, sums far past int32
    nv = tvm.tirx.Var("n", "int64")
    xp, wp = te.placeholder((nv, c, h, h), "int16", name="x"), te.placeholder((o, c, k, k), "int16", name="w")

    def make(xt, wt, isa_):
        return te_dot.conv2d(xt, wt, (stride, stride), (pad,) * 4, isa_, "float64", "int64")

    lib = _build(isa, make, xp, wp)
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(x.astype(np.int64)), torch.from_numpy(w.astype(np.int64)), stride=stride, padding=pad
    ).numpy()
    out = tvm.runtime.tensor(np.zeros(ref.shape, np.int64))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    np.testing.assert_array_equal(out.numpy(), ref)


INSTRUCTION = {  # (isa, container): the dot-product instruction its integer kernels are built on
    ("avx2", "int8"): "vpmaddwd",
    ("avx2", "int16"): "vpmaddwd",
    ("avx512", "int8"): "vpmaddwd",
    ("avx512", "int16"): "vpmaddwd",
    ("avx512_vnni", "int8"): "vpdpbusd",
    ("avx512_vnni", "int16"): "vpdpwssd",
    ("avx2", "uint8"): "vpmaddubsw",
    ("avx512", "uint8"): "vpmaddubsw",
    ("avx512_vnni", "uint8"): "vpdpbusd",
}


@pytest.mark.parametrize(("isa", "container"), list(INSTRUCTION))
def test_every_isa_tensorizes_onto_its_instruction(isa, container):
    """Compiled, not run (the host may lack the ISA): forward convs over a symbolic batch (int64
    loops), one with channels and one with pixels on the lanes, and a dw over a static batch
    (int32 loops) each tensorize their reduction, or schedule raises, and the machine code holds
    the ISA's instruction."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": MCPU[isa], "num-cores": 2})
    nv = tvm.tirx.Var("n", "int64")
    dtype = _dtype(container)
    xs, g = te.placeholder((4, 16, 8, 8), dtype), te.placeholder((4, 32, 8, 8), dtype)
    w = te.placeholder((32, 16, 3, 3), dtype, name="w")
    funcs = {}
    for form, size in (("channel lanes", 6), ("pixel lanes", 16)):
        x = te.placeholder((nv, 16, size, size), dtype, name="x")
        y = te_dot.conv2d(x, w, (1, 1), (1,) * 4, ISAS[isa], container, "int32")
        assert te_dot.pixel_lanes(32, size, 1, ISAS[isa].lanes) == (form == "pixel lanes")
        funcs[form] = schedule_dot_func(te.create_prim_func([x, w, y]), target)
    dw = te_dot_grad.conv2d_weight_grad(xs, g, (3, 3), (1, 1), (1,) * 4, ISAS[isa], container)
    funcs["dw"] = scheduled(te.create_prim_func([xs, g, dw]), target, schedule_dot_dw)
    for name, func in funcs.items():
        asm = tvm.compile(tvm.IRModule({"main": func}), target=target).mod.inspect_source("asm")
        assert INSTRUCTION[isa, container] in asm, f"{isa} {container} {name}"


@pytest.mark.parametrize("k", [1, 18, 144, 576, 4608])
def test_int32_max_wl_is_the_exact_bound(k):
    wl = int32_max_wl(k)
    assert k * 4 ** (wl - 1) <= 2**31 - 1 < k * 4**wl


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize(("h", "stride"), [(9, 2), (16, 1)], ids=["channel-lanes", "pixel-lanes"])
def test_float32_conv_matches_float64(isa, h, stride):
    n, c, o, k = 2, 5, 20, 3
    rng = np.random.default_rng(7)
    x, w = (
        rng.standard_normal((n, c, h, h)).astype(np.float32),
        rng.standard_normal((o, c, k, k)).astype(np.float32),
    )
    nv = tvm.tirx.Var("n", "int64")
    xp, wp = (
        te.placeholder((nv, c, h, h), "float32", name="x"),
        te.placeholder((o, c, k, k), "float32", name="w"),
    )

    def make(xt, wt, isa_):
        return te_dot.conv2d(xt, wt, (stride, stride), (1,) * 4, isa_, "float32", "float32")

    lib = _build(isa, make, xp, wp)
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(x).double(), torch.from_numpy(w).double(), stride=stride, padding=1
    )
    out = tvm.runtime.tensor(np.zeros(ref.shape, np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)


PAIR_ISAS = [p for p in isa_params() if ISAS[p.values[0]].pairs_in_int16("uint8")]


def _pairs_kernel(isa: str, x_shape, w_shape, conv: tuple[int, int] | None, container: str = "uint8"):
    """A kernel accumulating int16 pair sums (``int16_sums``) on ``uint8`` (a ReLU-fed input) or
    ``BIASED_INT8`` (a signed one as x + 128): a conv (stride, padding) or, with ``conv`` None, a
    matmul."""
    lead = tvm.tirx.Var("n", "int64")
    xp = te.placeholder((lead, *x_shape[1:]), "int8", name="x")
    wp = te.placeholder(w_shape, "int8", name="w")

    def make(xt, wt, isa_):
        if conv is None:
            return te_dot.matmul(xt, wt, isa_, container, "int32", int16_sums=True)
        stride, pad = conv
        return te_dot.conv2d(xt, wt, (stride, stride), (pad,) * 4, isa_, container, "int32", int16_sums=True)

    return _build(isa, make, xp, wp)


def _product(x: np.ndarray, w: np.ndarray, conv: tuple[int, int] | None) -> np.ndarray:
    x64, w64 = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64))
    if conv is None:
        return (x64 @ w64.T).numpy()
    return torch.nn.functional.conv2d(x64, w64, stride=conv[0], padding=conv[1]).numpy()


# (container, lowest input, the largest value the byte chain's operand reaches)
PAIR_OPERANDS = [("uint8", 0, 127), (BIASED_INT8, -128, 255)]


@pytest.mark.parametrize("isa", PAIR_ISAS)
@pytest.mark.parametrize(("container", "low", "top"), PAIR_OPERANDS, ids=["relu-fed", "signed"])
@pytest.mark.parametrize("shape", CONVS, ids=lambda s: "n{}c{}h{}o{}k{}s{}p{}".format(*s))
def test_int16_sum_conv2d_exact(isa, container, low, top, shape):
    """Weights whose pair lanes fit int16 (``int16_sums_fit``), inputs over the whole range (the
    signed ones at -128 and 127 too): the int16-sum kernel equals float64 torch, for every shape
    the int32 kernels cover."""
    n, c, h, o, k, stride, pad = shape
    rng = np.random.default_rng(sum(shape) + 2)
    x = rng.integers(low, 128, size=(n, c, h, h)).astype(np.int8)
    x[0], x[-1, 0] = 127, low
    w = rng.integers(-4, 5, size=(o, c, k, k)).astype(np.int8)
    if not te_dot.int16_sums_fit(w, top):
        w = rng.integers(-1, 2, size=(o, c, k, k)).astype(np.int8)
    assert te_dot.int16_sums_fit(w, top)
    lib = _pairs_kernel(isa, x.shape, w.shape, (stride, pad), container)
    ref = _product(x, w, (stride, pad))
    out = tvm.runtime.tensor(np.zeros(ref.shape, np.int32))
    lib["main"](tvm.runtime.tensor(x), at_page_end(w), out)
    np.testing.assert_array_equal(out.numpy().astype(np.float64), ref)


# layouts that place the reduction differently in the words: (x shape, w shape, conv (stride, pad))
BOUND_LAYERS = pytest.mark.parametrize(
    "layer",
    [
        ((2, 16, 8, 8), (4, 16, 3, 3), (1, 1)),
        ((2, 1, 16, 16), (6, 1, 5, 5), (1, 2)),
        ((5, 37), (3, 37), None),
    ],
    ids=["conv", "conv-folded-taps", "matmul"],
)


def _exact_bound(lib, x: np.ndarray, layer, fits) -> int:
    """Output 0's weights all v, the others 1: the largest v that ``fits`` (a weight check)
    accepts gives ``lib``'s exact product and the next one a wrong one, at either sign. So the
    check admits no weights the kernel gets wrong and refuses none it gets right. Returns v."""
    _, w_shape, conv = layer
    w = np.ones(w_shape, np.int8)

    def exact(v: int) -> bool:
        w[0] = v
        ref = _product(x, w, conv)
        out = tvm.runtime.tensor(np.zeros(ref.shape, np.int32))
        lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
        return bool(np.array_equal(out.numpy().astype(np.float64), ref))

    def accepted(v: int) -> bool:
        w_v = w.copy()
        w_v[0] = v
        return fits(w_v)

    largest = max(v for v in range(1, 128) if accepted(v))
    assert not accepted(-largest - 1)
    assert exact(largest) and not exact(largest + 1)
    assert exact(-largest) and not exact(-largest - 1)
    return largest


@pytest.mark.parametrize("isa", PAIR_ISAS)
@pytest.mark.parametrize(("container", "low", "top"), PAIR_OPERANDS, ids=["relu-fed", "signed"])
@BOUND_LAYERS
def test_int16_sums_fit_is_the_exact_bound(isa, container, low, top, layer):
    """The int16-sum kernel, every input 127 (a signed one packed as 255): ``int16_sums_fit``
    is its exact bound (a pair lane past 2**15 - 1 is wrong)."""
    x_shape, w_shape, conv = layer
    lib = _pairs_kernel(isa, x_shape, w_shape, conv, container)
    x = np.full(x_shape, 127, np.int8)
    assert _exact_bound(lib, x, layer, lambda w: te_dot.int16_sums_fit(w, top)) < 127


@pytest.mark.parametrize("isa", PAIR_ISAS)
@BOUND_LAYERS
def test_pair_sums_fit_is_the_exact_bound(isa, layer):
    """The byte chain on int32 sums, every input 255 (an int16 layer's levels): ``pair_sums_fit``
    is its exact bound (a pair of products just inside int16 is exact, past it ``vpmaddubsw``
    saturates); below 128 every byte weight fits."""
    x_shape, w_shape, conv = layer
    xp = te.placeholder((tvm.tirx.Var("n", "int64"), *x_shape[1:]), "int16", name="x")
    wp = te.placeholder(w_shape, "int8", name="w")

    def make(xt, wt, isa_):
        if conv is None:
            return te_dot.matmul(xt, wt, isa_, "uint8", "int32")
        stride, pad = conv
        return te_dot.conv2d(xt, wt, (stride, stride), (pad,) * 4, isa_, "uint8", "int32")

    lib = _build(isa, make, xp, wp)
    x = np.full(x_shape, 255, np.int16)
    assert _exact_bound(lib, x, layer, lambda w: te_dot.pair_sums_fit(w, 255)) == 64
    assert te_dot.pair_sums_fit(np.full(w_shape, -128, np.int8), 127)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_int16_sum_kernels_tensorize_on_every_byte_chain_isa(isa):
    """Compiled, not run: int16-sum convs over a symbolic batch, channels and pixels on the lanes,
    reach ``vpmaddubsw`` and the int16 add; VNNI has no such form (``vpdpbusd`` sums in int32)."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": MCPU[isa], "num-cores": 2})
    nv = tvm.tirx.Var("n", "int64")
    w = te.placeholder((32, 16, 3, 3), "int8", name="w")
    for size in (6, 16):
        x = te.placeholder((nv, 16, size, size), "int8", name="x")
        y = te_dot.conv2d(x, w, (1, 1), (1,) * 4, ISAS[isa], "uint8", "int32", int16_sums=True)
        func = schedule_dot_func(te.create_prim_func([x, w, y]), target)
        asm = tvm.compile(tvm.IRModule({"main": func}), target=target).mod.inspect_source("asm")
        assert "vpmaddubsw" in asm and "vpaddw" in asm, f"{isa} width {size}"
    with pytest.raises(ValueError, match="no int16-sum kernel"):
        ISAS["avx512_vnni"].intrinsic("uint8", int16_sums=True)


def test_an_int16_sum_kernel_shares_its_int32_twins_tuning_record():
    """A tuning database records the training kernels (int32 sums); the deployed int16-sum kernel
    of a ReLU-fed layer has the same operands and spatial loops, so it takes the same record
    (``dot_signature``), and the tuned tile schedules it. (So would a signed layer's x + 128 one,
    but the database holds that layer's widened int16 kernel: under a database it keeps that.)"""
    nv = tvm.tirx.Var("n", "int64")
    x = te.placeholder((nv, 16, 16, 16), "int8", name="x")
    w = te.placeholder((32, 16, 3, 3), "int8", name="w")

    def func(container: str, int16_sums: bool) -> tvm.tirx.PrimFunc:
        y = te_dot.conv2d(x, w, (1, 1), (1,) * 4, ISAS["avx2"], container, "int32", int16_sums=int16_sums)
        return te.create_prim_func([x, w, y])

    twin, pairs = func("uint8", False), func("uint8", True)
    assert dot_signature(twin) == dot_signature(pairs) == dot_signature(func(BIASED_INT8, True))
    assert dot_signature(twin) != dot_signature(func("int8", False))
    target = tvm.target.Target({"kind": "llvm", "mcpu": MCPU["avx2"], "num-cores": 2})
    for f in (twin, pairs):
        schedule_dot_func(f, target, tiles=(2, 2, 1))
