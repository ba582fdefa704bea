"""Lower each quantize -> conv/matmul -> quantize chain to an integer kernel of its class.

Inputs and weights are quantized straight into the class's integer container, the product
accumulates in the narrowest integer type the worst-case bound allows, and bias add, rounding and
the output clamp happen on the accumulator (``te_ops.requantize``): the result is the exact
fixed-point value, not a float32 approximation of it.

Given an x86 dot-product family (``dot_isa``), conv2d and Linear products run as packed kernels
on the machine's integer dot instructions (``te_dot``), which accumulate in int32. For the int8
class that is always exact. For the int16 class it is exact only while the sums fit int32, which
the worst case (``K * 2**(2*(wl-1)) < 2**31``) allows only up to wl 11-14 in LeNet-5 and ResNet-20,
so the kernel branches at run time on this call's weights (``te_ops.sums_fit_int32``): the packed
int32 kernel where they keep the sums and the requantize in int32 (trained-size weights do at
wl 16), else the packed kernel on float64 FMAs, whose integer-valued sums are exact below 2**53
(any K < 2**23).

A deployed layer on the byte chain (a ReLU-fed int8 input without VNNI) whose constant weights
keep every pair lane's sum inside int16 accumulates in int16 (``te_dot.int16_sums_fit``); so does
a signed int8 one, its input packed as x + 128, where the weights allow inputs up to 255. A deployed
int16 layer joins the chain where its weight levels fit a byte and its input's levels (their range
known from ``IntegerActivations``) fit unsigned bytes (``_byte_chain``).

Where the machine has AMX tiles (``dot_isa(...).amx``), conv2d and Linear layers with at least 8
input channels run on them (``amx``): the int8 class always; the int16 class as byte products
summed in int64, exact at every word length: convs from 32 input channels with no branch at all
(faster than vpdpwssd there), other layers only above the int32 bound (in place of float64). A
deployed int16 conv whose weight levels fit a byte always runs on tiles, as two byte products.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te

from marvin_compile import amx, te_dot, te_ops
from marvin_compile.dot_isa import BIASED_INT8, DotISA
from marvin_compile.fixed_point import Precision, quantize_np
from marvin_compile.kernel_classes import KernelClass
from marvin_compile.passes.find_layers import CORE_OPS, op_name
from marvin_compile.passes.insert_quantize import SALTS
from marvin_compile.passes.integer_activations import (
    INPUT_LEVELS_ATTR,
    LEVELS_DTYPE,
    OUTPUT_LEVELS_ATTR,
    Levels,
    to_levels,
)
from marvin_compile.passes.nonneg_inputs import operand_container
from marvin_compile.passes.utils import LAYER_ATTR, map_layers, param, static_extent

ACC_ATTR = "marvin.accumulator"
OPERAND_ATTR = "marvin.operand"  # a packed kernel's activation operand (``te_dot`` container)
INT32_MAX = 2**31 - 1
QNAME = "fxp_quantize_int"
FLOAT64_EXACT_K = 2**23  # int16 products (<= 2**30) sum exactly in float64 below this many terms
OUT_ELEMWISE_FUSABLE = 4  # TVM's OpPatternKind kOutEWiseFusable: element-wise consumers fuse in
INJECTIVE = 2  # TVM's OpPatternKind kInjective: fuses with injective producers and consumers
OPAQUE = 8  # TVM's OpPatternKind kOpaque: nothing fuses with it


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


def weight_levels(weight: np.ndarray, precision: Precision) -> np.ndarray:
    """The integer levels deployment quantizes a weight to (nearest rounding, clamped to wl)."""
    return quantize_np(weight.astype(np.float64), precision.wl, precision.fl) * 2.0**precision.fl


def weight_bound(weight: np.ndarray, precision: Precision) -> int:
    """The largest |sum_k x[k] * w[o, k]| any input can reach with these weights (nearest rounding)."""
    levels = weight_levels(weight, precision).reshape(weight.shape[0], -1)
    return int(np.abs(levels).sum(axis=1).max()) * 2 ** (precision.wl - 1)


def requantize_fits_int32(bound: int, precision: Precision) -> bool:
    """Whether a deployed layer's integer arithmetic stays inside int32 end to end: the products'
    sum (``bound``, its ``weight_bound``), the bias shifted onto their grid (a level of the layer's wl times
    2**fl) and the rounding term. The int16 class then requantizes in int32, not int64: half the
    vector work in the tile kernel's epilogue (ResNet-20: 4% at batch 1 and 64)."""
    bias = 2 ** (precision.wl - 1 + precision.fl)
    return bound + bias + 2**precision.fl <= INT32_MAX


