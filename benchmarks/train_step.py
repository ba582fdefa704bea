"""One training step, MARViN against float32 PyTorch: LeNet-5 and ResNet-20 at batch 128, random data.

Cases per model: MARViN at a fixed precision for every layer (int8 = Precision(8,4), int16 =
Precision(14,8), float32 class = Precision(24,12)) with ``backward="float"`` and ``"lowbit"`` (the
float32 class has no integer gradient kernels, so its lowbit row would repeat the float one and is
left out); MARViN with the live controller (MSGD + PrecisionController(DIGITS_CONTROLLER), float
backward, as the driver runs it); the same model's float32 eager step (torch.optim.SGD) and a
``torch.compile`` step (reported unavailable when it fails or its warm-up passes 120 s).

A MARViN step's time is split into compiled kernels (inside ``CompiledLayer.run`` /
``run_gradients``), batch norm's compiled kernels (``BatchNormKernels``), torch-side
``quantize`` calls, ``opt.step`` (optimizer + controller, less the quantize calls it makes) and the
rest (torch glue: batch norm's normalization, activations, autograd, float backward of the bridged
layers). A float32 eager step whose batch norms run as MARViN's do shows how much of the gap is
batch norm's. The regions are timed by wrappers this script monkeypatches in;
nested time is charged to the innermost region only.

Usage::

    .venv/bin/python benchmarks/train_step.py [--quick] [--steps N] [--write-md]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import marvin_compile  # noqa: F401  # isort: skip - before torch, as in the CLI: sets OMP_WAIT_POLICY
import torch
import torch.nn.functional as F
from torch import nn

import marvin_compile.runtime.controller as controller_mod
import marvin_compile.runtime.optimizer as optimizer_mod
import marvin_compile.runtime.torch_bridge as bridge_mod
from marvin_compile.api import MarvinConfig, MarvinHandle, quantize_
from marvin_compile.fixed_point import Precision
from marvin_compile.models import lenet5, resnet20
from marvin_compile.runtime.batch_norm import BatchNormKernels, route_batch_norms
from marvin_compile.runtime.controller import PrecisionController
from marvin_compile.runtime.driver import DIGITS_CONTROLLER
from marvin_compile.runtime.optimizer import MSGD, quantizable_layers
from marvin_compile.runtime.torch_bridge import CompiledLayer
from marvin_compile.runtime.variant_store import VariantStore
from marvin_compile.target import resolve_target

from common import REPO, busy_cpu_s, command_line, machine, markers, restore_affinity, write_section

BATCH = 128
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 1e-4
WARMUP = 2
ROUNDS = 6  # side-by-side rounds of float32 eager and MARViN int8 lowbit steps
COMPILE_LIMIT_S = 120
FIXED: dict[str, Precision] = {
    "int8": Precision(8, 4),
    "int16": Precision(14, 8),
    "float32": Precision(24, 12),
}
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int], int, int]] = {
    # name: (builder, input shape, default timed steps, warm-up steps). A ResNet-20 int16 lowbit
    # step takes ~1.5 s on 2 cores: 1 warm-up step (not 2) keeps the full run near 2 minutes.
    "lenet5": (lenet5, (1, 32, 32), 10, WARMUP),
    "resnet20": (resnet20, (3, 32, 32), 5, 1),
}
REGIONS = ("kernels", "batch_norm", "quantize", "optimizer")


# ---------------------------------------------------------------- region timing


@dataclass
class Regions:
    """Exclusive wall time per region: time in a nested region is not charged to its parent."""

    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(REGIONS, 0.0))
    stack: list[list[float]] = field(default_factory=list)  # [start, time of nested regions]

    def reset(self) -> None:
        self.totals = dict.fromkeys(REGIONS, 0.0)

    def wrap(self, region: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                start, nested = self.stack.pop()
                elapsed = time.perf_counter() - start
                self.totals[region] += elapsed - nested
                if self.stack:
                    self.stack[-1][1] += elapsed

        return timed


REGION_TIMER = Regions()


def instrument() -> None:
    """Wrap the compiled-kernel calls (layers, batch norm), every imported ``quantize`` (and the
    optimizer's ``quantize_each``) and ``MSGD.step`` (benchmark only)."""
    CompiledLayer.run = REGION_TIMER.wrap("kernels", CompiledLayer.run)
    CompiledLayer.run_gradients = REGION_TIMER.wrap("kernels", CompiledLayer.run_gradients)
    BatchNormKernels.stats = REGION_TIMER.wrap("batch_norm", BatchNormKernels.stats)
    BatchNormKernels.normalize_relu = REGION_TIMER.wrap("batch_norm", BatchNormKernels.normalize_relu)
    BatchNormKernels.backward = REGION_TIMER.wrap("batch_norm", BatchNormKernels.backward)
    quantizers = ((bridge_mod, "quantize"), (optimizer_mod, "quantize_each"), (controller_mod, "quantize"))
    for mod, name in quantizers:
        setattr(mod, name, REGION_TIMER.wrap("quantize", getattr(mod, name)))
    MSGD.step = REGION_TIMER.wrap("optimizer", MSGD.step)


# ---------------------------------------------------------------- steps


@dataclass
class Result:
    name: str
    median_ms: float | None
    note: str = ""
    breakdown: dict[str, float] | None = None  # region -> median ms per step (incl. "rest")
    ratio: float | None = None  # against the float32 eager steps it alternated with, where it did


def time_steps(
    step: Callable[[], None], steps: int, regions: bool, warmup: int = WARMUP
) -> tuple[float, dict[str, float] | None]:
    """Median step ms after ``warmup`` steps; with ``regions`` also the median ms per region."""
    for _ in range(warmup):
        step()
    times: list[float] = []
    parts: dict[str, list[float]] = {r: [] for r in (*REGIONS, "rest")}
    for _ in range(steps):
        REGION_TIMER.reset()
        t0 = time.perf_counter()
        step()
        dt_s = time.perf_counter() - t0
        times.append(dt_s)
        for r in REGIONS:
            parts[r].append(REGION_TIMER.totals[r])
        parts["rest"].append(dt_s - sum(REGION_TIMER.totals.values()))
    median = statistics.median(times) * 1e3
    if not regions:
        return median, None
    return median, {r: statistics.median(v) * 1e3 for r, v in parts.items()}


def torch_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One float32 (or MARViN) training step: zero_grad, forward, cross entropy, backward, step."""
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if isinstance(opt, MSGD):
        opt.step(loss=loss.detach())
    else:
        opt.step()


def float_results(
    base: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int, try_compile: bool
) -> list[Result]:
    """float32 eager and torch.compile steps (timed before any TVM call pins this thread)."""
    restore_affinity()
    model = copy.deepcopy(base).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    eager, _ = time_steps(lambda: torch_step(model, opt, x, y), steps, False, warmup)
    results = [Result("float32 eager (torch.optim.SGD)", eager)]
    if not try_compile:
        return [*results, Result("float32 torch.compile", None, "skipped (--quick)")]

    model = copy.deepcopy(base).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    compiled = torch.compile(model)

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"warm-up passed {COMPILE_LIMIT_S} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(COMPILE_LIMIT_S)
    t0 = time.perf_counter()
    try:
        torch_step(compiled, opt, x, y)
        warm_s = time.perf_counter() - t0
        signal.alarm(0)
        ms, _ = time_steps(lambda: torch_step(compiled, opt, x, y), steps, False, warmup - 1)
        results.append(Result("float32 torch.compile", ms, f"warm-up {warm_s:.0f} s"))
    except Exception as exc:  # noqa: BLE001 - any compile failure means "unavailable"
        signal.alarm(0)
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:120]
        results.append(Result("float32 torch.compile", None, f"unavailable ({reason})"))
    finally:
        signal.signal(signal.SIGALRM, old)
    return results


# A float32 eager child process: times ``steps`` steps (prints the median ms) per line it reads.
# torch loads before marvin_compile, so libgomp takes its wait policy from the environment the
# child is given: its default where OMP_WAIT_POLICY and GOMP_SPINCOUNT are unset (the `libgomp
# default wait policy` row), this process's settings otherwise (the eager side of the side-by-side
# row, in a process that never starts TVM: eager steps timed in a process whose TVM pool had run
# read up to 35% slower in some runs here).
_EAGER_CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import train_step as ts
name, steps, warmup = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
build, shape, _, _ = ts.MODELS[name]
torch.manual_seed(0)
model = build().train()
x, y = torch.randn(ts.BATCH, *shape), torch.randint(0, 10, (ts.BATCH,))
opt = torch.optim.SGD(model.parameters(), lr=ts.LR, momentum=ts.MOMENTUM, weight_decay=ts.WEIGHT_DECAY)
for _ in sys.stdin:
    print(ts.time_steps(lambda: ts.torch_step(model, opt, x, y), steps, False, warmup)[0], flush=True)
"""


def _eager_child(name: str, steps: int, warmup: int) -> list[str]:
    return [sys.executable, "-c", _EAGER_CHILD, str(Path(__file__).parent), name, str(steps), str(warmup)]


def default_policy_eager(name: str, steps: int, warmup: int) -> Result:
    """float32 eager with libgomp's default wait policy (a child process, see above)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run(
        _eager_child(name, steps, warmup), input="go\n", env=env, capture_output=True, text=True, check=False
    )
    label = "float32 eager, libgomp default wait policy"
    if done.returncode != 0:
        return Result(label, None, f"failed: {done.stderr.strip().splitlines()[-1][:120]}")
    return Result(label, float(done.stdout.split()[-1]), "child process, libgomp variables unset")


def marvin_optimizer(model: nn.Module, handle: MarvinHandle, **precision_source: Any) -> MSGD:
    """MSGD as the driver sets it up, with a fixed ``precision=`` or a live ``controller=``."""
    opt = MSGD(
        model.parameters(),
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        layers=quantizable_layers(model),
        seed=0,
        **precision_source,
    )
    opt.register_precision_hook(handle.set_precision)
    opt.quantize_params()  # the first forward already runs at the initial precision
    return opt


def marvin_results(
    base: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int
) -> list[Result]:
    """float32 eager with batch norm as MARViN runs it, MARViN steps at a fixed precision per class
    and backward, then the live controller."""
    model = copy.deepcopy(base).train()
    route_batch_norms(model, BatchNormKernels(VariantStore(resolve_target("cpu"))))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    restore_affinity()  # as for the other float32 rows
    ms, parts = time_steps(lambda: torch_step(model, opt, x, y), steps, True, warmup)
    results = [Result("float32 eager, MARViN's batch norm", ms, "torch.optim.SGD", parts)]
    print(f"  {results[-1].name}: {ms:.1f} ms", flush=True)
    for backward in ("float", "lowbit"):
        model = copy.deepcopy(base).train()
        t0 = time.perf_counter()
        handle = quantize_(
            model,
            x[:2],
            MarvinConfig(target="cpu", rounding="stochastic", backward=backward, initial=FIXED["int8"]),
        )
        print(f"  quantize_ (backward={backward}): {time.perf_counter() - t0:.1f} s", flush=True)
        start = copy.deepcopy(model.state_dict())
        for cls, p in FIXED.items():
            if backward == "lowbit" and cls == "float32":
                continue
            model.load_state_dict(start)
            handle.set_precision(dict.fromkeys(handle.layers, p))
            opt = marvin_optimizer(model, handle, precision=(p.wl, p.fl))
            ms, parts = time_steps(lambda: torch_step(model, opt, x, y), steps, True, warmup)  # noqa: B023
            results.append(Result(f"MARViN {cls} {p.wl},{p.fl}, {backward} backward", ms, breakdown=parts))
            print(f"  {results[-1].name}: {ms:.1f} ms", flush=True)

    # Live controller: as runtime/driver.py's _MarvinRun sets it up (float backward, the driver default).
    model = copy.deepcopy(base).train()
    initial = Precision(DIGITS_CONTROLLER.initial_wl, DIGITS_CONTROLLER.initial_fl)
    handle = quantize_(
        model, x[:2], MarvinConfig(target="cpu", rounding="stochastic", backward="float", initial=initial)
    )
    opt = marvin_optimizer(model, handle, controller=PrecisionController(DIGITS_CONTROLLER))
    handle.mark_warm()
    ms, parts = time_steps(lambda: torch_step(model, opt, x, y), steps, True, warmup)
    wls = sorted({p.wl for p in handle.precision.values()})
    note = f"swaps {handle.swaps}, compilations after warm-up {handle.compilations_after_warmup}"
    if wls:
        note += f", final wl {min(wls)}-{max(wls)}"
    results.append(Result("MARViN live controller, float backward", ms, note, parts))
    print(f"  {results[-1].name}: {ms:.1f} ms", flush=True)
    return results


def bench_model(name: str, steps: int, warmup: int, try_compile: bool) -> list[Result]:
    """All cases of one model; float32 first."""
    build, shape, _, _ = MODELS[name]
    torch.manual_seed(0)
    base = build()
    x = torch.randn(BATCH, *shape)
    y = torch.randint(0, 10, (BATCH,))
    print(f"{name}: {steps} timed steps after {warmup} warm-up steps", flush=True)
    results = float_results(base, x, y, steps, warmup, try_compile)
    results.append(default_policy_eager(name, steps, warmup))
    for r in results:
        print(
            f"  {r.name}: {r.median_ms if r.median_ms is None else round(r.median_ms, 1)} ms {r.note}",
            flush=True,
        )
    return (
        results + marvin_results(base, x, y, steps, warmup) + [alternating(name, base, x, y, steps, warmup)]
    )


def alternating(
    name: str, base: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int
) -> Result:
    """MARViN int8 lowbit against float32 eager side by side: ``ROUNDS`` rounds, each timing
    ``steps`` eager steps (in ``_EAGER_CHILD`` with this process's thread settings, this process
    waiting) and right after them ``steps`` MARViN steps, so that the host's drift in speed (eager
    ResNet-20 steps read 350-490 ms across runs here) hits both sides of each round's ratio alike.
    The row's ratio is the median of the rounds'."""
    model = copy.deepcopy(base).train()
    p = FIXED["int8"]
    handle = quantize_(
        model, x[:2], MarvinConfig(target="cpu", rounding="stochastic", backward="lowbit", initial=p)
    )
    opt = marvin_optimizer(model, handle, precision=(p.wl, p.fl))
    eager, ours = [], []
    with subprocess.Popen(
        _eager_child(name, steps, warmup), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        for _ in range(ROUNDS):
            child.stdin.write("go\n")
            child.stdin.flush()
            eager.append(float(child.stdout.readline()))
            ours.append(time_steps(lambda: torch_step(model, opt, x, y), steps, False, warmup)[0])
        child.stdin.close()
    ratios = sorted(o / e for o, e in zip(ours, eager, strict=True))
    note = (
        f"{ROUNDS} rounds alternating with float32 eager in a child process ({statistics.median(eager):.1f} "
        f"ms median there); round ratios {ratios[0]:.2f}-{ratios[-1]:.2f}"
    )
    result = Result(
        f"MARViN int8 {p.wl},{p.fl}, lowbit backward, side by side", statistics.median(ours), note
    )
    result.ratio = statistics.median(ratios)
    print(f"  {result.name}: {result.median_ms:.1f} ms, ratio {result.ratio:.2f} ({note})", flush=True)
    return result


# ---------------------------------------------------------------- report


def table(per_model: dict[str, list[Result]]) -> str:
    lines = [
        "| model | step | median ms | ratio vs float32 eager | kernels ms | batch-norm kernels ms "
        "| quantize ms | optimizer+controller ms | rest (torch glue) ms | note |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for model, results in per_model.items():
        eager = results[0].median_ms
        for r in results:
            ms = "n/a" if r.median_ms is None else f"{r.median_ms:.1f}"
            ratio = "n/a" if r.median_ms is None or not eager else f"{r.median_ms / eager:.2f}"
            if r.ratio is not None:
                ratio = f"{r.ratio:.2f} (side by side)"
            b = r.breakdown
            parts = (
                [f"{b[k]:.1f} ({100 * b[k] / sum(b.values()):.0f}%)" for k in (*REGIONS, "rest")]
                if b
                else [""] * (len(REGIONS) + 1)
            )
            lines.append(f"| {model} | {r.name} | {ms} | {ratio} | " + " | ".join(parts) + f" | {r.note} |")
    return "\n".join(lines)


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def section(
    per_model: dict[str, list[Result]],
    steps: dict[str, int],
    warmups: dict[str, int],
    wall_s: float,
    others: float | None,
) -> str:
    begin, end = markers("training-step")
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    step_text = "; ".join(f"{m}: {steps[m]} timed after {warmups[m]} warm-up" for m in steps)
    notes = [
        f"- Machine: {machine()}",
        f"- Date: {date}",
        f"- Command: `{command_line()}` (ran {wall_s:.0f} s)",
        f"- torch {torch.__version__}, threads: {torch.get_num_threads()}",
        f"- One training step (zero_grad, forward, cross entropy, backward, optimizer step) at batch "
        f"{BATCH} on random data (LeNet-5 1x32x32, ResNet-20 3x32x32); median step time ({step_text}; "
        "ResNet-20 gets one warm-up step: its int16 lowbit step still takes ~1.5 s here). "
        "Compilation happens in `quantize_`, before the timed steps (compiled variants come from the "
        "on-disk cache when present). torch.compile's warm-up step is its first warm-up step.",
        "- Other processes kept "
        + ("an unknown number of" if others is None else f"{others:.1f}")
        + " CPUs busy on average during the run (from /proc/stat less this process).",
        "- MARViN fixed: MSGD(lr 0.05, momentum 0.9, weight decay 1e-4, precision fixed for every "
        "layer), stochastic rounding; int8 = Precision(8,4), int16 = Precision(14,8), float32 class = "
        "Precision(24,12). The float32 class has no integer gradient kernels, so it has no lowbit row. "
        "Live controller: MSGD + PrecisionController(DIGITS_CONTROLLER), float backward, as "
        "`runtime/driver.py` sets it up. float32: torch.optim.SGD with the same hyperparameters; "
        "torch.compile compiles the model (the optimizer stays eager), timed after its warm-up step.",
        "- Batch norm: `quantize_` routes a model's batch norms through compiled kernels for their "
        "training statistics and backward (`runtime/batch_norm.py`; PyTorch's CPU kernel sums each "
        "channel one element at a time), normalizing with PyTorch's inference kernel; ResNet-20's "
        "batch norms that a ReLU (after a residual add, in a block's second) follows are "
        "`models.BatchNormReLU2d` modules, whose normalization, add and ReLU run as one kernel each "
        "way. The float32 eager rows run PyTorch's own ops (batch norm, add, ReLU), except `float32 "
        "eager, MARViN's batch norm`.",
        "- Breakdown (median ms per region, share of their sum): kernels = inside `CompiledLayer.run` "
        "/ `run_gradients`; batch-norm kernels = `BatchNormKernels.stats` / `normalize_relu` / "
        "`backward`; quantize = `fixed_point.quantize` calls (bridge, controller) and MSGD's "
        "`quantize_each` (its gradients, then its masters, one pass per precision; the bridge "
        "quantizes a parameter only where MSGD did not just put it on the layer's grid); "
        "optimizer+controller = `MSGD.step` less its quantize calls; rest = step time less the four "
        "(torch glue: batch norm's normalization where no ReLU follows, activations, pooling, "
        "autograd, float backward of the bridged layers). Timed with wrappers this script "
        "monkeypatches in; nested time counts in the innermost region only.",
        "- The float32 steps of a model run before its MARViN steps; the script restores the CPU "
        "affinity TVM's thread pool narrows before timing them. The `side by side` row times "
        f"{ROUNDS} rounds of float32 eager steps (in a child process that never starts TVM: eager "
        "steps in a process whose TVM pool had run read up to 35% slower in some runs) each "
        "followed right away by MARViN int8 lowbit steps (the same counts), so that the host's "
        "drift in speed hits both sides of a round's ratio alike; its ratio is the median of the "
        "rounds' (the acceptance measure for the lowbit step), the other rows' ratios are against "
        "the float32 eager row.",
        f"- Threads: OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')} for every row but "
        "the `libgomp default wait policy` one (importing marvin_compile before torch sets it, as the "
        "CLI does: torch's idle OpenMP workers otherwise spin on the cores TVM's kernels need); "
        "TVM_THREAD_POOL_SPIN_COUNT=0 from `quantize_` on (TVM's idle workers sleep too). Ratios are "
        "against the float32 eager row of this process.",
    ]
    title = "## Training step: MARViN vs float32 PyTorch"
    return "\n".join([begin, title, "", *notes, "", table(per_model), end])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="LeNet-5 only, 3 steps, no torch.compile (smoke test, < 60 s)"
    )
    p.add_argument("--models", default="lenet5,resnet20", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per case (default: 10 LeNet, 5 ResNet)"
    )
    p.add_argument(
        "--write-md", action="store_true", help="rewrite the training-step section of BENCHMARKS.md"
    )
    p.add_argument("--md", type=Path, default=REPO / "BENCHMARKS.md")
    args = p.parse_args(argv)
    models = ["lenet5"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; accepted: {', '.join(MODELS)}")
    steps = {m: args.steps or (2 if args.quick else MODELS[m][2]) for m in models}
    warmups = {m: 1 if args.quick else MODELS[m][3] for m in models}

    instrument()
    t0, busy0, own0 = time.perf_counter(), busy_cpu_s(), _own_cpu_s()
    per_model = {m: bench_model(m, steps[m], warmups[m], not args.quick) for m in models}
    wall_s = time.perf_counter() - t0
    busy1 = busy_cpu_s()
    others = None if busy0 is None or busy1 is None else (busy1 - busy0 - (_own_cpu_s() - own0)) / wall_s
    if others is not None:
        print(f"other processes kept {others:.1f} CPUs busy on average")
    print()
    print(table(per_model))
    print(f"\nran {wall_s:.0f} s")
    if args.write_md:
        write_section(args.md, "training-step", section(per_model, steps, warmups, wall_s, others))
        print(f"wrote section training-step of {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
