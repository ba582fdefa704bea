"""Per-device autotuning of the packed dot-product kernels with TVM's meta_schedule.

A task is one packed kernel (``te_dot``) of one (layer, kernel class); layers with the same shapes
share it. The design space is ``schedule_dot(tune=True)``: the register tile (output-channel
blocks x output columns; for a pixel-lane conv, channels x rows x row vectors) over static loops
only. A build looks the tile up by the kernel's dot block (``dot_signature``), so the tile
measured at the tuning batch applies to the symbolic-batch kernels of the variants and the
training driver, and to deployed kernels (packed constant weight, ReLU / residual add fused in)
whose dot block is the same.
The untuned default schedule is measured first, so the database's best is never a schedule slower
than the default on this device.

A database directory holds:

- ``database_workload.json``, ``database_tuning_record.json``: a meta_schedule ``JSONDatabase``
  whose workloads are the symbolic-batch kernels, with the best trace measured for each;
- ``work/<task>/``: meta_schedule's own database of every measured candidate of one task, so an
  interrupted tune resumes where it stopped instead of measuring again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.ir.utils import derived_object
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

from marvin_compile.dot_isa import dot_isa
from marvin_compile.frontend import import_onnx, load_onnx
from marvin_compile.kernel_classes import CLASS_BY_NAME
from marvin_compile.passes import pipeline
from marvin_compile.passes.schedule_dot import dot_signature, has_dot_block, schedule_dot, schedule_dot_func
from marvin_compile.report import atomic_write_json
from marvin_compile.target import target_key
from marvin_compile.tvmscript import install_fast_parsing, load_tensor_intrinsics

META = "tuning.json"  # the batch the database's kernels were timed at
BUILD_TIMEOUT_S = 200.0  # meta_schedule's 30 s default fails every candidate on 2 busy cores
RUN_TIMEOUT_S = 60.0
TUNED_CLASSES = ("int8", "int16")


class TuningError(ValueError):
    """A tuning database or request that cannot be used, with what is accepted instead."""


def default_db_dir(target: tvm.target.Target) -> Path:
    """``<variant cache>/tuning/<target hash>``: one database per device description."""
    from marvin_compile.runtime.variant_store import default_cache_dir

    digest = hashlib.sha256(target_key(target).encode()).hexdigest()[:16]
    return default_cache_dir() / "tuning" / digest


def _workload(func: tirx.PrimFunc) -> tvm.IRModule:
    """The database key of a kernel: the PrimFunc without attributes (the build adds some, such as
    its symbol name and fusion pattern, that do not change the computation)."""
    for key in list(func.attrs.keys()) if func.attrs is not None else []:
        func = func.without_attr(key)
    return tvm.IRModule({"main": func})


class TuningDatabase:
    """The best measured schedule of each packed kernel on one device, on disk."""

    def __init__(self, path: str | os.PathLike, target: tvm.target.Target, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not (self.path / "database_tuning_record.json").is_file():
            raise TuningError(
                f"no tuning database at {self.path}: expected database_tuning_record.json there; "
                "create one with `marvin-compile tune MODEL.onnx --db DIR`"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self.target = target
        self._db = ms.database.JSONDatabase(work_dir=str(self.path), module_equality="structural")
        self._tile_table: dict[str, tuple[tuple[int, ...] | None]] | None = None

    @property
    def digest(self) -> str:
        """Content hash of the records: part of variant cache keys, so retuning rebuilds."""
        data = (self.path / "database_tuning_record.json").read_bytes()
        return hashlib.sha256(data).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self._db)

    def tiles_for(self, func: tirx.PrimFunc) -> tuple[tuple[int, ...] | None] | None:
        """``(tile,)`` of the fastest record for ``func``'s dot block (tile None: the default
        schedule won), or None when the database has no record for it."""
        if self._tile_table is None:
            self._tile_table = self._best_tiles()
        return self._tile_table.get(dot_signature(func))

    def _best_tiles(self) -> dict[str, tuple[tuple[int, ...] | None]]:
        best: dict[str, tuple[float, tuple[int, ...] | None]] = {}
        for record in self._db.get_all_tuning_records():
            secs = _mean_secs(record.run_secs)
            key = dot_signature(record.workload.mod["main"])
            if secs is not None and (key not in best or secs < best[key][0]):
                best[key] = (secs, _tile_of(record.trace))
        return {key: (tile,) for key, (_, tile) in best.items()}

    def schedule(self, func: tirx.PrimFunc) -> tirx.PrimFunc | None:
        """``func`` scheduled with its tuned register tile (None when the database has none)."""
        found = self.tiles_for(func)
        if found is None:
            return None
        try:
            return schedule_dot_func(func, self.target, tiles=found[0])
        except Exception as exc:  # noqa: BLE001 - a record that does not fit must not stop a build
            msg = f"tuning record in {self.path} does not apply ({exc}); using the default schedule"
            warnings.warn(msg, stacklevel=2)
            return None

    def commit(self, func: tirx.PrimFunc, record: ms.database.TuningRecord) -> None:
        workload = self._db.commit_workload(_workload(func))
        self._tile_table = None
        self._db.commit_tuning_record(
            ms.database.TuningRecord(record.trace, workload, record.run_secs, self.target, record.args_info)
        )


def _tile_of(trace: tirx.Trace) -> tuple[int, ...] | None:
    """The register tile a ``schedule_dot(tune=True)`` trace sampled ((ob_block, w_block), or a
    pixel-lane kernel's (o_block, h_block, v_block)); None for the default."""
    values = tuple(
        int(inst.attrs[0][int(trace.decisions[inst])])
        for inst in trace.insts
        if inst.kind.name == "SampleCategorical"
    )
    return values or None


def open_database(db: str | os.PathLike | None, target: tvm.target.Target) -> TuningDatabase | None:
    """``db`` when given (it must exist), else the target's default database if one was tuned."""
    if db is not None:
        return TuningDatabase(db, target)
    default = default_db_dir(target)
    if (default / "database_tuning_record.json").is_file():
        return TuningDatabase(default, target)
    return None


@dataclass
class Task:
    """One packed kernel to tune: its symbolic form (the key) and a batch-specialized twin (measured)."""

    key: str
    symbolic: tirx.PrimFunc
    static: tirx.PrimFunc
    users: list[str] = field(default_factory=list)


def _dot_kernel(mod: tvm.IRModule) -> tirx.PrimFunc | None:
    kernels = [f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc) and has_dot_block(f)]
    return kernels[0] if kernels else None


