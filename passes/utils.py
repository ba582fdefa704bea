"""Small helpers the passes share: re-emitting bindings under a variable substitution."""

from __future__ import annotations

import math
from collections.abc import Callable

import tvm
from tvm import relax, tirx
from tvm.s_tir import Schedule

LAYER_ATTR = "marvin.layer"


def substitute(e: relax.Expr, vmap: dict) -> relax.Expr:
    """Rebuild ``e`` with variables replaced by ``vmap`` (calls, tuples and leaves only)."""
    if isinstance(e, relax.Var):
        return vmap.get(e, e)
    if isinstance(e, relax.Call):
        return relax.Call(e.op, [substitute(a, vmap) for a in e.args], e.attrs, e.ty_args)
    if isinstance(e, relax.Tuple):
        return relax.Tuple([substitute(f, vmap) for f in e.fields])
    if isinstance(e, relax.TupleGetItem):
        return relax.TupleGetItem(substitute(e.tuple_value, vmap), e.index)
    return e


def layer_functions(mod: tvm.IRModule) -> list[tuple[relax.GlobalVar, relax.Function]]:
    """The per-layer Relax functions of a module, in name order."""
    out = [
        (gv, f)
        for gv, f in mod.functions.items()
        if isinstance(f, relax.Function) and f.attrs is not None and LAYER_ATTR in f.attrs
    ]
    return sorted(out, key=lambda p: (len(p[0].name_hint), p[0].name_hint))  # layer_2 before layer_10


def param(name: str, shape, dtype: str) -> relax.Var:
    return relax.Var(name, relax.TensorType(shape, dtype))


def map_layers(
    mod: tvm.IRModule, rewrite: Callable[[relax.BlockBuilder, relax.Function, str], None]
) -> tvm.IRModule:
    """Replace every layer function by ``rewrite(bb, func, name)``, which defines ``name`` in ``bb``
    (a rewrite that defines nothing keeps the layer as it is).

    Sharing one BlockBuilder lets the rewrites add deduplicated PrimFuncs; callers keep using the
    original GlobalVars, so ``main`` stays valid.
    """
    bb = relax.BlockBuilder(mod)
    layers = layer_functions(mod)
    replaced = {}
    for gv, func in layers:
        tmp = gv.name_hint + "__rewritten"
        rewrite(bb, func, tmp)
        replaced[tmp] = gv
    built = bb.get()
    defined = {gv.name_hint for gv in built.functions}
    old = {gv.name_hint for gv, _ in layers if gv.name_hint + "__rewritten" in defined}
    symbols = {gv: f.attrs.get("global_symbol") if f.attrs is not None else None for gv, f in layers}
    out = {}
    for gv, f in built.functions.items():
        if gv.name_hint in replaced:
            orig = replaced[gv.name_hint]
            f = f.without_attr("global_symbol")  # bb.function named it after the temporary name
            out[orig] = f if symbols[orig] is None else f.with_attr("global_symbol", symbols[orig])
        elif gv.name_hint not in old:
            out[gv] = f
    return tvm.IRModule(out)


# TIR schedule helpers shared by schedule_cpu and schedule_dot.
VECTOR_LANES = (16, 8, 4, 2)
MAX_VECTOR = 64  # longest row vectorized as one vector
# A loop nest of fewer iterations (all extents static: a library specialized to a small batch) runs on
# the calling thread: waking the thread pool costs more than the work it would share. Serial layout
# kernels (and tile loops, ``amx.SERIAL_TILE_STEPS``) took ResNet-20 at batch 1 from 0.58 to 0.31 ms.
# At 2**16 its stem and its 32->64 strided conv (0.44M and 1.2M multiply-adds) ran serially in 15 and
# 16 us, shared in 11 and 11 us; 2**13 and 2**12 gained nothing more (the 1x1 shortcuts stay serial)
SERIAL_ITERATIONS = 1 << 14


def iterations(sch: Schedule, block) -> int | None:
    """The block's static iteration count (None where an extent is symbolic)."""
    total = 1
    for lp in sch.get_loops(block):
        extent = static_extent(sch.get(lp).extent)
        if extent is None:
            return None
        total *= extent
    return total


def parallel(sch: Schedule, loop, block, unit: int = 1) -> None:
    """``loop`` parallel, unless ``block`` is known to be too small to share: fewer than
    ``SERIAL_ITERATIONS`` iterations, counted in ``unit``s (a dot instruction's multiply-adds)."""
    count = iterations(sch, block)
    if count is None or count // unit >= SERIAL_ITERATIONS:
        sch.parallel(loop)


def vectorize_row(sch: Schedule, loop) -> bool:
    """Vectorize ``loop`` as one vector if its extent is static and at most ``MAX_VECTOR`` (LLVM
    splits it into registers); whether it did."""
    extent = static_extent(sch.get(loop).extent)
    if extent is None or extent > MAX_VECTOR:
        return False
    sch.vectorize(loop)
    return True


def vectorize_loop(sch: Schedule, loop) -> None:
    """Vectorize ``loop``: as one vector (``vectorize_row``), else split by the widest vector that
    divides its static extent (left scalar where none does)."""
    if vectorize_row(sch, loop):
        return
    lanes = lanes_for(static_extent(sch.get(loop).extent) or 1)
    if lanes is not None:
        sch.vectorize(sch.split(loop, factors=[None, lanes])[1])


def static_extent(extent: tirx.PrimExpr) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def lanes_for(extent: int) -> int | None:
    """The widest vector that divides the extent (no tail predicate, which vectorize rejects)."""
    return next((v for v in VECTOR_LANES if extent % v == 0), None)


def schedule_injective(sch: Schedule, block) -> None:
    """Parallel outside (``parallel``), vectorized inside by the widest vector dividing the static
    trailing extents: the shortest run of trailing loops whose extents the vector divides is fused
    and split by it, the loops before it (a symbolic batch among them) fused with its outer part.

    TVM's vectorizer gathers lane by lane where a lane's index needs a div/mod it cannot simplify,
    as when the vector split all loops fused with a symbolic batch (14-pixel rows: 17x slower)
    or a reshape's index (LeNet-5's flatten before its first Linear layer: 10x)."""
    loops = sch.get_loops(block)
    if not loops:
        return  # a scalar
    extents = [static_extent(sch.get(lp).extent) for lp in loops]
    first_static = len(loops)
    while first_static > 0 and extents[first_static - 1] is not None:
        first_static -= 1
    lanes = lanes_for(math.prod(extents[first_static:]))  # None for no static loop: prod() is 1
    if lanes is None:
        parallel(sch, sch.fuse(*loops) if len(loops) > 1 else loops[0], block)
        return
    start, run = len(loops), 1
    while run % lanes:
        start -= 1
        run *= extents[start]
    tail = sch.fuse(*loops[start:]) if len(loops) - start > 1 else loops[start]
    tail_outer, inner = sch.split(tail, factors=[None, lanes])
    parallel(sch, sch.fuse(*loops[:start], tail_outer) if start else tail_outer, block)
    sch.vectorize(inner)
