"""Lower each quantize -> conv/matmul -> quantize chain to an integer kernel of its class.

Inputs and weights are quantized straight into the class's integer container, the product
accumulates in the narrowest integer type the worst-case bound allows, and bias add, rounding and
the output clamp happen on the accumulator (``te_ops.requantize``): the result is the exact
fixed-point value, not a float32 approximation of it.
"""

from __future__ import annotations

from collections.abc import Mapping

import tvm
from tvm import relax

from marvin_compile import te_ops
from marvin_compile.kernel_classes import KernelClass
from marvin_compile.passes.find_layers import CORE_OPS, op_name
from marvin_compile.passes.insert_quantize import SALTS
from marvin_compile.passes.utils import LAYER_ATTR, map_layers, param

ACC_ATTR = "marvin.accumulator"


def _core_binding(func: relax.Function) -> tuple[relax.VarBinding, dict]:
    bindings = {b.var: b for block in func.body.blocks for b in block.bindings}
    cores = [b for b in bindings.values() if op_name(b.value) in CORE_OPS]
    if len(cores) != 1:
        raise ValueError(f"layer {func.attrs['marvin.layer']} must hold one conv/matmul, found {len(cores)}")
    return cores[0], bindings


def _is_quantize(e: relax.Expr, bindings: dict) -> bool:
    """True when ``e`` is (a transpose of) a value produced by a fixed-point quantize node."""
    b = bindings.get(e)
    if b is None or not isinstance(b.value, relax.Call):
        return False
    if b.value.op.same_as(tvm.ir.Op.get("relax.permute_dims")):
        return _is_quantize(b.value.args[0], bindings)
    return b.value.op.same_as(tvm.ir.Op.get("relax.call_tir")) and b.value.args[0].name_hint.startswith(
        te_ops.QUANTIZE_NAME
    )


def _integer_core(core: relax.Call, x: relax.Expr, w: relax.Expr, acc: str) -> relax.Expr:
    a = core.attrs
    if core.op.name == "relax.matmul":
        return relax.op.matmul(x, w, out_dtype=acc)
    conv = relax.op.nn.conv2d if core.op.name == "relax.nn.conv2d" else relax.op.nn.conv1d
    return conv(
        x,
        w,
        strides=a.strides,
        padding=a.padding,
        dilation=a.dilation,
        groups=a.groups,
        data_layout=a.data_layout,
        kernel_layout=a.kernel_layout,
        out_layout=a.out_layout,
        out_dtype=acc,
    )


@tvm.transform.module_pass(opt_level=0, name="LowerToIntegerKernels")
class LowerToIntegerKernels:
    """Rewrite quantized layers into integer kernels of their class (one class, or one per layer name)."""

    def __init__(self, kernel_class: KernelClass | Mapping[str, KernelClass]) -> None:
        self.kernel_class = kernel_class

    def _class_of(self, func: relax.Function) -> KernelClass:
        if isinstance(self.kernel_class, KernelClass):
            return self.kernel_class
        return self.kernel_class[str(func.attrs[LAYER_ATTR])]

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return map_layers(mod, self._rewrite)

    def _rewrite(self, bb: relax.BlockBuilder, func: relax.Function, name: str) -> None:
        kernel_class = self._class_of(func)
        if not kernel_class.is_integer:
            return  # the float32 class runs the quantized float graph as it is
        core, bindings = _core_binding(func)
        x_arg, w_arg = core.value.args[0], core.value.args[1]
        if not (_is_quantize(x_arg, bindings) and _is_quantize(w_arg, bindings)):
            raise ValueError(
                f"layer {func.attrs['marvin.layer']} is not quantized; run InsertFixedPointQuantize first"
            )
        params = [param(p.name, p.ty.shape, p.ty.dtype) for p in func.params]
        by_name = {p.name: p for p in params}
        x, w, b = by_name["x"], by_name["w"], by_name.get("b")
        qp, fl, seed = by_name["qp"], by_name["fl"], by_name.get("seed")
        weight_shape = [int(d) for d in w.ty.shape]
        reduction = weight_shape[1] * (1 if core.value.op.name == "relax.matmul" else _prod(weight_shape[2:]))
        acc = kernel_class.accumulator(reduction)
        container = kernel_class.container
        attrs = {**dict(func.attrs), ACC_ATTR: acc, "marvin.kernel_class": kernel_class.name}
        with bb.function(name, params, attrs=attrs):
            with bb.dataflow():
                xi = bb.emit_te(
                    te_ops.quantize_to_int,
                    x,
                    qp,
                    container,
                    seed,
                    SALTS[0],
                    primfunc_name_hint="fxp_quantize_int",
                )
                wi = bb.emit_te(
                    te_ops.quantize_to_int,
                    w,
                    qp,
                    container,
                    seed,
                    SALTS[1],
                    primfunc_name_hint="fxp_quantize_int",
                )
                if w_arg in bindings and op_name(bindings[w_arg].value) == "relax.permute_dims":
                    wi = bb.emit(relax.op.permute_dims(wi, bindings[w_arg].value.attrs.axes))
                bi = None if b is None else bb.emit_te(te_ops.quantize_to_int, b, qp, acc, seed, SALTS[2])
                y = bb.emit(_integer_core(core.value, xi, wi, acc))
                axis = len(y.ty.shape) - 1 if core.value.op.name == "relax.matmul" else 1
                out = bb.emit_te(te_ops.requantize, y, bi, qp, fl, axis, seed)
                out = bb.emit_output(out)
            bb.emit_func_output(out)


def _prod(xs: list[int]) -> int:
    out = 1
    for v in xs:
        out *= v
    return out
