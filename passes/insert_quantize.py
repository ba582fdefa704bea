"""Insert variable-precision fixed-point quantize nodes on each layer's input, weight, bias, output.

The precision is a runtime argument (``qp``, ``fl``; see ``marvin_compile.te_ops``), so one
compiled variant serves every (wl, fl) of its kernel class. After this pass a layer computes
``Q(layer(Q(x), Q(w), Q(b)))`` in float32: the paper's simulation, and the float32 class's kernel.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from marvin_compile import te_ops
from marvin_compile.fixed_point import Precision, check_rounding
from marvin_compile.passes.utils import map_layers, param, substitute

ROUNDING_ATTR = "marvin.rounding"
SALTS = (te_ops.SALT_INPUT, te_ops.SALT_WEIGHT, te_ops.SALT_BIAS)


def precision_params(rounding: str) -> list[relax.Var]:
    """The runtime precision arguments every layer variant takes after its tensors."""
    out = [param("qp", (4,), "float32"), param("fl", (), "int32")]
    if rounding == "stochastic":
        out.append(param("seed", (), "uint32"))
    return out


def precision_values(p: Precision) -> tuple[np.ndarray, np.ndarray]:
    """The values of ``precision_params``' qp and fl for precision ``p`` (layout: ``te_ops``)."""
    qp = np.array([2.0**p.fl, 2.0**-p.fl, p.int_min, p.int_max], dtype=np.float32)
    return qp, np.array(p.fl, dtype=np.int32)


@tvm.transform.module_pass(opt_level=0, name="InsertFixedPointQuantize")
class InsertFixedPointQuantize:
    """Wrap every layer function's tensors in runtime-precision fixed-point quantizers."""

    def __init__(self, rounding: str = "nearest") -> None:
        check_rounding(rounding)
        self.rounding = rounding

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return map_layers(mod, self._rewrite)

    def _rewrite(self, bb: relax.BlockBuilder, func: relax.Function, name: str) -> None:
        tensors = [param(p.name, p.ty.shape, p.ty.dtype) for p in func.params]
        extra = precision_params(self.rounding)
        qp, seed = extra[0], (extra[2] if len(extra) == 3 else None)
        attrs = {**dict(func.attrs), ROUNDING_ATTR: self.rounding}
        with bb.function(name, tensors + extra, attrs=attrs):
            with bb.dataflow():
                vmap = {
                    old: bb.emit_te(
                        te_ops.fake_quantize, new, qp, seed, salt, primfunc_name_hint=te_ops.QUANTIZE_NAME
                    )
                    for old, new, salt in zip(func.params, tensors, SALTS, strict=False)
                }
                for block in func.body.blocks:
                    for b in block.bindings:
                        vmap[b.var] = bb.emit(substitute(b.value, vmap))
                y = substitute(func.body.body, vmap)
                out = bb.emit_te(
                    te_ops.fake_quantize,
                    y,
                    qp,
                    seed,
                    te_ops.SALT_OUTPUT,
                    primfunc_name_hint=te_ops.QUANTIZE_NAME,
                )
                out = bb.emit_output(out)
            bb.emit_func_output(out)


def input_quantizer(func: relax.Function, rounding: str) -> tvm.IRModule:
    """``Q(x)`` of a layer's input exactly as its variants compute it (same hash site and seed).

    The float straight-through backward needs the quantized input; recomputing it here, bit for
    bit, saves quantizing every activation a second time in the forward pass (the low-bit backward's
    dw quantizes it inside its kernel instead).
    """
    x = param("x", func.params[0].ty.shape, func.params[0].ty.dtype)
    extra = precision_params(rounding)
    seed = extra[2] if len(extra) == 3 else None
    bb = relax.BlockBuilder()
    with bb.function("quantize_input", [x, *extra]):
        with bb.dataflow():
            out = bb.emit_te(
                te_ops.fake_quantize, x, extra[0], seed, SALTS[0], primfunc_name_hint=te_ops.QUANTIZE_NAME
            )
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    return bb.get()
