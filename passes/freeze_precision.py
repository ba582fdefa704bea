"""Freeze each layer's precision and weights into constants, for a deployed model.

Run after ``BindParams("main", ...)``: every layer call in ``main`` then passes constant weights.
This pass binds those constants and the layer's ``qp``/``fl`` into the layer function, so the
call keeps only the activation; constant folding then stores each weight and bias already
quantized in its integer container.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tvm
from tvm import relax

from marvin_compile.fixed_point import Precision
from marvin_compile.passes.utils import LAYER_ATTR, layer_functions, substitute


@tvm.transform.module_pass(opt_level=0, name="FreezeLayerPrecision")
class FreezeLayerPrecision:
    """Bind every layer's ``qp``, ``fl`` and constant weight arguments; calls pass only ``x``."""

    def __init__(self, precision: Mapping[str, Precision]) -> None:
        self.precision = precision

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        layers = dict(layer_functions(mod))
        main = mod["main"]
        bindings = [b for block in main.body.blocks for b in block.bindings]
        bb = relax.BlockBuilder(tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv not in layers}))
        new_gv = {  # fresh GlobalVars: the frozen functions have a new signature
            b.value.op: bb.add_func(self._freeze(layers[b.value.op], b.value.args[1:]), b.value.op.name_hint)
            for b in bindings
            if isinstance(b.value, relax.Call) and b.value.op in layers
        }
        vmap: dict = {}
        with bb.function("main__frozen", list(main.params), attrs=dict(main.attrs)):
            with bb.dataflow():
                for b in bindings:
                    value = substitute(b.value, vmap)
                    if isinstance(value, relax.Call) and value.op in new_gv:
                        value = relax.Call(new_gv[value.op], [value.args[0]])
                    vmap[b.var] = bb.emit(value, b.var.name)
                result = bb.emit_output(substitute(main.body.body, vmap))
            bb.emit_func_output(result)
        built = bb.get()
        out = {gv: f for gv, f in built.functions.items() if gv.name_hint not in ("main", "main__frozen")}
        out[tvm.ir.GlobalVar("main")] = built["main__frozen"].with_attr("global_symbol", "main")
        return tvm.IRModule(out)

    def _freeze(self, func: relax.Function, weights: list[relax.Expr]) -> relax.Function:
        name = str(func.attrs[LAYER_ATTR])
        if any(v.name == "seed" for v in func.params):
            raise ValueError("deployment freezes a nearest-rounding model; got a stochastic layer")
        if not all(isinstance(w, tvm.ir.expr.Constant) for w in weights):
            raise ValueError(
                f"layer {name}: weights must be bound as constants (run BindParams on main first)"
            )
        p = self.precision[name]
        binding = {
            "qp": np.array([2.0**p.fl, 2.0**-p.fl, p.int_min, p.int_max], dtype=np.float32),
            "fl": np.array(p.fl, dtype=np.int32),
        }
        for param, w in zip(func.params[1:], weights, strict=False):
            binding[param.name] = w.value
        return func.bind_params(binding)