def fits_byte(weight: np.ndarray, precision: Precision) -> bool:
    """Whether every weight level fits int8: an int16 layer then runs two byte products on AMX
    tiles, not four (``amx.Geometry.narrow``)."""
    levels = weight_levels(weight, precision)
    return bool(levels.min() >= -128 and levels.max() <= 127)


def int32_max_wl(reduction: int) -> int:
    """The largest wl whose products sum exactly in int32 over a reduction of length K."""
    wl = 1
    while reduction * 4**wl <= INT32_MAX:  # |x|, |w| <= 2**(wl-1), so |product| <= 4**(wl-1)
        wl += 1
    return wl


def packed_core(
    core: relax.Call, weight: relax.Expr, w_perm: relax.Call | None, isa: DotISA | None
) -> tuple[str, dict] | None:
    """How a packed kernel (``te_dot``) computes this core, as (kernel name, its static arguments),
    or None if it cannot: grouped/dilated conv, other layouts, Linear on more than 2-D input."""
    if isa is None:
        return None
    a = core.attrs
    if core.op.name == "relax.nn.conv2d":
        plain = (
            int(a.groups) == 1
            and all(int(d) == 1 for d in a.dilation)
            and (a.data_layout, a.kernel_layout, a.out_layout) == ("NCHW", "OIHW", "NCHW")
            and len(weight.ty.shape) == 4
        )
        if not plain:
            return None
        return "conv2d", {"strides": [int(v) for v in a.strides], "padding": [int(v) for v in a.padding]}
    transposed = w_perm is not None and [int(v) for v in w_perm.attrs.axes] == [1, 0]
    if core.op.name == "relax.matmul" and transposed and len(core.args[0].ty.shape) == 2:
        return "matmul", {}
    return None


