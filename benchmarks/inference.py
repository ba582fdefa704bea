"""Inference latency: the deployed TVM module against ONNX Runtime and PyTorch, batch 1 and 64.

For each model (LeNet-5, ResNet-20) this builds the network with a fixed seed, gives ResNet's batch
norms non-trivial statistics, deploys it at a mixed per-layer precision (alternating Precision(8,4)
and Precision(12,6) over the Conv/Linear layers, in model order; deploy re-derives fl for
BN-folded layers) and times, on the same inputs (the digits test set):

1. ``ours``: the deployed TVM module (``marvin_compile.runtime.deploy.load``), deployed with
   ``batches=(1, 64)``, so each batch runs the library specialized to its size (``model_b1.so``,
   ``model_b64.so``); ``ours, model.so`` is the same model's library for any batch size, timed
   beside it;
2. ``ORT fp32``: ONNX Runtime on ``model.float.onnx`` (BN folded, float32);
3. ``ORT our QDQ``: ONNX Runtime on ``model.qdq.onnx``;
4. ``ORT int8``: ONNX Runtime's ``quantize_static`` of the float model (QDQ, int8 weights, uint8
   activations by default: ORT's recommended U8S8 on x86, ``--ort-activations int8`` for S8S8;
   MinMax calibration on 128 training samples, after ``quant_pre_process``);
5. ``torch fp32``: the original model in PyTorch eager, eval mode, ``torch.no_grad()``.

Latency is the median of timed calls (``time.perf_counter``) after warm-up. A per-kernel breakdown
of one instrumented call of the TVM module is printed as well.

Usage::

    .venv/bin/python benchmarks/inference.py [--models lenet5,resnet20] [--repeat 30] [--quick] [--write-md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import tvm
from onnx import helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn
from tvm import relax

from marvin_compile.data import load_dataset
from marvin_compile.fixed_point import Precision
from marvin_compile.models import lenet5, resnet20

from common import (
    REPO,
    START_AFFINITY,
    busy_cpu_s,
    command_line,
    machine,
    markers,
    restore_affinity,
    write_section,
)

BEGIN, END = markers("inference")
BATCHES = (1, 64)
CALIBRATION_SAMPLES = 128
BN_STAT_SAMPLES = 512
PRECISIONS = (Precision(8, 4), Precision(12, 6))  # alternated over the Conv/Linear layers
ENGINES = (
    "ours (TVM)",
    "ours, model.so",
    "ORT fp32",
    "ORT our QDQ",
    "ORT int8",
    "torch fp32",
    "ORT fp32 1-thread",
)
OURS, OURS_GENERIC, ORT_FP32, ORT_INT8, ORT_FP32_1T = (ENGINES[i] for i in (0, 1, 2, 4, 6))
TARGET_VS_FP32 = 0.6  # issue 5: deployed TVM at most 0.6x ORT float32 latency, no slower than ORT int8
BUSY = 0.05  # other processes' CPU share above which a run is flagged as contended
QUIET = 0.15  # --wait-idle waits until other processes use at most this share of the CPUs
MIN_THREAD_WALL_S = 0.05  # busy threads are only reported for cases timed at least this long
CASE_BUDGET_S = 2.0  # timed seconds aimed at per (model, batch, engine)


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked network: its factory and input channels (inputs are N x C x 32 x 32)."""

    name: str
    factory: Callable[[], nn.Module]
    in_channels: int


MODELS: dict[str, ModelSpec] = {
    "lenet5": ModelSpec("LeNet-5", lambda: lenet5(), 1),
    "resnet20": ModelSpec("ResNet-20", lambda: resnet20(in_channels=3), 3),
}


@dataclass(frozen=True)
class Timing:
    """Median seconds per call, timed repeats, CPU s per wall s (busy threads; NaN when too short)."""

    median_s: float
    repeats: int
    threads: float


