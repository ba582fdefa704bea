"""The CUDA target generates and compiles every variant kind without a GPU (running needs one)."""

from __future__ import annotations

import shutil

import pytest
import tvm

from marvin_compile.frontend import import_onnx, load_onnx
from marvin_compile.kernel_classes import KERNEL_CLASSES
from marvin_compile.passes import pipeline
from marvin_compile.target import resolve_target

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs the CUDA toolkit (nvcc)")


def _cuda_sources(module: tvm.runtime.Module) -> list[str]:
    found = [module.inspect_source()] if module.kind == "cuda" else []
    for sub in module.imports:
        found += _cuda_sources(sub)
    return found


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_layer_variants_compile_for_cuda(small_cnn, rounding, tmp_path):
    _, path = small_cnn
    target = resolve_target("cuda")
    layers = pipeline.layer_functions(pipeline.partition(import_onnx(load_onnx(path)).mod))
    for _, func in layers[:2] + layers[-1:]:  # a conv, a grouped conv and the linear layer
        for cls in KERNEL_CLASSES:
            executable = pipeline.build(pipeline.variant_module(func, cls, rounding), target)
            sources = _cuda_sources(executable.mod)
            assert sources and "__global__" in sources[0]
            executable.export_library(str(tmp_path / f"{cls.name}.so"))


def test_gradient_kernels_compile_for_cuda(small_cnn):
    _, path = small_cnn
    target = resolve_target("cuda")
    layers = pipeline.layer_functions(pipeline.partition(import_onnx(load_onnx(path)).mod))
    for _, func in (layers[0], layers[-1]):
        for cls in KERNEL_CLASSES[:2]:
            executable = pipeline.build(pipeline.gradient_module(func, cls), target)
            assert any("__global__" in s for s in _cuda_sources(executable.mod))
