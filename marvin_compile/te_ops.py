"""Tensor-expression kernels of the fixed-point quantizer, shared by the Relax passes.

Runtime arguments keep one compiled variant valid for every (wl, fl) of its kernel class:
``qp = [2**fl, 2**-fl, -2**(wl-1), 2**(wl-1)-1]`` (float32[4]) and ``fl`` (int32 scalar).
Stochastic rounding draws ``u ~ U[0, 1)`` from a counter-based hash of (seed, element index, site),
so it needs no noise tensor in memory and is reproducible under a seed.
"""

from __future__ import annotations

from tvm import te, tirx

QUANTIZE_NAME = "fxp_quantize"
SALT_INPUT, SALT_WEIGHT, SALT_BIAS, SALT_OUTPUT = 0x1B873593, 0x68E31DA4, 0x3C6EF372, 0x2545F491


def _flat_index(indices, shape) -> tirx.PrimExpr:
    flat = tirx.const(0, "int64")
    for i, n in zip(indices, shape, strict=True):
        flat = flat * tirx.Cast("int64", n) + tirx.Cast("int64", i)
    return flat


def _hash32(seed: te.Tensor, indices, shape, salt: int) -> tirx.PrimExpr:
    """murmur3's 32-bit finaliser over (index, seed, salt): a uniform uint32 per element.

    Each step is a Let binding, so the expression stays linear in size instead of doubling.
    """

    def u32(v: int) -> tirx.PrimExpr:
        return tirx.const(v, "uint32")

    # The element index modulo 2**32: tensors of 4G elements are out of scope, and GPU lowering
    # narrows indices to int32, where a 32-bit shift would be invalid.
    index = tirx.Cast("uint32", _flat_index(indices, shape))
    start = index * u32(0x9E3779B1) + seed[()] * u32(0x85EBCA77) + u32(salt)
    steps = [
        lambda h: h ^ tirx.shift_right(h, u32(16)),
        lambda h: h * u32(0x85EBCA6B),
        lambda h: h ^ tirx.shift_right(h, u32(13)),
        lambda h: h * u32(0xC2B2AE35),
        lambda h: h ^ tirx.shift_right(h, u32(16)),
    ]

    def chain(value: tirx.PrimExpr, rest: list) -> tirx.PrimExpr:
        if not rest:
            return value
        v = tirx.Var("h", "uint32")
        return tirx.Let(v, value, chain(rest[0](v), rest[1:]))

    return chain(start, steps)


def _uniform(seed: te.Tensor, indices, shape, salt: int) -> tirx.PrimExpr:
    """u ~ U[0, 1) on a 2**-24 grid."""
    h = _hash32(seed, indices, shape, salt)
    return tirx.Cast("float32", tirx.shift_right(h, tirx.const(8, "uint32"))) * tirx.const(
        2.0**-24, "float32"
    )


def _quantized_level(t, qp, seed, salt, indices) -> tirx.PrimExpr:
    """floor(v + 1/2) or floor(v + u) of v = t * 2**fl, clamped, without float32 rounding slips.

    Adding the offset in float32 can round a sum up to the next integer (v = k + 0.49999997, or a
    grid value k plus u close to 1), so round up from the exact fraction r = v - floor(v) instead.
    """
    v = t(*indices) * qp[0]
    f = te.floor(v)
    r = v - f
    if seed is None:
        up = r >= tirx.const(0.5, "float32")
    else:
        up = _uniform(seed, indices, t.shape, salt) >= tirx.const(1.0, "float32") - r
    level = f + tirx.Select(up, tirx.const(1.0, "float32"), tirx.const(0.0, "float32"))
    return te.max(te.min(level, qp[3]), qp[2])


def fake_quantize(t: te.Tensor, qp: te.Tensor, seed: te.Tensor | None = None, salt: int = 0) -> te.Tensor:
    """Q(t; wl, fl) in float32: the value on the 2**-fl grid (the paper's float simulation)."""
    return te.compute(t.shape, lambda *i: _quantized_level(t, qp, seed, salt, i) * qp[1], name=QUANTIZE_NAME)


def quantize_to_int(
    t: te.Tensor, qp: te.Tensor, dtype: str, seed: te.Tensor | None = None, salt: int = 0
) -> te.Tensor:
    """The integer level round(t * 2**fl), clamped to the word length, in an integer container."""
    return te.compute(
        t.shape,
        lambda *i: tirx.Cast(dtype, _quantized_level(t, qp, seed, salt, i)),
        name=QUANTIZE_NAME + "_int",
    )


def rescale_levels(t: te.Tensor, shift: int, bounds: tuple[int, int] | None, dtype: str) -> te.Tensor:
    """``quantize_to_int`` (nearest) of integer levels ``t`` times ``2**shift``: ``t << shift``,
    or ``(t + 2**(-shift-1)) >> -shift`` (ties up, as ``floor(v + 1/2)``), clamped to ``bounds``
    (None: the caller knows they hold). Exact where the float32 path is: its values are these
    levels times a power of two."""

    def f(*i):
        v = tirx.Cast("int32", t(*i))
        if shift > 0:
            v = tirx.shift_left(v, tirx.const(shift, "int32"))
        elif shift < 0:
            v = tirx.shift_right(v + tirx.const(1 << (-shift - 1), "int32"), tirx.const(-shift, "int32"))
        if bounds is not None:
            v = te.max(te.min(v, tirx.const(bounds[1], "int32")), tirx.const(bounds[0], "int32"))
        return tirx.Cast(dtype, v)

    return te.compute(t.shape, f, name=QUANTIZE_NAME + "_int")