@dataclass
class Row:
    """One table row: a model, a batch size, an engine, its latency and its error vs torch."""

    model: str
    batch: int
    engine: str
    timing: Timing
    rel_err: float
    per_round_fp32: list[float] = field(default_factory=list)  # each round's time / ORT fp32's
    per_round_int8: list[float] = field(default_factory=list)  # the same against ORT int8

    @property
    def ms(self) -> float:
        return self.timing.median_s * 1e3

    @property
    def vs_fp32(self) -> float:
        return statistics.median(self.per_round_fp32)

    @property
    def vs_int8(self) -> float:
        return statistics.median(self.per_round_int8)


@dataclass
class ModelResult:
    """Everything measured for one model: rows, TVM breakdown per batch, deploy facts."""

    spec: ModelSpec
    rows: list[Row] = field(default_factory=list)
    breakdown: dict[int, dict[str, float]] = field(default_factory=dict)
    rounds: dict[int, list[dict[str, float]]] = field(default_factory=dict)  # batch -> engine -> s
    layers: list[dict] = field(default_factory=list)
    ours_vs_qdq: float = 0.0  # max |ours - ORT on our QDQ| in output steps of the last layer
    pinned: bool = False  # whether TVM narrowed the thread's affinity


def median_time(call: Callable[[], object], repeat: int, budget_s: float = CASE_BUDGET_S) -> Timing:
    """Median seconds of ``call`` after warm-up (two calls, a third when they were quick).

    The repeat count aims at ``budget_s`` timed seconds: at least min(3, repeat), at most repeat.
    """
    est = 0.0
    for i in range(3):
        t0 = time.perf_counter()
        call()
        est = time.perf_counter() - t0
        if i == 1 and est > 0.3:
            break
    n = max(min(3, repeat), min(repeat, int(budget_s / max(est, 1e-9))))
    times = []
    cpu0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    cpu, wall = time.process_time() - cpu0, sum(times)
    return Timing(statistics.median(times), n, cpu / wall if wall >= MIN_THREAD_WALL_S else float("nan"))


def build_model(spec: ModelSpec, train_x: torch.Tensor) -> nn.Module:
    """The eval-mode network, seed-0 init; batch norms get affine parameters and data statistics.

    Batch-norm weight ~ U(0.5, 1.5) and bias ~ N(0, 0.1); running mean and variance are the
    cumulative statistics of ``BN_STAT_SAMPLES`` training samples (train-mode forward passes).
    """
    torch.manual_seed(0)
    model = spec.factory()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.normal_(bn.bias, 0.0, 0.1)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    if bns:
        model.train()
        with torch.no_grad():
            for i in range(0, min(BN_STAT_SAMPLES, len(train_x)), 128):
                model(train_x[i : i + 128])
    return model.eval()


def mixed_precision(model: nn.Module) -> dict[str, Precision]:
    """Alternate ``PRECISIONS`` over every Conv2d / Linear layer, in model order."""
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return {name: PRECISIONS[i % len(PRECISIONS)] for i, name in enumerate(layers)}


