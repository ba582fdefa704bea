"""Turn ``main`` into glue that calls each layer through the runtime's layer dispatcher.

Calls to layer functions become ``call_dps_packed("marvin.dispatch_layer", (model, index, ...))``;
the runtime answers with the layer's current compiled variant, so swapping a layer's precision
or kernel class never recompiles the glue or any other layer.
"""

from __future__ import annotations

import tvm
from tvm import relax

from marvin_compile.passes.utils import layer_functions, substitute

DISPATCH = "marvin.dispatch_layer"


@tvm.transform.module_pass(opt_level=0, name="BindLayerDispatch")
class BindLayerDispatch:
    """Replace layer calls in main by dispatcher calls; main gains a trailing ``model`` handle."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        index = {gv: i for i, (gv, _) in enumerate(layer_functions(mod))}
        main = mod["main"]
        handle = relax.Var("model", tvm.ir.PrimType("int64"))
        bb = relax.BlockBuilder()
        vmap: dict = {}
        with bb.function("main", [*main.params, handle], attrs=dict(main.attrs)):
            with bb.dataflow():
                for block in main.body.blocks:
                    for b in block.bindings:
                        value = substitute(b.value, vmap)
                        if isinstance(value, relax.Call) and value.op in index:
                            value = relax.call_dps_packed(
                                relax.ExternFunc(DISPATCH),
                                relax.Tuple([handle, relax.prim_value(index[value.op]), *value.args]),
                                out_ty=b.var.ty,
                            )
                        vmap[b.var] = bb.emit(value, b.var.name)
                out = bb.emit_output(substitute(main.body.body, vmap))
            bb.emit_func_output(out)
        return bb.get()
