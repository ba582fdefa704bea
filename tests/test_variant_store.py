"""Variant caching: no compilation on precision changes inside a class, disk hits across processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

from marvin_compile.fixed_point import Precision
from marvin_compile.frontend import import_onnx, load_onnx
from marvin_compile.runtime.compiled_model import CompiledModel
from marvin_compile.runtime.variant_store import VariantStore


def test_fl_change_inside_a_class_compiles_nothing(compiled_cnn):
    x = np.random.default_rng(0).normal(size=(2, 2, 16, 16)).astype(np.float32)
    compiled_cnn.set_precision(Precision(8, 4))
    compiled_cnn(x)
    before = VariantStore.compilations
    outputs = []
    for wl, fl in [(8, 1), (8, 6), (6, 3), (4, 2), (7, 5)]:
        compiled_cnn.set_precision(Precision(wl, fl))
        outputs.append(compiled_cnn(x))
    assert VariantStore.compilations == before
    assert len({o.tobytes() for o in outputs}) == len(outputs)  # the precision really changed


def test_second_process_hits_the_disk_cache(small_cnn, target, tmp_path):
    _, path = small_cnn
    cache = tmp_path / "cache"
    model = CompiledModel(import_onnx(load_onnx(path)), VariantStore(target, cache))
    model.set_precision(Precision(12, 6))
    files = sorted(p.name for p in cache.iterdir())
    assert files and not [f for f in files if f.startswith(".tmp")]
    script = textwrap.dedent(
        f"""
        from marvin_compile.fixed_point import Precision
        from marvin_compile.frontend import import_onnx, load_onnx
        from marvin_compile.runtime.compiled_model import CompiledModel
        from marvin_compile.runtime.variant_store import VariantStore
        from marvin_compile.target import resolve_target
        store = VariantStore(resolve_target("cpu"), {str(cache)!r})
        m = CompiledModel(import_onnx(load_onnx({str(path)!r})), store)
        m.set_precision(Precision(12, 6))
        print("compilations", VariantStore.compilations)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "compilations 0" in out.stdout, out.stdout + out.stderr
    assert sorted(p.name for p in cache.iterdir()) == files


def test_identical_layers_share_a_variant(tmp_path, store):
    import torch
    from torch import nn

    from marvin_compile.frontend import export_onnx

    # both layers ReLU-fed: a layer fed by a ReLU compiles apart from one that is not (nonneg_inputs)
    net = nn.Sequential(nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    export_onnx(net, torch.zeros(1, 8), tmp_path / "m.onnx")
    model = CompiledModel(import_onnx(load_onnx(tmp_path / "m.onnx")), store)
    before = VariantStore.compilations
    model.set_precision(Precision(3, 1))
    assert VariantStore.compilations - before <= 1
