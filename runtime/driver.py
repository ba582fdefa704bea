"""The MARViN training driver: train a model with compiled per-layer variants, decide precision
inside the epoch, and write metrics, a precision plot and resumable checkpoints to a run folder.

    metrics = train(TrainConfig(model="lenet5", dataset="digits", out="runs/demo", baseline=True))
    metrics = train(load_config("runs/demo"), resume=True)       # after a crash: continue exactly

A training step is: forward through the compiled variants (``quantize_``), float or low-bit
backward with straight-through activation gradients, then ``MSGD.step`` (gradient quantization,
controller decisions, stochastic write-back). When a decision moves a layer's word length into
another kernel class, the optimizer's precision hook swaps that layer's variant; every class is
compiled before training, so a swap never compiles (``compilations_after_warmup`` stays 0).

Determinism: every random draw comes from a generator seeded from ``seed`` and saved in the
checkpoint (MSGD's rounding generators, the bridge's ``handle.generator``, torch's global RNG),
the data order of epoch e is ``randperm`` seeded with ``seed + e``, the learning rate is a
function of the step, and evaluation draws from its own re-seeded generator; so a resumed run
takes exactly the steps of an uninterrupted one.

Evaluation rounds stochastically, like training: the handle's variants are built for stochastic
rounding, and a nearest-rounding evaluation would need a second set of variants (``quantize_`` has
one rounding per handle). It is deterministic all the same (fixed evaluation seed).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from marvin_compile.api import BACKWARDS, MarvinConfig, MarvinHandle, quantize_
from marvin_compile.data import load_dataset
from marvin_compile.fixed_point import Precision
from marvin_compile.kernel_classes import KERNEL_CLASSES, class_for_wl
from marvin_compile.models import BUILTIN_MODELS, build_model
from marvin_compile.report import atomic_write_bytes, atomic_write_json, plot_precision, precision_table
from marvin_compile.target import resolve_target

from .controller import ControllerConfig, PrecisionController
from .optimizer import MSGD, quantizable_layers

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
PLOT = "precision.png"
CONFIG = "config.json"
EVAL_SEED_SALT = 0x5EED  # evaluation rounds with generator(seed + salt), apart from training's draws

LR_SCHEDULES: tuple[str, ...] = ("cosine", "constant")

# Input geometry of the built-in models; a "module:callable" model defaults to 32x32 RGB.
MODEL_INPUTS: dict[str, tuple[int, int]] = {"lenet5": (32, 1), "resnet20": (32, 3)}

DIGITS_CONTROLLER = ControllerConfig(
    min_resolution=16,
    max_resolution=64,
    min_lookback=8,
    max_lookback=32,
    push_down_tolerance=0.02,
)
"""The driver's default controller: a deliberate setting for small models and short runs.

Measured on digits/LeNet-5 (25 epochs of 11 steps; the published constants, ``ControllerConfig()``,
are for ResNet/CIFAR runs of tens of thousands of steps). Differences from the published values:

- lookback 8-32 (published 25-100): about 30 decisions per layer in the run instead of 11, so the
  timeline shows the vacillation, and even a one-epoch run takes a decision;
- histograms of 16-64 bins (published 50-150): conv1 has 150 weights, which fill 50+ bins too
  sparsely for the histogram KL to mean much;
- ``push_down_tolerance`` 0.02 (method: 0): with zero tolerance every weight must stay in its bin
  and push-down rarely trims; measured (seed 0), fc1 then sat at wl 28-32 (float32 class) for the
  whole second half of the run, with 0.02 it settles at wl 16-18 (int16) at the same accuracy.

