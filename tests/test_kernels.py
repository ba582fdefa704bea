"""Single-layer variants: worst-case accumulation, stochastic rounding, conv1d and MatMul layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from marvin_compile.dot_isa import dot_isa
from marvin_compile.fixed_point import Precision
from marvin_compile.frontend import export_onnx, import_onnx, load_onnx
from marvin_compile.kernel_classes import CLASS_BY_NAME
from marvin_compile.passes import pipeline
from marvin_compile.runtime.compiled_model import CompiledModel
from marvin_compile.target import resolve_target
from tests.test_semantics import reference


def compiled(module: nn.Module, example: torch.Tensor, tmp_path, store) -> CompiledModel:
    path = tmp_path / "m.onnx"
    export_onnx(module, example, path)
    return CompiledModel(import_onnx(load_onnx(path)), store)


@pytest.mark.parametrize("cls,wl,k", [("int8", 8, 65536), ("int16", 16, 4096)])
def test_worst_case_accumulation_does_not_overflow(cls, wl, k, tmp_path, store):
    """Every input and weight at the most negative level: the true sum is K * 2**(2wl-2)."""
    lin = nn.Linear(k, 2, bias=True)
    fl = 0
    lo = -(2 ** (wl - 1))
    with torch.no_grad():
        lin.weight.fill_(lo)
        lin.weight[1, ::2] = 2 ** (wl - 1) - 1  # row 1: alternating signs, partial sums swing widely
        lin.bias.fill_(lo)
    model = compiled(lin, torch.zeros(1, k), tmp_path, store)
    assert CLASS_BY_NAME[cls].accumulator(k) in ("int32", "int64")
    x = np.full((2, k), lo, dtype=np.float32)
    model.set_precision(Precision(wl, fl))
    got = model(x)
    w = lin.weight.detach().double().numpy()
    exact = np.clip(x.astype(np.float64) @ w.T + lo, lo, 2 ** (wl - 1) - 1)
    np.testing.assert_array_equal(got, exact)
    assert got[0, 0] == 2 ** (wl - 1) - 1  # saturates high, not wrapped to a negative value


def assert_linear_exact(w_levels, b_level: int, x_levels, wl: int, fl: int, tmp_path, store) -> None:
    """A Linear layer with these weight levels and one bias level, run at (wl, fl) on inputs at
    these levels, equals the float64 reference."""
    out_features, k = w_levels.shape
    lin = nn.Linear(k, out_features, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w_levels * 2.0**-fl))
        lin.bias.fill_(b_level * 2.0**-fl)
    model = compiled(lin, torch.zeros(1, k), tmp_path, store)
    model.set_precision(Precision(wl, fl))
    x = (x_levels * 2.0**-fl).astype(np.float32)
    exact = reference(nn.Sequential(lin), x, {"0": (wl, fl)})
    np.testing.assert_array_equal(model(x), exact.astype(np.float32))


@pytest.mark.parametrize("fl", [0, 5, 10])
def test_int16_at_its_int32_bound_requantizes_worst_case_sums_in_int32(fl, tmp_path, store):
    """K = 2047 at wl 11 (the int32 bound): every input and weight at the most negative level, so a
    sum reaches 2047 * 2**20, within 2**20 of int32's limit; the bias's largest level shifted onto
    the sums' grid (fl < wl) and the rounding term fill that gap but never cross it (at fl 10 the
    run-time check, ``2047 * 2**20 + 2**20 <= 2**31``, holds with equality): the kernel requantizes
    in int32 there, not int64, and must stay exact."""
    from marvin_compile.passes.lower_integer import int32_max_wl

    k, wl = 2047, 11
    assert int32_max_wl(k) == wl
    lo, hi = -(2 ** (wl - 1)), 2 ** (wl - 1) - 1
    w = np.full((3, k), float(lo))
    w[1, ::2] = hi  # alternating signs: a sum near the clamp
    w[2, 1::2] = hi
    x = np.full((2, k), float(lo))
    x[1, ::3] = hi
    assert_linear_exact(w, hi, x, wl, fl, tmp_path, store)


@pytest.mark.parametrize("level", [1019, 1020, 1030])
def test_int16_above_the_worst_case_bound_takes_the_int32_kernel_only_while_the_weights_allow(
    level, tmp_path, store
):
    """wl 16 is above the worst-case int32 word length of any reduction, but the int16 class checks
    each call's weights (``te_ops.sums_fit_int32``). At K = 64, fl 8 and weight levels of magnitude
    1019 the bound, 2**15 * 64 * 1020 + 2**(15+8), is exactly 2**31 (int32 kernel); at 1020 just
    over (float64 kernel); at 1030 the sum itself passes 2**31, so an int32 kernel would wrap. All
    must be exact, the first with a sum within 0.1% of int32's limit."""
    k, wl, fl = 64, 16, 8
    w = np.full((2, k), -float(level))
    w[1, ::2] = level  # alternating signs: a sum inside the output range
    x = np.full((2, k), -(2.0 ** (wl - 1)))
    x[1, ::3] = 5
    assert_linear_exact(w, 2 ** (wl - 1) - 1, x, wl, fl, tmp_path, store)


