"""MARViN precision controller (MARVIN.md sections 4 and 5), independent of optimizer and kernels.

The controller keeps, per quantized layer, its fixed-point pair (wl, fl), the histogram resolution,
the lookback and a window of normalised weight gradients. Every rule is a pure function of its
inputs (plus an explicit generator for stochastic rounding), so decisions are reproducible and
identical on every data-parallel rank that feeds identical inputs.

Deliberate differences from the reference code (lorenz0890/AdaPT, ``MSGD_FP``):

- the push-down fl bisection evaluates the loss at the midpoint (the reference used the lower
  bound), and the wl search covers ``[fl_new + 1, wl]`` because a valid pair needs fl < wl;
- push-down looks at the whole master weight tensor, as the method says (the reference passed
  only the first output channel, ``fpWeights[i][0]``);
- the information loss is a true D_KL(P || Q) on normalised histograms (never negative);
  quantized values that round just past ``[min w, max w]`` are counted in the edge bins instead
  of being dropped, so the extreme weight rounding outwards is not mistaken for lost mass;
- the quantizer inside the loss rounds to nearest by default (the reference: stochastic);
- the strategy rule compares against the mean of a full window of the last ``mean(lookback)``
  losses and falls back to the configured strategy (``min`` in the published configuration);
- ``push_down_tolerance`` (ours, default 0 = the method) lets push-down accept a pair whose loss
  is at most that value. With zero tolerance every weight must stay in its histogram bin, which
  for thousands of weights needs a fine grid (a 64x64x3x3 He-initialised conv with 50 bins is
  lossless only from fl = 22; 1280 weights from fl of about 12), so push-down rarely goes low.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from marvin_compile.fixed_point import ROUNDINGS, PrecisionError, check_precision, quantize

STRATEGIES: tuple[str, ...] = ("min", "mean", "max")


@dataclass(frozen=True)
class ControllerConfig:
    """Every constant of the controller; defaults are the published ResNet/CIFAR-10 settings."""

    min_resolution: int = 50
    max_resolution: int = 150
    min_lookback: int = 25
    max_lookback: int = 100
    lookback_momentum: float = 1.0
    results_buffer: int = 8
    push_up_strategy: str = "min"
    initial_wl: int = 8
    initial_fl: int = 4
    push_down_min_fl: int = 4
    push_down_rounding: str = "nearest"
    push_down_tolerance: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kinds = {"int": (int,), "float": (int, float), "str": (str,)}[str(f.type)]
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(f"{f.name} must be of type {f.type}, got {value!r}")
        _check_range("min_resolution", self.min_resolution, 1)
        _check_range("max_resolution", self.max_resolution, self.min_resolution)
        _check_range("min_lookback", self.min_lookback, 1)
        _check_range("max_lookback", self.max_lookback, self.min_lookback)
        _check_range("lookback_momentum", self.lookback_momentum, 0.0, 1.0)
        _check_range("results_buffer", self.results_buffer, 1, 32)
        _check_choice("push_up_strategy", self.push_up_strategy, STRATEGIES)
        try:
            check_precision(self.initial_wl, self.initial_fl)
        except PrecisionError as err:
            raise ValueError(f"initial_wl/initial_fl: {err}") from err
        _check_range("push_down_min_fl", self.push_down_min_fl, 0, 31)
        _check_choice("push_down_rounding", self.push_down_rounding, ROUNDINGS)
        _check_range("push_down_tolerance", self.push_down_tolerance, 0.0)


def _check_range(name: str, value: float, lo: float, hi: float | None = None) -> None:
    if not (lo <= value and (hi is None or value <= hi)):
        accepted = f"{lo} <= {name} <= {hi}" if hi is not None else f"{name} >= {lo}"
        raise ValueError(f"{name}={value} is out of range; accepted: {accepted}")


def _check_choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is unknown; accepted: {', '.join(accepted)}")


# ---------------------------------------------------------------- section 4.1: push-down


_TINY = 2.0**-1074  # smallest positive float: keeps "histograms differ" distinguishable from zero loss


def kl_information_loss(
    w: torch.Tensor,
    wl: int,
    fl: int,
    bins: int,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> float:
    """D_KL(P || Q) between the histograms of w and of Q(w; wl, fl), both over [min w, max w].

    Zero exactly when the two histograms agree bin by bin, positive otherwise (a changed histogram
    is never rounded to zero), and ``math.inf`` when Q has an empty bin where P has mass: that pair
    loses information outright (push-down only compares the loss with a tolerance). Quantized values
    outside [min w, max w] (rounding moves them by less than one step) fall into the edge bins.
    If all weights are equal there is no bin width, so the loss is 0 only if Q(w) == w.
    """
    _check_range("bins", bins, 1)
    x = w.detach().reshape(-1).to(torch.float32)
    if x.numel() == 0:
        raise ValueError("kl_information_loss needs at least one weight")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("weights contain NaN or inf; the information loss is undefined")
    q = quantize(x, wl, fl, rounding, generator)
    lo, hi = (v.item() for v in torch.aminmax(x))
    if lo == hi:
        return 0.0 if torch.equal(q, x) else math.inf
    p_counts = _histogram(x, lo, hi, bins)
    q_counts = _histogram(q, lo, hi, bins)
    if torch.equal(p_counts, q_counts):
        return 0.0
    has_mass = p_counts > 0
    c, d = p_counts[has_mass].double(), q_counts[has_mass].double()
    if bool((d == 0).any()):
        return math.inf
    kl = float((c / x.numel() * (torch.log(c) - torch.log(d))).sum())
    return max(kl, _TINY)


def _histogram(x: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    """Counts over `bins` equal bins of [lo, hi], out-of-range values in the edge bins.

    Integer bincount is deterministic on every device, unlike torch.histc on CUDA.
    """
    idx = torch.floor((x.double() - lo) * (bins / (hi - lo))).long().clamp_(0, bins - 1)
    return torch.bincount(idx, minlength=bins)


def push_down(
    w: torch.Tensor,
    wl: int,
    fl: int,
    bins: int,
    *,
    min_fl: int = 4,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    tolerance: float = 0.0,
) -> tuple[int, int]:
    """The least precision at which quantizing w loses no information (KL loss <= tolerance, 0 in
    the method).

    First the smallest fl in [min_fl, fl] that is lossless at the current wl, then the smallest wl
    in [fl_new + 1, wl] that is lossless at fl_new; both by bisection evaluated at the midpoint
    (loss assumed monotone), both keeping the current value when no smaller one is lossless.
    fl below min_fl is left as is.
    """
    check_precision(wl, fl)
    fl_new = fl
    if fl >= min_fl:
        fl_new = _smallest_lossless(
            min_fl, fl, lambda f: kl_information_loss(w, wl, f, bins, rounding, generator) <= tolerance
        )
    wl_new = _smallest_lossless(
        fl_new + 1, wl, lambda n: kl_information_loss(w, n, fl_new, bins, rounding, generator) <= tolerance
    )
    check_precision(wl_new, fl_new)
    return wl_new, fl_new


def _smallest_lossless(lo: int, hi: int, lossless: Callable[[int], bool]) -> int:
    """Bisection for the smallest v in [lo, hi) with lossless(v); hi when there is none."""
    while lo < hi:
        mid = (lo + hi) // 2
        if lossless(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


# ---------------------------------------------------------------- section 4.2: push-up


def gradient_diversity(count: int, grad_sum: torch.Tensor) -> float:
    """gd = count / ||sum||_2 for a window of `count` unit-norm gradients: 1 when they all agree,
    ``math.inf`` when they cancel exactly."""
    if count < 1:
        raise ValueError(f"count={count} is out of range; gradient diversity needs count >= 1")
    norm = float(torch.linalg.vector_norm(grad_sum.detach().double()))
    return count / norm if norm > 0 else math.inf


def push_up(wl: int, fl: int, gd: float, strategy: str, results_buffer: int) -> tuple[int, int]:
    """Raise fl by s bits chosen from the gradient diversity, then keep a results buffer of B bits.

    With L = ln(gd) - 1 > 0 and finite gd: s1 = max(ceil(1/L^2), 1), s2 = max(min(ceil(32 L^2), 32)
    - fl, 0), combined by `strategy`; otherwise s = 1. Then fl <= 32 - B and wl >= fl + B (capped
    at 32), which with B >= 1 always leaves a valid pair.
    """
    check_precision(wl, fl)
    _check_choice("strategy", strategy, STRATEGIES)
    _check_range("results_buffer", results_buffer, 1, 32)
    s = 1
    if 0 < gd < math.inf:
        log_gd = math.log(gd) - 1.0
        if log_gd > 0:
            s1 = max(math.ceil(1.0 / log_gd**2), 1)
            s2 = max(min(math.ceil(32.0 * log_gd**2), 32) - fl, 0)
            s = {"min": min(s1, s2), "mean": (s1 + s2 + 1) // 2, "max": max(s1, s2)}[strategy]
    fl = min(fl + s, 32)
    wl = min(max(wl, fl) + 1, 32)
    fl = min(fl, 32 - results_buffer)
    wl = max(min(fl + results_buffer, 32), wl)
    check_precision(wl, fl)
    return wl, fl


# ---------------------------------------------------------------- section 5: self-tuning


def adapt_lookback(gd: float, lookback: int, *, min_lookback: int, max_lookback: int, momentum: float) -> int:
    """Diverse gradients need a shorter window: lb_new = ceil(clamp(MAX_LB / gd, MIN_LB, MAX_LB)),
    smoothed by momentum m: ceil(m * lb_new + (1 - m) * lb)."""
    target = max_lookback if gd <= 0 else math.ceil(min(max(max_lookback / gd, min_lookback), max_lookback))
    return math.ceil(momentum * target + (1.0 - momentum) * lookback)


def adapt_resolution(
    lookback: int,
    resolution: int,
    *,
    min_lookback: int,
    max_lookback: int,
    min_resolution: int,
    max_resolution: int,
) -> int:
    """Finer histograms while gradients agree (lookback at max), coarser while they cancel (at min)."""
    if lookback == max_lookback:
        resolution += 1
    if lookback == min_lookback:
        resolution -= 1
    return min(max(resolution, min_resolution), max_resolution)


def escalate_strategy(strategy: str, recent_mean: float, loss: float, base: str = "min") -> str:
    """Not improving (|mean of recent losses| <= |loss|): min -> mean -> max; improving: back to base."""
    if abs(recent_mean) > abs(loss):
        return base
    return {"min": "mean", "mean": "max", "max": "max"}[strategy]


# ---------------------------------------------------------------- stateful controller


@dataclass
class LayerState:
    """One layer's precision and its gradient window; `observed` counts every gradient ever seen."""

    wl: int
    fl: int
    resolution: int
    lookback: int
    count: int = 0
    grad_sum: torch.Tensor | None = None
    observed: int = 0