def _bind_batch(func: relax.Function, batch: int) -> relax.Function:
    """The layer with its symbolic batch fixed (the leading dimension of the input)."""
    n = func.params[0].ty.shape[0]
    if isinstance(n, tirx.IntImm):
        return func
    mod = relax.transform.BindSymbolicVars({n: batch})(tvm.IRModule({"layer": func}))
    return mod["layer"]


def kernel_tasks(
    model_path: str | os.PathLike,
    target: tvm.target.Target,
    batch: int,
    classes: Iterable[str] = TUNED_CLASSES,
) -> list[Task]:
    """Every distinct packed kernel of the model's layers for ``classes``, in layer order."""
    if dot_isa(target) is None:
        raise TuningError(
            f"target {target.kind.name} {target.attrs.get('mcpu', '')} has no packed integer kernels "
            "to tune; accepted: an x86 llvm target with AVX2, AVX-512 or AVX-512 VNNI (e.g. --target cpu)"
        )
    unknown = sorted(set(classes) - set(TUNED_CLASSES))
    if unknown:
        raise TuningError(f"cannot tune kernel classes {unknown}; accepted: {', '.join(TUNED_CLASSES)}")
    mod = pipeline.partition(import_onnx(load_onnx(model_path)).mod)
    tasks: dict[str, Task] = {}
    for _, func in pipeline.layer_functions(mod):
        for name in classes:
            cls = CLASS_BY_NAME[name]
            symbolic = _dot_kernel(pipeline.variant_module(func, cls, "nearest", target))
            if symbolic is None:
                continue  # not a packed kernel (grouped conv, ...), or AMX tiles: written scheduled
            static = _dot_kernel(pipeline.variant_module(_bind_batch(func, batch), cls, "nearest", target))
            key = f"{tvm_ffi.structural_hash(_workload(symbolic)) & (2**64 - 1):016x}"
            task = tasks.setdefault(key, Task(key, symbolic, static))
            task.users.append(f"{func.attrs['marvin.layer']}/{name}")
    return list(tasks.values())


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Reports trials done and the best time so far after each measured batch."""

    def __init__(self, report: Callable[[int, float | None], None]) -> None:
        super().__init__()
        self.report = report
        self.done = 0
        self.best: float | None = None

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        for result in runner_results:
            self.done += 1
            secs = _mean_secs(result.run_secs) if result.error_msg is None else None
            if secs is not None:
                self.best = secs if self.best is None else min(self.best, secs)
        self.report(self.done, self.best)


def _measure(
    task: Task,
    target: tvm.target.Target,
    work: Path,
    trials: int,
    tune: bool,
    report: Callable[[int, float | None], None],
) -> None:
    isa = dot_isa(target)

    def space(sch: Schedule) -> None:
        schedule_dot(sch, isa, tune=tune)

    # meta_schedule's console handler takes the level its logger has when tuning starts (and the
    # logger is reset to DEBUG after): at WARNING, its task tables go to work/<task>/logs only.
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    ms.tune_tir(
        tvm.IRModule({"main": task.static}),
        target,
        work_dir=str(work),
        max_trials_global=trials,
        num_trials_per_iter=min(trials, 8),
        space=ms.space_generator.ScheduleFn(space, sch_rules=[], postprocs=[], mutator_probs={}),
        strategy="replay-trace",
        builder=ms.builder.LocalBuilder(
            timeout_sec=BUILD_TIMEOUT_S, max_workers=1, initializer=install_fast_parsing
        ),
        runner=ms.runner.LocalRunner(
            timeout_sec=RUN_TIMEOUT_S,
            initializer=install_fast_parsing,
            evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=20),
        ),
        database=ms.database.JSONDatabase(work_dir=str(work)),
        cost_model="random",
        measure_callbacks=[
            ms.measure_callback.AddToDatabase(),
            ms.measure_callback.RemoveBuildArtifact(),
            _Progress(report),
        ],
    )


def _mean_secs(run_secs) -> float | None:
    """Mean of a measurement's run times; None for no or failed runs."""
    secs = [float(s) for s in run_secs or []]
    return sum(secs) / len(secs) if secs and all(s < 1e9 for s in secs) else None  # 1e10: failed run


