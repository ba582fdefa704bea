"""The training driver: outputs of a run, exact resume, bridge semantics, CLI errors."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marvin_compile.api import MarvinConfig, quantize_
from marvin_compile.cli import main
from marvin_compile.fixed_point import Precision, quantize
from marvin_compile.runtime.driver import CHECKPOINT, TrainConfig, TrainingStopped, load_config, train

METRIC_KEYS = {
    "accuracy",
    "baseline_accuracy",
    "step_time_s",
    "baseline_step_time_s",
    "speedup",
    "variant_swaps",
    "compilations_after_warmup",
    "layers",
    "final_precision",
    "config",
    "epochs",
}
LENET_LAYERS = ["conv1", "conv2", "fc1", "fc2", "fc3"]


def _config(tmp_path, cache_dir, **kw) -> TrainConfig:
    return TrainConfig(out=str(tmp_path), cache_dir=str(cache_dir), progress=False, **kw)


def test_short_run_writes_metrics_plot_and_checkpoint(tmp_path, cache_dir):
    config = _config(tmp_path, cache_dir, epochs=1, baseline=True, checkpoint_every=4)
    metrics = train(config)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert METRIC_KEYS <= set(on_disk)
    assert on_disk["accuracy"] == metrics["accuracy"]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["baseline_accuracy"] <= 1.0
    assert metrics["speedup"] == pytest.approx(metrics["baseline_step_time_s"] / metrics["step_time_s"])
    assert metrics["compilations_after_warmup"] == 0
    assert metrics["variant_swaps"] >= 1  # the first decision leaves the int8 class (results buffer)
    assert list(metrics["layers"]) == LENET_LAYERS
    for name, record in metrics["layers"].items():
        assert (record["step"][0], record["wl"][0], record["fl"][0]) == (0, 8, 4)
        assert len(record["step"]) == len(record["wl"]) == len(record["fl"]) >= 2
        final = metrics["final_precision"][name]
        assert (final["wl"], final["fl"]) == (record["wl"][-1], record["fl"][-1])
    assert (tmp_path / "precision.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (1, 0, metrics["steps"])
    assert load_config(tmp_path) == config


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path, cache_dir):
    """Killed at step 30 (epoch 2 of 2, last checkpoint at 28 overwritten by the stop), resumed."""
    kw = dict(epochs=2, batch_size=64, checkpoint_every=7, seed=3)
    whole = train(_config(tmp_path / "whole", cache_dir, **kw))

    parted = _config(tmp_path / "parted", cache_dir, stop_after_steps=30, **kw)
    with pytest.raises(TrainingStopped):
        train(parted)
    ckpt = torch.load(tmp_path / "parted" / CHECKPOINT, weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 30) and 0 < ckpt["batch"] < 22
    resumed = train(dataclasses.replace(parted, stop_after_steps=None), resume=True)

    assert whole["steps"] == resumed["steps"] == 44
    assert resumed["accuracy"] == whole["accuracy"]
    assert resumed["layers"] == whole["layers"]
    assert resumed["final_precision"] == whole["final_precision"]
    assert resumed["variant_swaps"] == whole["variant_swaps"]
    assert resumed["epochs"] == whole["epochs"]
    assert any(s > 30 for r in whole["layers"].values() for s in r["step"])  # decisions after the stop
    assert resumed["compilations_after_warmup"] == 0


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(out=str(tmp_path), progress=False), resume=True)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("wl,fl,on_grid", [(8, 4, True), (12, 6, True), (8, 4, False)])
def test_bridge_matches_fake_quant_reference(wl, fl, on_grid, cache_dir):
    """Forward Q(layer(Q(x), Q(w), Q(b))) exactly; straight-through gradients to float32 rounding.

    In training the weights are on their grid (MSGD writes Q(master) after every step); off the grid
    the bridge's input gradient is taken at w instead of Q(w).
    """
    torch.manual_seed(0)
    model = _Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(quantize(4 * p, wl, fl) if on_grid else 4 * p)
    ref = copy.deepcopy(model).double()  # float64: the reference sums exactly
    p = Precision(wl, fl)
    cfg = MarvinConfig(rounding="nearest", initial=p, precompile=(), cache_dir=cache_dir)
    quantize_(model, torch.zeros(2, 2, 6, 6), cfg)

    def q(t: torch.Tensor) -> torch.Tensor:  # fake quantization with a straight-through gradient
        return t + (quantize(t, wl, fl) - t).detach()

    x = (3 * torch.randn(3, 2, 6, 6)).requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    y = model(x)
    h = q(F.conv2d(q(x_ref), q(ref.conv.weight), q(ref.conv.bias), padding=1))
    y_ref = q(F.linear(q(torch.relu(h).flatten(1)), q(ref.fc.weight), q(ref.fc.bias)))
    assert torch.equal(y, y_ref.float())

    g = torch.randn(3, 5)
    y.backward(g)
    y_ref.backward(g.double())
    tight = dict(rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad.float(), **tight)
    for name in ("conv", "fc"):
        for param in ("weight", "bias"):
            got = getattr(getattr(model, name), param).grad
            want = getattr(getattr(ref, name), param).grad.float()
            torch.testing.assert_close(got, want, **tight)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--backward", "int4"], "backward='int4' is unknown; accepted: float, lowbit"),
        (["--model", "nonsense"], "unknown model 'nonsense'; accepted: lenet5, resnet20"),
        (["--dataset", "mnist"], "unknown dataset 'mnist'; accepted: 'digits'"),
    ],
)
def test_cli_train_rejects_bad_input_in_one_line(args, message, tmp_path, capsys):
    base = {"--model": "lenet5", "--dataset": "digits", "--out": str(tmp_path / "run"), "--epochs": "1"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = ["train", *[v for pair in base.items() for v in pair]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("marvin-compile: error: ") and message in err and "\n" not in err


def test_cli_resume_without_run_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
