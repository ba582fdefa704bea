"""The front door for compiling: ONNX file -> directory of per-layer variants and a manifest."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import tvm

from marvin_compile import __version__
from marvin_compile.fixed_point import Precision, PrecisionError, check_precision, check_rounding
from marvin_compile.frontend import import_onnx, load_onnx
from marvin_compile.kernel_classes import CLASS_BY_NAME, class_for_wl
from marvin_compile.report import atomic_write_json
from marvin_compile.runtime.compiled_model import CompiledModel
from marvin_compile.runtime.variant_store import VariantStore
from marvin_compile.safety import MANIFEST, read_manifest
from marvin_compile.target import resolve_target
from marvin_compile.tuning import open_database

DEFAULT_WORD_LENGTHS = (4, 8, 12, 16)


def compile_model(
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    target: str | dict = "cpu",
    word_lengths: tuple[int, ...] = DEFAULT_WORD_LENGTHS,
    roundings: tuple[str, ...] = ("nearest",),
    cache_dir: str | os.PathLike | None = None,
    db: str | os.PathLike | None = None,
) -> dict:
    """Compile every layer for the kernel classes of ``word_lengths``; write OUT/manifest.json.

    ``db``: a tuning database (``marvin-compile tune``); default: the target's own, if tuned."""
    for wl in word_lengths:
        check_precision(wl, 0)
    for r in roundings:
        check_rounding(r)
    tgt = resolve_target(target)
    imported = import_onnx(load_onnx(model_path))
    tuning = open_database(db, tgt)
    store = VariantStore(tgt, cache_dir, tuning)
    model = CompiledModel(imported, store)
    classes = sorted({class_for_wl(wl).name for wl in word_lengths}, key=list(CLASS_BY_NAME).index)
    out = Path(out_dir)
    variants = out / "variants"
    variants.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, out / "model.onnx")
    layers = []
    for lay in model.layers:
        entry = {
            "name": lay.name,
            "op": lay.op,
            "input_shape": _shape(lay.func.params[0].ty.shape),
            "weight_shape": list(lay.weight_shape),
            "output_shape": _shape(lay.func.ret_ty.shape),
            "has_bias": lay.has_bias,
            "variants": {},
        }
        for cls in classes:
            for rounding in roundings:
                v = store.get(lay.func, CLASS_BY_NAME[cls], rounding)
                _copy(v.path, variants)
                entry["variants"].setdefault(cls, {})[rounding] = v.key
        layers.append(entry)
    for path in store.loaded_paths():
        _copy(path, variants)
    manifest = {
        "kind": "compiled",
        "toolkit": __version__,
        "tvm": tvm.__version__,
        "target": json.loads(str(tgt)),
        "model": "model.onnx",
        "input": {"name": imported.input_name, "shape": _shape(imported.mod["main"].params[0].ty.shape)},
        "word_lengths": list(word_lengths),
        "kernel_classes": classes,
        "tuning": None if tuning is None else {"db": str(tuning.path), "digest": tuning.digest},
        "layers": layers,
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def load_compiled(model_dir: str | os.PathLike) -> CompiledModel:
    """Load a directory written by ``compile_model``; variants it lacks are compiled into it."""
    d, manifest = read_manifest(model_dir, "compiled", "compile")
    tgt = resolve_target(manifest["target"])
    digest = (manifest.get("tuning") or {}).get("digest")
    store = VariantStore(tgt, d / "variants", tuning_digest=digest)
    return CompiledModel(import_onnx(load_onnx(d / manifest["model"])), store)


def parse_precision_file(path: str | os.PathLike, layer_names: list[str]) -> dict[str, Precision]:
    """P.json maps every layer name to {"wl": int, "fl": int}."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PrecisionError(f"precision file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise PrecisionError(f"precision file {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise PrecisionError(f'precision file {path} must map layer name -> {{"wl": .., "fl": ..}}')
    unknown = sorted(set(raw) - set(layer_names))
    missing = [n for n in layer_names if n not in raw]
    if unknown or missing:
        raise PrecisionError(
            f"precision file {path} must name every layer; unknown: {unknown}, missing: {missing}; "
            f"layers: {layer_names}"
        )
    out = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict) or set(spec) != {"wl", "fl"}:
            raise PrecisionError(f'layer {name!r} in {path}: expected {{"wl": int, "fl": int}}, got {spec!r}')
        out[name] = Precision(spec["wl"], spec["fl"])
    return out


def _shape(shape) -> list:
    return [int(d) if isinstance(d, tvm.tirx.IntImm) or str(d).isdigit() else str(d) for d in shape]


def _copy(src: Path, dst_dir: Path) -> None:
    dst = dst_dir / src.name
    if src.resolve() != dst.resolve() and not dst.exists():
        tmp = dst_dir / f".tmp-{src.name}"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
