"""Deploy a trained mixed-precision model: one compiled TVM library and a standard ONNX QDQ model.

- Batch norm is folded into the preceding convolution (torch.fx), and the folded layer's fl is
  re-derived by MARViN's push-down rule on the folded weights (its wl is kept).
- ``model.so``: the whole model at its final precisions as one TVM module; weights and biases are
  constant-folded into their integer containers (int8/int16), the float32 class stays float;
  ``model_b{N}.so``: the same with the batch bound to N, for each size asked for (default 1).
- ``model.qdq.onnx``: QuantizeLinear/DequantizeLinear pairs with scale 2**-fl and zero point 0
  around every integer-class layer, Clip where wl is narrower than the container; ONNX Runtime
  runs it with no custom ops. ONNX rounds ties to even where MARViN rounds them up, so the two
  forms can differ by one step on exact ties.
- ``manifest.json``: per layer wl, fl, class, parameter bytes; sizes measured from the files;
  versions; SHA-256 checksums that ``load`` verifies before it loads any shared library.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
import tvm
from onnx import helper, numpy_helper, version_converter
from torch import fx, nn
from torch.fx.experimental.optimization import fuse
from tvm import relax

from marvin_compile import __version__
from marvin_compile.fixed_point import Precision
from marvin_compile.frontend import ModelError, export_onnx, import_onnx, load_onnx
from marvin_compile.kernel_classes import class_for_wl
from marvin_compile.models import BatchNormReLU2d
from marvin_compile.passes import pipeline
from marvin_compile.report import atomic_write_json
from marvin_compile.runtime.controller import push_down
from marvin_compile.safety import MANIFEST, check_not_shared, read_manifest
from marvin_compile.target import resolve_target
from marvin_compile.tuning import TuningDatabase, open_database

LIBRARY, QDQ, FLOAT_ONNX = "model.so", "model.qdq.onnx", "model.float.onnx"
BATCH_LIBRARY = "model_b{}.so"  # the model with its batch bound to one size (static shapes)
QDQ_OPSET = 21  # int16 QuantizeLinear needs opset 21
PUSH_DOWN_BINS = 50
ALIGNMENT = 64  # bytes: TVM's default data alignment, which its kernels may assume
STAGED_BYTES = 1 << 16  # inputs up to this size are always copied into a staging tensor (_input)


class _BatchNormApart(fx.Tracer):
    """Traces a ``BatchNormReLU2d`` as a call of itself followed by its add and ReLU, so that
    ``_batch_norm_apart`` can make the call a plain batch norm that ``fuse`` folds into its Conv."""

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> object:
        if not isinstance(m, BatchNormReLU2d):
            return super().call_module(m, forward, args, kwargs)
        y = self.create_proxy("call_module", self.path_of_module(m), (args[0],), {})
        residual = args[1] if len(args) > 1 else kwargs.get("residual")
        return torch.relu(y if residual is None else y + residual)


def _batch_norm_apart(model: nn.Module) -> nn.Module:
    """``model`` with each ``BatchNormReLU2d`` a plain BatchNorm2d followed by its add and ReLU."""
    combined = [n for n, m in model.named_modules() if isinstance(m, BatchNormReLU2d)]
    if not combined:
        return model
    graph = fx.GraphModule(model, _BatchNormApart().trace(model))
    for name in combined:
        old = graph.get_submodule(name)
        plain = nn.BatchNorm2d(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats)
        plain.load_state_dict(old.state_dict())
        parent, _, leaf = name.rpartition(".")
        setattr(graph.get_submodule(parent) if parent else graph, leaf, plain.eval())
    return graph


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, set[str]]:
    """Eval-mode copy with every Conv->BatchNorm pair folded; returns the names of changed layers."""
    model = copy.deepcopy(model).eval()
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model, set()
    before = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d)
    }
    fused = fuse(_batch_norm_apart(model))
    after = dict(fused.named_modules())
    changed = {n for n, w in before.items() if n in after and not torch.equal(after[n].weight, w)}
    return fused, changed


def refit_precision(weight: torch.Tensor, trained: Precision) -> Precision:
    """(wl, fl) for folded weights by MARViN's push-down, starting from the trained pair.

    The start fl is the trained one, lowered if the folded weights would clamp at it; the pair
    also governs the layer's activations, so it never gains fractional bits (and range) over
    what training used.
    """
    wl = trained.wl
    amax = float(weight.detach().abs().max())
    int_bits = max(math.floor(math.log2(amax)) + 1, 0) if amax > 0 else 0
    fl = min(trained.fl, max(wl - 1 - int_bits, 0))
    new_wl, new_fl = push_down(weight.detach().float(), wl, fl, PUSH_DOWN_BINS, min_fl=min(4, fl))
    return Precision(new_wl, new_fl)


def compile_library(
    onnx_path: Path,
    precision: Mapping[str, Precision],
    target: tvm.target.Target,
    tuning: TuningDatabase | None = None,
    batch: int | None = None,
    exec_mode: str = "compiled",
) -> relax.VMExecutable:
    """The deploy pipeline: partition, quantize (nearest), lower per layer class, freeze, build
    (``batch``: for that batch size only, which spares the VM its shape bookkeeping; ``exec_mode``:
    see ``pipeline.build``)."""
    imported = import_onnx(load_onnx(onnx_path))
    mod = imported.mod if batch is None else pipeline.bind_batch(imported.mod, batch)
    mod = pipeline.partition(mod)
    mod = pipeline.freeze(mod, precision, imported.params, target, tuned=tuning is not None)
    return pipeline.build(mod, target, tuning, exec_mode)


def _quant_dtype(wl: int) -> int:
    return onnx.TensorProto.INT8 if wl <= 8 else onnx.TensorProto.INT16


def _np_dtype(wl: int) -> type:
    return np.int8 if wl <= 8 else np.int16


def _levels(values: np.ndarray, p: Precision) -> np.ndarray:
    return np.clip(np.floor(values.astype(np.float64) * 2.0**p.fl + 0.5), p.int_min, p.int_max)


def qdq_model(float_model: onnx.ModelProto, precision: Mapping[str, Precision]) -> onnx.ModelProto:
    """Wrap every integer-class Conv/Gemm/MatMul in QDQ pairs of its layer's precision."""
    model = version_converter.convert_version(float_model, QDQ_OPSET)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:  # the exporter dedupes equal constants behind Identity nodes
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    new_nodes, extra_inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        extra_inits.append(numpy_helper.from_array(value, name))
        return name

    def qdq(tensor: str, p: Precision, tag: str, dtype: int) -> list[onnx.NodeProto]:
        scale = const(f"{tag}_scale", np.array(2.0**-p.fl, np.float32))
        zero = const(f"{tag}_zero", np.array(0, _np_dtype(p.wl)))
        nodes, src = [], tensor
        container_bits = 8 if p.wl <= 8 else 16
        if p.wl < container_bits:
            lo = const(f"{tag}_lo", np.array(p.lo, np.float32))
            hi = const(f"{tag}_hi", np.array(p.hi, np.float32))
            nodes.append(helper.make_node("Clip", [src, lo, hi], [f"{tag}_clipped"]))
            src = f"{tag}_clipped"
        nodes.append(helper.make_node("QuantizeLinear", [src, scale, zero], [f"{tag}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_q", scale, zero], [f"{tag}_dq"]))
        del dtype
        return nodes

    for node in graph.node:
        weight = node.input[1] if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 else None
        name = _layer_of(weight) if weight in inits else None
        p = precision.get(name) if name is not None else None
        if p is None or not class_for_wl(p.wl).is_integer:
            new_nodes.append(node)
            continue
        tag = name.replace(".", "_") or "layer"
        new_nodes += qdq(node.input[0], p, f"{tag}_x", _quant_dtype(p.wl))
        w = numpy_helper.to_array(inits[weight])
        wq = const(f"{tag}_wq", _levels(w, p).astype(_np_dtype(p.wl)))
        scale = const(f"{tag}_w_scale", np.array(2.0**-p.fl, np.float32))
        zero = const(f"{tag}_w_zero", np.array(0, _np_dtype(p.wl)))
        new_nodes.append(helper.make_node("DequantizeLinear", [wq, scale, zero], [f"{tag}_w_dq"]))
        inputs = [f"{tag}_x_dq", f"{tag}_w_dq"]
        if len(node.input) > 2 and node.input[2]:
            b = numpy_helper.to_array(inits[node.input[2]])
            bq = const(f"{tag}_bq", (_levels(b, p) * 2.0**p.fl).astype(np.int32))  # on the 2**-2fl grid
            bscale = const(f"{tag}_b_scale", np.array(2.0 ** (-2 * p.fl), np.float32))
            bzero = const(f"{tag}_b_zero", np.array(0, np.int32))
            new_nodes.append(helper.make_node("DequantizeLinear", [bq, bscale, bzero], [f"{tag}_b_dq"]))
            inputs.append(f"{tag}_b_dq")
        out = node.output[0]
        core = helper.make_node(node.op_type, inputs, [f"{tag}_y"], name=node.name)
        core.attribute.extend(node.attribute)
        new_nodes.append(core)
        tail = qdq(f"{tag}_y", p, f"{tag}_y", _quant_dtype(p.wl))
        tail[-1].output[0] = out
        new_nodes += tail
    used = {i for n in new_nodes for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + extra_inits)
    onnx.checker.check_model(model)
    return model


