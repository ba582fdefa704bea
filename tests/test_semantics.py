"""Compiled fixed-point models against an independent float64 reference of MARViN's semantics.

Reference: the original torch module in float64 where every Conv/Linear computes
Q(layer(Q(x), Q(w), Q(b))) with Q = floor(v * 2**fl + 1/2) * 2**-fl clamped to the word length.
"""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from marvin_compile.fixed_point import Precision
from marvin_compile.kernel_classes import class_for_wl


def q_ref(v: torch.Tensor, wl: int, fl: int) -> torch.Tensor:
    """MARVIN.md section 1, nearest rounding, written out independently of the package."""
    levels = torch.floor(v * 2.0**fl + 0.5).clamp(-(2 ** (wl - 1)), 2 ** (wl - 1) - 1)
    return levels * 2.0**-fl


def reference(model: nn.Module, x: np.ndarray, precision: dict[str, tuple[int, int]], dtype=torch.float64):
    m = copy.deepcopy(model).to(dtype)
    for name, mod in m.named_modules():
        if name in precision:
            wl, fl = precision[name]
            with torch.no_grad():
                mod.weight.copy_(q_ref(mod.weight, wl, fl))
                if mod.bias is not None:
                    mod.bias.copy_(q_ref(mod.bias, wl, fl))
            mod.register_forward_pre_hook(lambda _m, a, wl=wl, fl=fl: (q_ref(a[0], wl, fl),))
            mod.register_forward_hook(lambda _m, _a, out, wl=wl, fl=fl: q_ref(out, wl, fl))
    with torch.no_grad():
        return m(torch.from_numpy(x).to(dtype)).numpy()


CASES = [(4, 2), (4, 3), (6, 3), (8, 3), (8, 5), (12, 6), (12, 9), (16, 8), (16, 11), (20, 10), (24, 14)]


@pytest.fixture(scope="module")
def inputs():
    return np.random.default_rng(0).normal(size=(3, 2, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("wl,fl", CASES)
def test_uniform_precision_matches_float64_reference(small_cnn, compiled_cnn, inputs, wl, fl):
    model, _ = small_cnn
    names = compiled_cnn.layer_names
    compiled_cnn.set_precision(Precision(wl, fl))
    got = compiled_cnn(inputs)
    exact = reference(model, inputs, {n: (wl, fl) for n in names})
    sim32 = reference(model, inputs, {n: (wl, fl) for n in names}, torch.float32)
    step = 2.0**-fl
    assert len(np.unique(exact)) > 8, "degenerate case: the reference output is (nearly) constant"
    if class_for_wl(wl).is_integer:
        # Integer kernels compute the fixed-point result exactly; never worse than float32 simulation.
        np.testing.assert_array_equal(got, exact)
        assert np.abs(got - exact).max() <= np.abs(sim32 - exact).max()
    else:
        # The float32 class is the paper's float32 simulation: as close to float64 as torch's float32
        # simulation of the same semantics, i.e. a few steps where float32 accumulation flips a rounding.
        err = np.abs(got - exact).max()
        assert err <= max(4 * step, 2 * np.abs(sim32 - exact).max()), err / step


def test_per_layer_precision(small_cnn, compiled_cnn, inputs):
    model, _ = small_cnn
    names = compiled_cnn.layer_names
    pairs = [(4, 2), (8, 4), (12, 7), (16, 10), (24, 12)]
    config = {n: pairs[i % len(pairs)] for i, n in enumerate(names)}
    compiled_cnn.set_precision({n: Precision(*p) for n, p in config.items()})
    got = compiled_cnn(inputs)
    exact = reference(model, inputs, config)
    assert np.abs(got - exact).max() <= 4 * 2.0**-12


def test_layer_names_map_to_torch_modules(compiled_cnn):
    assert compiled_cnn.layer_names == ["conv1", "grouped", "depthwise", "conv2", "fc"]


def test_float_path_matches_onnxruntime(small_cnn, compiled_cnn, inputs):
    _, path = small_cnn
    compiled_cnn.set_precision(None)
    got = compiled_cnn(inputs)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": inputs})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_any_batch_size_runs_one_variant(compiled_cnn, store, inputs):
    compiled_cnn.set_precision(Precision(8, 4))
    before = type(store).compilations
    for n in (1, 5, 7):
        x = np.random.default_rng(n).normal(size=(n, 2, 16, 16)).astype(np.float32)
        assert compiled_cnn(x).shape == (n, 10)
    assert type(store).compilations == before