def _fastest(records: list[ms.database.TuningRecord]) -> ms.database.TuningRecord | None:
    timed = [(t, r) for r in records if (t := _mean_secs(r.run_secs)) is not None]
    return min(timed, key=lambda p: p[0])[1] if timed else None


def _check_batch(path: Path, batch: int) -> None:
    """One database, one tuning batch: times measured at other batches are not comparable."""
    meta = path / META
    if meta.is_file():
        tuned_at = json.loads(meta.read_text())["batch"]
        if tuned_at != batch:
            raise TuningError(
                f"the tuning database {path} was tuned at batch {tuned_at}, not {batch}; "
                f"accepted: --batch {tuned_at}, or another --db for batch {batch}"
            )
    else:
        atomic_write_json(meta, {"batch": batch})


def _reporter(
    log: Callable[[str], None], label: str, base: int, trials: int
) -> Callable[[int, float | None], None]:
    """Progress lines: trials done of the task's budget, and the best time measured this session."""

    def report(n: int, fastest_s: float | None) -> None:
        best = "-" if fastest_s is None else f"{fastest_s * 1e3:.3f} ms"
        log(f"{label}: trials {min(base + n, trials)}/{trials}, best this session {best}")

    return report


def tune(
    model_path: str | os.PathLike,
    target: tvm.target.Target,
    trials: int,
    db_dir: str | os.PathLike | None = None,
    batch: int = 128,
    classes: Iterable[str] = TUNED_CLASSES,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Tune every packed kernel of a model; returns a summary per task. Resumable.

    Progress lines go to ``log`` (default: stderr)."""
    log = log or functools.partial(print, file=sys.stderr, flush=True)
    if trials < 1:
        raise TuningError(f"--trials must be at least 1, got {trials}")
    if batch < 1:
        raise TuningError(f"--batch must be at least 1, got {batch}")
    tasks = kernel_tasks(model_path, target, batch, classes)  # validates target and classes first
    db = TuningDatabase(db_dir if db_dir is not None else default_db_dir(target), target, create=True)
    _check_batch(db.path, batch)
    load_tensor_intrinsics()
    summary = {}
    for i, task in enumerate(tasks, 1):
        work = db.path / "work" / task.key
        work.mkdir(parents=True, exist_ok=True)
        measured = ms.database.JSONDatabase(work_dir=str(work))
        done = len(measured)
        label = f"[{i}/{len(tasks)}] {task.key} ({', '.join(task.users)})"

        if done == 0:  # the default schedule first: the database's best is never slower
            _measure(task, target, work, 1, tune=False, report=_reporter(log, label, 0, trials))
            done = len(measured := ms.database.JSONDatabase(work_dir=str(work)))
        if done < trials:
            _measure(task, target, work, trials - done, tune=True, report=_reporter(log, label, done, trials))
            measured = ms.database.JSONDatabase(work_dir=str(work))
        best = _fastest(measured.get_all_tuning_records())
        if best is None:
            log(f"{label}: no candidate ran; kept the default schedule")
            continue
        db.commit(task.symbolic, best)
        summary[task.key] = {
            "users": task.users,
            "trials": len(measured),
            "best_ms": 1e3 * _mean_secs(best.run_secs),
        }
        log(f"{label}: best {summary[task.key]['best_ms']:.3f} ms after {len(measured)} trials")
    return {"db": str(db.path), "batch": batch, "tasks": summary}
