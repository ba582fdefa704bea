"""Kernel throughput: our compiled layer variants (int8, int16, float32) against torch float32.

For representative conv and GEMM shapes (LeNet-5, ResNet-20, a VGG-style conv, a square GEMM) this
builds a one-layer torch model, compiles it through the marvin-compile pipeline into the variant of
each kernel class, and times one call of the variant right after ``torch.nn.functional.conv2d`` /
``linear`` (float32, oneDNN / MKL) on the same data, in rounds. Throughput is
``2 * MACs / median time``; a ratio is the median over rounds of the back-to-back ratios.

Usage::

    .venv/bin/python benchmarks/kernels.py [--batch 128] [--repeat 10] [--rounds 3] [--quick] [--write-md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from torch import nn
from tvm import relax

from marvin_compile import amx
from marvin_compile.fixed_point import Precision
from marvin_compile.frontend import export_onnx, import_onnx, load_onnx
from marvin_compile.kernel_classes import CLASS_BY_NAME
from marvin_compile.target import resolve_target

from common import (
    REPO,
    busy_cpu_s,
    command_line,
    machine,
    markers,
    restore_affinity,
    write_section,
)

if TYPE_CHECKING:
    from marvin_compile.runtime.variant_store import VariantStore

BEGIN, END = markers("kernels")
FLOAT32 = Precision(24, 12)


FULL_RANGE = " full-range w"  # row suffix: weights scaled to the clamp, past every int32 bound
RELU_FED = " ReLU-fed"  # row suffix: the input is a ReLU's output (every ResNet-20 conv but the stem)


def precisions(shape: Shape) -> list[tuple[str, str, Precision]]:
    """(row label, kernel class, precision) per row: int8 at wl 8, on a signed input and on a
    ReLU's output (``RELU_FED``: byte products, ``passes/nonneg_inputs``); int16 at the largest wl
    whose products sum exactly in int32 for this reduction whatever the weights (the worst-case
    bound) and, when that is below 16, at wl 16 twice: with the layer's weights (the variant checks
    each call's weights and takes the int32 kernel where they allow) and with weights scaled to the
    clamp (``FULL_RANGE``: the int64 kernel); float32 at wl 24."""
    from marvin_compile.passes.lower_integer import int32_max_wl

    fast = min(16, int32_max_wl(shape.reduction))
    rows = [
        ("int8", "int8", Precision(8, 4)),
        ("int8" + RELU_FED, "int8", Precision(8, 4)),
        (f"int16 wl{fast}", "int16", Precision(fast, fast // 2)),
    ]
    if fast < 16:
        rows.append(("int16 wl16", "int16", Precision(16, 8)))
        rows.append(("int16 wl16" + FULL_RANGE, "int16", Precision(16, 8)))
    return [*rows, ("float32", "float32", FLOAT32)]


BUSY = 0.05  # other processes' CPU share above which a run is flagged as contended
CASE_BUDGET_S = 1.5  # timed seconds aimed at per (shape, implementation) after warm-up
MIN_SAMPLE_S = 0.01  # a timed sample of a fast call loops it until about this long


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: a conv (cin->cout, k x k on hw x hw) or a GEMM (m x k times k x n)."""

    name: str
    kind: str  # "conv" or "gemm"
    cin: int  # conv input channels / GEMM reduction k
    cout: int  # conv output channels / GEMM n
    k: int = 1  # conv kernel size
    hw: int = 1  # conv input height = width
    pad: int = 0
    m: int | None = None  # GEMM rows; None: the batch

    def rows(self, batch: int) -> int:
        return self.m if self.m is not None else batch

    def input_shape(self, batch: int) -> tuple[int, ...]:
        if self.kind == "conv":
            return (batch, self.cin, self.hw, self.hw)
        return (self.rows(batch), self.cin)

    @property
    def reduction(self) -> int:
        """K of the product: input channels x kernel window (conv) or the GEMM depth."""
        return self.cin * self.k * self.k if self.kind == "conv" else self.cin

    def macs(self, batch: int) -> int:
        """Multiply-accumulates of the conv / GEMM (bias excluded)."""
        if self.kind == "conv":
            out = self.hw + 2 * self.pad - self.k + 1
            return batch * self.cout * out * out * self.cin * self.k * self.k
        return self.rows(batch) * self.cin * self.cout

    def module(self) -> nn.Module:
        """The one-layer torch model (with bias), wrapped so the layer has a module name."""
        torch.manual_seed(0)
        if self.kind == "conv":
            layer: nn.Module = nn.Conv2d(self.cin, self.cout, self.k, padding=self.pad, bias=True)
        else:
            layer = nn.Linear(self.cin, self.cout, bias=True)
        return nn.Sequential(layer).eval()