def _layer_of(weight_name: str) -> str:
    from marvin_compile.frontend import layer_name

    return layer_name(weight_name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_save(write, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def deploy(
    model: nn.Module,
    example: torch.Tensor,
    precision: Mapping[str, Precision],
    out_dir: str | os.PathLike,
    target: str | dict = "cpu",
    db: str | os.PathLike | None = None,
    batches: Sequence[int] = (1,),
) -> dict:
    """Fold, refit, compile and export ``model`` at its per-layer ``precision`` into ``out_dir``
    (tuned schedules from ``db``, default: the target's tuning database, if any). Besides
    ``model.so``, which takes any batch, each size in ``batches`` gets a library specialized to it
    (``model_b{N}.so``: static shapes, so the VM computes no shapes and plans its memory once),
    which ``load`` runs for batches of exactly that size."""
    sizes = batch_sizes(batches)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tgt = resolve_target(target)
    tuning = open_database(db, tgt)
    folded, changed = fold_batchnorm(model)
    modules = dict(folded.named_modules())
    final: dict[str, Precision] = {}
    for name, p in precision.items():
        if name not in modules:
            raise ModelError(f"precision names layer {name!r}, which the model does not have")
        final[name] = refit_precision(modules[name].weight, p) if name in changed else p
    _atomic_save(lambda tmp: export_onnx(folded, example[:2], tmp), out / FLOAT_ONNX)
    float_model = load_onnx(out / FLOAT_ONNX)
    layer_names = {
        _layer_of(n.input[1]) for n in float_model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
    }
    missing = sorted(layer_names & set(modules) - set(final))
    if missing:
        raise ModelError(f"no precision for layers {missing}; give one for every Conv/Linear layer")
    specialized = {str(b): BATCH_LIBRARY.format(b) for b in sizes}
    libraries = [(LIBRARY, None), *((specialized[str(b)], b) for b in sizes)]
    for library, batch in libraries:
        executable = compile_library(out / FLOAT_ONNX, final, tgt, tuning, batch)
        _atomic_save(executable.export_library, out / library)
    qdq = qdq_model(float_model, final)
    _atomic_save(lambda tmp: onnx.save(qdq, tmp), out / QDQ)

    layers = []
    for name, p in final.items():
        m = modules[name]
        cls = class_for_wl(p.wl)
        n_params = sum(t.numel() for t in (m.weight, m.bias) if t is not None)
        item = {"int8": 1, "int16": 2, "float32": 4}[cls.name]
        layers.append(
            {
                "name": name,
                "wl": p.wl,
                "fl": p.fl,
                "kernel_class": cls.name,
                "trained": {"wl": precision[name].wl, "fl": precision[name].fl},
                "batchnorm_folded": name in changed,
                "parameter_bytes": n_params * item,
                "float32_parameter_bytes": n_params * 4,
            }
        )
    for stale in out.glob(BATCH_LIBRARY.format("*")):  # a redeploy must not leave other sizes behind
        if stale.name not in specialized.values():
            stale.unlink()
    files = {f: out / f for f in (LIBRARY, QDQ, FLOAT_ONNX, *specialized.values())}
    manifest = {
        "kind": "deployed",
        "toolkit": __version__,
        "tvm": tvm.__version__,
        "onnxruntime_opset": QDQ_OPSET,
        "target": json.loads(str(tgt)),
        "tuning": None if tuning is None else {"db": str(tuning.path), "digest": tuning.digest},
        "input_shape": ["N", *example.shape[1:]],
        "batch_libraries": specialized,
        "layers": layers,
        "size": {
            "parameter_bytes": sum(lay["parameter_bytes"] for lay in layers),
            "float32_parameter_bytes": sum(lay["float32_parameter_bytes"] for lay in layers),
            "qdq_onnx_bytes": files[QDQ].stat().st_size,
            "float32_onnx_bytes": files[FLOAT_ONNX].stat().st_size,
            "library_bytes": files[LIBRARY].stat().st_size,
            "batch_library_bytes": {b: files[f].stat().st_size for b, f in specialized.items()},
        },
        "checksums": {f: _sha256(p) for f, p in files.items()},
    }
    manifest["size"]["qdq_vs_float32"] = (
        manifest["size"]["qdq_onnx_bytes"] / manifest["size"]["float32_onnx_bytes"]
    )
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def batch_sizes(batches: Sequence[int]) -> list[int]:
    """The distinct batch sizes to specialize libraries for, checked."""
    bad = [b for b in batches if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1]
    if bad:
        raise ValueError(f"batch sizes must be positive integers, got {bad}; accepted: e.g. (1, 64) or ()")
    return sorted({int(b) for b in batches})


class DeployedModel:
    """A loaded ``model.so``: call it on a numpy array or a torch tensor (batch first). A batch of a
    size the directory has a specialized library for (``model_b{N}.so``) runs that library."""

    def __init__(self, path: Path, manifest: dict, specialized: Mapping[int, Path]) -> None:
        self.manifest = manifest
        tgt = resolve_target(manifest["target"])
        self.device = tvm.device("cpu" if tgt.kind.name == "llvm" else tgt.kind.name, 0)
        self._on_cpu = tgt.kind.name == "llvm"
        self._main = self._entry(path)
        self._specialized = {b: self._entry(p) for b, p in specialized.items()}
        self.input_shape = tuple(manifest["input_shape"][1:])
        self._staging = threading.local()  # per thread: a TVM input tensor and its numpy view, reused

    @property
    def specialized_batches(self) -> tuple[int, ...]:
        """Batch sizes that run a library specialized to them."""
        return tuple(sorted(self._specialized))

    def _entry(self, path: Path) -> Callable[..., tvm.runtime.Tensor]:
        return relax.VirtualMachine(tvm.runtime.load_module(str(path)), self.device)["main"]

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        is_torch = isinstance(x, torch.Tensor)
        arr = x.detach().cpu().numpy() if is_torch else np.asarray(x)
        if arr.shape[1:] != self.input_shape:  # also a 0-d array: () is never the input shape
            dims = ", ".join(map(str, self.input_shape))
            raise ValueError(f"input has shape {arr.shape}; accepted: (batch, {dims})")
        main = self._specialized.get(arr.shape[0], self._main)
        tensor, staged = self._input(arr)
        out = main(tensor)
        if not self._on_cpu:
            y = out.numpy()
        else:  # DLPack hands the result over without a copy (``.numpy()`` took 7 us for a 1x10 output)
            y = np.from_dlpack(out)
            if staged is not None and np.may_share_memory(y, staged):  # a view of the input, reused
                y = y.copy()
        return torch.from_numpy(y) if is_torch else y

    def _input(self, arr: np.ndarray) -> tuple[tvm.runtime.Tensor, np.ndarray | None]:
        """The input as a float32 TVM tensor, and the staging buffer it was copied into (None where
        it was not). On the CPU a large input goes over by DLPack if it is float32, C-ordered and on
        a 64-byte boundary (the kernels assume TVM's alignment; torch's allocator gives it; numpy's
        often only 16 bytes). Anything else, and any small input, is copied into this thread's
        staging tensor, allocated by TVM (again only when the shape changes): at batch 1 the copy
        (1 us) is cheaper than reading the address to check it (``ndarray.ctypes``, 2 us) and
        wrapping it (1 us), a tenth of LeNet-5's latency."""
        if not self._on_cpu:
            return tvm.runtime.tensor(np.ascontiguousarray(arr, dtype=np.float32), self.device), None
        if (
            arr.nbytes > STAGED_BYTES
            and arr.dtype == np.float32
            and arr.flags.c_contiguous
            and arr.flags.writeable
            and arr.ctypes.data % ALIGNMENT == 0
        ):
            return tvm.runtime.from_dlpack(arr), None
        staging = getattr(self._staging, "pair", None)
        if staging is None or staging[1].shape != arr.shape:
            tensor = tvm.runtime.empty(arr.shape, "float32", self.device)
            staging = self._staging.pair = (tensor, np.from_dlpack(tensor))
        staging[1][...] = arr
        return staging


def load(model_dir: str | os.PathLike) -> DeployedModel:
    """Verify a deployed directory (ownership, permissions, checksums) and load its library."""
    d, manifest = read_manifest(model_dir, "deployed", "deploy")
    specialized = {int(b): d / f for b, f in _batch_libraries(manifest).items()}
    for p in (d, d / LIBRARY, d / MANIFEST, *specialized.values()):
        check_not_shared(p)
    for name, digest in manifest["checksums"].items():
        if not (d / name).is_file():
            raise ModelError(f"{d / name} is missing")
        if _sha256(d / name) != digest:
            raise ModelError(
                f"checksum mismatch for {d / name}: the file changed after deployment; redeploy it"
            )
    return DeployedModel(d / LIBRARY, manifest, specialized)


def _batch_libraries(manifest: dict) -> dict[str, str]:
    """Batch size -> specialized library, each named ``model_b{N}.so`` in the directory itself (a
    manifest cannot point the loader elsewhere); directories deployed before sizes were a choice
    name at most ``batch1_library``."""
    legacy = manifest.get("batch1_library")
    named = manifest.get("batch_libraries", {"1": legacy} if legacy else {})
    for size, name in named.items():
        if not str(size).isdigit() or name != BATCH_LIBRARY.format(int(size)):
            raise ModelError(
                f"manifest lists {name!r} as the library for batch {size!r}; accepted: model_b<N>.so "
                "for batch N, in the deployed directory"
            )
    return named


def deploy_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    target: str | dict = "cpu",
    db: str | os.PathLike | None = None,
    batches: Sequence[int] = (1,),
) -> dict:
    """Deploy the final state of a training run (``marvin-compile train --out RUN``)."""
    from marvin_compile.data import load_dataset
    from marvin_compile.models import build_model
    from marvin_compile.runtime.driver import CHECKPOINT, load_config

    run = Path(run_dir)
    ckpt_path = run / CHECKPOINT
    if not ckpt_path.is_file():
        raise ModelError(
            f"{run} is not a training run (no {CHECKPOINT}); accepted: the --out folder of `train`"
        )
    config = load_config(run)
    ckpt = torch.load(ckpt_path, weights_only=True)
    image_size, in_channels = config.input_geometry()
    _, test, num_classes = load_dataset(config.dataset, config.data_root, image_size, in_channels)
    model = build_model(config.model, num_classes, in_channels)
    model.load_state_dict(ckpt["model"])
    precision = {name: Precision(*pair) for name, pair in ckpt["precision"].items()}
    return deploy(model.eval(), test.tensors[0][:2], precision, out_dir, target, db, batches)
