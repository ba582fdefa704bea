"""Tensor-expression kernels of the low-bit backward pass: conv input and weight gradients.

Both take integer operands (the quantized gradient and the layer's weight or quantized input)
and accumulate in an integer type; the caller rescales by the two operands' steps. Written for
any number of spatial dimensions (conv1d and conv2d), with stride, padding, dilation and groups.
"""

from __future__ import annotations

from tvm import te, tirx


def _valid_and_clamped(index: tirx.PrimExpr, extent) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    ok = tirx.all(index >= 0, index < extent)
    return ok, te.max(te.min(index, extent - 1), 0)


def conv_input_grad(
    g: te.Tensor, w: te.Tensor, in_spatial: list[int], strides, padding, dilation, groups: int, acc: str
) -> te.Tensor:
    """dx[n, c, i] = sum_{r, k} g[n, grp*OCg + r, (i + p - k*d)/s] * w[grp*OCg + r, c mod ICg, k]."""
    out_ch, icg = int(w.shape[0]), int(w.shape[1])
    ocg = out_ch // groups
    ks = [int(k) for k in w.shape[2:]]
    out_spatial = list(g.shape[2:])
    r = te.reduce_axis((0, ocg), name="r")
    kax = [te.reduce_axis((0, k), name=f"k{d}") for d, k in enumerate(ks)]

    def f(n, c, *i):
        grp = c // icg
        oc = grp * ocg + r
        conds, oidx = [], []
        for d, (iv, k) in enumerate(zip(i, kax, strict=True)):
            t = iv + padding[d] - k * dilation[d]
            ok, o = _valid_and_clamped(tirx.floordiv(t, strides[d]), out_spatial[d])
            conds += [ok, tirx.floormod(t, strides[d]) == 0, t >= 0]
            oidx.append(o)
        prod = tirx.Cast(acc, g[(n, oc, *oidx)]) * tirx.Cast(acc, w[(oc, c % icg, *kax)])
        return te.sum(tirx.Select(tirx.all(*conds), prod, tirx.const(0, acc)), axis=[r, *kax])

    return te.compute((g.shape[0], icg * groups, *in_spatial), f, name="fxp_conv_dx")


def conv_weight_grad(
    x: te.Tensor, g: te.Tensor, weight_shape: list[int], strides, padding, dilation, groups: int, acc: str
) -> te.Tensor:
    """dw[o, c, k] = sum_{n, o_sp} g[n, o, o_sp] * x[n, grp*ICg + c, o_sp*s + k*d - p]."""
    out_ch, icg = weight_shape[0], weight_shape[1]
    ocg = out_ch // groups
    in_spatial = list(x.shape[2:])
    n = te.reduce_axis((0, x.shape[0]), name="n")
    oax = [te.reduce_axis((0, e), name=f"o{d}") for d, e in enumerate(g.shape[2:])]

    def f(o, c, *k):
        grp = o // ocg
        conds, idx = [], []
        for d, (ov, kv) in enumerate(zip(oax, k, strict=True)):
            ok, i = _valid_and_clamped(ov * strides[d] + kv * dilation[d] - padding[d], in_spatial[d])
            conds.append(ok)
            idx.append(i)
        prod = tirx.Cast(acc, g[(n, o, *oax)]) * tirx.Cast(acc, x[(n, grp * icg + c, *idx)])
        return te.sum(tirx.Select(tirx.all(*conds), prod, tirx.const(0, acc)), axis=[n, *oax])

    return te.compute(tuple(weight_shape), f, name="fxp_conv_dw")


def rescale(acc: te.Tensor, qp_a: te.Tensor, qp_b: te.Tensor) -> te.Tensor:
    """Integer accumulator on the 2**-(fa+fb) grid to float32 (exact product of two steps)."""
    return te.compute(
        acc.shape, lambda *i: tirx.Cast("float32", acc(*i)) * (qp_a[1] * qp_b[1]), name="fxp_rescale"
    )
