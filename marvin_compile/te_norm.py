"""Tensor-expression kernels of batch norm in training (``runtime/batch_norm``), over ``[N, C, P]``
(images, channels, the plane of each channel flattened).

Both directions need per-channel sums over N x P values, which PyTorch's CPU kernel takes one
element at a time. Here each image's channel plane is summed in float32 lanes (``LANES`` running
sums each, every input vector loaded once for both sums a direction needs), the planes combined
in float64. The statistics shift each value by its channel's first one ("shifted data"):
sum((x - K)^2) / M - (sum(x - K) / M)^2 then cancels no more digits than the data's spread
costs, where E[x^2] - E[x]^2 lost them all for a channel whose mean is large against its
deviation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tvm import te, tirx

LANES = 32  # running sums per plane (fewer where the plane is not a multiple): four AVX2 vectors
LANE_SUMS, PLANE_SUMS = "bn_lane_sums", "bn_plane_sums"


def _channel_sums(shape, term: Callable) -> te.Tensor:
    """``[C, 2]`` float64: sum over images and plane of ``term(image, channel, k, t)`` for t = 0, 1."""
    n, c, p = shape
    lanes = math.gcd(int(p), LANES)
    i = te.reduce_axis((0, int(p) // lanes), name="i")
    lane_sums = te.compute(
        (n, c, 2, lanes),
        lambda b, ch, t, lane: te.sum(term(b, ch, i * lanes + lane, t), axis=i),
        name=LANE_SUMS,
    )
    lane = te.reduce_axis((0, lanes), name="lane")
    plane_sums = te.compute(
        (n, c, 2), lambda b, ch, t: te.sum(lane_sums[b, ch, t, lane], axis=lane), name=PLANE_SUMS
    )
    image = te.reduce_axis((0, n), name="image")
    return te.compute(
        (c, 2), lambda ch, t: te.sum(plane_sums[image, ch, t].astype("float64"), axis=image), name="bn_sums"
    )


def _count(shape) -> tirx.PrimExpr:
    return tirx.Cast("float64", shape[0] * shape[2])


def batch_stats(x: te.Tensor) -> te.Tensor:
    """``[3, C]`` float32: per channel the mean, the biased variance (normalization) and the
    unbiased one (running statistics). ``x``: float32, at least two values per channel."""

    def term(b, ch, k, t) -> tirx.PrimExpr:
        d = x[b, ch, k] - x[0, ch, 0]
        return tirx.Select(t == 0, tirx.const(1.0, "float32"), d) * d

    sums = _channel_sums(x.shape, term)
    count = _count(x.shape)

    def stat(row, ch) -> tirx.PrimExpr:
        shift = sums[ch, 0] / count
        var = tirx.max(sums[ch, 1] / count - shift * shift, tirx.const(0.0, "float64"))
        mean = x[0, ch, 0].astype("float64") + shift
        return tirx.Select(row == 0, mean, tirx.Select(row == 1, var, var * count / (count - 1.0)))

    return te.compute((3, x.shape[1]), lambda row, ch: stat(row, ch).astype("float32"), name="bn_stats")


def _normalized(x, mean, invstd, weight, bias, b, ch, k) -> tirx.PrimExpr:
    """(x - mean) * (invstd * weight) + bias: one expression for the forward and the ReLU's gate."""
    return (x[b, ch, k] - mean[ch]) * (invstd[ch] * weight[ch]) + bias[ch]


def normalize_relu(
    x: te.Tensor,
    mean: te.Tensor,
    invstd: te.Tensor,
    weight: te.Tensor,
    bias: te.Tensor,
    residual: te.Tensor | None = None,
) -> te.Tensor:
    """relu((x - mean) * invstd * weight + bias [+ residual]): batch norm's normalization and the
    ReLU (and residual add) that follow it in one pass."""

    def y(b, ch, k) -> tirx.PrimExpr:
        v = _normalized(x, mean, invstd, weight, bias, b, ch, k)
        if residual is not None:
            v = v + residual[b, ch, k]
        return tirx.max(v, tirx.const(0.0, "float32"))

    return te.compute(x.shape, y, name="bn_relu")


def _gate(
    x: te.Tensor, mean: te.Tensor, invstd: te.Tensor, weight: te.Tensor, after: tuple
) -> Callable | None:
    """Where a ReLU after batch norm passed its input on: ``after`` is empty (no ReLU), the bias
    (``normalize_relu`` without a residual: recomputed from ``x``, which the backward reads anyway,
    rather than read from the output) or the ReLU's output (with a residual)."""
    if not after:
        return None
    (t,) = after
    if len(t.shape) == 1:
        return lambda b, ch, k: _normalized(x, mean, invstd, weight, t, b, ch, k) > tirx.const(0.0, "float32")
    return _output_gate(t)


def _output_gate(out: te.Tensor) -> Callable:
    return lambda b, ch, k: out[b, ch, k] > tirx.const(0.0, "float32")


def _gated(g: te.Tensor, gate: Callable | None, b, ch, k) -> tirx.PrimExpr:
    """The gradient behind the ReLU (none: ``g`` itself)."""
    if gate is None:
        return g[b, ch, k]
    return tirx.Select(gate(b, ch, k), g[b, ch, k], tirx.const(0.0, "float32"))


def grad_sums(
    g: te.Tensor, x: te.Tensor, mean: te.Tensor, invstd: te.Tensor, weight: te.Tensor, *after: te.Tensor
) -> te.Tensor:
    """``[2, C]`` float32: the bias and weight gradients, sum(g) and sum(g * (x - mean)) * invstd,
    ``g`` taken behind the ReLU that ``after`` describes (``_gate``)."""
    gate = _gate(x, mean, invstd, weight, after)

    def term(b, ch, k, t) -> tirx.PrimExpr:
        grad = _gated(g, gate, b, ch, k)
        return tirx.Select(t == 0, tirx.const(1.0, "float32"), x[b, ch, k] - mean[ch]) * grad

    sums = _channel_sums(x.shape, term)
    return te.compute(
        (2, x.shape[1]),
        lambda row, ch: tirx.Select(row == 0, sums[ch, 0], sums[ch, 1] * invstd[ch].astype("float64")).astype(
            "float32"
        ),
        name="bn_grad_sums",
    )


def input_grad(
    g: te.Tensor,
    x: te.Tensor,
    mean: te.Tensor,
    invstd: te.Tensor,
    weight: te.Tensor,
    sums: te.Tensor,
    *after: te.Tensor,
) -> te.Tensor:
    """The input gradient of normalization by the batch's statistics, from ``grad_sums`` (``after``
    as there): weight * invstd * (g - sum(g) / M - (x - mean) * invstd * sum(g * x_hat) / M)."""
    gate = _gate(x, mean, invstd, weight, after)
    scale = 1.0 / tirx.Cast("float32", x.shape[0] * x.shape[2])

    def dx(b, ch, k) -> tirx.PrimExpr:
        centred = (x[b, ch, k] - mean[ch]) * invstd[ch]
        grad = _gated(g, gate, b, ch, k)
        return weight[ch] * invstd[ch] * (grad - sums[0, ch] * scale - centred * sums[1, ch] * scale)

    return te.compute(x.shape, dx, name="bn_input_grad")


def gated_grad(g: te.Tensor, out: te.Tensor) -> te.Tensor:
    """The residual's gradient: ``g`` where the ReLU's output ``out`` is positive."""
    return te.compute(g.shape, lambda b, ch, k: _gated(g, _output_gate(out), b, ch, k), name="bn_relu_grad")