@tvm.transform.module_pass(opt_level=0, name="LowerToIntegerKernels")
class LowerToIntegerKernels:
    """Rewrite quantized layers into integer kernels of their class (one class, or one per layer name);
    with ``isa``, into packed dot-product kernels where the layer allows.

    ``frozen`` (deployment) gives each layer's final weight and precision: the int32 bound is then
    checked against the actual quantized weights, ``2**(wl-1) * max_o sum_k |w[o, k]|``, which
    trained weights meet far above the worst-case word length. ``biased_int8``: whether a signed
    layer may take the int16-sum kernel on ``x + 128`` (``_byte_chain``); not where a tuning database will
    schedule the kernels: its records are the training kernels', and a signed layer's is its
    widened int16 kernel (a ReLU-fed layer's int16-sum kernel shares its twin's record,
    ``schedule_dot.dot_signature``)."""

    def __init__(
        self,
        kernel_class: KernelClass | Mapping[str, KernelClass],
        isa: DotISA | None = None,
        frozen: Mapping[str, tuple[np.ndarray, Precision]] | None = None,
        biased_int8: bool = True,
    ) -> None:
        self.kernel_class = kernel_class
        self.isa = isa
        self.frozen = frozen or {}
        self.biased_int8 = biased_int8

    def _class_of(self, func: relax.Function) -> KernelClass:
        if isinstance(self.kernel_class, KernelClass):
            return self.kernel_class
        return self.kernel_class[str(func.attrs[LAYER_ATTR])]

    def _byte_chain(
        self, dot_container: str, frozen: tuple[np.ndarray, Precision], fed: Levels | None
    ) -> tuple[str, bool, int]:
        """(operand container, whether the kernel sums int16 pairs, the input grid's coarseness) of
        a deployed layer on the packed kernels. Its constant weights and its input's known range
        decide, not its class: where the weight levels fit a byte and the input's levels fit
        unsigned bytes (``x + 128`` for a signed int8 range, ``BIASED_INT8``), the byte chain takes
        it, summing pairs in int16 where ``te_dot.int16_sums_fit`` allows (one multiply a step
        instead of two). An int16 layer fed levels from a coarser grid (``IntegerActivations``)
        multiplies them unshifted, its sums ``2**coarse`` coarser (``requantize``'s ``acc_shift``):
        ResNet-20's int16 layers after an int8 one take levels up to 127 at fl 4, 508 at their fl 6."""
        levels, p = weight_levels(*frozen), frozen[1]
        if self.isa is None or levels.min() < -128 or levels.max() > 127:  # ``fits_byte``
            return dot_container, False, 0
        for lo, hi, coarse in _operand_ranges(fed, p, dot_container):
            if lo >= 0 and hi <= 255 and self.isa.pairs_in_int16("uint8"):
                if te_dot.int16_sums_fit(levels, max(hi, 1)):
                    return "uint8", True, coarse
                if te_dot.pair_sums_fit(levels, max(hi, 1)):
                    return "uint8", False, coarse
            biased = self.biased_int8 and self.isa.pairs_in_int16(BIASED_INT8)
            if biased and lo >= -128 and hi <= 127 and te_dot.int16_sums_fit(levels, hi + te_dot.OFFSET):
                return BIASED_INT8, True, coarse
        return dot_container, False, 0

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
        layer = str(func.attrs[LAYER_ATTR])
        frozen = self.frozen.get(layer)  # (weight, precision) of a deployed layer
        bound = None if frozen is None else weight_bound(*frozen)
        acc = kernel_class.accumulator(reduction)
        if bound is not None and requantize_fits_int32(bound, frozen[1]):
            acc = "int32"
        container = kernel_class.container
        dot_container = operand_container(func, container)  # a ReLU-fed int8 input: unsigned bytes
        w_bound = bindings[w_arg].value if w_arg in bindings else None
        w_perm = w_bound if op_name(w_bound) == "relax.permute_dims" else None
        packed = packed_core(core.value, w, w_perm, self.isa)
        fast_wl = int32_max_wl(reduction)
        attrs = {**dict(func.attrs), ACC_ATTR: acc, "marvin.kernel_class": kernel_class.name}
        exact_int32 = bound is not None and bound <= INT32_MAX
        narrow = container == "int16" and frozen is not None and fits_byte(*frozen)
        tiles = _tile_geometry(packed, list(x.ty.shape), weight_shape, container, self.isa, narrow)
        on_tiles_only = amx.always(tiles)
        on_packed_kernel = packed is not None and tiles is None
        branch = not on_tiles_only and packed is not None and fast_wl < kernel_class.max_wl
        # a deployed layer's weights are constants: its sums fit int32 (exact_int32) or never do
        wide_only = branch and frozen is not None and not exact_int32
        branch = branch and frozen is None
        # int16 on tiles in training: its byte products' sums combined in the kernel (a third of the
        # output) while the word length keeps the product in int32, three int32 sums above
        tiles_branch = on_tiles_only and frozen is None and tiles.sums > 1 and acc != "int32"
        tiles_branch = tiles_branch and fast_wl < kernel_class.max_wl
        axis = _channel_axis(core.value)
        sd = [] if seed is None else [seed]
        fed, levels_out = _levels_interface(func, frozen)
        out_dtype = LEVELS_DTYPE if levels_out else "float32"
        int16_sums, coarse = False, 0
        if on_packed_kernel and frozen is not None and not wide_only:
            dot_container, int16_sums, coarse = self._byte_chain(dot_container, frozen, fed)
        if on_packed_kernel:
            attrs[OPERAND_ATTR] = dot_container

        def x_int(xt: te.Tensor, qp_t: te.Tensor, *s: te.Tensor) -> te.Tensor:
            """The input's levels in the container: quantized, or fed levels (``IntegerActivations``)
            rescaled to the layer's grid by a shift (to ``coarse`` bits above it)."""
            if fed is None:
                return te_ops.quantize_to_int(xt, qp_t, container, s[0] if s else None, SALTS[0])
            p = frozen[1]
            shift = p.fl - fed.fl
            inside = _rescaled(fed.lo, shift) >= p.int_min and _rescaled(fed.hi, shift) <= p.int_max
            bounds = None if inside else (p.int_min, p.int_max)
            return te_ops.rescale_levels(xt, shift - coarse, bounds, container)

        def generic(bind: Callable[[relax.Expr], relax.Expr], bi: relax.Expr | None) -> relax.Expr:
            """Quantize, TVM's own integer conv2d/matmul, requantize (``bind``: emit or normalize)."""
            xi = bind(bb.call_te(x_int, x, qp, *sd, primfunc_name_hint=QNAME))
            wi = bind(
                bb.call_te(te_ops.quantize_to_int, w, qp, container, seed, SALTS[1], primfunc_name_hint=QNAME)
            )
            wt = wi if w_perm is None else bind(relax.op.permute_dims(wi, w_perm.attrs.axes))
            y = bind(_integer_core(core.value, xi, wt, acc))
            return bb.call_te(
                te_ops.requantize,
                y,
                bi,
                qp,
                fl,
                axis,
                seed,
                out_dtype=out_dtype,
                primfunc_name_hint="requantize",
            )

        def fast(
            bi: relax.Expr | None, weight: list[relax.Expr] | None, wide: bool = False, sums: str = acc
        ) -> relax.Expr:
            """One packed kernel: quantize x (and w, unless ``weight`` holds it packed) as its
            prologue (inlined into the packing, same hash sites as the generic path), the dot
            product (``wide``: on float64, exact where int32 is not), requantize as its epilogue,
            in ``sums`` (int32 where ``te_ops.sums_fit_int32`` holds: AVX2 has no int64 vector
            shift, min or conversion, ResNet-20's int16 layers ran 1.2-1.9x faster so)."""
            kind, kwargs = packed
            dot = functools.partial(
                getattr(te_dot, kind),
                **kwargs,
                isa=self.isa,
                container="float64" if wide else dot_container,
                acc=sums,
                int16_sums=int16_sums and not wide,
            )
            optional = {"bias": bi, "seed": seed}
            present = [k for k, v in optional.items() if v is not None]
            n_weight = 1 if weight is None else len(weight)

            def kernel(xt, *rest):  # call_te takes only tensors and PrimExprs
                wts, (qp_t, fl_t), extra = (
                    rest[:n_weight],
                    rest[n_weight : n_weight + 2],
                    rest[n_weight + 2 :],
                )
                given = dict(zip(present, extra, strict=True))
                sd = given.get("seed")
                xq = x_int(xt, qp_t, *([] if sd is None else [sd]))
                if weight is None:
                    wq = te_ops.quantize_to_int(wts[0], qp_t, container, sd, SALTS[1])
                else:
                    wq = te_dot.PackedWeight(wts[0], wts[1] if len(wts) > 1 else None, tuple(weight_shape))
                return te_ops.requantize(
                    dot(xq, wq),
                    given.get("bias"),
                    qp_t,
                    fl_t,
                    axis,
                    sd,
                    out_dtype=out_dtype,
                    acc_shift=coarse,
                )

            extra = [optional[k] for k in present]
            call = bb.call_te(
                kernel, x, *(weight or [w]), qp, fl, *extra, primfunc_name_hint=f"marvin_dot_{kind}"
            )
            if weight is not None:  # deployment: relu / residual add after the layer fuse into it
                _set_pattern(bb, call, OUT_ELEMWISE_FUSABLE)
            return call

        def w_int(wt, qp_t, *s):
            return te_ops.quantize_to_int(wt, qp_t, container, s[0] if s else None, SALTS[1])

        x_q, w_q = (x_int, [x, qp, *sd]), (w_int, [w, qp, *sd])  # for the tiles' packings

        def on_tiles(
            bind: Callable[[relax.Expr], relax.Expr],
            bi: relax.Expr | None,
            weight: relax.Expr | None,
            fits_int32: bool = False,
            packed: tuple[relax.Expr, relax.Expr] | None = None,
        ) -> relax.Expr:
            """The AMX kernel (``tile_product``): x (and in training w) quantized into the packing,
            requantize after the unpacking or inside the kernel (below) (``bind``: emit or
            normalize, as in ``generic``; ``weight``: deployment's packed constant;
            ``fits_int32``: the word length keeps every product in int32; ``packed``: training's
            x and w already packed, shared by the two branches of the int16 class)."""
            optional = {"bias": bi, "seed": seed}
            present = [k for k, v in optional.items() if v is not None]

            def requantize(out, qp_t, fl_t, *extra):
                given = dict(zip(present, extra, strict=True))
                return te_ops.requantize(out, given.get("bias"), qp_t, fl_t, axis, given.get("seed"))

            # requantize inside the kernel: in deployment (nearest rounding), and where int16's sums
            # would leave it as three int32 (12 bytes an output, 2 as levels: ResNet-20's 32-channel
            # layer at wl 16 1.19x -> 1.33x torch; elsewhere it measured 2-5% slower)
            three_sums = tiles.sums > 1 and not sums_combined(acc, fits_int32)
            if (seed is None and weight is not None) or three_sums:
                levels = amx.Levels(bi is not None, acc, container, stochastic=seed is not None)
                epilogue = InKernelRequantize(levels, bi, fl, qp, seed)
            else:
                epilogue = (requantize, [qp, fl, *[optional[k] for k in present]])
            xp, wp = packed or (x_q, w_q)
            out = tile_product(
                bb,
                bind,
                tiles,
                xp,
                weight if weight is not None else wp,
                epilogue,
                x.ty.shape[0],
                acc,
                fits_int32,
            )
            return to_levels(bind(out), frozen[1].fl) if levels_out else out

        def packed_weight() -> list[relax.Expr]:
            """Quantize and pack the (constant) weight in calls of their own, which constant
            folding evaluates at build time: the deployed kernel reads an integer packed weight."""
            wq = bb.emit_te(te_ops.quantize_to_int, w, qp, container, primfunc_name_hint=QNAME)
            isa = self.isa
            if on_tiles_only:
                return [bb.emit_te(lambda t: amx.pack_weight(t, tiles), wq)]
            data = bb.emit_te(lambda t: te_dot.pack_weight(t, isa, dot_container).data, wq)
            if not isa.offset(dot_container):
                return [data]
            return [data, bb.emit_te(lambda t: te_dot.weight_sums(t, isa, dot_container), wq)]

        def wide_kernel(bind: Callable[[relax.Expr], relax.Expr], bi: relax.Expr | None) -> relax.Expr:
            """Above the int32 bound: AMX byte products, else packed float64 (K < 2**23), else generic."""
            if tiles is not None:
                return on_tiles(bind, bi, None)
            if reduction < FLOAT64_EXACT_K:
                return fast(bi, None, wide=True)
            return generic(bind, bi)

        with bb.function(name, params, attrs=attrs):
            with bb.dataflow():
                bi = None if b is None else bb.emit_te(te_ops.quantize_to_int, b, qp, acc, seed, SALTS[2])
                packs_weight = packed is not None and frozen is not None and not wide_only
                weight = packed_weight() if packs_weight else None
                if branch:  # int16 class: the int32 kernel while this call's weights and wl allow
                    cond = bb.emit_output(bb.emit_te(te_ops.sums_fit_int32, w, qp, primfunc_name_hint="fits"))
                elif tiles_branch:  # int16 on tiles: the sums combined in int32 while the wl allows
                    word = relax.op.take(qp, relax.const(3, "int64"), axis=0)  # 2**(wl-1) - 1
                    cond = bb.emit_output(
                        bb.emit(relax.op.less(word, relax.const(2.0 ** (fast_wl - 1), "float32")))
                    )
                if branch or tiles_branch:
                    bi = None if bi is None else bb.emit_output(bi)
                    weight = None if weight is None else [bb.emit_output(v) for v in weight]
                elif on_tiles_only:
                    out = bb.emit_output(on_tiles(bb.emit, bi, weight[0] if weight else None))
                elif wide_only:
                    out = bb.emit_output(wide_kernel(bb.emit, bi))
                else:
                    out = bb.emit_output(fast(bi, weight) if packed is not None else generic(bb.emit, bi))
            if branch:
                out = bb.emit(relax.If(cond, fast(bi, weight, sums="int32"), wide_kernel(bb.normalize, bi)))
            elif tiles_branch:  # both branches read one packing of x and w
                packed = (
                    bb.emit(pack_tile_input(bb, tiles, x_q, OPAQUE)),
                    bb.emit(pack_tile_weight(bb, tiles, w_q)),
                )
                fits = on_tiles(bb.normalize, bi, None, fits_int32=True, packed=packed)
                out = bb.emit(relax.If(cond, fits, on_tiles(bb.normalize, bi, None, packed=packed)))
            bb.emit_func_output(out)


