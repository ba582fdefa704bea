"""Split each quantizable layer out of ``main`` into its own Relax function.

The runtime can then compile and swap one layer's variant without touching the others. Each
layer function has canonical parameters ``(x, w[, b])`` so layers of the same shape and
attributes print, hash and cache identically.
"""

from __future__ import annotations

import tvm
from tvm import relax

from marvin_compile.passes.find_layers import LayerMatch, find_quantizable_layers
from marvin_compile.passes.utils import LAYER_ATTR, param, substitute


def outline_layer(layer: LayerMatch) -> relax.Function:
    """The layer's bindings as a function of (x, w[, b]), returning the layer output."""
    x = param("x", layer.x.ty.shape, layer.x.ty.dtype)
    w = param("w", layer.weight.ty.shape, layer.weight.ty.dtype)
    vmap = {layer.x: x, layer.weight: w}
    params = [x, w]
    if layer.bias is not None:
        b = param("b", layer.bias.ty.shape, layer.bias.ty.dtype)
        vmap[layer.bias] = b
        params.append(b)
    bb = relax.BlockBuilder()
    with bb.function("layer", params, attrs={LAYER_ATTR: layer.name, "marvin.op": layer.op}):
        with bb.dataflow():
            for binding in layer.bindings:
                vmap[binding.var] = bb.emit(substitute(binding.value, vmap))
            out = bb.emit_output(vmap[layer.output])
        bb.emit_func_output(out)
    return bb.get()["layer"].without_attr("global_symbol")


@tvm.transform.module_pass(opt_level=0, name="ExtractLayers")
class ExtractLayers:
    """Outline every quantizable layer of main into ``layer_<i>`` and call it from main."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        main = mod["main"]
        layers = find_quantizable_layers(main)
        absorbed = {b.var: lay for lay in layers for b in lay.bindings}
        bb = relax.BlockBuilder()
        gvars = {lay.name: bb.add_func(outline_layer(lay), f"layer_{i}") for i, lay in enumerate(layers)}
        vmap: dict = {}
        with bb.function("main", list(main.params), attrs=dict(main.attrs) if main.attrs else None):
            with bb.dataflow():
                for block in main.body.blocks:
                    for b in block.bindings:
                        lay = absorbed.get(b.var)
                        if lay is None:
                            vmap[b.var] = bb.emit(substitute(b.value, vmap), b.var.name)
                        elif b.var.same_as(lay.output):
                            args = [substitute(lay.x, vmap), lay.weight]
                            if lay.bias is not None:
                                args.append(lay.bias)
                            vmap[b.var] = bb.emit(
                                relax.Call(gvars[lay.name], args), lay.name.replace(".", "_")
                            )
                out = bb.emit_output(substitute(main.body.body, vmap))
            bb.emit_func_output(out)
        return bb.get()
