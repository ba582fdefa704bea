"""MSGD against torch.optim.SGD and hand computations (MARVIN.md section 3)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from marvin_compile.runtime.controller import ControllerConfig, PrecisionController
from marvin_compile.runtime.optimizer import MSGD, quantizable_layers

FAST = ControllerConfig(min_lookback=1, max_lookback=2, min_resolution=10, max_resolution=20)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


DATA = torch.randn(6, 16, 4, generator=torch.Generator().manual_seed(1))
TARGET = torch.randint(0, 3, (6, 16), generator=torch.Generator().manual_seed(2))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, micro_batches: int = 1) -> None:
    for i in steps:
        opt.zero_grad()
        for x, y in zip(DATA[i].chunk(micro_batches), TARGET[i].chunk(micro_batches), strict=True):
            loss = nn.functional.cross_entropy(model(x), y) / micro_batches
            loss.backward()
        if isinstance(opt, MSGD):
            opt.step(loss=loss.detach())
        else:
            opt.step()


def on_grid(p: torch.Tensor, wl: int, fl: int) -> bool:
    scaled = p.detach().double() * 2**fl
    return bool((scaled == scaled.round()).all() and scaled.min() >= -(2 ** (wl - 1)))


def in_range(p: torch.Tensor, wl: int, fl: int) -> bool:
    scaled = p.detach().double() * 2**fl
    return bool(scaled.min() >= -(2 ** (wl - 1)) and scaled.max() <= 2 ** (wl - 1) - 1)


SGD_VARIANTS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, dampening=0.3),
    dict(lr=0.1, momentum=0.9, nesterov=True),
    dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
    dict(lr=0.05, weight_decay=1e-2),
]


@pytest.mark.parametrize("hyper", SGD_VARIANTS)
@pytest.mark.parametrize("with_layers", [False, True])
def test_matches_torch_sgd_when_quantization_is_off(hyper: dict, with_layers: bool) -> None:
    ref_model, model = make_model(), make_model()
    ref = torch.optim.SGD(ref_model.parameters(), **hyper)
    if with_layers:
        opt = MSGD(
            model.parameters(),
            **hyper,
            layers=quantizable_layers(model),
            quantize_grads=False,
            normalize_grads=False,
            quantize_weights=False,
        )
    else:
        opt = MSGD(model.parameters(), **hyper)
    train(ref_model, ref, range(5))
    train(model, opt, range(5))
    for p_ref, p in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p_ref, p)
    assert opt.precision_changes == {}


def test_gradient_accumulation_matches_torch_sgd() -> None:
    ref_model, model = make_model(), make_model()
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    opt = MSGD(model.parameters(), lr=0.1, momentum=0.9)
    train(ref_model, ref, range(4), micro_batches=4)
    train(model, opt, range(4), micro_batches=4)
    for p_ref, p in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p_ref, p)


def test_l1_adds_lr_times_l1_sign() -> None:
    w = nn.Parameter(torch.tensor([0.5, -0.25, 0.0]))
    w.grad = torch.tensor([0.1, 0.1, 0.1])
    MSGD([w], lr=0.5, l1=0.2).step()
    torch.testing.assert_close(w.detach(), torch.tensor([0.5 - 0.5 * 0.3, -0.25 - 0.5 * (0.1 - 0.2), -0.05]))


def test_gradient_is_quantized_then_normalised_hand_computed() -> None:
    fc = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[0.5, -0.25]]))
    fc.weight.grad = torch.tensor([[3 / 16, 4 / 16]])  # on the fl = 4 grid: quantization is exact
    opt = MSGD(fc.parameters(), lr=0.1, layers={"fc": (fc.weight, None)}, quantize_weights=False)
    opt.step()
    # normalised gradient (3, 4) / 5 = (0.6, 0.8); update 0.1 * that.
    torch.testing.assert_close(fc.weight.detach(), torch.tensor([[0.44, -0.33]]))
    assert torch.equal(fc.weight.grad, torch.tensor([[3 / 16, 4 / 16]]))  # .grad left untouched

    fc.weight.grad = torch.tensor([[3 / 16, 4 / 16]])
    opt = MSGD(fc.parameters(), lr=0.1, layers={"fc": (fc.weight, None)}, precision=(8, 4))
    opt.step()
    # master 0.44 - 0.06 = 0.38 -> 16 * 0.38 = 6.08 -> 6/16 or 7/16; -0.33 - 0.08 = -0.41 -> -7/16 or -6/16
    a, b = fc.weight.detach()[0].tolist()
    assert a in (6 / 16, 7 / 16) and b in (-7 / 16, -6 / 16)
    torch.testing.assert_close(opt.state[fc.weight]["master"], torch.tensor([[0.38, -0.41]]))


def test_zero_gradient_stays_zero() -> None:
    fc = nn.Linear(2, 1, bias=False)
    before = fc.weight.detach().clone()
    fc.weight.grad = torch.zeros_like(fc.weight)
    MSGD(fc.parameters(), lr=0.1, layers={"fc": (fc.weight, None)}, quantize_weights=False).step()
    assert torch.equal(fc.weight.detach(), before)


def test_parameters_lie_on_the_layer_grid_and_batch_norm_gets_plain_sgd() -> None:
    model = make_model()
    controller = PrecisionController()
    opt = MSGD(model.parameters(), lr=0.1, layers=quantizable_layers(model), controller=controller, seed=0)
    opt.quantize_params()
    for name, (weight, bias) in opt.layers.items():
        assert opt.precision[name] == (8, 4)
        assert on_grid(weight, 8, 4) and on_grid(bias, 8, 4)
    bn = model[1]
    opt.zero_grad()
    nn.functional.cross_entropy(model(DATA[0]), TARGET[0]).backward()
    bn_before = [(p.detach().clone(), p.grad.clone()) for p in bn.parameters()]
    opt.step()
    for name, (weight, bias) in opt.layers.items():
        wl, fl = opt.precision[name]
        for p in (weight, bias):
            assert on_grid(p, wl, fl) and in_range(p, wl, fl)
    for p, (p0, g) in zip(bn.parameters(), bn_before, strict=True):
        assert torch.equal(p.detach(), p0 - 0.1 * g)


def test_stochastic_rounding_is_reproducible_under_the_same_seed() -> None:
    def run(seed: int) -> list[torch.Tensor]:
        model = make_model()
        opt = MSGD(
            model.parameters(),
            lr=0.1,
            momentum=0.9,
            layers=quantizable_layers(model),
            precision=(12, 8),
            seed=seed,
        )
        train(model, opt, range(3))
        return [p.detach().clone() for p in model.parameters()]

    first, again, other = run(7), run(7), run(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_precision_changes_are_reported_and_bias_follows_weight() -> None:
    model = make_model()
    controller = PrecisionController(FAST)
    opt = MSGD(model.parameters(), lr=0.1, layers=quantizable_layers(model), controller=controller, seed=0)
    seen: list[dict] = []
    handle = opt.register_precision_hook(seen.append)
    train(model, opt, range(1))  # one gradient: gd = 1, lookback 2, no decision yet
    assert opt.precision_changes == {} and seen == []
    train(model, opt, range(1, 2))  # second gradient fills the window; push-up moves wl to >= fl + 8
    assert set(opt.precision_changes) == {"0", "3"}
    assert seen == [opt.precision_changes]
    assert opt.precision == {name: controller.precision(name) for name in ("0", "3")}
    for name, (weight, bias) in opt.layers.items():
        wl, fl = opt.precision[name]
        assert wl >= fl + 8
        assert controller.history[name]["step"] == [2]
        assert (controller.history[name]["wl"], controller.history[name]["fl"]) == ([wl], [fl])
        for p in (weight, bias):
            assert on_grid(p, wl, fl) and in_range(p, wl, fl)
    handle.remove()
    train(model, opt, range(2, 6))
    assert len(seen) == 1


def test_step_loss_feeds_the_strategy_rule() -> None:
    model = make_model()
    controller = PrecisionController(FAST)
    opt = MSGD(model.parameters(), lr=0.1, layers=quantizable_layers(model), controller=controller)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(DATA[0]), TARGET[0])
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert controller.loss_history == [loss.item()]


def test_state_dict_round_trip_resumes_identically() -> None:
    def build() -> tuple[nn.Module, MSGD]:
        model = make_model()
        opt = MSGD(
            model.parameters(),
            lr=0.1,
            momentum=0.9,
            weight_decay=1e-3,
            layers=quantizable_layers(model),
            controller=PrecisionController(FAST),
            seed=3,
        )
        return model, opt

    ref_model, ref_opt = build()
    train(ref_model, ref_opt, range(6))

    model, opt = build()
    train(model, opt, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    resumed_model, resumed_opt = build()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["opt"])
    train(resumed_model, resumed_opt, range(3, 6))

    for p_ref, p in zip(ref_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p_ref, p)
    assert resumed_opt.precision == ref_opt.precision
    assert resumed_opt.controller.history == ref_opt.controller.history
    assert len(ref_opt.controller.history["0"]["step"]) >= 2  # decisions happened after the resume too


def test_masters_stay_float32_for_low_precision_parameters() -> None:
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    w.grad = torch.tensor([1e-3, 1e-3], dtype=torch.bfloat16)
    opt = MSGD([w], lr=1.0)
    opt.step()
    master = opt.state[w]["master"]
    resumed = MSGD([nn.Parameter(w.detach().clone())], lr=1.0)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    restored = next(iter(resumed.state.values()))["master"]
    assert master.dtype == restored.dtype == torch.float32
    assert torch.equal(master, restored) and master[0] != 1.0


def test_constructor_validation() -> None:
    model = make_model()
    layers = quantizable_layers(model)
    with pytest.raises(ValueError, match="nesterov"):
        MSGD(model.parameters(), lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        MSGD(model.parameters(), lr=0.1, momentum=-1.0)
    with pytest.raises(ValueError, match="not among"):
        MSGD(model[0].parameters(), lr=0.1, layers=layers)
    with pytest.raises(ValueError, match="already belongs"):
        MSGD(model.parameters(), lr=0.1, layers={"a": layers["0"], "b": layers["0"]})
    with pytest.raises(ValueError, match="not both"):
        MSGD(model.parameters(), lr=0.1, layers=layers, controller=PrecisionController(), precision=(8, 4))
    with pytest.raises(ValueError, match="normalize_grads"):
        MSGD(
            model.parameters(), lr=0.1, layers=layers, controller=PrecisionController(), normalize_grads=False
        )
    with pytest.raises(ValueError, match="layer '3'"):
        MSGD(model.parameters(), lr=0.1, layers=layers, precision={"0": (8, 4)})
    with pytest.raises(ValueError, match="wl"):
        MSGD(model.parameters(), lr=0.1, layers=layers, precision=(8, 8))


def test_quantizable_layers_names_conv_and_linear() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 1))
    layers = quantizable_layers(model)
    assert list(layers) == ["0", "3"]
    assert layers["0"] == (model[0].weight, None)
    assert layers["3"][0] is model[3].weight and layers["3"][1] is model[3].bias
