"""Model zoo for MARViN training.

Layers are mapped to precisions by their torch module names, so every Conv/Linear has a short,
stable, readable name (``conv1``, ``layer2.0.conv1``, ``fc``); do not rename them lightly, saved
precision histories and checkpoints refer to them.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

BUILTIN_MODELS: tuple[str, ...] = ("lenet5", "resnet20")


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) for 32x32 inputs, with ReLU and 2x2 max pooling.

    ReLU + max pooling replace the original tanh + average pooling (subsampling): they train
    faster and are what fixed-point integer kernels handle cheaply. Input must be 32x32 so that
    the second pool leaves 16x5x5 features for ``fc1``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BatchNormReLU2d(nn.BatchNorm2d):
    """``relu(batch_norm(x) [+ residual])``: batch norm and what follows it as one module, so that
    MARViN's training runs each direction as one compiled kernel (``runtime/batch_norm``); plain
    PyTorch runs the separate ops it always did. Parameters and state dict are BatchNorm2d's."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = super().forward(x)
        return F.relu(y if residual is None else y + residual)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection (He et al. 2016, CIFAR variant).

    When the block changes resolution or width the shortcut is a 1x1 conv + BN projection
    (option B); otherwise it is the identity. Option B is used instead of the paper's
    zero-padding option A because a projection is an ordinary conv layer that the fixed-point
    machinery quantizes and compiles like every other one.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNormReLU2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = BatchNormReLU2d(planes)  # with the shortcut added before its ReLU
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(planes),
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.bn1(self.conv1(x))), self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016, section 4.2): 3 stages of 3 basic blocks, 16/32/64 channels.

    Projection (option B, 1x1 conv + BN) shortcuts at the two down-sampling blocks, which adds
    about 2.8k parameters to the paper's 0.27M.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = BatchNormReLU2d(16)
        self.layer1 = self._stage(16, 16, stride=1)
        self.layer2 = self._stage(16, 32, stride=2)
        self.layer3 = self._stage(32, 64, stride=2)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int, blocks: int = 3) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def lenet5(num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    """LeNet-5 with ReLU + max pooling for 32x32 inputs (see :class:`LeNet5`)."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet20:
    """CIFAR ResNet-20 with option-B (1x1 conv + BN projection) shortcuts (see :class:`ResNet20`)."""
    return ResNet20(num_classes=num_classes, in_channels=in_channels)


_BUILTINS: dict[str, Callable[..., nn.Module]] = {"lenet5": lenet5, "resnet20": resnet20}


def build_model(spec: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build a model from ``"lenet5"``, ``"resnet20"`` or ``"package.module:callable"``.

    The callable form lets users train their own architectures without editing the zoo; it is
    called as ``callable(num_classes=..., in_channels=...)`` and must return an ``nn.Module``.
    Every problem with the spec raises ValueError (so a CLI can report it as a usage error).
    """
    accepted = f"accepted: {', '.join(BUILTIN_MODELS)}, or 'package.module:callable'"
    name = spec.strip()
    if name.lower() in _BUILTINS:
        return _BUILTINS[name.lower()](num_classes=num_classes, in_channels=in_channels)
    module_name, sep, attr_path = name.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"unknown model {spec!r}; {accepted}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    factory: object = module
    for part in attr_path.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError as exc:
            raise ValueError(
                f"model {spec!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from exc
    if not callable(factory):
        raise ValueError(f"model {spec!r}: {attr_path!r} is not callable")
    model = factory(num_classes=num_classes, in_channels=in_channels)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model {spec!r}: {attr_path!r} returned {type(model).__name__}, not a torch nn.Module"
        )
    return model