def requantize(
    acc: te.Tensor,
    bias: te.Tensor | None,
    qp: te.Tensor,
    fl: te.Tensor,
    channel_axis: int,
    seed: te.Tensor | None = None,
    salt: int = SALT_OUTPUT,
    out_dtype: str = "float32",
    acc_shift: int = 0,
) -> te.Tensor:
    """Exact Q of an accumulator on the 2**-2fl grid back to the 2**-fl grid, as float32 (or, with
    an integer ``out_dtype``, as the levels themselves: a deployed layer handing them on).
    ``acc_shift``: the accumulator's grid is 2**acc_shift coarser (its input came as levels on a
    coarser grid, unshifted), so it shifts by fl - acc_shift (fl >= acc_shift: an fl >= 0 input).

    floor(acc / 2**fl + offset) = (acc + r) >> fl with r = 2**(fl-1) (nearest, ties up) or r
    uniform in [0, 2**fl) (stochastic): integer arithmetic, so no float rounding can creep in.
    """

    def f(*i):
        b = None if bias is None else bias[i[channel_axis]]
        h = None if seed is None else _hash32(seed, i, acc.shape, salt)
        level = requantized_level(acc(*i), acc.dtype, b, fl[()] - acc_shift, qp[2], qp[3], h)
        if out_dtype != "float32":
            return tirx.Cast(out_dtype, level)
        return tirx.Cast("float32", level) * qp[1]

    return te.compute(acc.shape, f, name="fxp_requantize")


def output_draw(seed: tirx.Buffer, indices: list, shape: list) -> tirx.PrimExpr:
    """``requantize``'s stochastic draw for the output element at ``indices`` of ``shape``, for a
    kernel that requantizes itself (``amx.Levels``): the same hash, so the same levels."""
    return _hash32(seed, indices, shape, SALT_OUTPUT)


def requantized_level(
    total: tirx.PrimExpr,
    dtype: str,
    bias: tirx.PrimExpr | None,
    fl: tirx.PrimExpr,
    lo: tirx.PrimExpr,
    hi: tirx.PrimExpr,
    hash_value: tirx.PrimExpr | None = None,
) -> tirx.PrimExpr:
    """``clamp((total + (bias << fl) + r) >> fl, lo, hi)`` in ``dtype`` (total's), r = 2**(fl-1) (nearest)
    or the hash's low fl bits (stochastic): the level ``requantize`` and the AMX kernel's own
    requantize (``amx.Levels``) both compute."""
    shift = tirx.Cast(dtype, fl)
    one = tirx.const(1, dtype)
    if bias is not None:
        total = total + tirx.shift_left(tirx.Cast(dtype, bias), shift)
    if hash_value is None:
        r = tirx.shift_right(tirx.shift_left(one, shift), one)
    else:
        r = tirx.bitwise_and(tirx.Cast(dtype, hash_value), tirx.shift_left(one, shift) - one)
    q = tirx.shift_right(total + r, shift)
    return te.max(te.min(q, tirx.Cast(dtype, acc_bound(hi))), tirx.Cast(dtype, acc_bound(lo)))


def acc_bound(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """Integer bounds arrive as float32 (exact up to 2**24, far above the integer classes' 2**15)."""
    return tirx.Cast("int64", v)


def sums_fit_int32(
    w: te.Tensor, qp: te.Tensor, qp_other: te.Tensor | None = None, out_axis: int = 0, requantize: bool = True
) -> te.Tensor:
    """Whether, at this call's weights and precisions, an int32 kernel's sums cannot overflow (0-d
    bool): ``B = 2**(wl'-1) * max_o sum_k |w level|`` stays within int32, ``o`` along ``out_axis`` and
    ``k`` the other axes, ``wl'`` the other operand's word length (``qp_other``, default ``qp``).
    With ``requantize``, ``(sum + (bias << fl) + r) >> fl`` must fit too: the bias level lies in
    [-2**(wl-1), 2**(wl-1) - 1] and r in [0, 2**fl - 1], so both ends hold iff
    ``B + 2**(wl-1+fl) <= 2**31``. A level is at most ``floor(|w| 2**fl) + 1`` under either
    rounding, and at most ``2**(wl-1)``; the other operand is at most ``2**(wl'-1)``. Trained
    weights meet this far above the worst-case word length of ``int32_max_wl``."""
    qp_other = qp if qp_other is None else qp_other
    outer = w.shape[out_axis]
    axes = [te.reduce_axis((0, d)) for i, d in enumerate(w.shape) if i != out_axis]
    top = qp[3] + tirx.const(1.0, "float32")  # 2**(wl-1)

    def level(o):
        i = [*axes[:out_axis], o, *axes[out_axis:]]
        return te.min(te.floor(te.abs(w(*i)) * qp[0]) + tirx.const(1.0, "float32"), top)

    row = te.compute(
        (outer,), lambda o: te.sum(tirx.Cast("int64", level(o)), axis=axes), name="fxp_row_bound"
    )
    o = te.reduce_axis((0, outer))
    worst = te.compute((), lambda: te.max(row[o], axis=o), name="fxp_worst_row")

    def fits():
        total = worst[()] * tirx.Cast("int64", qp_other[3] + tirx.const(1.0, "float32"))
        if requantize:  # the output's wl and fl are qp's
            return total + tirx.Cast("int64", top * qp[0]) <= tirx.const(2**31, "int64")
        return total <= tirx.const(2**31 - 1, "int64")

    return te.compute((), fits, name="fxp_sums_fit_int32")