class PrecisionController:
    """Per-layer MARViN state: feed normalised weight gradients, ask for decisions, feed losses.

    ``history[layer]`` holds lists ``step``, ``wl``, ``fl``, one entry per decision, where step is
    the layer's ``observed`` count at the decision (the optimizer step when every step has a
    gradient for the layer).
    """

    def __init__(self, config: ControllerConfig | None = None) -> None:
        self.config = config if config is not None else ControllerConfig()
        self.layers: dict[str, LayerState] = {}
        self.history: dict[str, dict[str, list[int]]] = {}
        self.strategy: str = self.config.push_up_strategy
        self.loss_history: list[float] = []

    def register(self, layer: str) -> LayerState:
        """State for `layer`, created at the initial precision on first use."""
        if layer not in self.layers:
            cfg = self.config
            self.layers[layer] = LayerState(
                cfg.initial_wl, cfg.initial_fl, cfg.min_resolution, cfg.min_lookback
            )
            self.history[layer] = {"step": [], "wl": [], "fl": []}
        return self.layers[layer]

    def precision(self, layer: str) -> tuple[int, int]:
        """Current (wl, fl) of `layer` (registering it at the initial precision if new)."""
        state = self.register(layer)
        return state.wl, state.fl

    def observe(self, layer: str, normalised_weight_grad: torch.Tensor) -> None:
        """Add one normalised weight gradient to the layer's window (kept as a float32 running sum)."""
        state = self.register(layer)
        g = normalised_weight_grad.detach().to(torch.float32)
        if state.grad_sum is None:
            state.grad_sum = g.clone()
        elif state.grad_sum.shape != g.shape:
            raise ValueError(
                f"layer {layer!r}: gradient shape {tuple(g.shape)} != {tuple(state.grad_sum.shape)}"
            )
        else:
            state.grad_sum.add_(g)
        state.count += 1
        state.observed += 1

    def maybe_decide(
        self, layer: str, master_weight: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[int, int] | None:
        """Adapt lookback and resolution; once the window is full, push down then up and reset it.

        Returns the new (wl, fl) when a decision was taken (it may equal the old pair), else None.
        `generator` feeds the push-down quantizer when its rounding is stochastic.
        """
        state = self.register(layer)
        if state.grad_sum is None:
            return None
        cfg = self.config
        gd = gradient_diversity(state.count, state.grad_sum)
        state.lookback = adapt_lookback(
            gd,
            state.lookback,
            min_lookback=cfg.min_lookback,
            max_lookback=cfg.max_lookback,
            momentum=cfg.lookback_momentum,
        )
        state.resolution = adapt_resolution(
            state.lookback,
            state.resolution,
            min_lookback=cfg.min_lookback,
            max_lookback=cfg.max_lookback,
            min_resolution=cfg.min_resolution,
            max_resolution=cfg.max_resolution,
        )
        if state.count < state.lookback:
            return None
        wl, fl = push_down(
            master_weight,
            state.wl,
            state.fl,
            state.resolution,
            min_fl=cfg.push_down_min_fl,
            rounding=cfg.push_down_rounding,
            generator=generator,
            tolerance=cfg.push_down_tolerance,
        )
        state.wl, state.fl = push_up(wl, fl, gd, self.strategy, cfg.results_buffer)
        state.count, state.grad_sum = 0, None
        record = self.history[layer]
        record["step"].append(state.observed)
        record["wl"].append(state.wl)
        record["fl"].append(state.fl)
        return state.wl, state.fl

    def update_strategy(self, loss: float | torch.Tensor) -> str:
        """Once per optimizer step: compare |loss| with the mean of the last mean(lookback) losses.

        Nothing is compared until that window is full; non-finite losses are ignored.
        """
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            return self.strategy
        lookbacks = [s.lookback for s in self.layers.values()] or [self.config.min_lookback]
        window = max(1, int(sum(lookbacks) / len(lookbacks)))
        if len(self.loss_history) >= window:
            recent = self.loss_history[-window:]
            self.strategy = escalate_strategy(
                self.strategy, sum(recent) / window, value, self.config.push_up_strategy
            )
        self.loss_history = [*self.loss_history, value][-window:]
        return self.strategy

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (windows, decisions so far, strategy, loss history)."""
        return {
            "strategy": self.strategy,
            "loss_history": list(self.loss_history),
            "layers": {
                name: {
                    "wl": s.wl,
                    "fl": s.fl,
                    "resolution": s.resolution,
                    "lookback": s.lookback,
                    "count": s.count,
                    "grad_sum": None if s.grad_sum is None else s.grad_sum.clone(),
                    "observed": s.observed,
                }
                for name, s in self.layers.items()
            },
            "history": {name: {k: list(v) for k, v in h.items()} for name, h in self.history.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        strategy = state["strategy"]
        _check_choice("strategy", strategy, STRATEGIES)
        self.strategy = strategy
        self.loss_history = [float(v) for v in state["loss_history"]]
        self.layers = {}
        for name, s in state["layers"].items():
            check_precision(s["wl"], s["fl"])
            grad_sum = s["grad_sum"]
            self.layers[name] = LayerState(
                wl=int(s["wl"]),
                fl=int(s["fl"]),
                resolution=int(s["resolution"]),
                lookback=int(s["lookback"]),
                count=int(s["count"]),
                grad_sum=None if grad_sum is None else grad_sum.detach().clone(),
                observed=int(s["observed"]),
            )
        self.history = {name: {k: list(v) for k, v in h.items()} for name, h in state["history"].items()}