@pytest.mark.parametrize("channels,size", [(16, 6), (32, 6), (16, 32)])
@pytest.mark.parametrize("wl", [12, 16])
def test_int16_conv_on_tiles_at_and_above_its_int32_bound(channels, size, wl, tmp_path, store):
    """16 (kernel columns folded: 48) and 32 input channels take int16 on AMX tiles (where present)
    at every word length: up to wl 12 (their products fit int32) the byte-product sums leave the
    kernel as one int32, above as three. On 32-pixel rows the input is packed as words, with the
    quantizer inlined (``amx.Geometry.words``)."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1)).eval()
    fl = wl // 2
    with torch.no_grad():
        net[0].weight.mul_(2.0 ** (wl - fl - 2) * 9)  # levels across the word length, some clamped
    model = compiled(net, torch.zeros(1, channels, size, size), tmp_path, store)
    model.set_precision(Precision(wl, fl))
    x = np.random.default_rng(wl).standard_normal((2, channels, size, size)) * 2.0 ** (wl - fl - 2)
    x = x.astype(np.float32)
    exact = reference(net, x, {"0": (wl, fl)})
    np.testing.assert_array_equal(model(x), exact.astype(np.float32))


def test_int16_tile_branches_share_one_packing(tmp_path):
    """The int16 class on tiles branches on the word length at run time (sums combined in the
    kernel, or requantized in it); x and w are packed once, before the branch, for both. Each
    branch packing its own ran both packings on every call."""
    target = resolve_target("cpu")
    isa = dot_isa(target)
    if isa is None or not isa.amx:
        pytest.skip("host CPU or OS lacks AMX-INT8")
    path = tmp_path / "m.onnx"
    export_onnx(nn.Conv2d(32, 32, 3, padding=1), torch.zeros(1, 32, 6, 6), path)
    ((_, func),) = pipeline.layer_functions(pipeline.partition(import_onnx(load_onnx(path)).mod))
    text = pipeline.variant_module(func, CLASS_BY_NAME["int16"], "nearest", target)["layer"].script()
    assert "if " in text and "marvin_amx_dot1" in text  # two tile kernels, one a branch
    assert text.count("R.call_tir(marvin_amx_pack_x") == 1
    assert text.count("R.call_tir(marvin_amx_pack_w") == 1


@pytest.mark.parametrize("channels,kernel,stride", [(1, 5, 1), (3, 3, 2)])
def test_int8_conv_of_few_channels_on_kernel_windows(channels, kernel, stride, tmp_path, store):
    """LeNet-5's first conv and an RGB stem: int8 on AMX tiles over their kernel windows
    (``amx.Geometry.of_patches``, where present), exact with the layer's own padding."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(channels, 6, kernel, stride=stride, padding=kernel // 2)).eval()
    model = compiled(net, torch.zeros(1, channels, 13, 13), tmp_path, store)
    model.set_precision(Precision(8, 4))
    x = (np.random.default_rng(channels).standard_normal((3, channels, 13, 13)) * 4).astype(np.float32)
    np.testing.assert_array_equal(model(x), reference(net, x, {"0": (8, 4)}).astype(np.float32))


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("wl", [8, 12])
def test_strided_1x1_conv_exact(padding, wl, tmp_path, store):
    """ResNet's shortcut: a 1x1 conv at stride 2 packs only the rows and columns it reads, with
    its input quantizer inlined into that packing (``te_dot.conv2d``, ``schedule_pack_x``)."""
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, padding=padding)).eval()
    model = compiled(net, torch.zeros(1, 16, 9, 9), tmp_path, store)
    fl = wl // 2
    model.set_precision(Precision(wl, fl))
    x = (np.random.default_rng(wl).standard_normal((3, 16, 9, 9)) * 2.0 ** (wl - fl - 2)).astype(np.float32)
    np.testing.assert_array_equal(model(x), reference(net, x, {"0": (wl, fl)}).astype(np.float32))


