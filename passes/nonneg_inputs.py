"""Mark the layers whose input cannot be negative: a ReLU's output, directly or through pools and
reshapes (ResNet-20: every layer but the stem; LeNet-5: every layer but conv1).

The int8 class multiplies such an input on byte products without vpdpbusd's +128 offset
(``dot_isa``'s ``uint8`` container): on AVX2 ``vpmaddubsw``, twice the multiply-adds of
``vpmaddwd`` per instruction, exact because a ReLU-fed int8 level is at most 127.
"""

from __future__ import annotations

import tvm
from tvm import relax

from marvin_compile.passes.utils import LAYER_ATTR

NONNEG_ATTR = "marvin.nonneg_input"
RELU = "relax.nn.relu"
# ops whose output is non-negative wherever their data input is (a max pool's padding never wins
# over a window's real elements, an average pool's zero padding keeps the mean >= 0; ``mean``:
# ONNX's GlobalAveragePool)
KEEPS_SIGN = {
    "relax.mean",
    "relax.max",
    "relax.nn.max_pool2d",
    "relax.nn.avg_pool2d",
    "relax.nn.adaptive_avg_pool2d",
    "relax.reshape",
    "relax.flatten",
    "relax.permute_dims",
    "relax.squeeze",
    "relax.expand_dims",
}


def operand_container(func: relax.Function, container: str) -> str:
    """The ``te_dot`` container of a layer's activation operand: ``uint8`` for an int8 layer that
    ``MarkNonNegativeInputs`` marked (its forward's input, its dw's x), else the class's own."""
    return "uint8" if container == "int8" and bool(func.attrs.get(NONNEG_ATTR, False)) else container


def non_negative(e: relax.Expr, values: dict[relax.Var, relax.Expr]) -> bool:
    """Whether ``e`` (an expression of main, whose bindings are ``values``) is >= 0 by construction."""
    while isinstance(e, relax.Var) and e in values:
        e = values[e]
        if not (isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)):
            return False
        if e.op.name == RELU:
            return True
        if e.op.name not in KEEPS_SIGN:
            return False
        e = e.args[0]
    return False


@tvm.transform.module_pass(opt_level=0, name="MarkNonNegativeInputs")
class MarkNonNegativeInputs:
    """Set ``NONNEG_ATTR`` on every layer function that main calls on a non-negative input."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        main = mod["main"]
        values = {b.var: b.value for block in main.body.blocks for b in block.bindings}
        out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        for value in values.values():
            if not (isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar)):
                continue
            func = mod[value.op]
            if func.attrs is not None and LAYER_ATTR in func.attrs and non_negative(value.args[0], values):
                out[value.op] = func.with_attr(NONNEG_ATTR, True)
        return out
