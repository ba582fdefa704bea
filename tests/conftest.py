"""Shared fixtures: a small CNN exported to ONNX, and one variant cache for the session."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from marvin_compile.frontend import export_onnx, import_onnx, load_onnx
from marvin_compile.runtime.variant_store import VariantStore
from marvin_compile.target import resolve_target


class SmallCNN(nn.Module):
    """Conv, grouped conv, depthwise conv, residual add, max and average pooling, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.grouped(y))
        y = y + self.depthwise(y)
        y = nn.functional.max_pool2d(y, 2)
        y = torch.relu(self.conv2(y))
        y = nn.functional.avg_pool2d(y, 2)
        return self.fc(y.flatten(1))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One variant cache for the whole run: pytest-xdist's workers share it (writes are atomic),
    so a layer variant is compiled once, not once per worker."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return tmp_path_factory.mktemp("variant-cache")
    shared = tmp_path_factory.getbasetemp().parent / "variant-cache"
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture(scope="session")
def target():
    return resolve_target("cpu")


@pytest.fixture(scope="session")
def small_cnn(tmp_path_factory):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():  # weights large enough that 4-bit grids are not all zero
        for p in model.parameters():
            p.mul_(4.0)
    path = tmp_path_factory.mktemp("onnx") / "small_cnn.onnx"
    export_onnx(model, torch.randn(2, 2, 16, 16), path)
    return model, path


@pytest.fixture(scope="session")
def store(target, cache_dir):
    return VariantStore(target, cache_dir)


@pytest.fixture(scope="session")
def compiled_cnn(small_cnn, store):
    from marvin_compile.runtime.compiled_model import CompiledModel

    _, path = small_cnn
    return CompiledModel(import_onnx(load_onnx(path)), store)
