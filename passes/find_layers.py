"""Find the quantizable layers of an imported model: Conv1D/2D and MatMul/Gemm with a weight."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import tvm
from tvm import relax

from marvin_compile.frontend import layer_name

CORE_OPS = {"relax.nn.conv1d": "conv1d", "relax.nn.conv2d": "conv2d", "relax.matmul": "matmul"}


@dataclass
class LayerMatch:
    """One layer: the bindings of main that compute it, and the variables it reads."""

    name: str
    op: str  # conv1d | conv2d | matmul
    x: relax.Expr  # the activation input
    weight: relax.Var  # a parameter of main
    bias: relax.Var | None
    output: relax.Var  # the last binding of the layer, whose value main goes on to use
    bindings: list[relax.VarBinding] = field(default_factory=list)  # in program order

    @property
    def reduction(self) -> int:
        """K of the dot products, which bounds the accumulator."""
        w = [int(d) for d in self.weight.ty.shape]
        return w[1] * _prod(w[2:]) if self.op.startswith("conv") else w[1]


def _prod(xs: list[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _uses(func: relax.Function) -> Counter:
    """How often each variable is read, counted over all binding values and the function output."""
    counts: Counter = Counter()

    def visit(e) -> None:
        if isinstance(e, relax.Var):
            counts[e] += 1
        elif isinstance(e, relax.Call):
            for a in e.args:
                visit(a)
        elif isinstance(e, relax.Tuple):
            for a in e.fields:
                visit(a)
        elif isinstance(e, relax.TupleGetItem):
            visit(e.tuple_value)

    for block in func.body.blocks:
        for b in block.bindings:
            visit(b.value)
    visit(func.body.body)
    return counts


def op_name(e: relax.Expr) -> str | None:
    return e.op.name if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None


def find_quantizable_layers(func: relax.Function) -> list[LayerMatch]:
    """Match ``core(x, W[^T]) [+ reshape(B)]`` where W and B are parameters of ``func``."""
    params = set(
        func.params[int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else 1 :]
    )
    uses = _uses(func)
    bindings = [b for block in func.body.blocks for b in block.bindings]
    value_of = {b.var: b for b in bindings}
    consumers: dict[relax.Var, list[relax.VarBinding]] = {}
    for b in bindings:
        if isinstance(b.value, relax.Call):
            for a in b.value.args:
                if isinstance(a, relax.Var):
                    consumers.setdefault(a, []).append(b)

    layers: list[LayerMatch] = []
    seen_names: Counter = Counter()
    for b in bindings:
        op = CORE_OPS.get(op_name(b.value) or "")
        if op is None:
            continue
        x, w = b.value.args[0], b.value.args[1]
        absorbed = [b]
        if w not in params:
            wb = value_of.get(w)
            transposed = (
                op == "matmul"
                and wb is not None
                and op_name(wb.value) == "relax.permute_dims"
                and wb.value.args[0] in params
                and len(wb.value.args[0].ty.shape) == 2
                and uses[w] == 1
            )
            if not transposed:
                continue
            absorbed.insert(0, wb)
            w = wb.value.args[0]
        if op == "matmul" and len(w.ty.shape) != 2:
            continue
        bias, output = None, b.var
        after = consumers.get(b.var, [])
        if uses[b.var] == 1 and len(after) == 1 and op_name(after[0].value) == "relax.add":
            other = [a for a in after[0].value.args if not a.same_as(b.var)]
            if len(other) == 1:
                cand, rb = other[0], value_of.get(other[0])
                if rb is not None and op_name(rb.value) == "relax.reshape" and uses[cand] == 1:
                    absorbed.append(rb)
                    cand = rb.value.args[0]
                if cand in params and len(cand.ty.shape) == 1:
                    bias, output = cand, after[0].var
                    absorbed.append(after[0])
                elif rb is not None and absorbed[-1] is rb:
                    absorbed.pop()
        name = layer_name(w.name)
        seen_names[name] += 1
        if seen_names[name] > 1:
            name = f"{name}#{seen_names[name]}"
        order = {bb.var: i for i, bb in enumerate(bindings)}
        absorbed.sort(key=lambda bb: order[bb.var])
        layers.append(LayerMatch(name, op, x, w, bias, output, absorbed))
    return layers
