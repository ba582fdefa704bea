"""``marvin-compile``: compile, run, train, tune and deploy from the shell.

Every user error ends in one line ``marvin-compile: error: ...`` and exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from marvin_compile.fixed_point import ROUNDINGS, Precision, PrecisionError
from marvin_compile.frontend import ModelError
from marvin_compile.safety import MANIFEST
from marvin_compile.target import TargetError

USER_ERRORS = (
    ModelError,
    PrecisionError,
    TargetError,
    FileNotFoundError,
    PermissionError,
    ValueError,
    KeyError,
)


def _word_lengths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        msg = f"expected comma-separated integers like 4,8,12,16, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _cmd_compile(args: argparse.Namespace) -> int:
    from marvin_compile.compiler import compile_model

    manifest = compile_model(
        args.model, args.out, args.target, args.word_lengths, tuple(args.rounding), args.cache_dir, args.db
    )
    print(
        f"compiled {len(manifest['layers'])} layers for classes {', '.join(manifest['kernel_classes'])} "
        f"-> {Path(args.out) / 'manifest.json'}"
    )
    return 0


def _is_deployed(model_dir: str) -> bool:
    manifest = Path(model_dir) / MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()).get("kind") == "deployed"


def _cmd_run(args: argparse.Namespace) -> int:
    from marvin_compile.compiler import load_compiled, parse_precision_file

    deployed = _is_deployed(args.model_dir)
    if deployed and (args.wl is not None or args.fl is not None or args.precision is not None):
        raise PrecisionError("a deployed model runs at its deployed precisions; drop --wl/--fl/--precision")
    if not deployed and (
        (args.wl is None) != (args.fl is None) or (args.wl is None) == (args.precision is None)
    ):
        raise PrecisionError("give either --wl N --fl M (uniform precision) or --precision P.json, not both")
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"input file not found: {args.input} (expected a .npy array, batch first)")
    x = np.load(args.input, allow_pickle=False)
    if deployed:
        from marvin_compile import load

        y = load(args.model_dir)(x)
    else:
        model = load_compiled(args.model_dir)
        config = (
            Precision(args.wl, args.fl)
            if args.precision is None
            else parse_precision_file(args.precision, model.layer_names)
        )
        model.set_precision(config, args.rounding, args.seed)
        y = model(x)
    buf = io.BytesIO()
    np.save(buf, y)
    from marvin_compile.report import atomic_write_bytes

    atomic_write_bytes(args.output, buf.getvalue())
    print(f"wrote {args.output} {tuple(y.shape)}")
    return 0


# `train` flags named like their TrainConfig fields; None means "not given" (the config's default).
_TRAIN_FIELDS = (
    "model",
    "dataset",
    "epochs",
    "batch_size",
    "target",
    "backward",
    "seed",
    "lr",
    "data_root",
    "cache_dir",
    "tuning_db",
)


def _cmd_train(args: argparse.Namespace) -> int:
    from marvin_compile.runtime.driver import TrainConfig, load_config, summary, train

    given = {name: getattr(args, name) for name in _TRAIN_FIELDS if getattr(args, name) is not None}
    if args.resume is not None:
        run_dir = args.resume or args.out
        if run_dir is None or (args.out is not None and args.resume and args.out != args.resume):
            raise ValueError("--resume needs the run folder: --resume RUN, or --out RUN --resume")
        extra = [f"--{name.replace('_', '-')}" for name in given if name not in ("cache_dir", "tuning_db")]
        if extra:
            raise ValueError(f"--resume continues RUN with its saved config; drop {', '.join(extra)}")
        config = load_config(run_dir)
        config.baseline = config.baseline or args.baseline
        config.cache_dir = given.get("cache_dir", config.cache_dir)
        config.tuning_db = given.get("tuning_db", config.tuning_db)
        metrics = train(config, resume=True)
    else:
        if args.out is None or "model" not in given or "dataset" not in given:
            raise ValueError("train needs --model, --dataset and --out (or --resume RUN to continue a run)")
        config = TrainConfig(out=args.out, baseline=args.baseline, **given)
        metrics = train(config)
    print(summary(metrics, config.out))
    return 0


def _batch_list(text: str) -> list[int]:
    if text.strip().lower() == "none":
        return []
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        accepted = "positive integers separated by commas, or none"
        raise argparse.ArgumentTypeError(f"{text!r}: accepted: {accepted}")
    return sizes


def _cmd_deploy(args: argparse.Namespace) -> int:
    from marvin_compile.runtime.deploy import LIBRARY, QDQ, deploy_run

    manifest = deploy_run(args.run, args.out, args.target, args.db, batches=args.batches)
    size = manifest["size"]
    files = ", ".join([LIBRARY, *manifest["batch_libraries"].values(), QDQ])
    print(
        f"deployed {len(manifest['layers'])} layers to {args.out}: {files} "
        f"({size['qdq_onnx_bytes']} bytes, {size['qdq_vs_float32']:.2f}x the float32 ONNX)"
    )
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from marvin_compile.target import resolve_target
    from marvin_compile.tuning import tune

    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    try:
        result = tune(args.model, resolve_target(args.target), args.trials, args.db, args.batch, classes)
    except KeyboardInterrupt:
        print(
            "marvin-compile: tuning interrupted; measured candidates are kept, rerun to resume",
            file=sys.stderr,
        )
        return 130
    print(f"tuned {len(result['tasks'])} kernels at batch {result['batch']} -> {result['db']}")
    return 0


DB_HELP = "tuning database from `marvin-compile tune` (default: the target's own database, if tuned)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="marvin-compile", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile an ONNX model into per-layer fixed-point variants")
    c.add_argument("model", help="MODEL.onnx")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--target", default="cpu", help="cpu, cuda, or a TVM JSON-dict target")
    c.add_argument(
        "--word-lengths",
        type=_word_lengths,
        default=(4, 8, 12, 16),
        help="word lengths to serve (default 4,8,12,16); each maps to a kernel class",
    )
    c.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        action="append",
        default=None,
        help="rounding modes to precompile (repeatable; default nearest)",
    )
    c.add_argument("--cache-dir", default=None, help="variant cache (default ~/.cache/marvin-compile)")
    c.add_argument("--db", default=None, help=DB_HELP)
    c.set_defaults(func=_cmd_compile)

    r = sub.add_parser("run", help="run a compiled model at a uniform or per-layer precision")
    r.add_argument("model_dir", help="directory written by `marvin-compile compile`")
    r.add_argument("--input", required=True, help="X.npy")
    r.add_argument("--output", required=True, help="Y.npy")
    r.add_argument("--wl", type=int, help="uniform word length (2..32)")
    r.add_argument("--fl", type=int, help="uniform fractional length (0..wl-1)")
    r.add_argument("--precision", help='P.json: {"layer": {"wl": .., "fl": ..}, ...}')
    r.add_argument("--rounding", choices=ROUNDINGS, default="nearest")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=_cmd_run)

    d = sub.add_parser("deploy", help="deploy a training run: compiled library + ONNX QDQ model")
    d.add_argument("run", help="RUN folder written by `marvin-compile train --out RUN`")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--target", default="cpu", help="cpu, cuda, or a TVM JSON-dict target")
    d.add_argument("--db", default=None, help=DB_HELP)
    d.add_argument(
        "--batches",
        type=_batch_list,
        default=[1],
        help="batch sizes to also compile a specialized library for (model_b{N}.so; static shapes, "
        "faster at exactly that size; each adds a compile): comma-separated, or none (default: 1)",
    )
    d.set_defaults(func=_cmd_deploy)

    t = sub.add_parser("train", help="MARViN training: precision decided per layer during training")
    t.add_argument("--model", help="lenet5, resnet20, or package.module:callable")
    t.add_argument("--dataset", help="digits, npz:PATH, or torchvision:NAME[:ROOT] (local files only)")
    t.add_argument("--epochs", type=int, help="epochs (default 25)")
    t.add_argument("--batch-size", type=int, help="batch size (default 128)")
    t.add_argument("--target", help="cpu (default) or an llvm TVM JSON-dict target; training runs on the CPU")
    t.add_argument("--out", help="run folder: metrics.json, precision.png, checkpoint.pt")
    t.add_argument("--baseline", action="store_true", help="also train the float32 PyTorch counterpart")
    t.add_argument("--backward", help="float (default: PyTorch float backward) or lowbit (integer kernels)")
    t.add_argument("--seed", type=int, help="seed of initial weights, data order and rounding (default 0)")
    t.add_argument("--lr", type=float, help="learning rate (default 0.05, cosine-annealed)")
    t.add_argument("--data-root", help="root for torchvision datasets whose spec names none")
    t.add_argument("--cache-dir", default=None, help="variant cache (default ~/.cache/marvin-compile)")
    t.add_argument("--db", dest="tuning_db", default=None, help=DB_HELP)
    t.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="RUN",
        help="continue RUN (or --out) from its checkpoint with its saved config",
    )
    t.set_defaults(func=_cmd_train)

    u = sub.add_parser("tune", help="autotune the packed integer kernels of a model for a device")
    u.add_argument("model", help="MODEL.onnx")
    u.add_argument("--target", default="cpu", help="cpu or an x86 llvm TVM JSON-dict target")
    u.add_argument("--trials", type=int, default=16, help="measured schedules per kernel (default 16)")
    u.add_argument("--db", default=None, help="tuning database directory (default: the target's own)")
    u.add_argument("--batch", type=int, default=128, help="batch size the kernels are timed at (default 128)")
    u.add_argument(
        "--classes",
        default="int8,int16",
        help="comma-separated integer kernel classes to tune (default int8,int16)",
    )
    u.set_defaults(func=_cmd_tune)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "rounding", None) is None and args.command == "compile":
        args.rounding = ["nearest"]
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"marvin-compile: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
