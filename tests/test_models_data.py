"""Fast checks of the model zoo, the dataset loaders and the reporting helpers."""

from __future__ import annotations

import json
import os
import socket
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from marvin_compile.data import load_dataset
from marvin_compile.models import build_model, lenet5, resnet20
from marvin_compile.report import atomic_write_bytes, atomic_write_json, plot_precision, precision_table


def _quantizable(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_lenet5_shape_and_layer_names() -> None:
    model = lenet5()
    assert model(torch.randn(4, 1, 32, 32)).shape == (4, 10)
    assert _quantizable(model) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert lenet5(num_classes=7, in_channels=3)(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_resnet20_shape_params_and_layer_names() -> None:
    model = resnet20()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 0.27e6) / 0.27e6 < 0.02, params
    names = _quantizable(model)
    assert len(names) == 19 + 2 + 1  # 19 convs of the paper, 2 projection shortcuts, the classifier
    assert names[0] == "conv1" and names[-1] == "fc"
    assert "layer2.0.shortcut.conv" in names and "layer3.0.shortcut.conv" in names
    assert "layer1.0.shortcut.conv" not in names


def test_build_model_builtins_and_callable() -> None:
    assert isinstance(build_model("lenet5", 10, 1), nn.Module)
    assert isinstance(build_model("ResNet20", 100, 3), nn.Module)
    model = build_model("marvin_compile.models:lenet5", num_classes=3, in_channels=1)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("alexnet", "accepted: lenet5, resnet20"),
        ("", "accepted"),
        ("no_such_pkg_xyz.mod:f", "cannot import module"),
        ("marvin_compile.models:nope", "no attribute"),
        ("marvin_compile.models:BUILTIN_MODELS", "not callable"),
        ("collections:OrderedDict", "not a torch nn.Module"),
    ],
)
def test_build_model_errors(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(spec, num_classes=10, in_channels=1)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_digits_dataset(no_network: None) -> None:
    train, test, num_classes = load_dataset("digits", None, image_size=32, in_channels=1)
    assert num_classes == 10
    assert len(train) == 1347 and len(test) == 450
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    assert x_train.shape == (1347, 1, 32, 32) and x_test.shape == (450, 1, 32, 32)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0 <= int(y_train.min()) and int(y_test.max()) <= 9
    assert set(y_train.tolist()) == set(range(10))
    assert abs(float(x_train.mean())) < 1e-4 and abs(float(x_train.std()) - 1) < 1e-3
    again, _, _ = load_dataset("digits", None, image_size=32, in_channels=1)
    assert torch.equal(again.tensors[0], x_train) and torch.equal(again.tensors[1], y_train)


def test_digits_replicates_channels() -> None:
    train, test, _ = load_dataset("digits", None, image_size=16, in_channels=3)
    x = train.tensors[0]
    assert x.shape[1:] == (3, 16, 16) and test.tensors[0].shape[1:] == (3, 16, 16)
    assert torch.equal(x[:, 0], x[:, 2])


def test_npz_dataset(tmp_path: os.PathLike[str]) -> None:
    rng = np.random.default_rng(0)
    path = os.path.join(tmp_path, "data.npz")
    np.savez(
        path,
        x_train=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        y_train=np.arange(20) % 4,
        x_test=rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
        y_test=np.arange(8) % 4,
    )
    train, test, num_classes = load_dataset(f"npz:{path}", None, image_size=32, in_channels=1)
    assert num_classes == 4
    assert train.tensors[0].shape == (20, 1, 32, 32) and test.tensors[0].shape == (8, 1, 32, 32)
    assert train.tensors[0].dtype == torch.float32 and test.tensors[1].dtype == torch.int64

    nchw = os.path.join(tmp_path, "rgb.npz")
    np.savez(
        nchw,
        x_train=rng.random((6, 3, 32, 32), dtype=np.float32),
        y_train=np.arange(6),
        x_test=rng.random((2, 3, 32, 32), dtype=np.float32),
        y_test=np.arange(2),
    )
    train, _, num_classes = load_dataset(f"npz:{nchw}", None, image_size=32, in_channels=3)
    assert train.tensors[0].shape == (6, 3, 32, 32) and num_classes == 6

    bad = os.path.join(tmp_path, "bad.npz")
    np.savez(bad, x_train=np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="y_train"):
        load_dataset(f"npz:{bad}", None, image_size=8, in_channels=1)
    with pytest.raises(FileNotFoundError):
        load_dataset(f"npz:{tmp_path}/missing.npz", None, image_size=8, in_channels=1)


def test_torchvision_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    class Fake:
        classes = ["a", "b", "c"]

        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            assert download is False and root == str(tmp_path)
            n = 5 if train else 3
            self.data = np.zeros((n, 32, 32, 3), dtype=np.uint8)  # NHWC, like CIFAR
            self.targets = [i % 3 for i in range(n)]

    datasets = types.ModuleType("torchvision.datasets")
    datasets.FAKE = Fake  # type: ignore[attr-defined]
    package = types.ModuleType("torchvision")
    package.datasets = datasets  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    spec = f"torchvision:FAKE:{tmp_path}"
    train, test, num_classes = load_dataset(spec, None, image_size=32, in_channels=3)
    assert train.tensors[0].shape == (5, 3, 32, 32) and len(test) == 3 and num_classes == 3
    _, _, num_classes = load_dataset("torchvision:FAKE", str(tmp_path), image_size=32, in_channels=1)
    assert num_classes == 3


def test_torchvision_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match="torchvision is not installed"):
        load_dataset("torchvision:CIFAR10:/nonexistent", None, image_size=32, in_channels=3)


@pytest.mark.parametrize("spec", ["mnist", "npz:", "torchvision", "digits:extra"])
def test_bad_dataset_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="accepted: 'digits', 'npz:PATH', 'torchvision:NAME"):
        load_dataset(spec, None, image_size=32, in_channels=1)


LAYERS = {
    "conv1": {"step": [0, 50, 120], "wl": [8, 7, 9], "fl": [4, 4, 6]},
    "layer1.0.conv1": {"step": [0, 80], "wl": [8, 12], "fl": [4, 8]},
    "fc": {"wl": [8], "fl": [4]},
}


def test_plot_precision_writes_png(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "sub", "precision.png")
    plot_precision(LAYERS, path)
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert os.listdir(os.path.dirname(path)) == ["precision.png"]
    with pytest.raises(ValueError, match="conv1"):
        plot_precision({"conv1": {"wl": [8, 9], "fl": [4]}}, path)


def test_precision_table() -> None:
    table = precision_table(LAYERS)
    for name in LAYERS:
        assert name in table
    row = next(line for line in table.splitlines() if line.startswith("conv1 "))
    assert row.split() == ["conv1", "8/4", "7", "9", "9/6", "2"]


def test_atomic_writes_leave_no_tmp(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    json_path = os.path.join(tmp_path, "cache.json")
    atomic_write_json(json_path, {"a": [1, 2]})
    atomic_write_json(json_path, {"a": [3]})
    with open(json_path, encoding="utf-8") as f:
        assert json.load(f) == {"a": [3]}
    atomic_write_bytes(os.path.join(tmp_path, "ckpt.bin"), b"\x00\x01")
    with pytest.raises(TypeError):
        atomic_write_json(os.path.join(tmp_path, "bad.json"), {"x": object()})

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(os.path.join(tmp_path, "ckpt.bin"), b"new")
    monkeypatch.undo()
    with open(os.path.join(tmp_path, "ckpt.bin"), "rb") as f:
        assert f.read() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["cache.json", "ckpt.bin"]