SHAPES: tuple[Shape, ...] = (
    Shape("LeNet-5 conv1 1->6 5x5 @32x32", "conv", 1, 6, 5, 32),
    Shape("LeNet-5 conv2 6->16 5x5 @14x14", "conv", 6, 16, 5, 14),
    Shape("LeNet-5 fc 400->120", "gemm", 400, 120),
    Shape("ResNet-20 16->16 3x3 @32x32 p1", "conv", 16, 16, 3, 32, 1),
    Shape("ResNet-20 32->32 3x3 @16x16 p1", "conv", 32, 32, 3, 16, 1),
    Shape("ResNet-20 64->64 3x3 @8x8 p1", "conv", 64, 64, 3, 8, 1),
    Shape("VGG 128->128 3x3 @16x16 p1", "conv", 128, 128, 3, 16, 1),
    Shape("GEMM 512x512x512", "gemm", 512, 512, m=512),
)
QUICK_SHAPES = ("LeNet-5 conv1 1->6 5x5 @32x32", "LeNet-5 fc 400->120")


@dataclass(frozen=True)
class Timing:
    """Median seconds per call, timed samples x calls per sample, CPU s per wall s (busy threads)."""

    median_s: float
    repeats: int
    inner: int
    threads: float

    @property
    def count(self) -> str:
        return f"x{self.repeats}" if self.inner == 1 else f"x{self.repeats}x{self.inner}"


@dataclass
class Row:
    """One table row: a shape, a kernel class, and ours and torch's timing in each round."""

    shape: str
    kernel_class: str
    macs: int
    rel_err: float
    ours: list[Timing] = field(default_factory=list)
    torch: list[Timing] = field(default_factory=list)

    @property
    def ours_gops(self) -> float:
        return 2 * self.macs / statistics.median(t.median_s for t in self.ours) / 1e9

    @property
    def torch_gops(self) -> float:
        return 2 * self.macs / statistics.median(t.median_s for t in self.torch) / 1e9

    @property
    def ratios(self) -> list[float]:
        """ours / torch throughput in each round (both timed back to back)."""
        return [t.median_s / o.median_s for o, t in zip(self.ours, self.torch, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


def median_time(call: Callable[[], object], repeat: int, budget_s: float = CASE_BUDGET_S) -> Timing:
    """Median seconds per call of ``call`` after warm-up, over timed samples.

    Warm-up is one call, plus a second when the first was quick; the last warm-up time picks the
    sample count so the timed part takes about ``budget_s`` (at least min(3, repeat), at most
    repeat). A sample of a call faster than MIN_SAMPLE_S loops it until about MIN_SAMPLE_S.
    """
    t0 = time.perf_counter()
    call()
    est = time.perf_counter() - t0
    if est < 0.3:
        t0 = time.perf_counter()
        call()
        est = time.perf_counter() - t0
    est = max(est, 1e-7)
    inner = max(1, round(MIN_SAMPLE_S / est))
    n = max(min(3, repeat), min(repeat, int(budget_s / (est * inner))))
    times = []
    cpu0 = _own_cpu_s()
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(inner):
            call()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times) / inner, n, inner, (_own_cpu_s() - cpu0) / sum(times))