The results buffer stays at the published 8 bits on purpose: one (wl, fl) pair covers a layer's
weights and activations, and the buffer is their integer headroom (wl - fl - 1 bits). With 4 bits
(range +-8) activations and logits clip and training collapsed (test accuracy 0.56 at the end,
measured). Consequence: wl >= fl + 8 >= 12 after the first decision, so LeNet-5 trains in the int16
and float32 classes; int8 is only its start state.
"""


class TrainingStopped(RuntimeError):
    """Raised by ``stop_after_steps``: the run stops as if killed, right after a checkpoint."""


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in the run folder, so a resume needs only it.

    The defaults are a deliberate setting for LeNet-5 on digits (controller: ``DIGITS_CONTROLLER``):
    batch 128, 25 epochs, lr 0.05 cosine-annealed to 0, momentum 0.9, weight decay 1e-4 (published).
    MSGD normalises each gradient tensor to unit L2 norm, so ``lr`` is a step length per tensor;
    the float32 baseline (torch.optim.SGD, same lr, schedule, momentum and weight decay on raw
    gradients) trains well with the same value. The annealing lets both runs settle: with a constant
    lr the last-epoch accuracy of either jumps by a percent from epoch to epoch, too much to compare
    two runs at 0.5 pp. ``grad_accumulation`` batches of ``batch_size`` make one optimizer step.
    ``image_size``/``in_channels`` default to the model's (32x32, 1 channel for lenet5, 3 otherwise).
    ``stop_after_steps`` is a test hook: after that many optimizer steps the run writes a checkpoint
    and raises ``TrainingStopped``, as if the process had been killed there.
    """

    model: str = "lenet5"
    dataset: str = "digits"
    out: str = "runs/train"
    epochs: int = 25
    batch_size: int = 128
    target: str = "cpu"
    baseline: bool = False
    backward: str = "float"
    seed: int = 0
    lr: float = 0.05
    lr_schedule: str = "cosine"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    l1: float = 0.0
    grad_accumulation: int = 1
    controller: ControllerConfig = field(default_factory=lambda: DIGITS_CONTROLLER)
    checkpoint_every: int = 50
    eval_batch_size: int = 512
    data_root: str | None = None
    image_size: int | None = None
    in_channels: int | None = None
    cache_dir: str | None = None
    tuning_db: str | None = None
    progress: bool = True
    stop_after_steps: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.controller, dict):
            self.controller = ControllerConfig(**self.controller)
        if self.backward not in BACKWARDS:
            raise ValueError(f"backward={self.backward!r} is unknown; accepted: {', '.join(BACKWARDS)}")
        for name in ("epochs", "batch_size", "grad_accumulation", "checkpoint_every", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is out of range; accepted: an integer >= 1")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule={self.lr_schedule!r} is unknown; accepted: {', '.join(LR_SCHEDULES)}"
            )
        for name in ("lr", "momentum", "weight_decay", "l1"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range; accepted: {name} >= 0")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ValueError(f"stop_after_steps={self.stop_after_steps} is out of range; accepted: >= 1")
        if self.model.strip().lower() not in BUILTIN_MODELS and ":" not in self.model:
            raise ValueError(
                f"unknown model {self.model!r}; accepted: {', '.join(BUILTIN_MODELS)}, or "
                "'package.module:callable'"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; accepted: {', '.join(sorted(known))}")
        return cls(**data)

    def input_geometry(self) -> tuple[int, int]:
        """(image_size, in_channels): the model's own unless set explicitly."""
        size, channels = MODEL_INPUTS.get(self.model.strip().lower(), (32, 3))
        return self.image_size or size, self.in_channels or channels


# Fields that may differ between a run and its resume: they do not change what is computed.
RESUMABLE_CHANGES = frozenset(
    {"baseline", "checkpoint_every", "progress", "cache_dir", "stop_after_steps", "tuning_db"}
)


def load_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The config a run was started with (its ``config.json``)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG} in {run_dir}: not a run folder of `marvin-compile train`")
    config = TrainConfig.from_dict(json.loads(path.read_text()))
    config.out = os.fspath(run_dir)
    return config


def train(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train with MARViN (and, with ``config.baseline``, the float32 counterpart); return the metrics.

    ``resume=True`` continues from ``out/checkpoint.pt`` (mid-epoch included) and reaches the same
    accuracy, precision history and final precisions as an uninterrupted run.
    """
    out = Path(config.out)
    ckpt_path = out / CHECKPOINT
    checkpoint: dict[str, Any] | None = None
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"cannot resume: no checkpoint at {ckpt_path}; start without resume")
        checkpoint = torch.load(ckpt_path, weights_only=True)
        _check_resumable(TrainConfig.from_dict(checkpoint["config"]), config)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for stale in (CHECKPOINT, METRICS, PLOT):
            (out / stale).unlink(missing_ok=True)
    atomic_write_json(out / CONFIG, config.to_dict())

    _seed_everything(config.seed)
    image_size, in_channels = config.input_geometry()
    train_set, test_set, num_classes = load_dataset(config.dataset, config.data_root, image_size, in_channels)
    run = _MarvinRun(config, train_set, test_set, num_classes, checkpoint)
    run.train()

    baseline = run.metrics.get("baseline")
    if config.baseline and baseline is None:
        baseline = _train_baseline(config, train_set, test_set, num_classes)
        run.metrics["baseline"] = baseline
        run.save_checkpoint()
    metrics = run.final_metrics(baseline if config.baseline else None)
    atomic_write_json(out / METRICS, metrics)
    plot_precision(metrics["layers"], out / PLOT, title=f"MARViN: {config.model} on {config.dataset}")
    print(precision_table(metrics["layers"]))
    return metrics


def _check_resumable(saved: TrainConfig, given: TrainConfig) -> None:
    saved_d, given_d = saved.to_dict(), given.to_dict()
    differ = sorted(k for k in saved_d if k not in RESUMABLE_CHANGES | {"out"} and saved_d[k] != given_d[k])
    if differ:
        raise ValueError(
            f"cannot resume: config differs from the checkpoint's in {differ}; resume with the saved config "
            f"(load_config(RUN)); only {', '.join(sorted(RESUMABLE_CHANGES))} may change"
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _build(config: TrainConfig, num_classes: int) -> nn.Module:
    """The model at its seeded initial weights: the MARViN run and the baseline start identical."""
    torch.manual_seed(config.seed)
    _, in_channels = config.input_geometry()
    return build_model(config.model, num_classes, in_channels)


def _epoch_batches(config: TrainConfig, n: int, epoch: int) -> list[torch.Tensor]:
    """The index batches of one epoch: a shuffle that depends only on (seed, epoch)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + epoch))
    return list(perm.split(config.batch_size))


