"""Compiled layer variants: built on first use, kept in memory and in an on-disk cache.

Key = (layer signature, kernel class, rounding, target, toolkit and TVM versions, codegen revision,
tuning-database digest). The layer signature hashes the printed float layer function, whose
parameters have canonical names, so layers with the same shapes and attributes share one variant.
Cache files are written to a temp file and renamed, so a crash or a concurrent process never leaves
a half-written library.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import tvm
from tvm import relax

from marvin_compile import __version__
from marvin_compile.kernel_classes import KernelClass
from marvin_compile.passes import pipeline
from marvin_compile.safety import check_not_shared

if TYPE_CHECKING:
    from marvin_compile.tuning import TuningDatabase

ENV_CACHE = "MARVIN_COMPILE_CACHE"


def default_cache_dir() -> Path:
    """``$MARVIN_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/marvin-compile`` (``~/.cache`` by default)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "marvin-compile"


def signature(func: relax.Function) -> str:
    """Content hash of a float layer function (shapes, dtypes, attributes; not its layer name)."""
    text = func.without_attr("marvin.layer").script(show_meta=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def variant_key(
    sig: str, kernel_class: str, rounding: str, target: tvm.target.Target, tuning: str = "untuned"
) -> str:
    text = "|".join(
        [
            sig,
            kernel_class,
            rounding,
            str(target),
            __version__,
            tvm.__version__,
            pipeline.codegen_key(target),
            tuning,
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class Variant:
    """One loaded variant: ``fn(x, w[, b], qp, fl[, seed])`` returning the layer output
    (for gradient variants, the VM whose ``dx`` and ``dw`` are the backward products)."""

    key: str
    kernel_class: str
    rounding: str
    fn: Callable
    path: Path


class VariantStore:
    """Compile-or-load layer variants for one target and device."""

    compilations = 0  # process-wide count of real compilations (tests assert on it)

    def __init__(
        self,
        target: tvm.target.Target,
        cache_dir: str | os.PathLike | None = None,
        tuning: TuningDatabase | None = None,
        tuning_digest: str | None = None,
    ) -> None:
        """``tuning``: schedules for the packed kernels; ``tuning_digest`` alone names the database
        that prebuilt variants (a compiled model directory) were built with."""
        self.target = target
        self.tuning = tuning
        self.tuning_digest = tuning.digest if tuning is not None else tuning_digest
        self._tuning_key = "untuned" if self.tuning_digest is None else "tuned-" + self.tuning_digest
        self.device = tvm.device("cpu" if target.kind.name == "llvm" else target.kind.name, 0)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._memory: dict[str, Variant] = {}
        self._lock = threading.Lock()
        self._paths: set[Path] = set()

    def _key(self, sig: str, kernel_class: str, rounding: str) -> str:
        return variant_key(sig, kernel_class, rounding, self.target, self._tuning_key)

    def path_for(self, key: str) -> Path:
        return self.cache_dir / f"{key}.so"

    def get(self, func: relax.Function, kernel_class: KernelClass, rounding: str) -> Variant:
        """The variant of ``func`` for a class and rounding: from memory, disk, or a fresh build."""
        key = self._key(signature(func), kernel_class.name, rounding)
        return self._cached(
            key,
            kernel_class.name,
            rounding,
            lambda: pipeline.variant_module(func, kernel_class, rounding, self.target),
        )

    def get_float(self, func: relax.Function) -> Variant:
        """The unquantized float32 layer (the reference path checked against ONNX Runtime)."""
        key = self._key(signature(func), "unquantized", "none")
        return self._cached(key, "unquantized", "none", lambda: pipeline.layer_module(func))

    def get_gradients(self, func: relax.Function, kernel_class: KernelClass, rounding: str) -> Variant:
        """The low-bit backward products of a layer whose forward rounds its input at ``rounding``;
        ``fn`` is the VM, with entries ``dx`` and ``dw``."""
        key = self._key(signature(func), kernel_class.name, f"gradients-{rounding}")
        return self._cached(
            key,
            kernel_class.name,
            rounding,
            lambda: pipeline.gradient_module(func, kernel_class, self.target, rounding),
            entry=None,
        )

    def get_input_quantizer(self, func: relax.Function, rounding: str) -> Variant:
        """``fn(x, qp, fl[, seed])`` returning Q(x) bit for bit as the layer's variants compute it."""
        key = self._key(signature(func), "input-quantizer", rounding)
        return self._cached(
            key,
            "input-quantizer",
            rounding,
            lambda: pipeline.input_quantizer_module(func, rounding),
            entry="quantize_input",
        )

    def _cached(
        self,
        key: str,
        kernel_class: str,
        rounding: str,
        build: Callable[[], tvm.IRModule],
        entry: str | None = "layer",
    ) -> Variant:
        with self._lock:
            if key not in self._memory:
                path = self.path_for(key)
                if not path.exists():
                    self._compile(build(), path)
                self._memory[key] = Variant(key, kernel_class, rounding, self._load(path, entry), path)
            return self._memory[key]

    def get_module(self, mod: tvm.IRModule, entry: str) -> Callable:
        """Compile-or-load a whole module (the glue) by content hash; returns its ``entry``."""
        text = "|".join(
            [
                mod.script(show_meta=True),
                str(self.target),
                __version__,
                tvm.__version__,
                pipeline.codegen_key(self.target),
            ]
        )
        path = self.path_for("module-" + hashlib.sha256(text.encode()).hexdigest()[:32])
        with self._lock:
            if not path.exists():
                self._compile(mod, path)
            return self._load(path, entry)

    def loaded_paths(self) -> list[Path]:
        """Every library this store has loaded (variants and glue), for copying into a model dir."""
        return list(self._paths)

    def _compile(self, mod: tvm.IRModule, path: Path) -> None:
        executable = pipeline.build(mod, self.target, self.tuning)
        type(self).compilations += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".so")
        os.close(fd)
        try:
            executable.export_library(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _load(self, path: Path, entry: str | None) -> Callable:
        """The VM function ``entry`` of a library, or the VM itself when ``entry`` is None."""
        check_not_shared(path.parent)
        check_not_shared(path)
        self._paths.add(path)
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), self.device)
        return vm if entry is None else vm[entry]