def _levels_interface(
    func: relax.Function, frozen: tuple[np.ndarray, Precision] | None
) -> tuple[Levels | None, bool]:
    """The levels a deployed layer is fed (None: float32) and whether it returns its levels
    (``IntegerActivations``)."""
    fed = func.attrs.get(INPUT_LEVELS_ATTR)
    levels_out = bool(func.attrs.get(OUTPUT_LEVELS_ATTR, False))
    if (fed is not None or levels_out) and frozen is None:
        raise ValueError(
            f"layer {func.attrs[LAYER_ATTR]}: integer levels in or out need a deployed (frozen) layer"
        )
    return (None if fed is None else Levels(*(int(v) for v in fed))), levels_out


def _operand_ranges(fed: Levels | None, p: Precision, dot_container: str) -> list[tuple[int, int, int]]:
    """The ranges a layer's input levels can enter its kernel in, as (lo, hi, coarse): fed levels
    from a coarser grid as they are where no clamp applies (coarse: the bits they lie above the
    layer's grid), then the levels on the layer's grid (clamped); a quantized input spans the word
    (from 0 where ReLU-fed)."""
    if fed is None:
        return [(0 if dot_container == "uint8" else p.int_min, p.int_max, 0)]
    shift = p.fl - fed.fl
    lo, hi = _rescaled(fed.lo, shift), _rescaled(fed.hi, shift)
    ranges = [(fed.lo, fed.hi, shift)] if shift > 0 and lo >= p.int_min and hi <= p.int_max else []
    return [*ranges, (max(lo, p.int_min), min(hi, p.int_max), 0)]