def _lr_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): constant, or cosine-annealed to 0."""
    if config.lr_schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def _steps_per_epoch(config: TrainConfig, n: int) -> int:
    return math.ceil(math.ceil(n / config.batch_size) / config.grad_accumulation)


def _step_groups(n_batches: int, k: int) -> list[range]:
    """Batches [i, i+k) form one optimizer step; the last group of an epoch may be shorter."""
    return [range(i, min(i + k, n_batches)) for i in range(0, n_batches, k)]


@torch.no_grad()
def _evaluate(model: nn.Module, test: TensorDataset, batch_size: int) -> float:
    """Test accuracy in eval mode (batch norm uses its running statistics)."""
    x, y = test.tensors
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    model.train()
    return correct / len(x)


@dataclass
class StepTimer:
    """Mean wall time of training steps. The first step of each process is not counted: it pays
    one-off costs (allocations, first calls into the loaded libraries) that a long run amortises."""

    total: float = 0.0
    count: int = 0
    started: bool = False

    def add(self, seconds: float) -> None:
        if self.started:
            self.total += seconds
            self.count += 1
        self.started = True

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


class _MarvinRun:
    """One MARViN training run: model, compiled handle, optimizer, counters; checkpointable."""

    def __init__(
        self,
        config: TrainConfig,
        train_set: TensorDataset,
        test_set: TensorDataset,
        num_classes: int,
        checkpoint: dict[str, Any] | None,
    ) -> None:
        self.config = config
        self.train_set, self.test_set = train_set, test_set
        if resolve_target(config.target).kind.name != "llvm":
            raise ValueError(
                f"target {config.target!r}: the training driver keeps its tensors on the CPU for now; "
                "accepted: cpu or an llvm target"
            )
        self.model = _build(config, num_classes)
        ctrl = config.controller
        self.initial = Precision(ctrl.initial_wl, ctrl.initial_fl)
        self.handle: MarvinHandle = quantize_(
            self.model,
            train_set.tensors[0][:2],
            MarvinConfig(
                target=config.target,
                rounding="stochastic",
                backward=config.backward,
                initial=self.initial,
                precompile=tuple(k.name for k in KERNEL_CLASSES),
                cache_dir=config.cache_dir,
                seed=config.seed,
                tuning_db=config.tuning_db,
            ),
        )
        layers = quantizable_layers(self.model)
        if not layers or set(layers) != set(self.handle.layers):
            raise ValueError(
                f"model {config.model!r}: quantizable layers {sorted(layers)}, compiled "
                f"{sorted(self.handle.layers)}; accepted: a model whose Conv1d, Conv2d and Linear layers "
                "are applied directly to their input"
            )
        self.controller = PrecisionController(ctrl)
        self.opt = MSGD(
            self.model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            l1=config.l1,
            layers=layers,
            controller=self.controller,
            seed=config.seed,
        )
        self.opt.register_precision_hook(self.handle.set_precision)
        self.epoch = 0
        self.batch = 0  # batches of the current epoch already consumed
        self.step = 0
        self.timer = StepTimer()
        self.epoch_stats = {"loss_sum": 0.0, "correct": 0, "seen": 0}
        self.metrics: dict[str, Any] = {"epochs": []}
        self.swaps_offset = 0  # swaps of earlier (resumed) processes, less those the restore itself made
        self.compilations_before = 0
        if checkpoint is None:
            self.opt.quantize_params()  # the first forward already runs at the initial precision
        else:
            self._restore(checkpoint)
        self.handle.mark_warm()

    # ---------------------------------------------------------------- checkpoints

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.handle.set_precision({name: tuple(p) for name, p in ckpt["precision"].items()})
        self.handle.generator.set_state(ckpt["handle_generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.epoch, self.batch, self.step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        self.timer = StepTimer(ckpt["time_sum"], ckpt["time_count"])
        self.epoch_stats = dict(ckpt["epoch_stats"])
        self.metrics = ckpt["metrics"]
        self.swaps_offset = ckpt["swaps"] - self.handle.swaps
        self.compilations_before = ckpt["compilations_after_warmup"]

    def save_checkpoint(self) -> None:
        state = {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "precision": {name: [p.wl, p.fl] for name, p in self.handle.precision.items()},
            "handle_generator": self.handle.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "time_sum": self.timer.total,
            "time_count": self.timer.count,
            "epoch_stats": dict(self.epoch_stats),
            "metrics": self.metrics,
            "swaps": self.swaps,
            "compilations_after_warmup": self.compilations_after_warmup,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(Path(self.config.out) / CHECKPOINT, buffer.getvalue())

    @property
    def swaps(self) -> int:
        return self.handle.swaps + self.swaps_offset

    @property
    def compilations_after_warmup(self) -> int:
        return self.compilations_before + self.handle.compilations_after_warmup

    # ---------------------------------------------------------------- training

    def mean_wl(self) -> float:
        precision = self.opt.precision
        return sum(wl for wl, _ in precision.values()) / len(precision)

    def train(self) -> None:
        cfg = self.config
        x, y = self.train_set.tensors
        total_steps = cfg.epochs * _steps_per_epoch(cfg, len(x))
        while self.epoch < cfg.epochs:
            batches = _epoch_batches(cfg, len(x), self.epoch)
            groups = _step_groups(len(batches), cfg.grad_accumulation)
            done = sum(1 for g in groups if g.stop <= self.batch)
            bar = tqdm(
                total=len(groups),
                initial=done,
                desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                disable=not cfg.progress,
                leave=False,
                dynamic_ncols=True,
            )
            self.model.train()
            for group in groups[done:]:
                for g in self.opt.param_groups:
                    g["lr"] = _lr_at(cfg, self.step, total_steps)
                self._train_step([batches[i] for i in group], x, y)
                self.batch = group.stop
                self.step += 1
                s = self.epoch_stats
                bar.update()
                bar.set_postfix(
                    loss=f"{s['loss_sum'] / s['seen']:.4f}",
                    acc=f"{s['correct'] / s['seen']:.3f}",
                    wl=f"{self.mean_wl():.2f}",
                )
                stopping = cfg.stop_after_steps is not None and self.step == cfg.stop_after_steps
                if self.step % cfg.checkpoint_every == 0 or stopping:
                    self.save_checkpoint()
                if stopping:
                    bar.close()
                    raise TrainingStopped(f"stopped after step {self.step} (stop_after_steps)")
            bar.close()
            self._end_epoch()

    def _train_step(self, batches: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step over the given micro-batches: forward, backward, controller and update
        are timed; the progress statistics are not."""
        n = sum(len(b) for b in batches)
        start = time.perf_counter()
        total_loss = 0.0
        outputs = []
        for idx in batches:
            out = self.model(x[idx])
            loss = F.cross_entropy(out, y[idx])
            (loss * (len(idx) / n)).backward()
            total_loss += float(loss.detach()) * len(idx) / n
            outputs.append(out.detach())
        self.opt.step(loss=total_loss)
        self.opt.zero_grad(set_to_none=True)
        self.timer.add(time.perf_counter() - start)
        s = self.epoch_stats
        s["loss_sum"] += total_loss * n
        s["correct"] += sum(int((o.argmax(1) == y[i]).sum()) for o, i in zip(outputs, batches, strict=True))
        s["seen"] += n

    def _end_epoch(self) -> None:
        accuracy = self._evaluate()
        s = self.epoch_stats
        record = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "train_loss": s["loss_sum"] / s["seen"],
            "train_accuracy": s["correct"] / s["seen"],
            "test_accuracy": accuracy,
            "mean_wl": self.mean_wl(),
        }
        self.metrics["epochs"].append(record)
        if self.config.progress:
            tqdm.write(
                f"epoch {record['epoch']}/{self.config.epochs}: loss {record['train_loss']:.4f} train acc "
                f"{record['train_accuracy']:.4f} test acc {accuracy:.4f} mean wl {record['mean_wl']:.2f}"
            )
        self.epoch += 1
        self.batch = 0
        self.epoch_stats = {"loss_sum": 0.0, "correct": 0, "seen": 0}
        self.save_checkpoint()

    def _evaluate(self) -> float:
        """Eval-mode accuracy, rounding stochastically from a freshly seeded generator; the training
        generator is restored after, so evaluating never shifts the training's random stream."""
        gen = self.handle.generator
        saved = gen.get_state()
        gen.manual_seed(self.config.seed + EVAL_SEED_SALT)
        try:
            return _evaluate(self.model, self.test_set, self.config.eval_batch_size)
        finally:
            gen.set_state(saved)

    # ---------------------------------------------------------------- results

    def layer_history(self) -> dict[str, dict[str, list[int]]]:
        """Per layer every precision decision, preceded by the start state at step 0."""
        return {
            name: {
                "step": [0, *self.controller.history[name]["step"]],
                "wl": [self.initial.wl, *self.controller.history[name]["wl"]],
                "fl": [self.initial.fl, *self.controller.history[name]["fl"]],
            }
            for name in self.handle.layers
        }

    def final_metrics(self, baseline: dict[str, float] | None) -> dict[str, Any]:
        epochs = self.metrics["epochs"]
        step_time = self.timer.mean
        precision = self.opt.precision
        metrics: dict[str, Any] = {
            "accuracy": epochs[-1]["test_accuracy"],
            "baseline_accuracy": None,
            "accuracy_diff_pp": None,
            "step_time_s": step_time,
            "baseline_step_time_s": None,
            "speedup": None,
            "variant_swaps": self.swaps,
            "compilations_after_warmup": self.compilations_after_warmup,
            "steps": self.step,
            "eval_rounding": "stochastic, fixed evaluation seed",
            "layers": self.layer_history(),
            "final_precision": {
                name: {"wl": wl, "fl": fl, "kernel_class": class_for_wl(wl).name}
                for name, (wl, fl) in precision.items()
            },
            "epochs": epochs,
            "config": self.config.to_dict(),
        }
        if baseline is not None:
            metrics["baseline_accuracy"] = baseline["accuracy"]
            metrics["accuracy_diff_pp"] = 100.0 * (metrics["accuracy"] - baseline["accuracy"])
            metrics["baseline_step_time_s"] = baseline["step_time_s"]
            if step_time and baseline["step_time_s"]:
                metrics["speedup"] = baseline["step_time_s"] / step_time
            metrics["baseline_epochs"] = baseline["epochs"]
        return metrics


