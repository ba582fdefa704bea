"""Freeze each layer's precision and weights into constants, for a deployed model.

Run after ``BindParams("main", ...)``: every layer call in ``main`` then passes constant weights.
This pass binds those constants and the layer's ``qp``/``fl`` into the layer function and inlines
its body into ``main`` (a layer that branches at run time stays a call), so TVM's fusion sees
each kernel next to the ReLU or residual add that follows it; constant folding then stores each
weight and bias already quantized (and packed) in its integer container.
"""

from __future__ import annotations

from collections.abc import Mapping

import tvm
from tvm import relax

from marvin_compile.fixed_point import Precision
from marvin_compile.passes.insert_quantize import precision_values
from marvin_compile.passes.utils import LAYER_ATTR, layer_functions, substitute


@tvm.transform.module_pass(opt_level=0, name="FreezeLayerPrecision")
class FreezeLayerPrecision:
    """Bind every layer's ``qp``, ``fl`` and constant weight arguments and inline the layer."""

    def __init__(self, precision: Mapping[str, Precision]) -> None:
        self.precision = precision

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        layers = dict(layer_functions(mod))
        main = mod["main"]
        bindings = [b for block in main.body.blocks for b in block.bindings]
        bb = relax.BlockBuilder(tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv not in layers}))
        vmap: dict = {}
        with bb.function("main__frozen", list(main.params), attrs=dict(main.attrs)):
            with bb.dataflow():
                for b in bindings:
                    value = substitute(b.value, vmap)
                    if isinstance(value, relax.Call) and value.op in layers:
                        frozen = self._freeze(layers[value.op], value.args[1:])
                        inlined = _inline(bb, frozen, value.args[0])
                        if inlined is None:  # a layer that branches at run time stays a function
                            inlined = relax.Call(bb.add_func(frozen, value.op.name_hint), [value.args[0]])
                        value = inlined
                    vmap[b.var] = value if isinstance(value, relax.Var) else bb.emit(value, b.var.name)
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
        qp, fl = precision_values(p)
        binding = {"qp": qp, "fl": fl}
        for param, w in zip(func.params[1:], weights, strict=False):
            binding[param.name] = w.value
        return func.bind_params(binding)


def _inline(bb: relax.BlockBuilder, func: relax.Function, x: relax.Expr) -> relax.Expr | None:
    """Emit a one-parameter function's dataflow bindings on ``x`` (its symbolic batch bound to
    ``x``'s); None when its body is not a single dataflow block."""
    blocks = func.body.blocks
    if len(blocks) != 1 or not isinstance(blocks[0], relax.DataflowBlock):
        return None
    dims = zip(func.params[0].ty.shape.values, x.ty.shape.values, strict=True)
    func = func.bind_symbolic_vars({p: a for p, a in dims if isinstance(p, tvm.tirx.Var)})
    local: dict = {func.params[0]: x}
    for b in func.body.blocks[0].bindings:
        local[b.var] = bb.emit(substitute(b.value, local), b.var.name)
    return substitute(func.body.body, local)
