"""Batch norm in training on compiled kernels.

PyTorch's CPU batch norm sums each channel of a contiguous NCHW tensor one element at a time in
float64: 2.5-3 ms for ResNet-20's 16-channel layer at batch 128 (ten times a copy of the tensor),
its backward 1.2-1.8 ms, together a fifth of a low-bit MARViN training step over the model's 21
batch norms. ``quantize_`` routes a model's batch norms here: the statistics come from
``te_norm``'s kernel (one vectorized pass, 0.1-0.25 ms there), the normalization from PyTorch's
inference kernel given them, the gradients from ``te_norm``'s two backward kernels (the
per-channel sums, then the input gradient: 0.4 ms). In evaluation, on other devices and dtypes,
and with one value per channel, the module runs its own forward."""

from __future__ import annotations

import functools
from collections.abc import Callable

import onnx
import torch
import torch.nn.functional as F
import tvm
from torch import nn

from marvin_compile.passes import pipeline
from marvin_compile.runtime.torch_bridge import interleave_with_torch
from marvin_compile.runtime.variant_store import VariantStore

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class BatchNormKernels:
    """``te_norm``'s kernels for one store's target, by (channels, plane size), compiled (or loaded
    from the store's cache) on first use."""

    def __init__(self, store: VariantStore) -> None:
        interleave_with_torch()
        self.store = store
        self._entries: dict[tuple[int, int], tuple[Callable, Callable]] = {}

    def entries(self, channels: int, plane: int) -> tuple[Callable, Callable]:
        """``batch_stats`` and ``backward`` for this shape."""
        key = channels, plane
        if key not in self._entries:
            vm = self.store.get_module(pipeline.batch_norm_module(*key), None)
            self._entries[key] = vm["batch_stats"], vm["backward"]
        return self._entries[key]

    def stats(self, x: torch.Tensor) -> torch.Tensor:
        """``[3, C]``: per channel the mean, the biased and the unbiased variance."""
        planes = _planes(x)
        return torch.from_dlpack(self.entries(*planes.shape[1:])[0](tvm.runtime.from_dlpack(planes)))

    def backward(
        self, g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The input gradient (shaped as ``x``) and ``[2, C]``: the bias and weight gradients."""
        planes = _planes(x)
        args = [tvm.runtime.from_dlpack(t) for t in (_planes(g), planes, mean, invstd, weight)]
        dx, sums = self.entries(*planes.shape[1:])[1](*args)
        return torch.from_dlpack(dx).view(x.shape), torch.from_dlpack(sums)


def _planes(x: torch.Tensor) -> torch.Tensor:
    return x.detach().contiguous().view(x.shape[0], x.shape[1], -1)


def onnx_batch_norm_shapes(model: onnx.ModelProto) -> set[tuple[int, int]]:
    """(channels, plane size) of every BatchNormalization input whose shape ONNX infers."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: v.type.tensor_type.shape.dim for v in [*graph.value_info, *graph.input]}
    out = set()
    for node in graph.node:
        dims = shapes.get(node.input[0]) if node.op_type == "BatchNormalization" else None
        if dims and len(dims) >= 2 and all(d.HasField("dim_value") for d in dims[1:]):
            plane = 1
            for d in dims[2:]:
                plane *= d.dim_value
            out.add((dims[1].dim_value, plane))
    return out


class _BatchNormTrain(torch.autograd.Function):
    """Normalization by the batch's statistics, which it returns too (not differentiable)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, kernels):  # noqa: ANN001, ANN205 - autograd's signature
        mean, var, unbiased = kernels.stats(x)
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        ctx.kernels = kernels
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, unbiased)
        return y, mean, unbiased

    @staticmethod
    def backward(ctx, grad, _mean, _unbiased):  # noqa: ANN001, ANN205
        x, weight, mean, invstd = ctx.saved_tensors
        affine = weight is not None
        dx, (gb, gw) = ctx.kernels.backward(
            grad, x, mean, invstd, weight if affine else torch.ones_like(mean)
        )
        return dx, gw if affine else None, gb if ctx.has_bias else None, None, None


def vectorizable(x: torch.Tensor) -> bool:
    """Whether the kernel takes ``x``'s statistics: contiguous float32 on the CPU, at least two
    values per channel (else PyTorch's batch norm runs, and raises what it raises)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() >= 2
        and x.is_contiguous()
        and x.numel() > x.shape[1]
    )


def _forward(
    module: nn.modules.batchnorm._BatchNorm, kernels: BatchNormKernels, x: torch.Tensor
) -> torch.Tensor:
    """``module``'s own forward, in training by ``kernels``."""
    if not (module.training and vectorizable(x)):
        return type(module).forward(module, x)
    module._check_input_dim(x)
    momentum = 0.0 if module.momentum is None else module.momentum
    tracked = module.track_running_stats
    if tracked and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:  # a cumulative average
            momentum = 1.0 / float(module.num_batches_tracked)
    y, mean, unbiased = _BatchNormTrain.apply(x, module.weight, module.bias, module.eps, kernels)
    if tracked and module.running_mean is not None:
        with torch.no_grad():
            module.running_mean.lerp_(mean, momentum)
            module.running_var.lerp_(unbiased, momentum)
    return y


def route_batch_norms(model: nn.Module, kernels: BatchNormKernels) -> list[str]:
    """Route every batch norm of ``model`` through ``kernels`` in training; parameters, buffers and
    state_dict unchanged. Returns their names."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, BATCH_NORMS):
            module.forward = functools.partial(_forward, module, kernels)
            names.append(name)
    return names