def _train_baseline(
    config: TrainConfig, train_set: TensorDataset, test_set: TensorDataset, num_classes: int
) -> dict[str, Any]:
    """The float32 counterpart: same architecture, initial weights, data order and epochs, trained by
    torch.optim.SGD with the same lr, momentum and weight decay (L1 added as ``l1 * sign(w)`` to
    the gradient, as MSGD does). Deterministic, so it is rerun rather than checkpointed."""
    _seed_everything(config.seed)
    model = _build(config, num_classes)
    opt = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    x, y = train_set.tensors
    timer, step = StepTimer(), 0
    total_steps = config.epochs * _steps_per_epoch(config, len(x))
    epochs = []
    for epoch in range(config.epochs):
        batches = _epoch_batches(config, len(x), epoch)
        model.train()
        for group in tqdm(
            _step_groups(len(batches), config.grad_accumulation),
            desc=f"float32 baseline {epoch + 1}/{config.epochs}",
            disable=not config.progress,
            leave=False,
            dynamic_ncols=True,
        ):
            idxs = [batches[i] for i in group]
            n = sum(len(b) for b in idxs)
            for g in opt.param_groups:
                g["lr"] = _lr_at(config, step, total_steps)
            start = time.perf_counter()
            for idx in idxs:
                (F.cross_entropy(model(x[idx]), y[idx]) * (len(idx) / n)).backward()
            if config.l1:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.add_(torch.sign(p.detach()), alpha=config.l1)
            opt.step()
            opt.zero_grad(set_to_none=True)
            timer.add(time.perf_counter() - start)
            step += 1
        accuracy = _evaluate(model, test_set, config.eval_batch_size)
        epochs.append({"epoch": epoch + 1, "test_accuracy": accuracy})
    return {
        "accuracy": epochs[-1]["test_accuracy"],
        "step_time_s": timer.mean,
        "epochs": epochs,
    }