def _rescaled(level: int, shift: int) -> int:
    """``te_ops.rescale_levels`` of one level, before its clamp."""
    return level << shift if shift >= 0 else (level + (1 << (-shift - 1))) >> -shift


def _tile_geometry(
    packed: tuple[str, dict] | None,
    x_shape: list,
    w_shape: list[int],
    container: str,
    isa: DotISA | None,
    narrow: bool = False,
) -> amx.Geometry | None:
    """The layer on AMX tiles, where the machine has them and the layer suits them (``narrow``:
    a conv's int16 weight levels fit a byte)."""
    if packed is None or isa is None or not isa.amx:
        return None
    kind, kwargs = packed
    if kind == "matmul":
        return amx.matmul_geometry(w_shape, container, static_extent(x_shape[0]))
    return amx.conv_geometry(x_shape, w_shape, **kwargs, container=container, narrow=narrow)


@dataclass(frozen=True)
class InKernelRequantize:
    """A tile product's epilogue run inside the tile kernel (``amx.Levels``), with its Relax
    arguments: the quantized bias (or None), fl, qp and with stochastic rounding the seed."""

    levels: amx.Levels
    bias: relax.Expr | None
    fl: relax.Expr
    qp: relax.Expr
    seed: relax.Expr | None = None  # stochastic rounding's


