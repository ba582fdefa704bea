"""The low-bit backward: integer dx/dw kernels against PyTorch's float backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from marvin_compile.api import MarvinConfig, quantize_
from marvin_compile.fixed_point import Precision, mark_on_grid, on_grid, quantize
from marvin_compile.runtime.optimizer import MSGD, quantizable_layers


def _net(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    if kind == "conv2d":
        return nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (3, 4, 9, 9)
    if kind == "conv2d_dense":  # the packed dot-product gradient kernels on x86
        return nn.Conv2d(3, 5, 3, stride=2, padding=1), (3, 3, 9, 9)
    if kind == "conv2d_tiles":  # >= 8 channels each way: AMX tiles forward and for dx, where present
        return nn.Conv2d(8, 16, 3, stride=2, padding=1), (3, 8, 9, 9)
    if kind == "conv2d_tiles32":  # 32 channels: int16 on tiles too, dx's sums combined in the kernel to wl 12
        return nn.Conv2d(32, 32, 3, stride=2, padding=1), (3, 32, 9, 9)
    if kind == "linear_tiles":
        return nn.Linear(12, 16), (3, 12)
    if kind == "conv1d":
        return nn.Conv1d(3, 4, 3, padding=2, dilation=2), (3, 3, 10)
    return nn.Linear(12, 5), (3, 12)


@pytest.mark.parametrize(
    "kind", ["conv2d", "conv2d_dense", "conv2d_tiles", "conv2d_tiles32", "conv1d", "linear", "linear_tiles"]
)
@pytest.mark.parametrize("wl,fl", [(8, 4), (12, 6), (16, 9)])
def test_lowbit_backward_exact_when_gradient_fits(kind, wl, fl, cache_dir):
    """Gradients on a coarse grid survive the dynamic-scale quantization, so dx and dw are exact."""
    torch.manual_seed(0)
    layer, shape = _net(kind)
    with torch.no_grad():
        layer.weight.copy_(quantize(layer.weight, wl, fl))
        layer.bias.copy_(quantize(layer.bias, wl, fl))
    reference = [p.detach().clone() for p in (layer.weight, layer.bias)]
    cfg = MarvinConfig(
        rounding="nearest", backward="lowbit", initial=Precision(wl, fl), cache_dir=cache_dir, precompile=()
    )
    handle = quantize_(layer, torch.zeros(shape), cfg)
    assert handle.layers[next(iter(handle.layers))].gradients is not None
    x = torch.randn(shape).requires_grad_()
    y = layer(x)
    g = torch.randint(-5, 6, y.shape).float()
    y.backward(g)

    xq = quantize(x.detach(), wl, fl).requires_grad_()
    w, b = (t.clone().requires_grad_() for t in reference)
    if kind.startswith("linear"):
        ref = nn.functional.linear(xq, w, b)
    elif kind.startswith("conv2d"):
        ref = nn.functional.conv2d(xq, w, b, stride=2, padding=1, groups=layer.groups)
    else:
        ref = nn.functional.conv1d(xq, w, b, padding=2, dilation=2)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xq.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.grad, b.grad, rtol=0, atol=0)

    layer.weight.grad = None
    layer(x.detach()).backward(g)  # a first layer: its input gradient is skipped, dw is the same
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=0, atol=0)


def test_a_slice_of_a_batch_runs_as_its_copy(cache_dir):
    """A slice that starts past a batch's first sample is not 64-byte aligned, which TVM refuses
    without a copy."""
    layer, shape = _net("conv2d_dense")
    cfg = MarvinConfig(rounding="nearest", backward="lowbit", cache_dir=cache_dir, precompile=())
    quantize_(layer, torch.zeros(shape), cfg)
    x = torch.randn(shape)
    assert x[1:].data_ptr() % 64 != 0
    torch.testing.assert_close(layer(x[1:]), layer(x[1:].clone()), rtol=0, atol=0)


def test_lowbit_backward_refuses_a_gradient_that_is_not_finite(cache_dir):
    """A diverged training's inf gradient gets an error naming the layer, not a math domain error."""
    layer, shape = _net("linear")
    cfg = MarvinConfig(backward="lowbit", initial=Precision(8, 4), cache_dir=cache_dir, precompile=())
    quantize_(layer, torch.zeros(shape), cfg)
    y = layer(torch.randn(shape))
    g = torch.ones_like(y)
    g[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="output gradient is not finite"):
        y.backward(g)


