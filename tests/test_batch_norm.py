"""Batch norm in training through the compiled statistics and gradient kernels, against PyTorch's
batch norm in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from marvin_compile.api import MarvinConfig, quantize_
from marvin_compile.frontend import export_onnx, load_onnx
from marvin_compile.models import BatchNormReLU2d
from marvin_compile.runtime.batch_norm import BatchNormKernels, onnx_batch_norm_shapes, route_batch_norms
from marvin_compile.runtime.variant_store import VariantStore
from marvin_compile.target import resolve_target


@pytest.fixture(scope="module")
def kernels(cache_dir) -> BatchNormKernels:
    return BatchNormKernels(VariantStore(resolve_target("cpu"), cache_dir))


def _modules(module: nn.Module, kernels: BatchNormKernels) -> tuple[nn.Module, nn.Module]:
    """(the float64 reference, the routed float32 copy), with the same non-trivial affine parameters."""
    if module.affine:
        nn.init.uniform_(module.weight, 0.5, 1.5)
        nn.init.uniform_(module.bias, -1.0, 1.0)
    reference = copy.deepcopy(module).double()
    ours = copy.deepcopy(module)
    route_batch_norms(ours, kernels)
    return reference, ours


def _close(ours: torch.Tensor, reference: torch.Tensor, rtol: float, floor: float = 1e-6) -> None:
    """Relative to the reference's largest magnitude, or ``floor`` where that is smaller."""
    ours, reference = ours.detach().double(), reference.detach()
    assert float((ours - reference).abs().max() / reference.abs().max().clamp_min(floor)) < rtol


CASES = {
    "2d": (nn.BatchNorm2d(16), (32, 16, 8, 8), 0.0),
    "odd plane (no lanes)": (nn.BatchNorm2d(3), (5, 3, 5, 7), 0.0),
    "mean far from zero": (nn.BatchNorm2d(4), (16, 4, 8, 8), 1000.0),
    "cumulative average": (nn.BatchNorm2d(4, momentum=None), (8, 4, 4, 8), 2.0),
    "not affine": (nn.BatchNorm2d(4, affine=False), (8, 4, 4, 8), 0.0),
    "untracked": (nn.BatchNorm2d(4, track_running_stats=False), (8, 4, 4, 8), 0.0),
    "1d features": (nn.BatchNorm1d(6), (10, 6), 0.5),
    "1d sequence": (nn.BatchNorm1d(6), (4, 6, 32), 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_matches_torch_in_float64(case, kernels):
    module, shape, offset = CASES[case]
    reference, ours = _modules(module, kernels)
    torch.manual_seed(0)
    for _ in range(2):  # the running statistics move twice
        x = torch.randn(shape) * 3.0 + offset
        g = torch.randn(shape)
        xr, xo = x.double().requires_grad_(), x.clone().requires_grad_()
        yr, yo = reference(xr), ours(xo)
        yr.backward(g.double())
        yo.backward(g)
        # float32 throughout: a mean 1000 deviations out leaves its normalized values ~1e-4 apart
        rtol = 2e-3 if offset > 100 else 2e-5
        _close(yo, yr, rtol)
        _close(xo.grad, xr.grad, rtol)
    if module.affine:
        _close(ours.weight.grad, reference.weight.grad, rtol)
        _close(ours.bias.grad, reference.bias.grad, rtol)
    if module.track_running_stats:
        _close(ours.running_mean, reference.running_mean, 1e-6, floor=1.0)  # the data's scale
        _close(ours.running_var, reference.running_var, 1e-6)
        assert int(ours.num_batches_tracked) == 2
    else:
        assert ours.running_mean is None


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(16, 8, 8, 8), (6, 3, 5, 5)])
def test_batch_norm_relu_matches_torch_in_float64(shape, residual, kernels):
    """relu(batch_norm(x) [+ r]) in one kernel each way, against the separate ops in float64."""
    reference, ours = _modules(BatchNormReLU2d(shape[1]), kernels)
    torch.manual_seed(1)
    for _ in range(2):
        x, r, g = torch.randn(shape) * 2.0 + 0.5, torch.randn(shape), torch.randn(shape)
        xr, xo = x.double().requires_grad_(), x.clone().requires_grad_()
        rr, ro = r.double().requires_grad_(), r.clone().requires_grad_()
        yr = reference(xr, rr if residual else None)
        yo = ours(xo, ro if residual else None)
        yr.backward(g.double())
        yo.backward(g)
        assert bool((yo == 0).any()) and bool((yo > 0).any())  # the ReLU cuts
        _close(yo, yr, 2e-5)
        _close(xo.grad, xr.grad, 2e-5)
        if residual:
            _close(ro.grad, rr.grad, 1e-6)
    _close(ours.weight.grad, reference.weight.grad, 2e-5)
    _close(ours.bias.grad, reference.bias.grad, 2e-5)
    _close(ours.running_var, reference.running_var, 1e-6)


def test_statistics_keep_their_digits_far_from_zero(kernels):
    """Mean 10^4 deviations away: E[x^2] - E[x]^2 in float64 of float32 sums would lose the variance."""
    x = torch.randn(64, 8, 16, 16) + 1e4
    mean, var, unbiased = kernels.stats(x)
    xd = x.double()
    _close(mean, xd.mean((0, 2, 3)), 1e-7)
    _close(var, xd.var((0, 2, 3), unbiased=False), 1e-4)
    _close(unbiased, xd.var((0, 2, 3), unbiased=True), 1e-4)


def test_evaluation_and_other_inputs_run_torchs_own_forward(kernels):
    module = nn.BatchNorm2d(4)
    reference, ours = copy.deepcopy(module), copy.deepcopy(module)
    route_batch_norms(ours, kernels)
    x = torch.randn(8, 4, 6, 6)
    ours(x)  # a training step moves the running statistics
    reference.load_state_dict(ours.state_dict())
    reference.eval()
    ours.eval()
    assert torch.equal(ours(x), reference(x))
    reference.train()
    ours.train()
    torch.testing.assert_close(ours(x[1:]), reference(x[1:].clone()))  # a slice: not 64-byte aligned
    ours.load_state_dict(reference.state_dict())
    strided = x.to(memory_format=torch.channels_last)  # not contiguous NCHW: PyTorch's kernel
    assert torch.equal(ours(strided), reference(strided))
    assert torch.equal(ours.running_var, reference.running_var)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(torch.randn(1, 4, 1, 1))


def test_quantize_routes_batch_norms_and_keeps_the_state_dict(cache_dir):
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    )
    keys = list(model.state_dict())
    quantize_(
        model, torch.randn(2, 2, 4, 4), MarvinConfig(target="cpu", cache_dir=cache_dir, precompile=("int8",))
    )
    assert "forward" in vars(model[1])
    assert list(model.state_dict()) == keys
    x = torch.randn(8, 2, 4, 4)
    model(x).sum().backward()
    assert model[1].weight.grad is not None and int(model[1].num_batches_tracked) == 1


def test_onnx_batch_norm_shapes(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 7 * 7, 5)
    )
    model.append(nn.BatchNorm1d(5))
    path = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "m.onnx", fold_batchnorm=False)
    assert onnx_batch_norm_shapes(load_onnx(path)) == {(8, 49), (5, 1)}
