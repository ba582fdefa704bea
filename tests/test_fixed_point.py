"""``fixed_point.quantize`` against float64 numpy: ties up, clamping, stochastic rounding's draws;
``quantize_each`` (many tensors, each at its precision) against the same references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marvin_compile.fixed_point import quantize, quantize_each

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


def _reference(x: torch.Tensor, wl: int, fl: int, u: np.ndarray | float = 0.5) -> np.ndarray:
    """floor(x * 2**fl + u) clamped to wl bits, in float64: nearest with u = 1/2."""
    scaled = x.double().numpy() * 2**fl
    floor = np.floor(scaled)
    return np.clip(floor + (u >= 1.0 - (scaled - floor)), -(2 ** (wl - 1)), 2 ** (wl - 1) - 1) / 2**fl


def test_quantize_each_puts_each_tensor_on_its_own_grid() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=g) * 3 for shape in [(16, 3, 3, 3), (7,), (4, 5), (300,)]]
    precisions = [(8, 4), (12, 6), (8, 4), (4, 1)]
    nearest = quantize_each(tensors, precisions)
    for x, q, (wl, fl) in zip(tensors, nearest, precisions, strict=True):
        assert q.shape == x.shape
        np.testing.assert_array_equal(q.double().numpy(), _reference(x, wl, fl))
    stochastic = quantize_each(tensors, precisions, "stochastic", torch.Generator().manual_seed(1))
    for x, q, (wl, fl) in zip(tensors, stochastic, precisions, strict=True):
        down, up = _reference(x, wl, fl, 0.0), _reference(x, wl, fl, 1.0)  # the two neighbours
        got = q.double().numpy()
        assert np.all((got == down) | (got == up)), f"({wl}, {fl}): a value off its two grid neighbours"


def test_quantize_each_is_unbiased_and_refuses_a_missing_precision() -> None:
    x = [torch.full((100_000,), 0.3), torch.full((100_000,), -1.03125)]
    got = quantize_each(x, [(8, 4), (12, 6)], "stochastic", torch.Generator().manual_seed(0))
    for t, q, fl in zip(x, got, (4, 6), strict=True):
        assert q.double().mean().item() == pytest.approx(t[0].item(), abs=4 / 2**fl / np.sqrt(len(t)))
    with pytest.raises(ValueError, match="one precision per tensor"):
        quantize_each(x, [(8, 4)])