@pytest.mark.parametrize("layer", ["conv16", "conv64", "linear"])
def test_int16_levels_requantized_in_the_tile_kernel_match_the_packed_kernel(
    layer, tmp_path, store, monkeypatch
):
    """Above int16's int32 bound the AMX kernel requantizes inside (``amx.Levels``), stochastic
    draws hashed from each element's index in the unpacked output (``te_ops.output_draw``): the
    same levels as the packed kernel's requantize (``MARVIN_AMX=0``), nearest and stochastic."""
    torch.manual_seed(4)
    net, shape = {
        "conv16": (nn.Conv2d(16, 32, 3, padding=1), (2, 16, 6, 7)),
        "conv64": (nn.Conv2d(64, 20, 3, stride=2, padding=1), (2, 64, 7, 7)),
        "linear": (nn.Linear(64, 24), (5, 64)),
    }[layer]
    net = net.eval()
    example = torch.zeros(1, *shape[1:])
    x = (np.random.default_rng(5).standard_normal(shape) * 16).astype(np.float32)
    tiles, packed = compiled(net, example, tmp_path, store), compiled(net, example, tmp_path, store)
    for rounding in ("nearest", "stochastic"):
        tiles.set_precision(Precision(16, 8), rounding, seed=7)  # variants compile here
        with monkeypatch.context() as m:
            m.setenv("MARVIN_AMX", "0")
            packed.set_precision(Precision(16, 8), rounding, seed=7)
            want = packed(x)
        np.testing.assert_array_equal(tiles(x), want)


def test_conv1d_and_matmul_layers(tmp_path, store):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3, padding=1)
            self.proj = nn.Parameter(torch.randn(4 * 8, 5) * 0.3)

        def forward(self, x):
            return torch.relu(self.conv(x)).flatten(1) @ self.proj

    torch.manual_seed(1)
    net = Net().eval()
    model = compiled(net, torch.randn(2, 3, 8), tmp_path, store)
    assert [lay.op for lay in model.layers] == ["conv1d", "matmul"]
    assert model.layer_names == ["conv", "proj"]
    wl, fl = 8, 4
    x = np.random.default_rng(0).normal(size=(4, 3, 8)).astype(np.float32)
    model.set_precision(Precision(wl, fl))

    def q(v):
        return np.clip(np.floor(v * 2.0**fl + 0.5), -(2 ** (wl - 1)), 2 ** (wl - 1) - 1) / 2.0**fl

    conv = net.conv
    xd = torch.from_numpy(q(x.astype(np.float64)))
    h = torch.nn.functional.conv1d(
        xd,
        torch.from_numpy(q(conv.weight.detach().double().numpy())),
        torch.from_numpy(q(conv.bias.detach().double().numpy())),
        padding=1,
    )
    h = torch.relu(torch.from_numpy(q(h.numpy()))).flatten(1).numpy()
    want = q(q(h) @ q(net.proj.detach().double().numpy()))
    np.testing.assert_array_equal(model(x), want)


@pytest.mark.parametrize("wl,fl", [(8, 3), (16, 9), (24, 10)])
def test_stochastic_rounding_is_unbiased_and_seeded(wl, fl, tmp_path, store):
    """A 1x1 conv with weight 1: the output is Q(x) stochastic, whose mean must be x."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    model = compiled(conv, torch.zeros(1, 1, 16, 16), tmp_path, store)
    rng = np.random.default_rng(3)
    x = (rng.uniform(-2, 2, size=(1, 1, 16, 16))).astype(np.float32)
    model.set_precision(Precision(wl, fl), "stochastic", seed=7)
    draws = np.stack([model(x) for _ in range(400)])
    step = 2.0**-fl
    assert np.all(np.abs(draws - x) < step)  # always one of the two neighbouring grid points
    assert np.all(np.isclose(draws / step, np.round(draws / step)))
    # mean error per element: std <= step/2/sqrt(400); over 256 elements check 5 sigma on the average
    bias = (draws.mean(axis=0) - x) / step
    assert abs(bias.mean()) < 5 * 0.5 / np.sqrt(400 * 256)
    assert np.abs(bias).max() < 0.2
    model.set_precision(Precision(wl, fl), "stochastic", seed=7)
    again = np.stack([model(x) for _ in range(3)])
    np.testing.assert_array_equal(again, draws[:3])
    model.set_precision(Precision(wl, fl), "stochastic", seed=8)
    assert not np.array_equal(model(x), draws[0])
