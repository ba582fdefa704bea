"""The low-bit backward products (``dx``, ``dw``) on the packed dot-product kernels, per x86 ISA.

Each compiled gradient module is checked bit for bit against float64 torch on integer operands
(fl = 0, so the quantizers pass them through): random values with the container's extremes, and
every operand at the most negative level (the worst-case sums), for odd channel counts, strides 1
and 2, ragged spatial sizes, batches of 1, odd and several int32 chunks. The int16 class is run at
the widest word length whose sums stay exact in int32 (the packed kernels), at the widest that dw's
split gradient serves (``gradient_kernels.SPLIT_BITS``) and at wl 16 (where the run-time branch
takes the float64 kernels wherever the split does not fit).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx

from marvin_compile.dot_isa import ISAS
from marvin_compile.fixed_point import Precision
from marvin_compile.kernel_classes import CLASS_BY_NAME
from marvin_compile.passes import pipeline
from marvin_compile.passes.gradient_kernels import product_bound
from marvin_compile.passes.nonneg_inputs import NONNEG_ATTR
from marvin_compile.passes.utils import LAYER_ATTR, param
from marvin_compile.runtime.compiled_model import precision_args
from marvin_compile.te_dot_grad import dw_chunk
from tests.test_dot_kernels import MCPU, RUNNABLE, isa_params

CONVS = [  # (c, h, o, k, stride, pad)
    (3, 7, 5, 3, 2, 1),  # stride 2 on an odd size (the last input row is reached by no window)
    (3, 8, 4, 3, 2, 1),  # stride 2 on an even size (ResNet's downsampling conv)
    (5, 6, 7, 1, 2, 0),  # a 1x1 stride-2 shortcut
    (2, 10, 3, 5, 1, 0),  # LeNet-like, no padding
    (6, 5, 17, 3, 1, 1),  # more output channels than one vector of lanes
    (2, 7, 3, 1, 2, 0),  # a 1x1 stride-2 shortcut on an odd size
    (3, 9, 5, 3, 2, 2),  # padding kernel - 1
    (2, 11, 3, 5, 3, 1),  # stride 3, a 5x5 kernel
    (2, 16, 3, 3, 1, 1),  # dw chunks of 4 output rows (128 products), 4 chunks an image
    (2, 13, 3, 3, 1, 1),  # dw chunks of 338 products (13 rows): wl 16 past the split's bound (float64)
]
LINEAR = (37, 21)  # (k, o)
BATCHES = {"conv2d": (1, 3, 9), "linear": (1, 3, 130)}  # 9 and 130: several int32 chunks of dw


def _layer(kind: str, shape: tuple, relu_fed: bool = False) -> relax.Function:
    """A float layer function as ``ExtractLayers`` outlines it (symbolic batch); ``relu_fed``: as
    ``MarkNonNegativeInputs`` marks a layer whose input is a ReLU's output."""
    n = tirx.Var("n", "int64")
    if kind == "linear":
        k, o = shape
        x, w = param("x", (n, k), "float32"), param("w", (o, k), "float32")
    else:
        c, h, o, kk, _, _ = shape
        x, w = param("x", (n, c, h, h), "float32"), param("w", (o, c, kk, kk), "float32")
    bb = relax.BlockBuilder()
    with bb.function("layer", [x, w], attrs={LAYER_ATTR: "layer", "marvin.op": kind}):
        with bb.dataflow():
            if kind == "linear":
                y = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w, [1, 0]))))
            else:
                stride, pad = shape[4], shape[5]
                y = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=pad))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    func = bb.get()["layer"].without_attr("global_symbol")
    return func.with_attr(NONNEG_ATTR, True) if relu_fed else func


