"""A whole compiled model: glue compiled once, each layer dispatched to its current variant.

The glue (``main`` after ``BindLayerDispatch``) calls ``marvin.dispatch_layer`` for every layer;
this module answers with the variant of the layer's kernel class and passes the layer's runtime
precision (``qp``, ``fl``, ``seed``). Changing fl inside a class, or moving a layer to a class it
has visited before, compiles nothing.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from marvin_compile.fixed_point import Precision, check_rounding
from marvin_compile.frontend import ImportedModel
from marvin_compile.kernel_classes import class_for_wl
from marvin_compile.passes import pipeline
from marvin_compile.passes.bind_dispatch import DISPATCH
from marvin_compile.passes.insert_quantize import precision_values
from marvin_compile.runtime.variant_store import VariantStore

PrecisionConfig = Precision | dict[str, Precision] | None


@dataclass
class Layer:
    """A quantizable layer as the runtime sees it."""

    name: str
    op: str
    func: relax.Function  # the float layer function (compile input for every variant)
    weight_shape: tuple[int, ...]
    has_bias: bool


def precision_args(p: Precision, device: tvm.runtime.Device) -> tuple:
    """The runtime arguments (qp, fl) of a variant for precision p."""
    return tuple(tvm.runtime.tensor(v, device) for v in precision_values(p))


def layers_of(mod: tvm.IRModule) -> list[Layer]:
    out = []
    for _, f in pipeline.layer_functions(mod):
        w = f.params[1].ty.shape
        out.append(
            Layer(
                str(f.attrs["marvin.layer"]),
                str(f.attrs["marvin.op"]),
                f,
                tuple(int(d) for d in w),
                len(f.params) == 3,
            )
        )
    return out


_MODELS: weakref.WeakValueDictionary[int, CompiledModel] = weakref.WeakValueDictionary()
_IDS = itertools.count(1)


@tvm.register_global_func(DISPATCH, override=True)
def _dispatch(model_id: int, index: int, *args) -> None:
    _MODELS[int(model_id)]._run_layer(int(index), args[:-1], args[-1])


class CompiledModel:
    """Run an imported ONNX model with every quantizable layer in a compiled fixed-point variant."""

    def __init__(self, imported: ImportedModel, store: VariantStore) -> None:
        self.store = store
        self.device = store.device
        mod = pipeline.partition(imported.mod)
        self.layers = layers_of(mod)
        main = mod["main"]
        self.input_shape = tuple(int(d) for d in list(main.params[0].ty.shape)[1:])  # after the batch dim
        self._params = [tvm.runtime.tensor(imported.params[p.name], self.device) for p in main.params[1:]]
        self._glue = store.get_module(pipeline.glue_module(mod), "main")
        self._id = next(_IDS)
        _MODELS[self._id] = self
        self._precision: list[Precision | None] = [None] * len(self.layers)
        self._args: list[tuple] = [()] * len(self.layers)
        self._variants: list = [None] * len(self.layers)
        self.rounding = "nearest"
        self._seed = 0
        self._calls = 0

    @property
    def layer_names(self) -> list[str]:
        return [lay.name for lay in self.layers]

    def set_precision(self, config: PrecisionConfig, rounding: str = "nearest", seed: int = 0) -> None:
        """Uniform precision, a per-layer dict (every layer named), or None for plain float32."""
        check_rounding(rounding)
        if isinstance(config, dict):
            unknown = sorted(set(config) - set(self.layer_names))
            missing = [n for n in self.layer_names if n not in config]
            if unknown or missing:
                raise KeyError(
                    f"precision config must name every layer; unknown: {unknown}, missing: {missing}; "
                    f"layers: {self.layer_names}"
                )
        self.rounding, self._seed, self._calls = rounding, seed, 0
        for i, lay in enumerate(self.layers):
            p = config.get(lay.name) if isinstance(config, dict) else config
            self._precision[i] = p
            if p is None:
                self._variants[i] = self.store.get_float(lay.func)
                self._args[i] = ()
            else:
                self._variants[i] = self.store.get(lay.func, class_for_wl(p.wl), rounding)
                self._args[i] = precision_args(p, self.device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if any(v is None for v in self._variants):
            raise RuntimeError("call set_precision(...) before running the model")
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            dims = ", ".join(map(str, self.input_shape))
            raise ValueError(f"input has shape {tuple(x.shape)}; accepted: (batch, {dims})")
        self._calls += 1
        out = self._glue(
            tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), self.device),
            *self._params,
            self._id,
        )
        return out.numpy()

    def _run_layer(self, index: int, args: tuple, out: tvm.runtime.Tensor) -> None:
        extra = self._args[index]
        if self.rounding == "stochastic" and self._precision[index] is not None:
            seed = np.random.default_rng([self._seed, self._calls, index]).integers(2**32, dtype=np.uint32)
            extra = (*extra, tvm.runtime.tensor(np.array(seed, dtype=np.uint32), self.device))
        self._variants[index].fn(*args, *extra).copyto(out)
