"""The user API, in torchao's spirit: one call turns a model into a MARViN model.

    handle = marvin_compile.quantize_(model, example_input, MarvinConfig(target="cpu"))
    handle.set_precision({"conv1": Precision(8, 4), ...})   # or let the MSGD optimizer decide

Conv and Linear modules then run compiled fixed-point variants; everything else (activations,
pooling, residual adds) stays plain PyTorch and trains as written, batch norm too, except that on
the CPU its training statistics and gradients come from compiled kernels (``runtime/batch_norm``:
PyTorch's sums each channel one element at a time), a ``models.BatchNormReLU2d``'s add and ReLU
with them.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import torch
from torch import nn

from marvin_compile.fixed_point import Precision, check_rounding
from marvin_compile.frontend import export_onnx, import_onnx, load_onnx
from marvin_compile.kernel_classes import CLASS_BY_NAME, KERNEL_CLASSES
from marvin_compile.passes import pipeline
from marvin_compile.runtime.batch_norm import BatchNormKernels, onnx_batch_norm_shapes, route_batch_norms
from marvin_compile.runtime.compiled_model import layers_of
from marvin_compile.runtime.torch_bridge import (
    BACKWARDS,
    BRIDGED,
    CompiledLayer,
    bridge,
    interleave_with_torch,
)
from marvin_compile.runtime.variant_store import VariantStore
from marvin_compile.target import resolve_target
from marvin_compile.tuning import open_database

DLPACK_CUDA = 2  # kDLCUDA


@dataclass
class MarvinConfig:
    """How layers are compiled and run. ``precompile`` lists the kernel classes built up front."""

    target: str | dict = "cpu"
    rounding: str = "stochastic"
    backward: str = "float"
    initial: Precision = field(default_factory=lambda: Precision(8, 4))
    precompile: tuple[str, ...] = tuple(k.name for k in KERNEL_CLASSES)
    cache_dir: str | os.PathLike | None = None
    seed: int = 0
    tuning_db: str | os.PathLike | None = None  # default: the target's database, if tuned

    def __post_init__(self) -> None:
        check_rounding(self.rounding)
        if self.backward not in BACKWARDS:
            raise ValueError(f"backward={self.backward!r} is not supported; accepted: {', '.join(BACKWARDS)}")
        unknown = [c for c in self.precompile if c not in CLASS_BY_NAME]
        if unknown:
            raise ValueError(f"unknown kernel classes {unknown}; accepted: {', '.join(CLASS_BY_NAME)}")


class MarvinHandle:
    """The compiled layers of a MARViN model and the counters a training run reports."""

    def __init__(
        self, layers: dict[str, CompiledLayer], store: VariantStore, generator: torch.Generator
    ) -> None:
        self.layers = layers
        self.store = store
        self.generator = generator
        self._warm = VariantStore.compilations

    def set_precision(self, precision: dict[str, Precision] | dict[str, tuple[int, int]]) -> None:
        for name, p in precision.items():
            self.layers[name].set_precision(p if isinstance(p, Precision) else Precision(*p))

    def mark_warm(self) -> None:
        """From now on every compilation counts as a compilation after warm-up."""
        self._warm = VariantStore.compilations

    @property
    def compilations_after_warmup(self) -> int:
        return VariantStore.compilations - self._warm

    @property
    def swaps(self) -> int:
        return sum(layer.swaps for layer in self.layers.values())

    @property
    def precision(self) -> dict[str, Precision]:
        return {n: layer.precision for n, layer in self.layers.items()}


def quantize_(
    model: nn.Module, example_input: torch.Tensor, config: MarvinConfig | None = None
) -> MarvinHandle:
    """Compile every Conv/Linear layer of ``model`` and route its forward through the variants."""
    config = config or MarvinConfig()
    interleave_with_torch()
    target = resolve_target(config.target)
    store = VariantStore(target, config.cache_dir, open_database(config.tuning_db, target))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_onnx(model, example_input[:2], path, fold_batchnorm=False)
        graph = load_onnx(path)
        layers = layers_of(pipeline.partition(import_onnx(graph).mod))
    modules = dict(model.named_modules())
    device = "cuda" if store.device.dlpack_device_type() == DLPACK_CUDA else "cpu"
    generator = torch.Generator(device=device).manual_seed(config.seed)  # rounds tensors of that device
    compiled: dict[str, CompiledLayer] = {}
    for layer in layers:
        module = modules.get(layer.name)
        if not isinstance(module, BRIDGED):
            continue  # e.g. a MatMul with a bare parameter: it stays in PyTorch
        if (module.bias is not None) != layer.has_bias:
            raise AssertionError(f"layer {layer.name}: ONNX and torch disagree on the bias")
        cl = CompiledLayer(layer, store, config.rounding, config.backward)
        for name in config.precompile:
            cls = CLASS_BY_NAME[name]
            store.get(layer.func, cls, config.rounding)
            if config.backward == "lowbit" and cls.is_integer:
                store.get_gradients(layer.func, cls, config.rounding)
        store.get_input_quantizer(layer.func, config.rounding)
        cl.set_precision(config.initial)
        bridge(module, cl, generator)
        compiled[layer.name] = cl
    if target.kind.name == "llvm":
        kernels = BatchNormKernels(store)
        for shape in onnx_batch_norm_shapes(graph):
            kernels.entries(*shape)
        route_batch_norms(model, kernels)
    missing = [n for n, m in modules.items() if isinstance(m, BRIDGED) and n not in compiled]
    if missing:
        raise ValueError(
            f"layers {missing} were not found in the exported graph; accepted: Conv1d, Conv2d, Linear "
            "applied directly to their input"
        )
    handle = MarvinHandle(compiled, store, generator)
    handle.mark_warm()
    return handle