class CalibrationReader(CalibrationDataReader):
    """Feeds calibration samples one at a time to ``quantize_static``."""

    def __init__(self, input_name: str, data: np.ndarray) -> None:
        self._items = iter([{input_name: data[i : i + 1]} for i in range(len(data))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def ort_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU session, created unpinned; ``threads`` 0 keeps ORT's default intra-op threads."""
    restore_affinity()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_int8_model(float_path: Path, out_path: Path, calib: np.ndarray, activations: str) -> None:
    """ONNX Runtime's own static quantization (QDQ, int8 weights, MinMax) of the float model."""
    pre = out_path.with_name("ort.pre.onnx")
    try:
        quant_pre_process(str(float_path), str(pre))
    except Exception as e:  # pre-processing is recommended, not required
        print(f"  quant_pre_process failed ({e}); quantizing the float model as is", file=sys.stderr)
        pre = float_path
    name = ort_session(pre).get_inputs()[0].name
    quantize_static(
        str(pre),
        str(out_path),
        CalibrationReader(name, calib),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )


def ort_intra_threads() -> int:
    """Threads one default ORT session computes with: pool threads it starts plus the caller."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        before = len(os.listdir("/proc/self/task"))
        sess = ort_session(path)
        started = len(os.listdir("/proc/self/task")) - before
        del sess
    return started + 1


def tvm_breakdown(out: Path, manifest: dict, batch: int, x: np.ndarray) -> dict[str, float]:
    """Seconds per kernel kind in one instrumented call of the deployed model at ``batch``.

    The deployed libraries run ``main`` as compiled code, which has no per-call hooks, so this
    builds the same model for the same batch with ``main`` as VM bytecode (same kernels) and
    instruments that. ``total`` is the instrumented call's wall time; what the kinds do not cover
    is the Python instrument callbacks' own overhead (two per VM call).
    """
    from marvin_compile.fixed_point import Precision
    from marvin_compile.runtime.deploy import FLOAT_ONNX, compile_library
    from marvin_compile.target import resolve_target

    precision = {layer["name"]: Precision(layer["wl"], layer["fl"]) for layer in manifest["layers"]}
    target = resolve_target(manifest["target"])
    executable = compile_library(out / FLOAT_ONNX, precision, target, None, batch, exec_mode="bytecode")
    dev = tvm.cpu()
    vm = relax.VirtualMachine(executable, dev)
    arg = tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), dev)
    vm["main"](arg)
    spent: dict[str, float] = defaultdict(float)
    start = [0.0]

    def instrument(func: object, symbol: str, before: bool, ret: object, *args: object) -> int:
        if before:
            start[0] = time.perf_counter()
        else:
            spent[_kernel_kind(symbol)] += time.perf_counter() - start[0]
        return 0

    vm.set_instrument(instrument)
    t0 = time.perf_counter()
    vm["main"](arg)
    spent["total"] = time.perf_counter() - t0
    return dict(spent)


KERNEL_KINDS = {
    "conv2d": "generic conv2d",
    "matmul": "dense",
    "dense": "dense",
    "fxp_quantize_int": "quantize",
    "requantize": "requantize",
    "shape_func": "VM/shapes",
}


def _kernel_kind(symbol: str) -> str:
    """Group a VM call's symbol (``conv2d3``, ``requantize``, ``vm.builtin.alloc_tensor``) by kind."""
    if symbol.startswith("vm.builtin"):
        return "VM/shapes"
    if "marvin_dot" in symbol:  # the packed kernel: quantize, conv/dense, requantize (+ ReLU / add)
        return "packed conv/dense"
    if "marvin_amx_dot" in symbol:
        return "AMX tile products"
    if "marvin_amx" in symbol:  # quantize + pack before the tiles, unpack + requantize (+ ReLU / add) after
        return "AMX packing/unpacking"
    return KERNEL_KINDS.get(re.sub(r"\d+$", "", symbol), "elementwise/pool/other")


def merged(timings: list[Timing]) -> Timing:
    """Rounds of one case as one: the median of their medians, all their repeats."""
    threads = [t.threads for t in timings if not np.isnan(t.threads)]
    return Timing(
        statistics.median(t.median_s for t in timings),
        sum(t.repeats for t in timings),
        statistics.fmean(threads) if threads else float("nan"),
    )


def bench_model(
    spec: ModelSpec, data: tuple, repeat: int, workdir: Path, ort_act: str, n_rounds: int = 1
) -> ModelResult:
    """Deploy one model and time the engines (five plus the 1-thread reference) at batch 1 and 64."""
    from marvin_compile.runtime.deploy import (
        FLOAT_ONNX,
        LIBRARY,
        QDQ,
        DeployedModel,
        deploy,
        load,
    )

    train_x, test_x = data
    result = ModelResult(spec)
    model = build_model(spec, train_x)
    out = workdir / spec.name
    t0 = time.perf_counter()
    manifest = deploy(model, test_x[:2], mixed_precision(model), out, target="cpu", batches=BATCHES)
    result.layers = manifest["layers"]
    ours = load(out)
    generic = DeployedModel(out / LIBRARY, manifest, {})  # the same loader, model.so at every batch
    print(f"  deployed {spec.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    calib = train_x[:CALIBRATION_SAMPLES].numpy()
    ort_int8_model(out / FLOAT_ONNX, out / "ort.int8.onnx", calib, ort_act)
    sessions = {
        ORT_FP32: ort_session(out / FLOAT_ONNX),
        "ORT our QDQ": ort_session(out / QDQ),
        ORT_INT8: ort_session(out / "ort.int8.onnx"),
        ORT_FP32_1T: ort_session(out / FLOAT_ONNX, threads=1),
    }

    def ort_call(sess: ort.InferenceSession, x: np.ndarray) -> Callable[[], np.ndarray]:
        name = sess.get_inputs()[0].name
        return lambda: sess.run(None, {name: x})[0]

    def torch_call(x: np.ndarray) -> Callable[[], np.ndarray]:
        xt = torch.from_numpy(x)

        def run() -> np.ndarray:
            with torch.no_grad():
                return model(xt).numpy()

        return run

    last_step = 2.0 ** -result.layers[-1]["fl"]
    for batch in BATCHES:
        idx = np.arange(batch) % len(test_x)
        x = np.ascontiguousarray(test_x[idx].numpy(), dtype=np.float32)
        calls: dict[str, Callable[[], np.ndarray]] = {
            OURS: lambda x=x: ours(x),
            OURS_GENERIC: lambda x=x: generic(x),
        }
        calls.update({name: ort_call(s, x) for name, s in sessions.items()})
        calls["torch fp32"] = torch_call(x)
        calls = {name: calls[name] for name in ENGINES}
        outputs = {}
        for name in ENGINES:
            if name not in (OURS, OURS_GENERIC):
                restore_affinity()
            outputs[name] = calls[name]()
        result.pinned |= restore_affinity()
        ref = outputs["torch fp32"]
        result.ours_vs_qdq = max(
            result.ours_vs_qdq, float(np.abs(outputs[OURS] - outputs["ORT our QDQ"]).max()) / last_step
        )
        rounds: list[dict[str, Timing]] = []
        for r in range(n_rounds):  # every engine once per round: drifts in machine speed hit all
            rounds.append({})
            # the order turns by one each round: a round's first engine measured slower (model.so
            # timed first: LeNet-5 b1 0.101 ms against 0.055 in second place), so no engine is
            # always first
            for name in ENGINES[r % len(ENGINES) :] + ENGINES[: r % len(ENGINES)]:
                if name not in (OURS, OURS_GENERIC):
                    result.pinned |= restore_affinity()
                rounds[-1][name] = median_time(calls[name], repeat, CASE_BUDGET_S / n_rounds)
        result.rounds[batch] = [{name: t.median_s for name, t in r.items()} for r in rounds]
        timed = {name: merged([r[name] for r in rounds]) for name in ENGINES}
        for name in ENGINES:
            err = float(np.linalg.norm(outputs[name] - ref) / max(np.linalg.norm(ref), 1e-30))
            print(
                f"  {spec.name:9s} b={batch:<3d} {name:17s} {timed[name].median_s * 1e3:10.3f} ms "
                f"(x{timed[name].repeats}, {_threads(timed[name])} thr)  rel.err vs torch {err:.1e}",
                file=sys.stderr,
                flush=True,
            )
            result.rows.append(Row(spec.name, batch, name, timed[name], err))
        for row in result.rows[-len(ENGINES) :]:
            row.per_round_fp32, row.per_round_int8 = (
                [r[row.engine] / r[ref] for r in result.rounds[batch]] for ref in (ORT_FP32, ORT_INT8)
            )
        result.breakdown[batch] = tvm_breakdown(out, manifest, batch, x)
        result.pinned |= restore_affinity()
    return result


class LoadMeter:
    """Share of the machine's CPU time that other processes used since it was started."""

    def __init__(self) -> None:
        self.wall0, self.busy0, self.own0 = time.perf_counter(), busy_cpu_s(), time.process_time()

    def other_share(self) -> float | None:
        busy = busy_cpu_s()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.wall0
        other = (busy - self.busy0) - (time.process_time() - self.own0)
        return max(0.0, other) / (wall * (os.cpu_count() or 1))


def wait_for_quiet(max_wait_s: float, window_s: float = 2.0) -> float | None:
    """Wait (at most ``max_wait_s``) until other processes use at most QUIET of the CPUs; last share."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        meter = LoadMeter()
        time.sleep(window_s)
        share = meter.other_share()
        if share is None or share <= QUIET or time.perf_counter() >= deadline:
            return share
        print(f"# waiting for a quieter machine: others use {100 * share:.0f}% of the CPUs", file=sys.stderr)


def markdown_table(rows: list[Row]) -> str:
    """Model, batch, engine, median ms, ratios vs ORT fp32 and ORT int8, error vs torch."""
    lines = [
        "| model | batch | engine | median ms | vs ORT fp32 | vs ORT int8 | rel. err vs torch |",
        "|---|--:|---|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.batch} | {r.engine} | {_ms(r.ms)} | {r.vs_fp32:.2f}x "
            f"| {r.vs_int8:.2f}x | {r.rel_err:.1e} |"
        )
    return "\n".join(lines)


def _ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def acceptance(results: list[ModelResult]) -> list[str]:
    """One line per (model, batch): ours vs the issue-5 target, met or not and by how much."""
    lines = []
    for res in results:
        for r in (r for r in res.rows if r.engine == OURS):
            vs_fp32, vs_int8 = r.vs_fp32, r.vs_int8
            ok = vs_fp32 <= TARGET_VS_FP32 and vs_int8 <= 1.0
            over = max(vs_fp32 / TARGET_VS_FP32, vs_int8)
            verdict = "met" if ok else f"**not met**: {over:.2f}x the time allowed"
            per_fp32, per_int8 = r.per_round_fp32, r.per_round_int8
            met = sum(a <= TARGET_VS_FP32 and b <= 1.0 for a, b in zip(per_fp32, per_int8, strict=True))
            lines.append(
                f"  - {r.model} batch {r.batch}: {_ms(r.ms)} ms = {vs_fp32:.2f}x ORT fp32 "
                f"(target <= {TARGET_VS_FP32}x), {vs_int8:.2f}x ORT int8 (target <= 1x): {verdict}; "
                f"per round {_span(per_fp32)}x ORT fp32, {_span(per_int8)}x ORT int8, "
                f"met in {met} of {len(per_fp32)}"
            )
    return lines


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def breakdown_lines(results: list[ModelResult]) -> list[str]:
    """Where the TVM module's time goes, per model and batch (one instrumented call)."""
    lines = []
    for res in results:
        for batch, spent in res.breakdown.items():
            parts = sorted(((k, v) for k, v in spent.items() if k != "total"), key=lambda kv: -kv[1])
            covered = sum(v for _, v in parts)
            median = next(r.ms for r in res.rows if r.engine == OURS and r.batch == batch)
            text = ", ".join(f"{k} {_ms(v * 1e3)} ms ({100 * v / covered:.0f}%)" for k, v in parts)
            lines.append(
                f"  - {res.spec.name} batch {batch} (timed median {_ms(median)} ms; instrumented call "
                f"{_ms(spent['total'] * 1e3)} ms, of which callbacks {_ms((spent['total'] - covered) * 1e3)} "
                f"ms): {text}"
            )
    return lines


def _threads(t: Timing) -> str:
    return "n/a" if np.isnan(t.threads) else f"{t.threads:.1f}"


def precision_text(res: ModelResult) -> str:
    """Deployed per-layer precisions, compacted: ``int8 (8,4) x2, int16 (12,6) x3``."""
    counts: dict[str, int] = defaultdict(int)
    for lay in res.layers:
        counts[f"{lay['kernel_class']} ({lay['wl']},{lay['fl']})"] += 1
    return ", ".join(f"{k} x{n}" for k, n in counts.items())


def kernel_note() -> str:
    """Which instructions the host's integer layers run on (the tables differ most by this)."""
    from marvin_compile.dot_isa import dot_isa
    from marvin_compile.target import resolve_target

    isa = dot_isa(resolve_target("cpu"))
    if isa is not None and isa.amx:
        return (
            "On this AMX host every ResNet-20 conv runs on the tiles (16384 MACs per instruction): int8 "
            "as one byte product (a 3-channel int8 conv over its kernel windows), int16 as two where the "
            "folded weight levels fit a byte, else four; so do LeNet-5's int8 layers, while its int16 "
            "layers (the 6-channel conv, a Linear layer) keep the packed vpdpwssd kernel (32 MACs per "
            "instruction). ORT int8 runs every layer in int8; see the kernels section for per-layer "
            "throughput."
        )
    if isa is not None and isa.name == "avx2":
        return (
            "On this AVX2 host every layer runs the packed kernel. int16 layers run on vpmaddwd (int16 "
            "pairs into int32: 16 MACs per instruction, plus a vpaddd), except where the deployed weight "
            "levels fit a byte and the input's levels (known from the producing layers) fit unsigned bytes: "
            "those join the int8 layers' byte chain, multiplying levels from a coarser grid as they are "
            "(ResNet-20: 5 of its 11 int16 layers, fed an int8 layer's levels, up to 254). "
            "int8 layers run on vpmaddubsw "
            "(unsigned x signed bytes, 32 MACs), summed in int16 by a vpaddw where the deployed weights "
            "keep every int16 lane's sum in range (checked per layer when deploying; the kernel adds "
            "each lane's two halves once, at the end): the ReLU-fed ones (levels in [0, 127]), and one "
            "whose input may be negative packed as x + 128 (LeNet-5's conv1); else a ReLU-fed layer "
            "widens its pair sums by vpmaddwd by ones and a vpaddd (where no pair sum can saturate), "
            "and a signed one (ResNet-20's stem, "
            "whose weights would take a lane past int16) runs widened to int16 on vpmaddwd. "
            "ORT int8 runs every layer on vpmaddubsw (uint8 activations x int8 weights, its pair sums "
            "saturating); see the kernels section for per-layer throughput."
        )
    return "ORT int8 runs every layer in int8; see the kernels section for per-layer throughput."


def section(
    results: list[ModelResult],
    command: str,
    elapsed_s: float,
    other_load: float | None,
    loadavg: tuple[float, float, float],
    ort_threads: int,
    ort_act: str,
) -> str:
    """The BENCHMARKS.md section (markers included)."""
    rows = [r for res in results for r in res.rows]
    load = "unknown" if other_load is None else f"{100 * other_load:.0f}% of all CPUs"
    threads = defaultdict(list)
    for r in rows:
        if not np.isnan(r.timing.threads):
            threads[r.engine].append(r.timing.threads)
    busy = ", ".join(f"{e} {min(v):.1f}-{max(v):.1f}" for e, v in threads.items()) or "n/a"
    pinned = any(res.pinned for res in results)
    n_rounds = max(len(r) for res in results for r in res.rounds.values())
    return "\n".join(
        [
            BEGIN,
            "## Inference: deployed TVM module vs ONNX Runtime and PyTorch",
            "",
            f"- Machine: {machine()}",
            f"- Date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"- Command: `{command}` (ran {elapsed_s:.0f} s; load average at start "
            f"{loadavg[0]:.2f}/{loadavg[1]:.2f}/{loadavg[2]:.2f}; other processes' load meanwhile: {load})",
            f"- Versions: TVM {tvm.__version__}, onnxruntime {ort.__version__} (CPUExecutionProvider, "
            f"default options: {ort_threads} intra-op threads incl. the caller), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), numpy {np.__version__}",
            "- Models: seed-0 init, untrained (latency only); ResNet-20 batch norms with weight ~ "
            f"U(0.5, 1.5), bias ~ N(0, 0.1), running statistics of {BN_STAT_SAMPLES} digits training "
            "samples. "
            "Precisions alternate (8,4) / (12,6) over the Conv/Linear layers; deploy folds BN and re-derives "
            "fl, giving: " + "; ".join(f"{res.spec.name}: {precision_text(res)}" for res in results) + ".",
            "- Engines: ours = `deploy.load(DIR)` called on numpy (AMX tile kernels where the host has "
            "them, requantizing inside the kernel, int16 convs whose weight levels fit a byte as two byte "
            "products; else packed dot-product kernels with the default register tiles; no tuning "
            "database; each layer's ReLU / residual add fused into its unpacking, and on AMX the next "
            "layer's packing too where the output feeds only that layer; on the packed kernels layers "
            "hand each other int16 levels, ReLU / add / max pool between them run on the levels; "
            "deployed with `batches=(1, 64)`, so "
            "batch 1 and 64 run `model_b1.so` and `model_b64.so`, the libraries with the batch bound to "
            "that size (static shapes: no shape bookkeeping, memory planned once); `main` compiled to "
            'machine code (Relax `exec_mode="compiled"`), input and output passed by DLPack; '
            f"`{OURS_GENERIC}` is the library for any batch size, timed alongside; "
            f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'unset')}); "
            "ORT fp32 = `model.float.onnx` (BN folded); ORT our QDQ = "
            "`model.qdq.onnx`; ORT int8 = `quantize_static` of the float model after `quant_pre_process` "
            "(QDQ, int8 weights, "
            f"{ort_act} activations, MinMax, the first {CALIBRATION_SAMPLES} digits training samples); "
            "torch fp32 = "
            "the original (unfolded) model in eager mode, `no_grad`.",
            "- Inputs: digits test images (32x32, repeated to fill batch 64). Timed in "
            f"{n_rounds} rounds, each engine once per round, the order turned by one engine each round "
            "(median of timed calls after 2-3 warm-up "
            f"calls, repeats chosen so a case times ~{CASE_BUDGET_S:.0f} s over all rounds, at least 3 "
            "a round); the table gives the median of the round medians. Ratios pair the engines within a "
            "round, timed seconds apart: the median over rounds of each round's ratio, so a slow spell "
            "of the shared host that hits some rounds moves neither (lower = faster). "
            "rel. err = ||y - y_torch|| / ||y_torch|| on the timed batch; for ours "
            "and our QDQ it is not an accuracy result (untrained weights, and one fl per layer shared by "
            "weights and activations, so activations clip at +-2**(wl-fl-1)); the tests check accuracy.",
            f"- Busy threads while timing (CPU s / wall s, cases timed >= {MIN_THREAD_WALL_S} s): {busy}. "
            f"`{ORT_FP32_1T}` (intra_op_num_threads=1) is a reference for the single-threaded TVM module, "
            "not part of the target.",
            "- CPU affinity: TVM's runtime can pin the calling thread to CPU 0 on first use; the script "
            "saves the affinity at start and restores it before creating ORT sessions and before timing "
            "every non-TVM engine"
            + (" (it was narrowed during this run)." if pinned else " (it was not narrowed in this run)."),
            "- Ours vs ORT on our QDQ model: max output difference "
            f"{max(r.ours_vs_qdq for r in results):.1f} steps of the last layer (same numerics; ties "
            "round differently).",
            *(
                [
                    f"- **Warning: other processes used {load} during the run; multi-threaded (ORT, torch) "
                    "times are unreliable and slower than on a quiet machine (torch's OpenMP threads suffer "
                    "most: every parallel region waits for a descheduled thread).**"
                ]
                if other_load is not None and other_load > BUSY
                else []
            ),
            "",
            markdown_table(rows),
            "",
            "Acceptance target of issue 5 (deployed TVM at most 0.6x ORT float32 latency and no slower than "
            "ORT int8, batch 1 and 64):",
            *acceptance(results),
            "",
            "Where the TVM module's time goes (one instrumented call of the same model built with `main` as "
            "VM bytecode, since the deployed libraries compile `main` to machine code, which has no per-call "
            "hooks; ms per kernel kind and share of the "
            "kernels' sum; packed conv/dense = a layer's whole packed kernel: input quantize (or the fed "
            "levels' shift), dot product, requantize and the fused ReLU / residual add; on AMX a layer "
            "is three calls: AMX packing/"
            "unpacking = input quantize + packing before the tiles, unpacking + requantize + fused ReLU / "
            "residual add after them, AMX tile products = the tile loop; VM/shapes = allocation and shape "
            "bookkeeping; "
            "at batch 1 "
            "the many small VM calls are inflated by the callbacks' timer overhead):",
            *breakdown_lines(results),
            "",
            "Half of ResNet-20's layers (two of LeNet-5's five) are int16 (12,6). " + kernel_note(),
            END,
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="lenet5,resnet20", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--repeat", type=int, default=30, help="max timed repeats per case (fewer for slow cases)")
    p.add_argument("--quick", action="store_true", help="LeNet-5 only, at most 5 repeats (smoke test)")
    p.add_argument("--rounds", type=int, default=10, help="rounds of all engines per case (machine drift)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="first wait up to S seconds for other processes to go quiet")  # fmt: skip
    p.add_argument(
        "--ort-activations",
        choices=("uint8", "int8"),
        default="uint8",
        help="activation type of ORT's int8 quantization (uint8 = U8S8, ORT's x86 recommendation)",
    )
    p.add_argument("--write-md", action="store_true", help="rewrite the inference section of BENCHMARKS.md")
    p.add_argument("--md", type=Path, default=REPO / "BENCHMARKS.md", help="markdown file for --write-md")
    args = p.parse_args(argv)
    args.models = ["lenet5"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"unknown models {unknown}; accepted: {', '.join(MODELS)}")
    if args.repeat < 1 or args.rounds < 1:
        p.error("--repeat and --rounds must be >= 1")
    if args.quick:
        args.repeat = min(args.repeat, 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.wait_idle > 0:
        wait_for_quiet(args.wait_idle)
    start, meter, loadavg = time.perf_counter(), LoadMeter(), os.getloadavg()
    ort_threads = ort_intra_threads()
    print(
        f"# {machine()}; load average {loadavg[0]:.2f} {loadavg[1]:.2f} {loadavg[2]:.2f}; "
        f"affinity {sorted(START_AFFINITY or [])}\n# TVM {tvm.__version__}; onnxruntime {ort.__version__} "
        f"intra-op threads (default) {ort_threads}; torch {torch.__version__} "
        f"threads {torch.get_num_threads()}",
        file=sys.stderr,
        flush=True,
    )
    results: list[ModelResult] = []
    with tempfile.TemporaryDirectory(prefix="marvin-inference-") as workdir:
        for key in args.models:
            spec = MODELS[key]
            train, test, _ = load_dataset("digits", None, 32, spec.in_channels)
            data = (train.tensors[0], test.tensors[0])
            results.append(
                bench_model(spec, data, args.repeat, Path(workdir), args.ort_activations, args.rounds)
            )
    elapsed, other_load = time.perf_counter() - start, meter.other_share()
    print(f"\nORT intra-op threads: {ort_threads} (default); torch threads: {torch.get_num_threads()}\n")
    print(markdown_table([r for res in results for r in res.rows]))
    print("\nacceptance (issue 5):")
    print("\n".join(acceptance(results)))
    print("TVM time breakdown:")
    print("\n".join(breakdown_lines(results)))
    print(f"\ntotal run time: {elapsed:.1f} s; load average at start {loadavg[0]:.2f}", flush=True)
    if other_load is not None:
        print(f"other processes' load during the run: {100 * other_load:.0f}% of all CPUs")
        if other_load > BUSY:
            print("WARNING: the machine was busy; ORT and torch times are unreliable", file=sys.stderr)
    if args.write_md:
        write_section(
            args.md,
            "inference",
            section(results, command_line(), elapsed, other_load, loadavg, ort_threads, args.ort_activations),
        )
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