def summary(metrics: dict[str, Any], out: str | os.PathLike) -> str:
    """The few lines a user reads after a run: accuracy against float32, speedup, swaps, outputs."""
    lines = [f"MARViN accuracy {metrics['accuracy']:.4f}"]
    if metrics["baseline_accuracy"] is not None:
        lines[0] += f", float32 {metrics['baseline_accuracy']:.4f} ({metrics['accuracy_diff_pp']:+.2f} pp)"
    if metrics["speedup"] is not None:
        ours, theirs = metrics["step_time_s"] * 1e3, metrics["baseline_step_time_s"] * 1e3
        speedup = metrics["speedup"]
        lines.append(f"step time {ours:.1f} ms vs float32 {theirs:.1f} ms: measured speedup {speedup:.2f}x")
    final = ", ".join(f"{n} {p['wl']}/{p['fl']}" for n, p in metrics["final_precision"].items())
    lines.append(f"final wl/fl: {final}")
    swaps, builds = metrics["variant_swaps"], metrics["compilations_after_warmup"]
    lines.append(f"{swaps} variant swaps, {builds} compilations after warm-up")
    out = Path(out)
    lines.append(f"precision plot: {out / PLOT}; metrics: {out / METRICS}; checkpoint: {out / CHECKPOINT}")
    return "\n".join(lines)
