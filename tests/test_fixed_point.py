"""``fixed_point.quantize`` against float64 numpy: ties up, clamping, stochastic rounding's draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marvin_compile.fixed_point import quantize

WL, FL = 8, 4  # grid 1/16, levels -128..127


def _inputs() -> torch.Tensor:
    rng = np.random.default_rng(0)
    ties = (np.arange(-300, 300) + 0.5) / 2**FL  # exact halfway points, some past the range
    values = np.concatenate([rng.normal(0, 4, 5000), ties, [20.0, -20.0, 0.0]])
    return torch.from_numpy(values.astype(np.float32))


def test_nearest_rounds_ties_up_and_clamps() -> None:
    x = _inputs()
    want = np.clip(np.floor(x.double().numpy() * 2**FL + 0.5), -128, 127) / 2**FL
    got = quantize(x, WL, FL)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.double().numpy(), want)


def test_stochastic_rounds_up_where_its_draw_passes_the_fraction() -> None:
    x = _inputs()
    got = quantize(x, WL, FL, "stochastic", torch.Generator().manual_seed(3))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)).double().numpy()
    scaled = x.double().numpy() * 2**FL
    floor = np.floor(scaled)
    want = np.clip(floor + (u >= 1.0 - (scaled - floor)), -128, 127) / 2**FL
    np.testing.assert_array_equal(got.double().numpy(), want)


@pytest.mark.parametrize("value", [0.3, -1.03125, 2.97])
def test_stochastic_rounding_is_unbiased(value: float) -> None:
    x = torch.full((200_000,), value)
    mean = quantize(x, WL, FL, "stochastic", torch.Generator().manual_seed(0)).double().mean().item()
    assert mean == pytest.approx(value, abs=4 * (1 / 2**FL) / np.sqrt(len(x)))


def test_input_is_left_unchanged() -> None:
    x = _inputs()
    kept = x.clone()
    quantize(x, WL, FL, "stochastic", torch.Generator().manual_seed(0))
    quantize(x, WL, FL)
    assert torch.equal(x, kept)