def tile_product(
    bb: relax.BlockBuilder,
    bind: Callable[[relax.Expr], relax.Expr],
    tiles: amx.Geometry,
    x_int: relax.Expr | tuple[Callable, list[relax.Expr]],
    weight: relax.Expr | tuple[Callable, list[relax.Expr]],
    epilogue: tuple[Callable, list[relax.Expr]] | InKernelRequantize,
    rows: tvm.tirx.PrimExpr,
    acc: str,
    fits_int32: bool = False,
) -> relax.Expr:
    """An integer product on AMX tiles (``amx``) as Relax calls: the integer operand packed (already
    packed, or a TE function of its arguments, e.g. a quantizer), the weight packed (already
    packed, or a TE function giving the integer [O, C, KH, KW] / [O, K] weight), the tile kernel,
    then the unpacked ``acc`` product through ``epilogue`` (a TE function of it and its
    arguments), or the kernel's own requantized levels scaled back to float32
    (``InKernelRequantize``). ``rows``: the batch (the matmul's M). Where every product fits
    int32 (``acc``, or ``fits_int32``: the caller's word lengths bound it), int16's byte-product
    sums are combined in the kernel (``amx._Combine``).
    The packing is opaque to fusion and the unpacking takes element-wise consumers; with
    ``InKernelRequantize`` (nearest rounding) both are injective, see below."""
    in_kernel = isinstance(epilogue, InKernelRequantize)
    xp = (
        x_int
        if isinstance(x_int, relax.Expr)
        else pack_tile_input(bb, tiles, x_int, INJECTIVE if in_kernel else OPAQUE)
    )
    if not isinstance(weight, relax.Expr):
        weight = bind(pack_tile_weight(bb, tiles, weight))
    if in_kernel:
        levels, qp = epilogue.levels, epilogue.qp
        kernel = bb.add_func(amx.tile_kernel(tiles, levels, static_extent(rows)), amx.KERNEL)
        out_type = relax.TensorType(amx.output_shape(tiles, rows, levels), levels.dtype)
        args = [bind(xp), weight, *([epilogue.bias] if levels.bias else []), epilogue.fl, qp]
        args += [epilogue.seed] if levels.stochastic else []
        y = bind(relax.call_tir(kernel, args, out_type))
        call = bb.call_te(
            lambda yt, qt: amx.unpack_levels(yt, tiles, rows, qt[1]),
            y,
            qp,
            primfunc_name_hint="marvin_amx_unpack",
        )
        # Injective, like the packing: where a layer's output (after its ReLU, say) feeds only the
        # next layer, the unpacking, the element-wise ops and the next packing fuse into one
        # kernel, and the float32 activation between them never reaches memory.
        _set_pattern(bb, call, INJECTIVE)
        if tiles.w is not None:  # for a max pool after it (``FuseMaxPoolIntoLevels``)
            gv = call.args[0]
            bb.update_func(gv, bb.get()[gv].with_attr(amx.LEVELS_WIDTH, tiles.plane[1]))
        return call
    combined = tiles.sums > 1 and sums_combined(acc, fits_int32)
    kernel = bb.add_func(amx.tile_kernel(tiles, None, static_extent(rows), combined), amx.KERNEL)
    out_type = relax.TensorType(amx.output_shape(tiles, rows, None, combined), "int32")
    y = bind(relax.call_tir(kernel, [bind(xp), weight], out_type))
    fe, e_args = epilogue

    def unpack(yt, *a):
        product = (
            amx.unpack_matmul(yt, rows, tiles, acc) if tiles.w is None else amx.unpack_conv(yt, tiles, acc)
        )
        return fe(product, *a)

    call = bb.call_te(unpack, y, *e_args, primfunc_name_hint="marvin_amx_unpack")
    _set_pattern(bb, call, OUT_ELEMWISE_FUSABLE)
    return call


