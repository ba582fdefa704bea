"""The AMX int8 tile kernels (``amx`` + ``schedule_amx``) against float64 torch.

Runs where the host has AMX-INT8 and the OS grants tile state; elsewhere the int8 class keeps the
vpdpbusd kernels, which ``test_dot_kernels`` covers. Operands include -128 * -128 products, shapes
cover strides 1-3, asymmetric padding, channel counts that are not whole 4-channel groups or
whole 64-channel chunks, output channels that are not whole 16-channel blocks, ragged output
widths and ragged GEMM rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import te, tirx

from marvin_compile import amx
from marvin_compile.dot_isa import dot_isa
from marvin_compile.passes.schedule_cpu import schedule_prim_func
from marvin_compile.target import resolve_target

TARGET = resolve_target("cpu")
HOST = dot_isa(TARGET)
pytestmark = pytest.mark.skipif(HOST is None or not HOST.amx, reason="host CPU or OS lacks AMX-INT8")


def _int8(rng, shape) -> np.ndarray:
    v = rng.integers(-128, 128, size=shape, dtype=np.int64)
    v.flat[: min(3, v.size)] = [-128, -128, 127][: min(3, v.size)]
    return v.astype(np.int8)


def _compile(funcs: dict[str, tirx.PrimFunc]):
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    return tvm.compile(mod, target=TARGET)


def _run(g: amx.Geometry, x: np.ndarray, w: np.ndarray, matmul: bool) -> np.ndarray:
    def stages(n):
        xs = te.placeholder((n, g.c) if matmul else (n, g.c, g.h, g.w), "int8", name="x")
        ys = te.placeholder(amx.output_shape(g, n), "int32", name="y")
        pack = amx.pack_matmul_input(xs, g) if matmul else amx.pack_conv_input(xs, g)
        out = amx.unpack_matmul(ys, n, g, "int32") if matmul else amx.unpack_conv(ys, g, "int32")
        return xs, pack, ys, out

    xs, pack, ys, out = stages(tirx.Var("n", "int64"))
    ws = te.placeholder(w.shape, "int8", name="w")
    wp = amx.pack_weight(ws, g)
    with TARGET:
        lib = _compile(
            {
                "pack_x": schedule_prim_func(te.create_prim_func([xs, pack])),
                "pack_w": schedule_prim_func(te.create_prim_func([ws, wp])),
                "dot": amx.tile_kernel(g),
                "unpack": schedule_prim_func(te.create_prim_func([ys, out])),
            }
        )
    _, pack, ys, out = stages(x.shape[0])  # the buffers' shapes at this batch
    dev = tvm.cpu()

    def empty(t: te.Tensor) -> tvm.runtime.Tensor:
        return tvm.runtime.empty([int(d) for d in t.shape], t.dtype, dev)

    buffers = [tvm.runtime.tensor(x, dev), empty(pack), tvm.runtime.tensor(w, dev), empty(wp)]
    y, result = empty(ys), empty(out)
    lib["pack_x"](buffers[0], buffers[1])
    lib["pack_w"](buffers[2], buffers[3])
    lib["dot"](buffers[1], buffers[3], y)
    lib["unpack"](y, result)
    return result.numpy()


CONVS = [  # (n, c, h, w, o, kh, kw, stride, padding)
    (2, 16, 9, 9, 32, 3, 3, (1, 1), (1, 1, 1, 1)),
    (3, 8, 7, 11, 20, 3, 3, (2, 2), (1, 1, 1, 1)),  # ragged widths, O not a 16-block, stride 2
    (1, 70, 6, 6, 16, 1, 1, (1, 1), (0, 0, 0, 0)),  # channels past one 64-channel chunk
    (2, 13, 10, 10, 17, 5, 3, (1, 3), (2, 0, 1, 1)),  # odd channels, stride 3, asymmetric pad
    (1, 64, 8, 8, 64, 3, 3, (1, 1), (1, 1, 1, 1)),  # ResNet-20's last stage at batch 1
]


@pytest.mark.parametrize("shape", CONVS, ids=lambda s: "x".join(map(str, s[:7])) + f"s{s[7][0]}{s[7][1]}")
def test_conv_is_exact(shape) -> None:
    n, c, h, w, o, kh, kw, stride, padding = shape
    rng = np.random.default_rng(0)
    x, wt = _int8(rng, (n, c, h, w)), _int8(rng, (o, c, kh, kw))
    g = amx.Geometry(c, h, w, o, kh, kw, stride, padding)
    top, left, bottom, right = padding
    xpad = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(xpad), torch.from_numpy(wt.astype(np.float64)), stride=stride
    )
    np.testing.assert_array_equal(_run(g, x, wt, matmul=False), ref.numpy().astype(np.int64))


@pytest.mark.parametrize("rows", [1, 5, 33, 130])
@pytest.mark.parametrize("k,o", [(400, 120), (64, 10), (9, 33)])
def test_matmul_is_exact(rows: int, k: int, o: int) -> None:
    rng = np.random.default_rng(rows)
    x, w = _int8(rng, (rows, k)), _int8(rng, (o, k))
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_array_equal(_run(amx.matmul_geometry([o, k]), x, w, matmul=True), ref.astype(np.int64))


def test_small_channel_counts_stay_on_vpdpbusd() -> None:
    """Below 8 input channels most of each tile row would multiply padding."""
    assert amx.conv_geometry([1, 3, 32, 32], [16, 3, 3, 3], [1, 1], [1, 1, 1, 1]) is None
    assert amx.matmul_geometry([10, 4]) is None
    assert amx.conv_geometry([1, 16, 32, 32], [16, 16, 3, 3], [1, 1], [1, 1, 1, 1]) is not None
