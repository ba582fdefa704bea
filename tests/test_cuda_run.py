"""On a machine with a GPU: CUDA variants give the same fixed-point results as the CPU ones."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from marvin_compile.fixed_point import Precision
from marvin_compile.frontend import import_onnx, load_onnx
from marvin_compile.kernel_classes import KERNEL_CLASSES
from marvin_compile.passes import pipeline
from marvin_compile.runtime.compiled_model import layers_of, precision_args
from marvin_compile.runtime.variant_store import VariantStore
from marvin_compile.target import resolve_target

pytestmark = pytest.mark.skipif(not tvm.cuda(0).exist, reason="needs an NVIDIA GPU")


@pytest.mark.parametrize(
    "cls,p", list(zip(KERNEL_CLASSES, [Precision(8, 4), Precision(14, 8), Precision(24, 12)], strict=True))
)
def test_cuda_variants_match_cpu(small_cnn, tmp_path, cls, p):
    _, path = small_cnn
    layers = layers_of(pipeline.partition(import_onnx(load_onnx(path)).mod))
    cpu, gpu = VariantStore(resolve_target("cpu"), tmp_path), VariantStore(resolve_target("cuda"), tmp_path)
    rng = np.random.default_rng(0)
    for layer in layers:
        shapes = [
            [4 if isinstance(d, tvm.tirx.Var) else int(d) for d in prm.ty.shape] for prm in layer.func.params
        ]
        arrays = [(4 * rng.normal(size=s)).astype(np.float32) for s in shapes]
        outs = []
        for store in (cpu, gpu):
            args = [tvm.runtime.tensor(a, store.device) for a in arrays] + list(
                precision_args(p, store.device)
            )
            outs.append(store.get(layer.func, cls, "nearest").fn(*args).numpy())
        if cls.is_integer:
            np.testing.assert_array_equal(outs[1], outs[0])
        else:
            np.testing.assert_allclose(outs[1], outs[0], atol=4 * 2.0**-p.fl)
