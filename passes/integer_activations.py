"""Hand integer levels, not float32, from one deployed layer to the next.

A deployed layer's output is an exact level times ``2**-fl``; the ReLU, residual add, max pool and
reshapes between layers keep it on such a grid; and the next layer's input quantizer only has to
rescale it. This pass rewrites ``main`` so those ops run on the levels (an add first aligning its
operands' grids by shifts) and marks the layers: each returns its levels (``OUTPUT_LEVELS_ATTR``),
and one fed by levels takes them (``INPUT_LEVELS_ATTR``: their fl and range). ``LowerToIntegerKernels``
then ends the kernel at its clamped levels and starts the next one with a shift where it multiplied,
rounded and clamped float32: half the bytes between layers and integer work at both ends. A value
something else needs in float32 (a mean, the model's output) is dequantized where it is used.

Exact: the float32 path's values are these levels times powers of two. Each layer function stays
complete in itself (it dequantizes its input and takes its output's levels as explicit ops), so a
lowering that does not fold them in computes the same. Run in phase freeze, after
``InsertFixedPointQuantize``: the precisions are static there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from marvin_compile.fixed_point import Precision
from marvin_compile.kernel_classes import class_for_wl
from marvin_compile.passes.insert_quantize import precision_values
from marvin_compile.passes.utils import LAYER_ATTR, layer_functions, param, substitute

INPUT_LEVELS_ATTR = "marvin.input_levels"  # (fl, lo, hi) of the levels a layer takes as its input
OUTPUT_LEVELS_ATTR = "marvin.output_levels"  # the layer returns its levels (int16), not float32
LEVELS_DTYPE = "int16"  # a layer's own levels: every integer class's word fits
# ops that move or select elements without changing them: the same on levels as on their values
# (a max pool's padding is the dtype's minimum, never chosen over a window's real element)
SAME_LEVELS = {
    "relax.nn.max_pool2d",
    "relax.reshape",
    "relax.flatten",
    "relax.permute_dims",
    "relax.squeeze",
    "relax.expand_dims",
}


@dataclass(frozen=True)
class Levels:
    """An integer activation: its value is ``level * 2**-fl`` with ``level`` in ``[lo, hi]``."""

    fl: int
    lo: int
    hi: int

    @staticmethod
    def of(p: Precision) -> Levels:
        return Levels(p.fl, p.int_min, p.int_max)

    def shifted(self, fl: int) -> Levels:
        """The same values on the finer grid ``fl`` (>= self.fl)."""
        s = fl - self.fl
        return Levels(fl, self.lo << s, self.hi << s)

    @property
    def dtype(self) -> str | None:
        """The narrowest container of int16 / int32 holding the range (None: neither)."""
        for dtype in ("int16", "int32"):
            info = np.iinfo(dtype)
            if info.min <= self.lo and self.hi <= info.max:
                return dtype
        return None


def dequantize(levels: relax.Expr, fl: int) -> relax.Expr:
    """The float32 values of ``levels`` on the 2**-fl grid (exact below 2**24)."""
    return relax.op.multiply(relax.op.astype(levels, "float32"), relax.const(2.0**-fl, "float32"))


def to_levels(values: relax.Expr, fl: int) -> relax.Expr:
    """The int16 levels of float32 ``values`` that lie on the 2**-fl grid (a layer's output)."""
    return relax.op.astype(relax.op.multiply(values, relax.const(2.0**fl, "float32")), LEVELS_DTYPE)


@tvm.transform.module_pass(opt_level=0, name="IntegerActivations")
class IntegerActivations:
    """Integer levels between the integer-class layers of ``main`` (``precision``: every layer's)."""

    def __init__(self, precision: Mapping[str, Precision]) -> None:
        self.precision = precision

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        main = mod["main"]
        bindings = [b for block in main.body.blocks for b in block.bindings]
        calls = Counter(b.value.op for b in bindings if isinstance(b.value, relax.Call))
        layers = {
            gv: func
            for gv, func in layer_functions(mod)
            if calls[gv] == 1 and class_for_wl(self._precision(func).wl).is_integer
        }
        if not layers:
            return mod
        levels, inputs = self._plan(bindings, layers)
        bb = relax.BlockBuilder(tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv not in layers}))
        renamed = {gv: self._layer(bb, gv.name_hint, func, inputs.get(gv)) for gv, func in layers.items()}
        return self._main(bb, main, bindings, levels, renamed)

    def _precision(self, func: relax.Function) -> Precision:
        return self.precision[str(func.attrs[LAYER_ATTR])]

    def _plan(
        self, bindings: list[relax.Binding], layers: Mapping[relax.GlobalVar, relax.Function]
    ) -> tuple[dict[relax.Var, Levels], dict[relax.GlobalVar, Levels]]:
        """Which of main's values are levels (and their grid and range), and which layers take levels."""
        levels: dict[relax.Var, Levels] = {}
        inputs: dict[relax.GlobalVar, Levels] = {}
        for b in bindings:
            v = b.value
            if not isinstance(v, relax.Call) or not v.args:
                continue
            args = [levels.get(a) if isinstance(a, relax.Var) else None for a in v.args]
            if v.op in layers:
                if args[0] is not None:
                    inputs[v.op] = args[0]
                levels[b.var] = Levels.of(self._precision(layers[v.op]))
            elif not isinstance(v.op, tvm.ir.Op) or args[0] is None:
                continue
            elif v.op.name == "relax.nn.relu":
                levels[b.var] = Levels(args[0].fl, max(args[0].lo, 0), max(args[0].hi, 0))
            elif v.op.name in SAME_LEVELS:
                levels[b.var] = args[0]
            elif v.op.name == "relax.add" and args[1] is not None:
                total = _sum(args[0], args[1])
                if total.dtype is not None:
                    levels[b.var] = total
        return levels, inputs

    def _layer(
        self, bb: relax.BlockBuilder, name: str, func: relax.Function, given: Levels | None
    ) -> relax.GlobalVar:
        """The layer returning its levels and, fed levels (``given``), taking them."""
        p = self._precision(func)
        params = [param(v.name, v.ty.shape, v.ty.dtype) for v in func.params]
        attrs = {**dict(func.attrs), OUTPUT_LEVELS_ATTR: True}
        if given is not None:
            params[0] = param(params[0].name, params[0].ty.shape, given.dtype)
            attrs[INPUT_LEVELS_ATTR] = [given.fl, given.lo, given.hi]
        with bb.function(name + "__levels", params, attrs=attrs, private=True):
            with bb.dataflow():
                vmap = dict(zip(func.params, params, strict=True))
                if given is not None:
                    vmap[func.params[0]] = bb.emit(dequantize(params[0], given.fl))
                for block in func.body.blocks:
                    for b in block.bindings:
                        vmap[b.var] = bb.emit(substitute(b.value, vmap))
                out = bb.emit_output(to_levels(substitute(func.body.body, vmap), p.fl))
            bb.emit_func_output(out)
        return bb.get().get_global_var(name + "__levels")

    def _main(
        self,
        bb: relax.BlockBuilder,
        main: relax.Function,
        bindings: list[relax.Binding],
        levels: Mapping[relax.Var, Levels],
        renamed: Mapping[relax.GlobalVar, relax.GlobalVar],
    ) -> tvm.IRModule:
        vmap: dict = {}
        floats: dict[relax.Var, relax.Var] = {}

        def as_float(e: relax.Expr) -> relax.Expr:
            """``e`` rebuilt, its levels dequantized (once per value)."""
            if isinstance(e, relax.Var) and e in levels:
                if e not in floats:
                    floats[e] = bb.emit(dequantize(vmap[e], levels[e].fl))
                return floats[e]
            if isinstance(e, relax.Call):
                return relax.Call(e.op, [as_float(a) for a in e.args], e.attrs, e.ty_args)
            if isinstance(e, relax.Tuple):
                return relax.Tuple([as_float(f) for f in e.fields])
            return substitute(e, vmap)

        def aligned(a: relax.Var, fl: int, dtype: str) -> relax.Expr:
            out = vmap[a] if levels[a].dtype == dtype else relax.op.astype(vmap[a], dtype)
            s = fl - levels[a].fl
            return out if s == 0 else relax.op.left_shift(out, relax.const(s, dtype))

        with bb.function("main__levels", list(main.params), attrs=dict(main.attrs)):
            with bb.dataflow():
                for b in bindings:
                    v = b.value
                    if b.var in levels and isinstance(v, relax.Call) and v.op in renamed:
                        x = vmap[v.args[0]] if v.args[0] in levels else as_float(v.args[0])
                        callee = bb.get()[renamed[v.op]]
                        if len(v.args) + 2 != len(callee.params):
                            raise ValueError(f"{v.op.name_hint}: expected main to pass its tensors only")
                        p = self._precision(callee)
                        precision = [relax.const(v) for v in precision_values(p)]
                        value = relax.Call(renamed[v.op], [x, *map(as_float, v.args[1:]), *precision])
                    elif b.var in levels and v.op.name == "relax.add":
                        a, c = v.args
                        total = levels[b.var]
                        value = relax.op.add(
                            aligned(a, total.fl, total.dtype), aligned(c, total.fl, total.dtype)
                        )
                    elif b.var in levels:  # the ReLU and SAME_LEVELS: the op itself, on the levels
                        value = relax.Call(v.op, [vmap[v.args[0]], *map(as_float, v.args[1:])], v.attrs)
                    else:
                        value = as_float(v)
                    vmap[b.var] = bb.emit(value, b.var.name)
                out = bb.emit_output(as_float(main.body.body))
            bb.emit_func_output(out)
        built = bb.get()
        functions = {
            gv: f for gv, f in built.functions.items() if gv.name_hint not in ("main", "main__levels")
        }
        functions[tvm.ir.GlobalVar("main")] = built["main__levels"].with_attr("global_symbol", "main")
        return tvm.IRModule(functions, attrs=built.attrs)


def _sum(a: Levels, b: Levels) -> Levels:
    """The levels of ``a + b`` on the finer of their grids, the range widened to the shifted
    operands' own: the add runs in the container of the result."""
    fl = max(a.fl, b.fl)
    a, b = a.shifted(fl), b.shifted(fl)
    return Levels(fl, min(a.lo, b.lo, a.lo + b.lo), max(a.hi, b.hi, a.hi + b.hi))
