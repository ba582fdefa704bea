"""Add the low-bit backward products of a layer: ``dx(g, w, ...)`` and ``dw(x, g, ...)``.

The incoming gradient is quantized stochastically into the class's integer container with a
dynamic scale ``qp_g`` chosen per call by the runtime (gradients span many octaves, so a fixed fl
would flush them to zero); the weight and the saved input are already on the layer's grid. The
products accumulate in integers and are rescaled once, so they are exact given the quantized
operands. ``dw`` reduces over the batch, whose size is only known at run time: it always
accumulates in int64.
"""

from __future__ import annotations

import tvm
from tvm import relax

from marvin_compile import te_grad_ops, te_ops
from marvin_compile.kernel_classes import KernelClass
from marvin_compile.passes.find_layers import CORE_OPS, op_name
from marvin_compile.passes.utils import layer_functions, param

SALT_GRAD = 0x5BD1E995


def _core(func: relax.Function) -> relax.Call:
    calls = [b.value for blk in func.body.blocks for b in blk.bindings if op_name(b.value) in CORE_OPS]
    if len(calls) != 1:
        raise ValueError(f"layer {func.attrs['marvin.layer']} must hold one conv/matmul")
    return calls[0]


@tvm.transform.module_pass(opt_level=0, name="AddGradientKernels")
class AddGradientKernels:
    """For the module's single layer function, add integer ``dx`` and ``dw`` functions of a class."""

    def __init__(self, kernel_class: KernelClass) -> None:
        if not kernel_class.is_integer:
            raise ValueError(f"low-bit gradients need an integer kernel class, got {kernel_class.name}")
        self.kernel_class = kernel_class

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        ((_, func),) = layer_functions(mod)
        core = _core(func)
        x_ty, w_ty, y_ty = func.params[0].ty, func.params[1].ty, func.ret_ty
        if core.op.name == "relax.matmul" and len(x_ty.shape) != 2:
            raise ValueError(
                f"layer {func.attrs['marvin.layer']}: low-bit backward supports 2-D Linear inputs only"
            )
        w_shape = [int(d) for d in w_ty.shape]
        k = self.kernel_class
        bb = relax.BlockBuilder(mod)
        quant = te_ops.quantize_to_int

        g, w, qp_g, qp_w, seed = (
            param("g", y_ty.shape, "float32"),
            param("w", w_ty.shape, "float32"),
            param("qp_g", (4,), "float32"),
            param("qp_w", (4,), "float32"),
            param("seed", (), "uint32"),
        )
        with bb.function("dx", [g, w, qp_g, qp_w, seed]):
            with bb.dataflow():
                gi = bb.emit_te(
                    quant, g, qp_g, k.container, seed, SALT_GRAD, primfunc_name_hint="fxp_quantize_grad"
                )
                wi = bb.emit_te(quant, w, qp_w, k.container, primfunc_name_hint="fxp_quantize_int")
                if core.op.name == "relax.matmul":
                    acc = k.accumulator(w_shape[0])
                    prod = bb.emit(relax.op.matmul(gi, wi, out_dtype=acc))
                else:
                    a = core.attrs
                    nd = len(w_shape) - 2
                    acc = k.accumulator(w_shape[0] // int(a.groups) * _prod(w_shape[2:]))
                    prod = bb.emit_te(
                        te_grad_ops.conv_input_grad,
                        gi,
                        wi,
                        [int(d) for d in list(x_ty.shape)[2:]],
                        [int(v) for v in a.strides],
                        [int(v) for v in list(a.padding)[:nd]],
                        [int(v) for v in a.dilation],
                        int(a.groups),
                        acc,
                    )
                out = bb.emit_output(bb.emit_te(te_grad_ops.rescale, prod, qp_g, qp_w))
            bb.emit_func_output(out)

        x, g2, qp_x, qp_g2, seed2 = (
            param("x", x_ty.shape, "float32"),
            param("g", y_ty.shape, "float32"),
            param("qp_x", (4,), "float32"),
            param("qp_g", (4,), "float32"),
            param("seed", (), "uint32"),
        )
        with bb.function("dw", [x, g2, qp_x, qp_g2, seed2]):
            with bb.dataflow():
                xi = bb.emit_te(quant, x, qp_x, k.container, primfunc_name_hint="fxp_quantize_int")
                gi = bb.emit_te(
                    quant, g2, qp_g2, k.container, seed2, SALT_GRAD, primfunc_name_hint="fxp_quantize_grad"
                )
                if core.op.name == "relax.matmul":
                    prod = bb.emit(relax.op.matmul(relax.op.permute_dims(gi, [1, 0]), xi, out_dtype="int64"))
                else:
                    a = core.attrs
                    nd = len(w_shape) - 2
                    prod = bb.emit_te(
                        te_grad_ops.conv_weight_grad,
                        xi,
                        gi,
                        w_shape,
                        [int(v) for v in a.strides],
                        [int(v) for v in list(a.padding)[:nd]],
                        [int(v) for v in a.dilation],
                        int(a.groups),
                        "int64",
                    )
                out = bb.emit_output(bb.emit_te(te_grad_ops.rescale, prod, qp_x, qp_g2))
            bb.emit_func_output(out)
        return bb.get()


def _prod(xs: list[int]) -> int:
    out = 1
    for v in xs:
        out *= v
    return out
