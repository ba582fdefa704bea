"""Add the low-bit backward products of a layer: ``dx(g, w, ...)`` and ``dw(x, g, ...)``.

The incoming gradient is quantized stochastically into the class's integer container with a
dynamic scale ``qp_g`` chosen per call by the runtime (gradients span many octaves, so a fixed fl
would flush them to zero); the weight is already on the layer's grid, and dw quantizes the saved
raw input exactly as the forward did (same seed and hash site under stochastic rounding). The
products accumulate in integers and are rescaled once, so they are exact given the quantized
operands.

Given an x86 dot-product family (``dot_isa``), conv2d (groups 1, dilation 1) and Linear products
run as packed kernels (``te_dot_grad``) that sum in int32: dx over ``O * KH * KW`` products, dw per
chunk of samples, for int16 of a few output rows (then in int64 over the batch). Where the class's
word lengths can overflow that int32 sum (the int16 class), the function branches at run time: dx
on this call's weights
(``te_ops.sums_fit_int32``, as the forward), dw on the operands' word lengths, the packed kernel
while ``length * 2**(wl_a-1) * 2**(wl_b-1) < 2**31`` (both its operands are activations: a check of
their levels would scan them), then the packed kernel on the gradient split into ``g >> 7`` and
``g & 127`` while those smaller products sum in int32 (``split_fits``: twice the int32 products,
2x faster than float64 FMAs); else the packed kernel on float64 FMAs, whose integer-valued sums
are exact there too. On AMX (``amx``) dx and conv dw run on
tiles: int8 directly, int16 as byte products summed in int64, exact at every word length (dw
always; dx of convs from 32 channels of g always, other dx above the int32 bound). The
generic kernels (other layers, other targets) accumulate dx in the class's accumulator and dw, whose
batch is only known at run time, in int64.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import tvm
from tvm import relax

from marvin_compile import amx, te_dot_grad, te_grad_ops, te_ops
from marvin_compile.dot_isa import DotISA
from marvin_compile.fixed_point import ROUNDINGS
from marvin_compile.kernel_classes import KernelClass
from marvin_compile.passes.find_layers import CORE_OPS, op_name
from marvin_compile.passes.insert_quantize import SALTS
from marvin_compile.passes.lower_integer import FLOAT64_EXACT_K, packed_core, tile_product
from marvin_compile.passes.nonneg_inputs import operand_container
from marvin_compile.passes.utils import layer_functions, param

SALT_GRAD = 0x5BD1E995
INT32_MAX = 2**31 - 1
OFFSET_BITS = 8  # vpdpbusd's offset input x + 128 lies in [0, 2**8)
SPLIT_BITS = 7  # int16 dw above its int32 bound: the gradient's levels as g >> 7 and g & 127


def _core(func: relax.Function) -> tuple[relax.Call, dict]:
    bindings = {b.var: b.value for blk in func.body.blocks for b in blk.bindings}
    calls = [v for v in bindings.values() if op_name(v) in CORE_OPS]
    if len(calls) != 1:
        raise ValueError(f"layer {func.attrs['marvin.layer']} must hold one conv/matmul")
    return calls[0], bindings


def product_bound(length: int) -> int:
    """The largest power of two P with ``length * P <= INT32_MAX``: int32 sums ``length`` products
    of magnitude at most P exactly (0 if not even products of 1)."""
    most = INT32_MAX // length
    return 0 if most == 0 else 2 ** (most.bit_length() - 1)


def split_fits(a: relax.Expr, b: relax.Expr, length: int) -> relax.Expr:
    """Whether ``length`` products of levels up to ``a`` by the two parts of levels up to ``b``
    (``b >> SPLIT_BITS`` up to ``b / 2**SPLIT_BITS``, the low part up to ``2**SPLIT_BITS - 1``) sum
    exactly in int32: ``length * a * max(...) < 2**31``, exact in float32 (powers of two times
    an integer below 2**24)."""
    high = relax.op.divide(b, relax.const(2.0**SPLIT_BITS))
    part = relax.op.maximum(high, relax.const(2.0**SPLIT_BITS - 1))
    most = relax.op.multiply(relax.op.multiply(a, part), relax.const(float(length)))
    return relax.op.less(most, relax.const(2.0**31))


def packed_kind(core: relax.Call, bindings: dict, isa: DotISA | None) -> str | None:
    """``conv2d`` or ``linear`` when the packed kernels compute this layer's gradients, else None:
    where the forward has no packed kernel (``packed_core``), and convs padded as wide as the kernel."""
    w = bindings.get(core.args[1])
    packed = packed_core(core, core.args[1], w if op_name(w) == "relax.permute_dims" else None, isa)
    if packed is None:
        return None
    kind, kwargs = packed
    if kind == "matmul":
        return "linear"
    kh, kw = (int(d) for d in list(core.args[1].ty.shape)[2:])
    top, left, bottom, right = kwargs["padding"]
    return "conv2d" if max(top, bottom) < kh and max(left, right) < kw else None


@tvm.transform.module_pass(opt_level=0, name="AddGradientKernels")
class AddGradientKernels:
    """For the module's single layer function, add integer ``dx`` and ``dw`` functions of a class
    (packed dot-product kernels where ``isa`` and the layer allow)."""

    def __init__(
        self, kernel_class: KernelClass, isa: DotISA | None = None, rounding: str = "nearest"
    ) -> None:
        if not kernel_class.is_integer:
            raise ValueError(f"low-bit gradients need an integer kernel class, got {kernel_class.name}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding {rounding!r} is not one of {ROUNDINGS}")
        self.kernel_class = kernel_class
        self.isa = isa
        self.rounding = rounding

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        ((_, func),) = layer_functions(mod)
        core, bindings = _core(func)
        x_ty, w_ty, y_ty = func.params[0].ty, func.params[1].ty, func.ret_ty
        if core.op.name == "relax.matmul" and len(x_ty.shape) != 2:
            raise ValueError(
                f"layer {func.attrs['marvin.layer']}: low-bit backward supports 2-D Linear inputs only"
            )
        w_shape = [int(d) for d in w_ty.shape]
        k, isa = self.kernel_class, self.isa
        kind = packed_kind(core, bindings, isa)
        conv = core.op.name != "relax.matmul"
        a = core.attrs
        nd = len(w_shape) - 2
        strides = [int(v) for v in a.strides] if conv else []
        padding = [int(v) for v in a.padding] if conv else []
        dilation = [int(v) for v in a.dilation] if conv else []
        groups = int(a.groups) if conv else 1
        in_spatial = [int(d) for d in list(x_ty.shape)[2:]]
        out_spatial = [int(d) for d in list(y_ty.shape)[2:]]
        bb = relax.BlockBuilder(mod)
        quant = te_ops.quantize_to_int
        container = k.container
        dw_container = operand_container(func, container)  # dw multiplies x by g: x may be a byte

        g, w, qp_g, qp_w, seed = (
            param("g", y_ty.shape, "float32"),
            param("w", w_ty.shape, "float32"),
            param("qp_g", (4,), "float32"),
            param("qp_w", (4,), "float32"),
            param("seed", (), "uint32"),
        )

        def dx_generic(bind: Callable[[relax.Expr], relax.Expr]) -> relax.Expr:
            gi = bind(
                bb.call_te(quant, g, qp_g, container, seed, SALT_GRAD, primfunc_name_hint="fxp_quantize_grad")
            )
            wi = bind(bb.call_te(quant, w, qp_w, container, primfunc_name_hint="fxp_quantize_int"))
            if not conv:
                prod = bind(relax.op.matmul(gi, wi, out_dtype=k.accumulator(w_shape[0])))
            else:
                acc = k.accumulator(w_shape[0] // groups * _prod(w_shape[2:]))
                prod = bind(
                    bb.call_te(
                        te_grad_ops.conv_input_grad,
                        gi,
                        wi,
                        in_spatial,
                        strides,
                        padding[:nd],
                        dilation,
                        groups,
                        acc,
                    )
                )
            return bb.call_te(te_grad_ops.rescale, prod, qp_g, qp_w)

        def dx_packed(bind: Callable[[relax.Expr], relax.Expr], wide: bool = False) -> relax.Expr:
            """``wide``: products on float64 FMAs, exact above the int32 bound (``lower_integer``)."""
            dot_container, acc = ("float64", "int64") if wide else (container, "int32")

            def kernel(gt, wt, qp_gt, qp_wt, seed_t):  # call_te takes only tensors and PrimExprs
                gq = quant(gt, qp_gt, container, seed_t, SALT_GRAD)
                wq = quant(wt, qp_wt, container)
                if kind == "linear":
                    prod = te_dot_grad.linear_input_grad(gq, wq, isa, dot_container, acc)
                else:
                    prod = te_dot_grad.conv2d_input_grad(
                        gq, wq, tuple(in_spatial), tuple(strides), tuple(padding), isa, dot_container, acc
                    )
                return te_grad_ops.rescale(prod, qp_gt, qp_wt)

            out = bb.call_te(kernel, g, w, qp_g, qp_w, seed, primfunc_name_hint="marvin_dot_dx")
            if kind == "conv2d" and strides != [1, 1]:
                out = _interleave_phases(bind, bind(out), list(x_ty.shape), strides)
            return out

        def dx_geometry() -> amx.Geometry | None:
            """dx on AMX tiles: a matmul by the transposed weight, or the phase conv of g."""
            if kind is None or not isa.amx:
                return None
            if kind == "linear":
                return amx.matmul_geometry([w_shape[1], w_shape[0]], container)
            out_hw = out_spatial[0], out_spatial[1]
            phase_w, pad = te_dot_grad.input_grad_geometry(
                w_shape, tuple(in_spatial), out_hw, strides, padding
            )
            return amx.conv_geometry([None, w_shape[0], *out_hw], phase_w, [1, 1], list(pad), container)

        tiles = dx_geometry()

        def dx_tiles(bind: Callable[[relax.Expr], relax.Expr], fits_int32: bool = False) -> relax.Expr:
            """dx on AMX tiles: exact for int8, and for int16 at every word length (int64 sums;
            ``fits_int32``: the word lengths keep dx in int32, its sums combined in the kernel)."""
            acc = "int32" if container == "int8" else "int64"

            def g_int(gt, qp_gt, seed_t):
                return quant(gt, qp_gt, container, seed_t, SALT_GRAD)

            def w_int(wt, qp_wt):
                wq = quant(wt, qp_wt, container)
                if kind == "linear":
                    return te_dot_grad.transposed(wq)
                out_hw = (out_spatial[0], out_spatial[1])
                return te_dot_grad.input_grad_weight(
                    wq, tuple(in_spatial), out_hw, tuple(strides), tuple(padding)
                )[0]

            out = tile_product(
                bb,
                bind,
                tiles,
                (g_int, [g, qp_g, seed]),
                (w_int, [w, qp_w]),
                (te_grad_ops.rescale, [qp_g, qp_w]),
                y_ty.shape[0],
                acc,
                fits_int32,
            )
            if kind == "conv2d" and strides != [1, 1]:
                out = _interleave_phases(bind, bind(out), list(x_ty.shape), strides)
            return out

        def dx_float64(bind: Callable[[relax.Expr], relax.Expr]) -> relax.Expr:
            return dx_packed(bind, wide=True)

        dx_length = w_shape[0] * _prod(w_shape[2:])
        on_tiles_only = amx.always(tiles)
        dx_fast = dx_tiles if on_tiles_only else (dx_packed if kind else None)
        if tiles is not None and not on_tiles_only:  # int16 above the int32 bound: byte products on tiles
            dx_wide = dx_tiles
        elif on_tiles_only and tiles.sums > 1:  # int16: one int32 sum out of the kernel while dx fits
            dx_fast, dx_wide = functools.partial(dx_tiles, fits_int32=True), dx_tiles
        else:
            dx_wide = dx_float64 if kind and dx_length < FLOAT64_EXACT_K else None
        self._product(
            bb,
            "dx",
            [g, w, qp_g, qp_w, seed],
            dx_generic,
            dx_fast,
            dx_length,
            (qp_g, qp_w),
            wide=dx_wide,
            exact=on_tiles_only and tiles.sums == 1,
            fits=None if dx_fast is not dx_packed else (te_ops.sums_fit_int32, [w, qp_w, qp_g, 1, False]),
        )

        x, g2, qp_x, qp_g2, seed2 = (
            param("x", x_ty.shape, "float32"),
            param("g", y_ty.shape, "float32"),
            param("qp_x", (4,), "float32"),
            param("qp_g", (4,), "float32"),
            param("seed", (), "uint32"),
        )
        # dw takes the layer's raw input and quantizes it as the forward did (with the forward's
        # seed under stochastic rounding), so that the backward needs no pass of its own to
        # recompute Q(x) (ResNet-20's int8 step at batch 128: 11.5 ms of 305)
        x_seed = [param("seed_x", (), "uint32")] if self.rounding == "stochastic" else []
        x_draw = (*x_seed, SALTS[0]) if x_seed else ()

        def quant_x(xt, qp_xt, *draw):  # draw: (seed, salt) under stochastic rounding
            return quant(xt, qp_xt, container, *draw)

        def dw_generic(bind: Callable[[relax.Expr], relax.Expr]) -> relax.Expr:
            xi = bind(bb.call_te(quant_x, x, qp_x, *x_draw, primfunc_name_hint="fxp_quantize_int"))
            gi = bind(
                bb.call_te(
                    quant, g2, qp_g2, container, seed2, SALT_GRAD, primfunc_name_hint="fxp_quantize_grad"
                )
            )
            if not conv:
                prod = bind(relax.op.matmul(bind(relax.op.permute_dims(gi, [1, 0])), xi, out_dtype="int64"))
            else:
                prod = bind(
                    bb.call_te(
                        te_grad_ops.conv_weight_grad,
                        xi,
                        gi,
                        w_shape,
                        strides,
                        padding[:nd],
                        dilation,
                        groups,
                        "int64",
                    )
                )
            return bb.call_te(te_grad_ops.rescale, prod, qp_x, qp_g2)

        def dw_packed(
            _bind: Callable[[relax.Expr], relax.Expr], wide: bool = False, split: int = 0
        ) -> relax.Expr:
            """``split``: the gradient's levels in two parts (``te_dot_grad._weight_grad``)."""
            dot_container = "float64" if wide else dw_container

            def kernel(xt, gt, qp_xt, qp_gt, seed_t, *draw):
                xq = quant_x(xt, qp_xt, *draw)
                gq = quant(gt, qp_gt, container, seed_t, SALT_GRAD)
                if kind == "linear":
                    prod = te_dot_grad.linear_weight_grad(xq, gq, isa, dot_container, split)
                else:
                    prod = te_dot_grad.conv2d_weight_grad(
                        xq, gq, tuple(w_shape[2:]), tuple(strides), tuple(padding), isa, dot_container, split
                    )
                return te_grad_ops.rescale(prod, qp_xt, qp_gt)

            return bb.call_te(kernel, x, g2, qp_x, qp_g2, seed2, *x_draw, primfunc_name_hint="marvin_dot_dw")

        # conv dw on AMX tiles, where present and the layer suits them (its own layout, never folded:
        # its tile rows are input channels already)
        dw_tiles_geometry = None
        if kind == "conv2d" and isa.amx:
            geometry = amx.conv_geometry(list(x_ty.shape), w_shape, strides, padding, container, fold=False)
            dw_tiles_geometry = geometry if geometry is not None and amx.dw_images(geometry) > 0 else None

        def dw_tiles(bind: Callable[[relax.Expr], relax.Expr]) -> relax.Expr:
            """dw on AMX tiles: int32 sums per chunk of images, folded in int64 (``amx.dw_kernel``);
            exact at every word length of both classes."""
            tiles = dw_tiles_geometry

            def x_pack(xt, qp_xt, *draw):
                return amx.pack_dw_input(quant_x(xt, qp_xt, *draw), tiles)

            def g_pack(gt, qp_gt, seed_t):
                return amx.pack_dw_grad(quant(gt, qp_gt, container, seed_t, SALT_GRAD), tiles)

            xp = bb.call_te(x_pack, x, qp_x, *x_draw, primfunc_name_hint="marvin_amx_pack_dw_x")
            gp = bb.call_te(g_pack, g2, qp_g2, seed2, primfunc_name_hint="marvin_amx_pack_dw_g")
            kernel = bb.add_func(amx.dw_kernel(tiles), amx.DW_KERNEL)
            out_type = relax.TensorType(amx.dw_partial_shape(tiles, x_ty.shape[0]), "int32")
            part = bind(relax.call_tir(kernel, [bind(xp), bind(gp)], out_type))

            def fold(pt, qp_xt, qp_gt):
                return te_grad_ops.rescale(amx.fold_dw(pt, tiles), qp_xt, qp_gt)

            return bb.call_te(fold, part, qp_x, qp_g2, primfunc_name_hint="marvin_amx_fold_dw")

        def dw_float64(bind: Callable[[relax.Expr], relax.Expr]) -> relax.Expr:
            return dw_packed(bind, wide=True)

        def dw_split(bind: Callable[[relax.Expr], relax.Expr]) -> relax.Expr:
            return dw_packed(bind, split=SPLIT_BITS)

        if dw_tiles_geometry is not None:
            dw_fast, offset = dw_tiles, False
            dw_length = amx.dw_images(dw_tiles_geometry) * dw_tiles_geometry.plane_for(amx.DW_STEP)[2]
        else:
            dw_fast = dw_packed if kind else None
            offset = kind is not None and isa.offset(dw_container)
            out_hw = (out_spatial[0], out_spatial[1]) if kind == "conv2d" else (1, 1)
            dw_length = 0 if kind is None else te_dot_grad.dw_chunk(isa, dw_container, out_hw)
        self._product(
            bb,
            "dw",
            [x, g2, qp_x, qp_g2, seed2, *x_seed],
            dw_generic,
            dw_fast,
            dw_length,
            (qp_x, qp_g2),
            offset,
            wide=dw_float64 if kind else None,
            exact=dw_tiles_geometry is not None,
            split=dw_split if dw_fast is dw_packed and container == "int16" else None,
        )
        return bb.get()

    def _product(
        self,
        bb: relax.BlockBuilder,
        name: str,
        params: list[relax.Var],
        generic: Callable[[Callable[[relax.Expr], relax.Expr]], relax.Expr],
        packed: Callable[[Callable[[relax.Expr], relax.Expr]], relax.Expr] | None,
        length: int,
        qps: tuple[relax.Var, relax.Var],
        offset: bool = False,
        wide: Callable[[Callable[[relax.Expr], relax.Expr]], relax.Expr] | None = None,
        exact: bool = False,
        fits: tuple[Callable, list] | None = None,
        split: Callable[[Callable[[relax.Expr], relax.Expr]], relax.Expr] | None = None,
    ) -> None:
        """Define ``name``: the ``packed`` kernel (None: none) where its int32 sums of ``length`` products
        are exact for every word length of the class, the generic one where they never are, else an
        ``R.If`` on the word lengths, whose other branch is ``wide`` (the packed float64 products)
        when given, else the generic kernel.

        ``offset``: the kernel also needs the sums of (x + 128) * g in int32 (vpdpbusd's dw), a bound
        of the int8 class only, checked here for its widest word length. ``exact``: the packed
        kernel is exact at every word length (AMX byte products), so it always runs. ``fits``: a TE
        function and its arguments that decide the ``R.If`` from this call's weights instead
        (``te_ops.sums_fit_int32``: dx, whose one operand is the weight). ``split``: the packed
        kernel on the second operand's levels split in ``SPLIT_BITS`` (dw), a middle tier of the
        word-length branch (not of ``fits``) where those smaller products still sum exactly in
        int32 (``split_fits``)."""
        bound = product_bound(length) if packed is not None else 0
        widest = self.kernel_class.max_wl - 1
        worst = 2 ** (OFFSET_BITS + widest) if offset else 4**widest
        if exact:
            bound = worst
        branch = bound < worst and bound > 0 and not offset
        with bb.function(name, params):
            with bb.dataflow():
                if branch and fits is not None:
                    cond = bb.emit_output(bb.emit_te(fits[0], *fits[1], primfunc_name_hint="fits"))
                elif branch:  # qp[3] + 1 = 2**(wl-1): the operands' bound, a product exact in float32
                    a, b = (
                        relax.op.add(relax.op.take(qp, relax.const(3, "int64"), axis=0), relax.const(1.0))
                        for qp in qps
                    )
                    fits = relax.op.less_equal(relax.op.multiply(a, b), relax.const(float(bound), "float32"))
                    cond = bb.emit_output(bb.emit(fits))
                    if split is not None:
                        split_cond = bb.emit_output(bb.emit(split_fits(a, b, length)))
                else:
                    out = bb.emit_output(packed(bb.emit) if worst <= bound else generic(bb.emit))
            if branch:
                other = (wide or generic)(bb.normalize)
                if split is not None:
                    other = relax.If(split_cond, split(bb.normalize), other)
                out = bb.emit(relax.If(cond, packed(bb.normalize), other))
            bb.emit_func_output(out)


def _interleave_phases(
    bind: Callable[[relax.Expr], relax.Expr], y: relax.Expr, x_shape: list, strides: list[int]
) -> relax.Expr:
    """dx in NCHW from the phase-major layout of ``te_dot_grad.conv2d_input_grad`` (one copy; a
    ragged last phase row or column is cut off)."""
    n, c, h, w = x_shape
    sh, sw = strides
    a, b = -(-int(h) // sh), -(-int(w) // sw)
    y = bind(relax.op.reshape(y, [n, sh, sw, c, a, b]))
    y = bind(relax.op.permute_dims(y, [0, 3, 4, 1, 5, 2]))
    y = relax.op.reshape(y, [n, c, a * sh, b * sw])
    if (a * sh, b * sw) == (int(h), int(w)):
        return y
    return relax.op.strided_slice(bind(y), axes=[2, 3], begin=[0, 0], end=[int(h), int(w)])


def _prod(xs: list[int]) -> int:
    out = 1
    for v in xs:
        out *= v
    return out
