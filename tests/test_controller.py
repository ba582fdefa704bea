"""The MARViN controller rules (MARVIN.md sections 4-5) against hand-computed cases."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from marvin_compile.runtime.controller import (
    ControllerConfig,
    PrecisionController,
    adapt_lookback,
    adapt_resolution,
    escalate_strategy,
    gradient_diversity,
    kl_information_loss,
    push_down,
    push_up,
)

LB = dict(min_lookback=25, max_lookback=100)


def grid(k_max: int, fl: int) -> torch.Tensor:
    """All multiples of 2**-fl in [-k_max, k_max] * 2**-fl: weights already on a coarse grid."""
    return torch.arange(-k_max, k_max + 1, dtype=torch.float32) / 2**fl


# ---------------------------------------------------------------- configuration


def test_config_defaults_are_the_published_ones() -> None:
    cfg = ControllerConfig()
    assert (cfg.min_resolution, cfg.max_resolution) == (50, 150)
    assert (cfg.min_lookback, cfg.max_lookback) == (25, 100)
    assert cfg.lookback_momentum == 1.0
    assert cfg.results_buffer == 8
    assert cfg.push_up_strategy == "min"
    assert (cfg.initial_wl, cfg.initial_fl) == (8, 4)
    assert cfg.push_down_min_fl == 4
    assert cfg.push_down_rounding == "nearest"
    assert cfg.push_down_tolerance == 0.0


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        (dict(push_up_strategy="avg"), ["push_up_strategy", "min, mean, max"]),
        (dict(push_down_rounding="up"), ["push_down_rounding", "nearest, stochastic"]),
        (dict(min_lookback=0), ["min_lookback", ">= 1"]),
        (dict(min_lookback=30, max_lookback=20), ["max_lookback", ">= 30"]),
        (dict(max_resolution=10), ["max_resolution"]),
        (dict(lookback_momentum=1.5), ["lookback_momentum", "0.0 <= lookback_momentum <= 1.0"]),
        (dict(results_buffer=0), ["results_buffer", "1 <= results_buffer <= 32"]),
        (dict(initial_wl=8, initial_fl=8), ["initial_wl/initial_fl", "0 <= fl < wl"]),
        (dict(push_down_min_fl=-1), ["push_down_min_fl"]),
        (dict(push_down_tolerance=float("nan")), ["push_down_tolerance"]),
        (dict(min_resolution=2.5), ["min_resolution", "int"]),
        (dict(max_lookback=True), ["max_lookback", "int"]),
    ],
)
def test_config_validation_names_field_and_accepted_values(kwargs: dict, needles: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        ControllerConfig(**kwargs)
    for needle in needles:
        assert needle in str(err.value)


# ---------------------------------------------------------------- information loss


def test_kl_is_exactly_zero_for_identical_histograms() -> None:
    w = grid(20, 5)
    assert kl_information_loss(w, 8, 5, 50) == 0.0
    assert kl_information_loss(w, 8, 5, 50, "stochastic", torch.Generator().manual_seed(1)) == 0.0


def test_kl_hand_computed() -> None:
    # bins [0, .5) and [.5, 1]: P = (3, 1)/4; at step 1/2, .3 and .4 round up to .5: Q = (1, 3)/4.
    w = torch.tensor([0.0, 0.3, 0.4, 1.0])
    expected = 0.75 * math.log(3 / 1) + 0.25 * math.log(1 / 3)  # = ln(3) / 2
    assert kl_information_loss(w, 4, 1, 2) == pytest.approx(expected, rel=1e-12)
    # at step 1/4: .3 -> .25, .4 -> .5, so Q = (2, 2)/4.
    expected = 0.75 * math.log(3 / 2) + 0.25 * math.log(1 / 2)
    assert kl_information_loss(w, 4, 2, 2) == pytest.approx(expected, rel=1e-12)


def test_kl_is_infinite_when_quantized_histogram_empties_a_bin() -> None:
    # three bins of [0, 1] hold one value each; at step 1, 0.5 rounds to 1: the middle bin empties.
    assert kl_information_loss(torch.tensor([0.0, 0.5, 1.0]), 4, 0, 3) == math.inf


def test_kl_counts_values_rounded_past_the_range_in_the_edge_bin() -> None:
    # 0.97 rounds to 1.0 > max w; it stays in the last bin, so the histograms agree.
    assert kl_information_loss(torch.tensor([0.0, 0.5, 0.97]), 4, 1, 2) == 0.0


def test_kl_never_negative_and_positive_when_histograms_differ() -> None:
    w = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 0.1
    for fl in range(3, 25):
        loss = kl_information_loss(w, 32, fl, 50)
        assert loss >= 0.0
        lo, hi = float(w.min()), float(w.max())
        edges = torch.linspace(lo, hi, 51, dtype=torch.float64)
        q = torch.floor(w.double() * 2**fl + 0.5) / 2**fl
        p_counts = torch.histogram(w.double(), bins=edges)[0]
        q_counts = torch.histogram(q.clamp(lo, hi), bins=edges)[0]
        assert (loss == 0.0) == torch.equal(p_counts, q_counts)


def test_kl_constant_weights_and_bad_input() -> None:
    assert kl_information_loss(torch.full((5,), 0.25), 8, 4, 50) == 0.0
    assert kl_information_loss(torch.full((5,), 0.3), 8, 4, 50) == math.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        kl_information_loss(torch.tensor([0.0, float("nan")]), 8, 4, 50)
    with pytest.raises(ValueError, match="bins"):
        kl_information_loss(torch.tensor([0.0, 1.0]), 8, 4, 0)


# ---------------------------------------------------------------- push-down


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_push_down_finds_the_grid_of_coarse_weights(rounding: str) -> None:
    # k / 32 for |k| <= 100: fl = 5 is lossless, fl = 4 is not; k = +-100 needs 2**(wl-1) - 1 >= 100.
    gen = torch.Generator().manual_seed(0)
    assert push_down(grid(100, 5), 16, 10, 50, rounding=rounding, generator=gen) == (8, 5)
    # the lower bound of the fl search is reachable: k / 16 gives fl = 4.
    assert push_down(grid(100, 4), 16, 10, 50, rounding=rounding, generator=gen) == (8, 4)


def test_push_down_leaves_fl_below_min_fl_and_trims_wl() -> None:
    # k / 8 for |k| <= 20: fl = 3 < 4 stays; wl = 6 holds [-32, 31] >= 20, wl = 5 clamps.
    assert push_down(grid(20, 3), 12, 3, 50) == (6, 3)


def test_push_down_keeps_precision_when_nothing_smaller_is_lossless() -> None:
    w = torch.randn(256, generator=torch.Generator().manual_seed(0)) * 0.1
    assert push_down(w, 8, 4, 50) == (8, 4)


def test_push_down_tolerance() -> None:
    # w = [0, .3, .4, 1], 2 bins: loss(fl=2) = .1308 (see test_kl_hand_computed), loss(fl=1) = .5493.
    w = torch.tensor([0.0, 0.3, 0.4, 1.0])
    # tolerance .2 accepts fl = 2; at fl = 2 even wl = 3 (1.0 saturates to .75, same bin) is accepted.
    assert push_down(w, 8, 3, 2, min_fl=1, tolerance=0.2) == (3, 2)
    # without tolerance fl = 3 is the first lossless one; wl = 4 saturates 1.0 to .875, same bin.
    assert push_down(w, 8, 3, 2, min_fl=1) == (4, 3)


# ---------------------------------------------------------------- gradient diversity and push-up


def test_gradient_diversity_hand_computed() -> None:
    g = torch.tensor([0.6, 0.8])
    assert gradient_diversity(5, 5 * g) == 1.0  # identical gradients
    assert gradient_diversity(2, g + -g) == math.inf  # opposite gradients cancel
    assert gradient_diversity(9, torch.eye(9).sum(0)) == 3.0  # 9 orthogonal: 9 / sqrt(9)
    with pytest.raises(ValueError, match="count"):
        gradient_diversity(0, g)


def test_push_up_takes_one_step_without_usable_diversity() -> None:
    # gd = inf (cancelling window) and gd = 1 (ln 1 - 1 < 0) both give s = 1:
    # fl = 6 + 1, wl = max(10, 7) + 1 = 11, then wl >= fl + B = 15.
    assert push_up(10, 6, math.inf, "min", 8) == (15, 7)
    assert push_up(10, 6, 1.0, "max", 8) == (15, 7)


def test_push_up_strategies_hand_computed() -> None:
    # L = ln(e^1.6) - 1 = 0.6, L^2 = 0.36: s1 = ceil(2.78) = 3, s2 = min(ceil(11.52), 32) - 4 = 8.
    gd = math.exp(1.6)
    assert push_up(10, 4, gd, "min", 8) == (15, 7)  # s = 3: fl 7, wl max(11, 7 + 8)
    assert push_up(10, 4, gd, "mean", 8) == (18, 10)  # s = ceil(11 / 2) = 6
    assert push_up(10, 4, gd, "max", 8) == (20, 12)  # s = 8


def test_push_up_s2_zero_and_results_buffer_cap() -> None:
    # gd = 3: L = 0.0986, s1 = 103, s2 = max(1 - 4, 0) = 0; min -> s = 0 but wl still grows by one.
    assert push_up(10, 4, 3.0, "min", 8) == (12, 4)
    # mean -> s = 52: fl caps at 32, then at 32 - B = 24; wl = 32.
    assert push_up(10, 4, 3.0, "mean", 8) == (32, 24)
    assert push_up(32, 30, math.inf, "min", 8) == (32, 24)


def test_push_up_always_returns_a_valid_pair_within_the_buffer() -> None:
    for buffer in (1, 8, 31, 32):
        for wl in range(2, 33):
            for fl in range(wl):
                for gd in (1.0, 2.0, math.exp(1.6), 30.0, math.inf):
                    for strategy in ("min", "mean", "max"):
                        new_wl, new_fl = push_up(wl, fl, gd, strategy, buffer)
                        assert 2 <= new_wl <= 32 and 0 <= new_fl < new_wl
                        assert new_fl <= 32 - buffer and new_wl >= min(new_fl + buffer, 32)


# ---------------------------------------------------------------- self-tuning


@pytest.mark.parametrize(
    ("gd", "expected"), [(1.0, 100), (2.0, 50), (3.0, 34), (8.0, 25), (math.inf, 25), (0.0, 100)]
)
def test_adapt_lookback(gd: float, expected: int) -> None:
    assert adapt_lookback(gd, 60, **LB, momentum=1.0) == expected


def test_adapt_lookback_momentum() -> None:
    assert adapt_lookback(2.0, 25, **LB, momentum=0.5) == 38  # ceil(0.5 * 50 + 0.5 * 25)
    assert adapt_lookback(2.0, 25, **LB, momentum=0.0) == 25


@pytest.mark.parametrize(
    ("lookback", "resolution", "expected"),
    [(100, 60, 61), (25, 60, 59), (50, 60, 60), (100, 150, 150), (25, 50, 50)],
)
def test_adapt_resolution(lookback: int, resolution: int, expected: int) -> None:
    assert adapt_resolution(lookback, resolution, **LB, min_resolution=50, max_resolution=150) == expected


def test_escalate_strategy() -> None:
    assert escalate_strategy("min", 1.0, 1.0) == "mean"  # mean <= |loss|: not improving
    assert escalate_strategy("mean", 1.0, 2.0) == "max"
    assert escalate_strategy("max", 1.0, 2.0) == "max"
    assert escalate_strategy("max", 1.0, 0.5) == "min"  # improving
    assert escalate_strategy("max", 1.0, 0.5, base="mean") == "mean"


def test_update_strategy_waits_for_a_full_window_then_escalates_and_falls_back() -> None:
    ctrl = PrecisionController()
    ctrl.register("fc")  # lookback 25: window of 25 losses
    for _ in range(25):
        assert ctrl.update_strategy(1.0) == "min"
    assert ctrl.update_strategy(1.0) == "mean"
    assert ctrl.update_strategy(torch.tensor(1.0)) == "max"
    assert ctrl.update_strategy(1.0) == "max"
    assert ctrl.update_strategy(float("nan")) == "max"  # ignored
    assert ctrl.update_strategy(0.5) == "min"
    assert len(ctrl.loss_history) == 25


# ---------------------------------------------------------------- stateful controller


def test_identical_gradients_decide_after_max_lookback() -> None:
    # gd = 1 keeps the lookback at 100; resolution stays 50; push-down (16, 10) -> (8, 5) on the
    # k / 32 grid, push-up with s = 1 -> fl 6, wl max(9, 6 + 8) = 14.
    cfg = ControllerConfig(initial_wl=16, initial_fl=10, max_resolution=50)
    ctrl = PrecisionController(cfg)
    g = torch.tensor([0.6, 0.8])
    w = grid(100, 5)
    for _ in range(99):
        ctrl.observe("fc", g)
        assert ctrl.maybe_decide("fc", w) is None
    assert ctrl.layers["fc"].lookback == 100
    ctrl.observe("fc", g)
    assert ctrl.maybe_decide("fc", w) == (14, 6)
    state = ctrl.layers["fc"]
    assert (state.wl, state.fl, state.count, state.grad_sum) == (14, 6, 0, None)
    assert ctrl.history["fc"] == {"step": [100], "wl": [14], "fl": [6]}


def test_opposite_gradients_shrink_lookback_and_push_up_by_one() -> None:
    # g, -g: after two gradients gd = inf -> lookback 2 (min), resolution -1 (clamped at 10);
    # push-down keeps (8, 4) on the k / 16 grid, push-up s = 1 -> (max(9, 5 + 8), 5) = (13, 5).
    cfg = ControllerConfig(min_lookback=2, max_lookback=4, min_resolution=10, max_resolution=20)
    ctrl = PrecisionController(cfg)
    g = torch.tensor([0.6, 0.8])
    ctrl.observe("fc", g)
    assert ctrl.maybe_decide("fc", grid(100, 4)) is None
    assert (ctrl.layers["fc"].lookback, ctrl.layers["fc"].resolution) == (4, 11)
    ctrl.observe("fc", -g)
    assert ctrl.maybe_decide("fc", grid(100, 4)) == (13, 5)
    assert (ctrl.layers["fc"].lookback, ctrl.layers["fc"].resolution) == (2, 10)


def test_observe_rejects_shape_change_and_does_not_alias() -> None:
    ctrl = PrecisionController()
    g = torch.tensor([0.6, 0.8])
    ctrl.observe("fc", g)
    g.zero_()
    assert torch.equal(ctrl.layers["fc"].grad_sum, torch.tensor([0.6, 0.8]))
    with pytest.raises(ValueError, match="shape"):
        ctrl.observe("fc", torch.ones(3))


def test_state_dict_round_trip_resumes_identically() -> None:
    cfg = ControllerConfig(min_lookback=2, max_lookback=3, min_resolution=10, max_resolution=20)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(2, 3, generator=gen) for _ in range(8)]
    grads = [g / g.norm() for g in grads]
    w = torch.randn(2, 3, generator=gen)

    def run(ctrl: PrecisionController, steps: range) -> list:
        out = []
        for i in steps:
            ctrl.update_strategy(1.0 / (i + 1) if i % 3 else 2.0)
            ctrl.observe("a", grads[i])
            out.append(ctrl.maybe_decide("a", w))
        return out

    reference = PrecisionController(cfg)
    expected = run(reference, range(8))
    resumed_from = PrecisionController(cfg)
    run(resumed_from, range(6))
    saved = copy.deepcopy(resumed_from.state_dict())
    resumed = PrecisionController(cfg)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.layers["a"].grad_sum, resumed_from.layers["a"].grad_sum)
    assert resumed.loss_history == resumed_from.loss_history
    assert run(resumed, range(6, 8)) == expected[6:]
    assert resumed.history == reference.history and resumed.strategy == reference.strategy
    assert any(d is not None for d in expected[6:])