def _build(isa: str, kind: str, shape: tuple, container: str, relu_fed: bool = False):
    target = tvm.target.Target({"kind": "llvm", "mcpu": MCPU[isa], "num-cores": 2})
    mod = pipeline.gradient_module(_layer(kind, shape, relu_fed), CLASS_BY_NAME[container], target)
    kernels = {gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    assert {"marvin_dot_dx", "marvin_dot_dw"} <= kernels  # the packed kernels, not a silent fallback
    return relax.VirtualMachine(pipeline.build(mod, target), tvm.cpu())


def _fast_wl(kind: str, shape: tuple, isa: str, container: str) -> int:
    """The widest int16-class word length both packed products serve (per the kernels' int32 bound)."""
    if kind == "linear":
        dx_length, out = shape[1], 1
    else:
        c, h, o, k, stride, pad = shape
        dx_length, out = o * k * k, (h + 2 * pad - k) // stride + 1
    bound = min(product_bound(dx_length), product_bound(dw_chunk(ISAS[isa], container, (out, out))))
    return (bound.bit_length() - 1) // 2 + 1


def _split_wl(kind: str, shape: tuple, isa: str) -> int:
    """The widest int16 word length whose dw chunks still sum exactly in int32 with g split into
    ``g >> 7`` (up to 2**(wl-8)) and ``g & 127``."""
    out = 1 if kind == "linear" else (shape[1] + 2 * shape[5] - shape[3]) // shape[4] + 1
    chunk = dw_chunk(ISAS[isa], "int16", (out, out))
    return max(wl for wl in range(2, 17) if chunk * 2 ** (wl - 1) * max(127, 2 ** (wl - 8)) < 2**31)


def _operands(rng, wl: int, shapes: list[tuple], extreme: bool) -> list[np.ndarray]:
    lo, hi = -(2 ** (wl - 1)), 2 ** (wl - 1) - 1
    out = []
    for s in shapes:
        v = np.full(s, lo) if extreme else rng.integers(lo, hi + 1, size=s)
        if not extreme:
            v.flat[: min(3, v.size)] = [lo, hi, lo][: min(3, v.size)]
        out.append(v.astype(np.float32))
    return out


def _reference(kind: str, shape: tuple, x, g, w) -> tuple[np.ndarray, np.ndarray]:
    x64, g64, w64 = (torch.from_numpy(a).double() for a in (x, g, w))
    if kind == "linear":
        dx, dw = g64 @ w64, g64.T @ x64
    else:
        stride, pad = shape[4], shape[5]
        dx = torch.nn.grad.conv2d_input(x64.shape, w64, g64, stride=stride, padding=pad)
        dw = torch.nn.grad.conv2d_weight(x64, w64.shape, g64, stride=stride, padding=pad)
    return dx.numpy().astype(np.float32), dw.numpy().astype(np.float32)  # one rounding of the exact sums


def _check(vm, kind: str, shape: tuple, wl: int, batch: int, extreme: bool, relu_fed: bool = False) -> None:
    """``relu_fed``: x in [0, 2**(wl-1) - 1], at its top where ``extreme`` (against g and w at the
    bottom: dw's byte products at their most negative pair sums)."""
    if kind == "linear":
        k, o = shape
        x_shape, w_shape, g_shape = (batch, k), (o, k), (batch, o)
    else:
        c, h, o, kk, stride, pad = shape
        oh = (h + 2 * pad - kk) // stride + 1
        x_shape, w_shape, g_shape = (batch, c, h, h), (o, c, kk, kk), (batch, o, oh, oh)
    rng = np.random.default_rng(batch * wl)
    x, g, w = _operands(rng, wl, [x_shape, g_shape, w_shape], extreme)
    if relu_fed:
        x = np.full_like(x, 2 ** (wl - 1) - 1) if extreme else np.abs(x).clip(max=2 ** (wl - 1) - 1)
    dev = tvm.cpu()
    qp, _ = precision_args(Precision(wl, 0), dev)
    seed = tvm.runtime.tensor(np.array(5, np.uint32), dev)
    gt, wt, xt = (tvm.runtime.tensor(a, dev) for a in (g, w, x))
    dx = vm["dx"](gt, wt, qp, qp, seed).numpy()
    dw = vm["dw"](xt, gt, qp, qp, seed).numpy()
    ref_dx, ref_dw = _reference(kind, shape, x, g, w)
    np.testing.assert_array_equal(dx, ref_dx)
    np.testing.assert_array_equal(dw, ref_dw)


def _cases(isa: str) -> list[tuple[str, tuple]]:
    convs = CONVS if isa == RUNNABLE[-1] else CONVS[:1]  # the host's own ISA gets every shape
    return [("conv2d", s) for s in convs] + [("linear", LINEAR)]


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("container", ["int8", "int16", "int8 ReLU-fed"])
def test_packed_gradients_exact(isa, container):
    relu_fed = container.endswith("ReLU-fed")
    container = container.split()[0]
    for kind, shape in _cases(isa):
        vm = _build(isa, kind, shape, container, relu_fed)
        wls = [8] if container == "int8" else [_fast_wl(kind, shape, isa, container), 16]
        if container == "int16":  # the split's widest wl, where it is below 16 (else wl 16 splits)
            wls = sorted({*wls, _split_wl(kind, shape, isa)})
            assert wls[0] < wls[1]
        for wl in wls:
            for batch in BATCHES[kind]:
                for extreme in (False, True):
                    _check(vm, kind, shape, wl, batch, extreme, relu_fed)


def test_grouped_conv_keeps_the_generic_kernels():
    """Grouped convs (and dilated ones, conv1d, non-x86 targets) are not packed."""
    bb = relax.BlockBuilder()
    n = tirx.Var("n", "int64")
    x, w = param("x", (n, 4, 6, 6), "float32"), param("w", (4, 2, 3, 3), "float32")
    with bb.function("layer", [x, w], attrs={LAYER_ATTR: "layer", "marvin.op": "conv2d"}):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.conv2d(x, w, padding=1, groups=2)))
        bb.emit_func_output(out)
    func = bb.get()["layer"].without_attr("global_symbol")
    target = tvm.target.Target({"kind": "llvm", "mcpu": MCPU["avx2"]})
    mod = pipeline.gradient_module(func, CLASS_BY_NAME["int8"], target)
    names = {gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    assert not any(name.startswith("marvin_dot") for name in names)


@pytest.mark.parametrize("level", [427, 428, 430])
def test_int16_dx_above_the_worst_case_bound_takes_the_int32_kernel_only_while_the_weights_allow(level):
    """dx at wl 16 checks each call's weights (``te_ops.sums_fit_int32`` over the output channels
    and kernel window of every input channel): with g at -2**15 and 153 weight levels of -``level``
    per input channel, the bound 2**15 * 153 * (level + 1) sits just under 2**31 at 427 (the int32
    kernel), just over at 428; at 430 the sum itself passes 2**31, where an int32 kernel would wrap.
    Exact in every case."""
    shape = (6, 5, 17, 3, 1, 1)  # 17 output channels x 3 x 3 = 153 products per input channel
    c, h, o, kk, _, _ = shape
    vm = _build(RUNNABLE[-1], "conv2d", shape, "int16")
    g = np.full((2, o, h, h), -(2**15), dtype=np.float32)
    g[1, :, ::2] = 7.0
    w = np.full((o, c, kk, kk), -float(level), dtype=np.float32)
    w[:, 1::2] = 3.0
    x = np.zeros((2, c, h, h), dtype=np.float32)
    dev = tvm.cpu()
    qp, _ = precision_args(Precision(16, 0), dev)
    seed = tvm.runtime.tensor(np.array(5, np.uint32), dev)
    dx = vm["dx"](tvm.runtime.tensor(g, dev), tvm.runtime.tensor(w, dev), qp, qp, seed).numpy()
    np.testing.assert_array_equal(dx, _reference("conv2d", shape, x, g, w)[0])


@pytest.mark.parametrize(("wl", "level"), [(15, -1), (15, -(2**14)), (16, -1), (16, -(2**15))])
def test_int16_dw_splits_the_gradient_while_both_parts_sum_in_int32(wl, level):
    """A 13 x 13 conv's dw sums chunks of 338 products (whole images: 13 is prime, and one row of
    a sample pair is 26 products, short of ``DW_CHUNK``).
    Past the int32 bound, dw splits each gradient level into ``g >> 7`` and ``g & 127``: at wl 15
    with x at -2**14, g at -1 (low part 127) or -2**14 (high part -128) keeps either part's chunk
    sum below 2**30, exact in int32 (the split kernel); at wl 16 the high part of -2**15 would reach
    338 * 2**15 * 2**8 > 2**31 (an int32 split kernel would wrap), so dw takes the float64 kernel
    there. Exact in every case."""
    shape = (2, 13, 3, 3, 1, 1)
    c, h, o, kk, _, _ = shape
    vm = _build(RUNNABLE[-1], "conv2d", shape, "int16")
    x = np.full((2, c, h, h), -(2.0 ** (wl - 1)), dtype=np.float32)
    g = np.full((2, o, h, h), float(level), dtype=np.float32)
    dev = tvm.cpu()
    qp, _ = precision_args(Precision(wl, 0), dev)
    seed = tvm.runtime.tensor(np.array(5, np.uint32), dev)
    dw = vm["dw"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(g, dev), qp, qp, seed).numpy()
    np.testing.assert_array_equal(
        dw, _reference("conv2d", shape, x, g, np.zeros((o, c, kk, kk), np.float32))[1]
    )
