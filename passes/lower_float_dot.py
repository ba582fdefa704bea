"""Run the float32 class's conv/matmul on the packed FMA kernel (``te_dot``, float32).

The float32 class computes ``Q(layer(Q(x), Q(w), Q(b)))`` in float32 (the paper's simulation).
Its product is an ordinary float32 conv or matmul, which TVM's generic CPU schedule runs at a
fraction of the machine's FMA throughput; this pass swaps it for the same register-blocked,
tensorized kernel the integer classes use, with ``vfmadd`` as the instruction. Summation order
differs from a naive loop, as any float32 BLAS does.
"""

from __future__ import annotations

import functools

import tvm
from tvm import relax

from marvin_compile import te_dot
from marvin_compile.dot_isa import DotISA
from marvin_compile.passes.find_layers import CORE_OPS, op_name
from marvin_compile.passes.lower_integer import packed_core
from marvin_compile.passes.utils import map_layers, param, substitute

CLASS_ATTR = "marvin.kernel_class"


@tvm.transform.module_pass(opt_level=0, name="LowerFloatDotKernels")
class LowerFloatDotKernels:
    """Replace the float conv2d / Linear product of every float32-class layer by the packed kernel."""

    def __init__(self, isa: DotISA | None) -> None:
        self.isa = isa

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if self.isa is None:
            return mod
        return map_layers(mod, self._rewrite)

    def _rewrite(self, bb: relax.BlockBuilder, func: relax.Function, name: str) -> None:
        if CLASS_ATTR in func.attrs:
            return  # an integer class: LowerToIntegerKernels owns it
        bindings = [b for block in func.body.blocks for b in block.bindings]
        by_var = {b.var: b for b in bindings}
        cores = [b for b in bindings if op_name(b.value) in CORE_OPS]
        if len(cores) != 1 or cores[0].value.args[0].ty.dtype != "float32":
            return
        core = cores[0]
        w_arg = core.value.args[1]
        w_perm = by_var[w_arg].value if w_arg in by_var else None
        w_perm = w_perm if op_name(w_perm) == "relax.permute_dims" else None
        weight = w_perm.args[0] if w_perm is not None else w_arg
        packed = packed_core(core.value, weight, w_perm, self.isa)
        if packed is None:
            return
        kind, kwargs = packed
        kernel = functools.partial(
            getattr(te_dot, kind), **kwargs, isa=self.isa, container="float32", acc="float32"
        )
        params = [param(p.name, p.ty.shape, p.ty.dtype) for p in func.params]
        vmap = dict(zip(func.params, params, strict=True))
        with bb.function(name, params, attrs=dict(func.attrs)):
            with bb.dataflow():
                for b in bindings:
                    if b is core:
                        x, w = substitute(core.value.args[0], vmap), substitute(weight, vmap)
                        vmap[b.var] = bb.emit(
                            bb.call_te(kernel, x, w, primfunc_name_hint=f"marvin_dot_{kind}")
                        )
                    else:
                        vmap[b.var] = bb.emit(substitute(b.value, vmap))
                out = bb.emit_output(substitute(func.body.body, vmap))
            bb.emit_func_output(out)
