"""``marvin-compile``: compile, run (and, as the toolkit grows, train, tune, deploy) from the shell.

Every user error ends in one line ``marvin-compile: error: ...`` and exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

import numpy as np

from marvin_compile.fixed_point import ROUNDINGS, Precision, PrecisionError
from marvin_compile.frontend import ModelError
from marvin_compile.target import TargetError

USER_ERRORS = (ModelError, PrecisionError, TargetError, FileNotFoundError, ValueError, KeyError)


def _word_lengths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 4,8,12,16, got {text!r}") from None


def _cmd_compile(args: argparse.Namespace) -> int:
    from marvin_compile.compiler import compile_model

    manifest = compile_model(args.model, args.out, args.target, args.word_lengths, tuple(args.rounding),
                             args.cache_dir)
    print(f"compiled {len(manifest['layers'])} layers for classes {', '.join(manifest['kernel_classes'])} "
          f"-> {Path(args.out) / 'manifest.json'}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from marvin_compile.compiler import load_compiled, parse_precision_file

    if (args.wl is None) != (args.fl is None) or (args.wl is None) == (args.precision is None):
        raise PrecisionError("give either --wl N --fl M (uniform precision) or --precision P.json, not both")
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"input file not found: {args.input} (expected a .npy array, batch first)")
    x = np.load(args.input, allow_pickle=False)
    model = load_compiled(args.model_dir)
    config = (Precision(args.wl, args.fl) if args.precision is None
              else parse_precision_file(args.precision, model.layer_names))
    model.set_precision(config, args.rounding, args.seed)
    y = model(x)
    buf = io.BytesIO()
    np.save(buf, y)
    from marvin_compile.report import atomic_write_bytes

    atomic_write_bytes(args.output, buf.getvalue())
    print(f"wrote {args.output} {tuple(y.shape)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="marvin-compile", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile an ONNX model into per-layer fixed-point variants")
    c.add_argument("model", help="MODEL.onnx")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--target", default="cpu", help="cpu, cuda, or a TVM JSON-dict target")
    c.add_argument("--word-lengths", type=_word_lengths, default=(4, 8, 12, 16),
                   help="word lengths to serve (default 4,8,12,16); each maps to a kernel class")
    c.add_argument("--rounding", choices=ROUNDINGS, action="append", default=None,
                   help="rounding modes to precompile (repeatable; default nearest)")
    c.add_argument("--cache-dir", default=None, help="variant cache (default ~/.cache/marvin-compile)")
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