@dataclass
class Case:
    """One shape's data, its imported float layer, and torch's output (the forward's reference)."""

    shape: Shape
    macs: int
    x: np.ndarray
    w: np.ndarray
    b: np.ndarray
    layer: relax.Function
    onnx_path: str
    ref: np.ndarray | None = None


def prepare(shape: Shape, batch: int, workdir: str) -> Case:
    """Random input, the torch layer's weights, and the layer imported through ONNX into Relax."""
    # passes/ and runtime/ are imported here, in their own block, because ruff sorts them as
    # third-party (their source dirs are not under marvin_compile/) unless configured otherwise.
    from marvin_compile.passes import pipeline
    from marvin_compile.runtime.compiled_model import layers_of

    model = shape.module()
    x = np.random.default_rng(0).standard_normal(shape.input_shape(batch), dtype=np.float32)
    onnx_path = os.path.join(workdir, "".join(c if c.isalnum() else "_" for c in shape.name) + ".onnx")
    export_onnx(model, torch.from_numpy(x[:1]), onnx_path)
    layers = layers_of(pipeline.partition(import_onnx(load_onnx(onnx_path)).mod))
    if len(layers) != 1:
        raise RuntimeError(f"{shape.name}: expected one layer, found {[lay.name for lay in layers]}")
    w = model[0].weight.detach().numpy().copy()
    b = model[0].bias.detach().numpy().copy()
    case = Case(shape, shape.macs(batch), x, w, b, layers[0].func, onnx_path)
    with torch.inference_mode():
        case.ref = torch_forward(case)().numpy()
    return case


def torch_forward(case: Case, x: np.ndarray | None = None) -> Callable[[], torch.Tensor]:
    """torch float32 ``F.conv2d`` / ``F.linear`` on the case's data (``x``: another input)."""
    x, w, b = torch.from_numpy(case.x if x is None else x), torch.from_numpy(case.w), torch.from_numpy(case.b)
    if case.shape.kind == "conv":
        return functools.partial(F.conv2d, x, w, b, padding=case.shape.pad)
    return functools.partial(F.linear, x, w, b)


def torch_calls(case: Case) -> dict[str, Callable]:
    """torch float32 on the case's data: the forward and the two backward products."""
    x, w = torch.from_numpy(case.x), torch.from_numpy(case.w)
    return {"forward": torch_forward(case), **torch_gradients(case, x, w)}