def test_lowbit_backward_is_unbiased(cache_dir):
    """Off-grid gradients: stochastic quantization averages to the float backward."""
    torch.manual_seed(1)
    layer = nn.Linear(16, 4)
    cfg = MarvinConfig(
        rounding="nearest", backward="lowbit", initial=Precision(6, 4), cache_dir=cache_dir, precompile=()
    )
    quantize_(layer, torch.zeros(2, 16), cfg)
    x = torch.randn(8, 16)
    g = torch.randn(8, 4)
    grads = []
    for _ in range(300):
        layer.weight.grad = None
        layer(x).backward(g)
        grads.append(layer.weight.grad.clone())
    mean = torch.stack(grads).mean(0)
    want = g.t() @ quantize(x, 6, 4)
    spread = torch.stack(grads).std(0) / 300**0.5
    assert torch.all((mean - want).abs() <= 5 * spread + 1e-6)
    assert not torch.equal(grads[0], grads[1])  # really stochastic


@pytest.mark.parametrize("wl,fl", [(8, 3), (12, 7), (20, 9)])
def test_backward_input_quantizer_matches_the_kernel_bit_for_bit(wl, fl, cache_dir):
    """Q(x) recomputed for the backward equals the variant's own Q(x) under stochastic rounding."""
    net = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(1.0)  # y = Q(Q(x) * 1) = Q(x): the output shows the kernel's Q(x)
    cfg = MarvinConfig(rounding="stochastic", initial=Precision(wl, fl), cache_dir=cache_dir, precompile=())
    layer = quantize_(net, torch.zeros(2, 1, 8, 8), cfg).layers["0"]
    x = torch.rand(4, 1, 8, 8) * 3 - 1.5
    for seed in (1, 2, 3):
        y = layer.run(x, net[0].weight.detach(), None, seed)
        torch.testing.assert_close(layer.quantize_input(x, seed), y, rtol=0, atol=0)
    assert not torch.equal(layer.quantize_input(x, 1), layer.quantize_input(x, 2))


@pytest.mark.parametrize("kind", ["conv2d_dense", "linear"])
def test_stochastic_dw_quantizes_the_input_as_the_forward_did(kind, cache_dir):
    """Under stochastic rounding dw takes the layer's raw input and draws Q(x) from the forward's
    seed: it equals the float64 weight gradient of the forward's Q(x) (``quantize_input``, which
    matches the kernel's bit for bit) and an on-grid g, for each seed."""
    torch.manual_seed(2)
    layer, shape = _net(kind)
    wl, fl = 8, 4
    initial = Precision(wl, fl)
    cfg = MarvinConfig(
        rounding="stochastic", backward="lowbit", initial=initial, cache_dir=cache_dir, precompile=()
    )
    compiled = next(iter(quantize_(layer, torch.zeros(shape), cfg).layers.values()))
    x = torch.randn(shape)
    w = quantize(layer.weight.detach(), wl, fl)
    g = torch.randint(-5, 6, layer(x).shape).float()
    draws = []
    for seed in (1, 2):
        _, dw = compiled.run_gradients(g, x, w, (seed, 9), input_grad=False)
        xq, g64 = compiled.quantize_input(x, seed).double(), g.double()
        if kind == "linear":
            want = g64.t() @ xq
        else:
            want = torch.nn.grad.conv2d_weight(xq, w.shape, g64, stride=2, padding=1)
        torch.testing.assert_close(dw.double(), want, rtol=0, atol=0)
        draws.append(dw)
    assert not torch.equal(*draws)  # x really drawn from each seed


def test_a_weight_msgd_put_on_the_grid_is_used_as_is_until_written(cache_dir):
    """After MSGD's step the bridge takes the weight as it is (no second quantization); written in
    place afterwards, the weight is quantized again. The float backward shows which weight the
    forward saved: dx = g @ w_saved."""
    torch.manual_seed(3)
    layer = nn.Linear(12, 5)
    wl, fl = 8, 4
    cfg = MarvinConfig(rounding="nearest", initial=Precision(wl, fl), cache_dir=cache_dir, precompile=())
    quantize_(layer, torch.zeros(2, 12), cfg)
    opt = MSGD(layer.parameters(), lr=0.1, layers=quantizable_layers(layer), precision=(wl, fl))
    x, g = torch.randn(3, 12), torch.randn(3, 5)
    layer(x).backward(g)
    opt.step()
    assert on_grid(layer.weight, wl, fl)

    def input_grad() -> torch.Tensor:
        xr = x.clone().requires_grad_()
        layer(xr).backward(g)
        return xr.grad

    torch.testing.assert_close(input_grad(), g @ layer.weight.detach(), rtol=0, atol=0)
    with torch.no_grad():
        layer.weight.add_(0.01)  # off the grid now
    assert not on_grid(layer.weight, wl, fl)
    torch.testing.assert_close(input_grad(), g @ quantize(layer.weight.detach(), wl, fl), rtol=0, atol=0)
    mark_on_grid(layer.weight, wl, fl)  # a false mark is believed: the saved weight is the raw one
    torch.testing.assert_close(input_grad(), g @ layer.weight.detach(), rtol=0, atol=0)
