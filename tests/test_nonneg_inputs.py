"""ReLU-fed layers: found in the graph (``passes/nonneg_inputs``) and, in the int8 class, run on byte
products (``dot_isa``'s ``uint8``), exactly, against the float64 reference of the semantics tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from marvin_compile.fixed_point import Precision
from marvin_compile.frontend import export_onnx, import_onnx, load_onnx
from marvin_compile.passes import pipeline
from marvin_compile.passes.nonneg_inputs import NONNEG_ATTR
from marvin_compile.passes.utils import layer_functions
from marvin_compile.runtime.compiled_model import CompiledModel
from marvin_compile.runtime.variant_store import signature
from tests.test_semantics import reference


class Mixed(nn.Module):
    """Inputs of every kind: the raw input, ReLU through a max pool, a residual add (signed), a
    ReLU through an average pool and a flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pooled = nn.Conv2d(8, 8, 3, padding=1)
        self.after_add = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.max_pool2d(torch.relu(self.stem(x)), 2)
        y = y + self.pooled(y)
        y = torch.relu(self.after_add(y))
        return self.fc(nn.functional.avg_pool2d(y, 2).flatten(1))


def test_layers_fed_by_a_relu_are_marked(tmp_path):
    export_onnx(Mixed().eval(), torch.zeros(1, 3, 8, 8), tmp_path / "m.onnx")
    mod = pipeline.partition(import_onnx(load_onnx(tmp_path / "m.onnx")).mod)
    marked = {
        str(f.attrs["marvin.layer"]): bool(f.attrs.get(NONNEG_ATTR, False)) for _, f in layer_functions(mod)
    }
    assert marked == {"stem": False, "pooled": True, "after_add": False, "fc": True}


def test_a_relu_fed_layer_and_its_signed_twin_never_share_a_variant(tmp_path, store):
    """The mark is part of the variant's key: a signed input must never reach the byte kernel,
    which would read its negative levels as zeros."""
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    export_onnx(net.eval(), torch.zeros(1, 8), tmp_path / "m.onnx")
    compiled = CompiledModel(import_onnx(load_onnx(tmp_path / "m.onnx")), store)
    compiled.set_precision(Precision(8, 4))
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_array_equal(compiled(x), reference(net, x, {"0": (8, 4), "2": (8, 4)}))
    first, second = (
        f for _, f in layer_functions(pipeline.partition(import_onnx(load_onnx(tmp_path / "m.onnx")).mod))
    )
    assert signature(first) != signature(second)


def test_relu_fed_int8_conv_matches_the_float64_reference(tmp_path, store):
    """wl 8, fl 7, a 1x1 conv over 16 channels: full-range weight levels, input levels up to 127
    (after the ReLU), sums small enough that most outputs fall inside the word. The byte products'
    extremes, which the output clamp would hide here, are checked on the raw sums in
    ``test_dot_kernels``."""
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 16, 1, bias=False)).eval()
    p = Precision(8, 7)
    rng = np.random.default_rng(1)
    levels = rng.integers(-128, 128, size=model[1].weight.shape)
    levels[0, :4] = -128
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(levels * 2.0**-p.fl))
    x = (rng.integers(-64, 128, size=(2, 16, 6, 6)) * 2.0**-p.fl).astype(np.float32)
    export_onnx(model, torch.from_numpy(x), tmp_path / "m.onnx")
    compiled = CompiledModel(import_onnx(load_onnx(tmp_path / "m.onnx")), store)
    assert compiled.layer_names == ["1"]
    compiled.set_precision(p)
    got = compiled(x)
    exact = reference(model, x, {"1": (p.wl, p.fl)})
    inside = np.abs(exact * 2.0**p.fl) < 127
    assert inside.mean() > 0.3 and len(np.unique(exact[inside])) > 50
    np.testing.assert_array_equal(got, exact)