def gradient_precisions(shape: Shape, target: tvm.target.Target) -> list[tuple[str, str, Precision]]:
    """(row label, kernel class, precision) of the backward rows: int8 at wl 8 (and its dw on a
    ReLU's output, ``RELU_FED``); int16 at the largest wl whose dx and dw sums are exact in int32 on
    the target's packed kernels (when below 16) and at wl 16."""
    from marvin_compile.dot_isa import dot_isa
    from marvin_compile.passes.gradient_kernels import product_bound
    from marvin_compile.te_dot_grad import dw_chunk

    rows = [("int8", "int8", Precision(8, 4)), ("int8" + RELU_FED, "int8", Precision(8, 4))]
    isa = dot_isa(target)
    if isa is not None:
        out = shape.hw + 2 * shape.pad - shape.k + 1
        dx_length = shape.cout * shape.k * shape.k
        out_hw = (out, out) if shape.kind == "conv" else (1, 1)
        bound = min(product_bound(dx_length), product_bound(dw_chunk(isa, "int16", out_hw)))
        fast = min(16, (bound.bit_length() - 1) // 2 + 1)  # 4**(wl-1) <= bound
        if fast < 16:
            rows.append((f"int16 wl{fast}", "int16", Precision(fast, fast // 2)))
    return [*rows, ("int16 wl16", "int16", Precision(16, 8))]


def torch_gradients(case: Case, x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable]:
    """The two backward products in torch float32: input gradient dx and weight gradient dw."""
    g = torch.from_numpy(np.random.default_rng(1).standard_normal(case.ref.shape, dtype=np.float32))
    if case.shape.kind == "conv":
        pad = case.shape.pad
        return {
            "dx": functools.partial(torch.nn.grad.conv2d_input, x.shape, w, g, padding=pad),
            "dw": functools.partial(torch.nn.grad.conv2d_weight, x, w.shape, g, padding=pad),
        }
    return {"dx": functools.partial(torch.matmul, g, w), "dw": functools.partial(torch.matmul, g.t(), x)}


@dataclass
class Timed:
    """One of our calls and the row it is timed for, against torch's ``product``."""

    row: Row
    product: str  # forward / dx / dw
    call: Callable[[], object]


def gradient_calls(case: Case, store: VariantStore) -> list[Timed]:
    """The lowbit backward's integer dx / dw kernels of each integer class (stochastic rounding);
    a ReLU-fed layer differs only in dw (x by g), so its row times dw alone, on the input's ReLU."""
    from marvin_compile.passes.nonneg_inputs import NONNEG_ATTR
    from marvin_compile.runtime.compiled_model import precision_args

    dev = store.device
    x, w = tvm.runtime.tensor(case.x, dev), tvm.runtime.tensor(case.w, dev)
    x_relu = tvm.runtime.tensor(np.maximum(case.x, 0), dev)
    g_np = np.random.default_rng(1).standard_normal(case.ref.shape, dtype=np.float32)
    g, seed = tvm.runtime.tensor(g_np, dev), tvm.runtime.tensor(np.array(7, np.uint32), dev)
    out = []
    for name, class_name, precision in gradient_precisions(case.shape, store.target):
        relu_fed = name.endswith(RELU_FED)
        layer = case.layer.with_attr(NONNEG_ATTR, True) if relu_fed else case.layer
        vm = store.get_gradients(layer, CLASS_BY_NAME[class_name], "stochastic").fn
        qp, _ = precision_args(precision, dev)
        calls = {  # dw quantizes x as a stochastic forward did: a seed for g, one for x
            "dx": functools.partial(vm["dx"], g, w, qp, qp, seed),
            "dw": functools.partial(vm["dw"], x_relu if relu_fed else x, g, qp, qp, seed, seed),
        }
        if relu_fed:
            del calls["dx"]
        for product, call in calls.items():
            row = Row(case.shape.name, f"{name} {product}", case.macs, float("nan"))
            out.append(Timed(row, product, call))
    return out


def forward_calls(
    case: Case, store: VariantStore, suffix: str = "", classes: tuple[str, ...] = ()
) -> list[Timed]:
    """The compiled variant of each kernel class on the case's data, checked against torch
    (``classes``: only these; ``suffix`` marks the rows, e.g. " tuned")."""
    from marvin_compile.passes.nonneg_inputs import NONNEG_ATTR
    from marvin_compile.runtime.compiled_model import precision_args

    dev = store.device
    x, w, b = (tvm.runtime.tensor(a, dev) for a in (case.x, case.w, case.b))
    x_relu = np.maximum(case.x, 0)
    with torch.inference_mode():
        ref_relu = torch_forward(case, x_relu)().numpy()
    w_full = tvm.runtime.tensor(case.w / np.abs(case.w).max() * 127.0, dev)  # levels at the wl16 clamp
    out = []
    for label, class_name, precision in precisions(case.shape):
        if classes and class_name not in classes:
            continue
        name = label + suffix
        relu_fed = label.endswith(RELU_FED)
        layer = case.layer.with_attr(NONNEG_ATTR, True) if relu_fed else case.layer
        variant = store.get(layer, CLASS_BY_NAME[class_name], "nearest")
        qp, fl = precision_args(precision, dev)
        weight = w_full if label.endswith(FULL_RANGE) else w
        xin, ref = (tvm.runtime.tensor(x_relu, dev), ref_relu) if relu_fed else (x, case.ref)
        y = variant.fn(xin, weight, b, qp, fl).numpy()
        if y.shape != ref.shape or not np.all(np.isfinite(y)):
            raise RuntimeError(
                f"{case.shape.name} {name}: output {y.shape} (torch {ref.shape}) or not finite"
            )
        error = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        rel_err = float("nan") if weight is w_full else float(error)  # nan: not torch's weights
        call = functools.partial(variant.fn, xin, weight, b, qp, fl)
        out.append(Timed(Row(case.shape.name, name, case.macs, rel_err), "forward", call))
    return out


def time_rounds(cases: list[Case], ours: list[list[Timed]], repeat: int, rounds: int) -> None:
    """Each round times, per case, every torch product and right after it our calls against it, so
    a drift in machine speed (up to 2x within minutes here) hits both sides of a ratio alike."""
    budget = CASE_BUDGET_S / rounds
    references = [torch_calls(case) for case in cases]
    for r in range(rounds):
        for case, calls, timed in zip(cases, references, ours, strict=True):
            for product, torch_call in calls.items():
                mine = [t for t in timed if t.product == product]
                if not mine:
                    continue
                restore_affinity()
                with torch.inference_mode():
                    reference = median_time(torch_call, repeat, budget)
                for t in mine:
                    t.row.torch.append(reference)
                    t.row.ours.append(median_time(t.call, repeat, budget))
                    print(
                        f"  round {r + 1}: {case.shape.name:32s} {t.row.kernel_class:16s} "
                        f"{t.row.ours[-1].median_s * 1e3:9.3f} ms, torch {reference.median_s * 1e3:9.3f} ms: "
                        f"{reference.median_s / t.row.ours[-1].median_s:.3f}x",
                        file=sys.stderr,
                        flush=True,
                    )


def tuned_calls(cases: list[Case], target, args: argparse.Namespace, workdir: str) -> list[list[Timed]]:
    """Tune every case's packed kernels with meta_schedule (``marvin-compile tune``); the variants
    built from the database, timed like the default-schedule rows."""
    from marvin_compile.runtime.variant_store import VariantStore
    from marvin_compile.tuning import TuningDatabase, tune

    db = os.path.join(workdir, "tuning")
    for case in cases:
        tune(case.onnx_path, target, args.tune_trials, db, args.batch, ("int8", "int16"))
    store = VariantStore(target, os.path.join(workdir, "tuned-cache"), TuningDatabase(db, target))
    return [forward_calls(case, store, " tuned", ("int8", "int16")) for case in cases]


def _own_cpu_s() -> float:
    """CPU seconds of this process, all threads."""
    return time.process_time()


class LoadMeter:
    """Share of the machine's CPU time that other processes used while we ran.

    A busy neighbour matters here: with torch's default threads = cores, one stolen core makes
    every parallel region wait for the scheduler, so contended torch times are not comparable.
    """

    def __init__(self) -> None:
        self.wall0, self.busy0, self.own0 = time.perf_counter(), busy_cpu_s(), _own_cpu_s()

    def other_share(self) -> float | None:
        busy = busy_cpu_s()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.wall0
        other = (busy - self.busy0) - (_own_cpu_s() - self.own0)
        return max(0.0, other) / (wall * (os.cpu_count() or 1))


def wait_idle(max_s: float, window_s: float = 5.0) -> float | None:
    """Wait up to ``max_s`` for a window in which other processes use < BUSY of the CPUs.

    Returns the last window's share (None where /proc/stat is unavailable).
    """
    deadline, share = time.perf_counter() + max_s, None
    while time.perf_counter() < deadline:
        meter = LoadMeter()
        time.sleep(window_s)
        share = meter.other_share()
        if share is None or share < BUSY:
            break
        print(f"# waiting for an idle machine: other processes use {100 * share:.0f}%", file=sys.stderr)
    return share


def tvm_threads() -> str:
    """TVM's thread-pool size and where it comes from."""
    env = os.environ.get("TVM_NUM_THREADS")
    source = f"TVM_NUM_THREADS={env}" if env else "TVM default: cores / 2, unless OMP_NUM_THREADS is set"
    n = tvm.runtime.num_threads()  # starts TVM's pool, which pins this thread: undo that
    restore_affinity()
    return f"{n} ({source})"


def kernel_families(target_text: str) -> str:
    """Which instructions the integer classes' forward products run on here."""
    from marvin_compile.dot_isa import dot_isa

    isa = dot_isa(tvm.target.Target(json.loads(target_text)))
    if isa is None:
        return "none (TVM's generic integer kernels)"
    packed = f"packed `{isa.name}` dot products"
    vnni = isa.name == "avx512_vnni"
    relu_fed = "`vpdpbusd` without its +128 offset" if vnni else "`vpmaddubsw` + `vpmaddwd`"
    if not isa.amx:
        return f"int8, int16 and the backward products on {packed}; int8 ReLU-fed on {relu_fed}"
    return (
        f"AMX tiles where a layer has >= 8 input channels (an int8 conv of fewer, in fractional "
        f"4-channel groups, over its kernel windows where they fit 64 bytes: LeNet-5's conv1 forward), "
        f"else {packed}: int8 forward, dx and conv dw "
        f"(`tdpbssd`); int16 as byte products (`tdpbssd`/`tdpbsud`/`tdpbusd`/`tdpbuud`) for conv dw, "
        f"for convs whose tile rows hold {amx.MIN_INT16_CHANNELS} input channels (kernel columns "
        f"folded in: from 16), and above the int32 bound (the wl16 rows, requantized inside the "
        f"kernel), else {packed} (`vpdpwssd`); Linear dw on {packed}"
    )


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| shape | class | ours GOP/s | torch fp32 GOP/s | ratio ours/torch | ratio per round |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.kernel_class} | {r.ours_gops:.2f} | {r.torch_gops:.1f} | {r.ratio:.3f} "
            f"| {min(r.ratios):.2f}-{max(r.ratios):.2f} |"
        )
    return "\n".join(lines)


@dataclass
class RunInfo:
    """What the BENCHMARKS.md section says about the run besides the table."""

    batch: int
    command: str
    elapsed_s: float  # excluding waited_s
    waited_s: float  # waiting for an idle machine (--wait-idle)
    target: str
    load: float | None  # other processes' CPU share while the rounds were timed
    rounds: int


def _pct(share: float | None) -> str:
    return "unknown" if share is None else f"{100 * share:.0f}%"


def load_warnings(info: RunInfo) -> list[str]:
    """Warnings for phases during which other processes used the CPUs."""
    if info.load is not None and info.load > BUSY:
        return [
            f"other processes used {_pct(info.load)} of the CPUs while the kernels were timed: "
            "multi-threaded times are unreliable (a stolen core stalls every parallel region)"
        ]
    return []


def section(rows: list[Row], grad_rows: list[Row], info: RunInfo) -> str:
    """The BENCHMARKS.md section (markers included)."""
    gemm_m = ", ".join(f"{s.name}: M={s.m}" for s in SHAPES if s.m is not None)
    return "\n".join(
        [
            BEGIN,
            "## Kernels: compiled layer variants vs torch float32",
            "",
            f"- Machine: {machine()}",
            f"- Date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"- Command: `{info.command}` (ran {info.elapsed_s:.0f} s"
            + (f", after waiting {info.waited_s:.0f} s for an idle machine)" if info.waited_s >= 1 else ")"),
            f"- torch {torch.__version__}, threads: {torch.get_num_threads()}; TVM {tvm.__version__}, "
            f"threads: {tvm_threads()}; target `{info.target}`",
            f"- Batch {info.batch} (GEMM rows = batch except {gemm_m}); all layers with bias; nearest "
            "rounding; int8 = Precision(8,4) on the signed random input, int8 ReLU-fed = the same on "
            "that input's ReLU (the layer marked as a ReLU's consumer, as every ResNet-20 layer but the "
            "stem and every LeNet-5 layer but conv1 is: byte products, `passes/nonneg_inputs`; torch "
            "runs the same call); int16 wlN = Precision(N,N/2) at the largest N whose "
            "products sum exactly in int32 for the shape's reduction whatever the weights (the packed "
            "int32 kernel); above it the int16 class checks each call's weights: wl16 = Precision(16,8) "
            "with the layer's weights (torch's init: the int32 kernel), wl16 full-range w = with "
            "weights scaled so the largest level sits at the clamp (past the bound: the packed float64 "
            "kernel); float32 = Precision(24,12).",
            f"- Integer kernels on this target: {kernel_families(info.target)}",
            "- GOP/s = 2 * MACs / median wall time of one call, after warm-up; up to --repeat timed "
            f"samples (fewer, >= 3, for slow cases: ~{CASE_BUDGET_S} s per case); a fast call is looped "
            f"so one sample lasts ~{MIN_SAMPLE_S * 1e3:.0f} ms. Ours = one call of the compiled variant "
            "(quantize inputs/weights/bias, conv/GEMM, requantize) as the pipeline compiles it now; "
            "torch = `F.conv2d` / `F.linear` float32. Timed in "
            f"{info.rounds} rounds: in each, per shape and product, torch and right after it each of "
            "our variants (the machine's speed drifts up to 2x within minutes); GOP/s are the median "
            "of the round medians, the ratio is the median of the rounds' ratios, and the last column "
            "gives the rounds' range.",
            f"- Busy threads while timing (CPU s / wall s): ours {_span(_threads(rows, 'ours'))}, "
            f"torch {_span(_threads(rows, 'torch'))}. TVM's pool pins the calling thread to CPU 0 "
            "on first use; the script restores the affinity before timing torch.",
            f"- Other processes' CPU share while timing: {_pct(info.load)}.",
            *[f"- **Warning: {w}.**" for w in load_warnings(info)],
            *(
                [
                    "- Rows marked `tuned`: the same variants built from a meta_schedule tuning database "
                    "(`--tune-trials N`: per shape and class, the default schedule plus N-1 sampled "
                    "register tilings, timed at this batch); the default schedule is itself a candidate, "
                    "so a tuned row differs from its default row by the chosen tiling and by timing noise."
                ]
                if any(r.kernel_class.endswith(" tuned") for r in rows)
                else []
            ),
            "",
            markdown_table(rows),
            "",
            "Backward products of the lowbit training step: our integer dx / dw kernels (the incoming "
            "gradient quantized stochastically, and in dw the layer's input as the forward did; on "
            "the kernels named above, dw summed in int32 over "
            "chunks of the batch (int16: of a few output rows) and in int64 over the chunks; int16 wlN "
            "as above, for the dx and dw worst-case bounds together; wl16 = above them, where dx checks "
            "the call's weights (torch's init: its int32 kernel) and dw, both of whose operands are "
            "activations, branches on the word lengths: the int32 kernel on the gradient split into "
            "g >> 7 and g & 127 (twice the products) while both parts' chunk sums fit int32, which "
            "they do for every shape here, else float64 FMAs) against `torch.nn.grad.conv2d_input` / "
            "`conv2d_weight` (GEMM: `g @ W`, `g.T @ x`) in float32, same MAC count as the forward. "
            "int8 ReLU-fed dw: the same dw for a layer whose input is a ReLU's output (x by g on byte "
            "products, x the unsigned operand), on the input's ReLU; its dx is the int8 row's.",
            "",
            markdown_table(grad_rows),
            END,
        ]
    )


def _threads(rows: list[Row], side: str) -> list[float]:
    return [t.threads for r in rows for t in getattr(r, side)]


def _span(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}" if values else "n/a"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128, help="batch size (GEMM rows for the fc layer)")
    p.add_argument("--repeat", type=int, default=10, help="max timed samples per case (fewer for slow cases)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each timing torch and ours per case")
    p.add_argument("--quick", action="store_true", help="only 2 shapes, 1 repeat, 1 round (smoke test)")
    p.add_argument("--write-md", action="store_true", help="rewrite the kernels section of BENCHMARKS.md")
    p.add_argument("--md", type=Path, default=REPO / "BENCHMARKS.md", help="markdown file for --write-md")
    p.add_argument("--cache-dir", default=None, help="variant cache (default: a fresh temp dir)")
    p.add_argument(
        "--tune-trials",
        type=int,
        default=0,
        metavar="N",
        help="also autotune each shape's int8/int16 kernels (N trials each) and add 'tuned' rows",
    )
    p.add_argument(
        "--tvm-threads",
        type=int,
        default=None,
        metavar="N",
        help="set TVM_NUM_THREADS for our variants (default: TVM's own, cores / 2 when unset)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for an idle machine",
    )
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeat < 1 or args.rounds < 1:
        p.error("--batch, --repeat and --rounds must be >= 1")
    if args.quick:
        args.rounds = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tvm_threads is not None:  # read when TVM's thread pool starts, i.e. before any TVM call
        os.environ["TVM_NUM_THREADS"] = str(args.tvm_threads)
    from marvin_compile.runtime.variant_store import VariantStore

    start = time.perf_counter()
    repeat = 1 if args.quick else args.repeat
    shapes = [s for s in SHAPES if s.name in QUICK_SHAPES] if args.quick else list(SHAPES)
    target = resolve_target("cpu")
    print(
        f"# {machine()}; torch {torch.__version__} threads={torch.get_num_threads()}; "
        f"TVM {tvm.__version__} threads={tvm_threads()} target={target}; batch={args.batch}",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="marvin-bench-") as workdir:
        cases = [prepare(shape, args.batch, workdir) for shape in shapes]
        wait_start = time.perf_counter()
        if args.wait_idle > 0:
            wait_idle(args.wait_idle)
        waited = time.perf_counter() - wait_start
        store = VariantStore(target, args.cache_dir or os.path.join(workdir, "cache"))
        forward = [forward_calls(case, store) for case in cases]  # compiled before any timing
        backward = [gradient_calls(case, store) for case in cases]
        tuned = tuned_calls(cases, target, args, workdir) if args.tune_trials else [[] for _ in cases]
        meter = LoadMeter()  # after tuning, whose builder/runner processes would count as load
        ours = [f + t + g for f, t, g in zip(forward, tuned, backward, strict=True)]
        time_rounds(cases, ours, repeat, args.rounds)
        load = meter.other_share()
        rows = [t.row for f, tu in zip(forward, tuned, strict=True) for t in f + tu]
        grad_rows = [t.row for g in backward for t in g]
    elapsed = time.perf_counter() - start - waited
    info = RunInfo(args.batch, command_line(), elapsed, waited, str(target), load, args.rounds)

    print(f"torch threads: {torch.get_num_threads()}; TVM threads: {tvm_threads()}; batch: {args.batch}\n")
    print(markdown_table(rows))
    print("\nBackward products (lowbit training):\n")
    print(markdown_table(grad_rows))
    wait_note = f" (plus {waited:.0f} s waiting for an idle machine)" if args.wait_idle > 0 else ""
    print(f"\ntotal run time: {elapsed:.1f} s{wait_note}", flush=True)
    print(f"other processes' CPU share while timing: {_pct(load)}")
    for warning in load_warnings(info):
        print(f"WARNING: {warning}", file=sys.stderr)
    if args.write_md:
        write_section(args.md, "kernels", section(rows, grad_rows, info))
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