def pack_tile_input(
    bb: relax.BlockBuilder, tiles: amx.Geometry, x_int: tuple[Callable, list[relax.Expr]], pattern: int
) -> relax.Expr:
    """The call packing the integer operand (a TE function of its arguments) for the tiles, with
    its fusion ``pattern``."""
    fx, x_args = x_int
    pack = amx.pack_matmul_input if tiles.w is None else amx.pack_conv_input
    xp = bb.call_te(lambda *a: pack(fx(*a), tiles), *x_args, primfunc_name_hint="marvin_amx_pack_x")
    _set_pattern(bb, xp, pattern)
    return xp


def pack_tile_weight(
    bb: relax.BlockBuilder, tiles: amx.Geometry, weight: tuple[Callable, list[relax.Expr]]
) -> relax.Expr:
    """The call packing the integer weight (a TE function of its arguments) for the tiles."""
    fw, w_args = weight
    return bb.call_te(
        lambda *a: amx.pack_weight(fw(*a), tiles), *w_args, primfunc_name_hint="marvin_amx_pack_w"
    )


def sums_combined(acc: str, fits_int32: bool) -> bool:
    """Whether int16's byte-product sums can be combined into one int32 in the tile kernel: every
    product fits int32 (``acc``, or the caller's word lengths: ``fits_int32``)."""
    return fits_int32 or acc == "int32"


def _set_pattern(bb: relax.BlockBuilder, call: relax.Call, pattern: int) -> None:
    """Set the fusion pattern (TVM's OpPatternKind) of the PrimFunc a ``call_te`` calls."""
    gv = call.args[0]
    bb.update_func(gv, bb.get()[gv].with_attr("op_pattern", pattern))


def _channel_axis(core: relax.Call) -> int:
    """The output axis a bias runs along: features of a (2-D) Linear, channels of a conv."""
    return len(core.ty.shape) - 1 if core.op.name == "relax.matmul" else 1


def _prod(xs: list[int]) -> int:
    out = 1
    for v in xs:
        out *= v
    return out
