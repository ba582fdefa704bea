"""Batch norm in training on compiled kernels.

PyTorch's CPU batch norm sums each channel of a contiguous NCHW tensor one element at a time in
float64: 2.5-3 ms for ResNet-20's 16-channel layer at batch 128 (ten times a copy of the tensor),
its backward 1.2-1.8 ms, together a fifth of a low-bit MARViN training step over the model's 21
batch norms. ``quantize_`` routes a model's batch norms here: the statistics come from
``te_norm``'s kernel (one vectorized pass, 0.1-0.25 ms there), the normalization from PyTorch's
inference kernel given them, the gradients from ``te_norm``'s two backward kernels (the
per-channel sums, then the input gradient: 0.4 ms). A ``models.BatchNormReLU2d`` (batch norm, an
optional residual add, a ReLU) runs its normalization, add and ReLU as one kernel and takes the
ReLU's gradient inside the backward kernels, which spares the ReLU's two passes each way (and the
add's). In evaluation, on other devices and dtypes, and with one value per channel, the module
runs its own forward."""

from __future__ import annotations

import functools

import onnx
import torch
import torch.nn.functional as F
import tvm
from torch import nn

from marvin_compile.models import BatchNormReLU2d
from marvin_compile.passes import pipeline
from marvin_compile.runtime.torch_bridge import interleave_with_torch, to_tvm
from marvin_compile.runtime.variant_store import VariantStore

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class BatchNormKernels:
    """``te_norm``'s kernels for one store's target, by (channels, plane size), compiled (or loaded
    from the store's cache) on first use."""

    def __init__(self, store: VariantStore) -> None:
        interleave_with_torch()
        self.store = store
        self._vms: dict[tuple[int, int], tvm.runtime.Module] = {}

    def entries(self, channels: int, plane: int) -> tvm.runtime.Module:
        """The VM holding this shape's entries (``pipeline.batch_norm_module``)."""
        key = channels, plane
        if key not in self._vms:
            self._vms[key] = self.store.get_module(pipeline.batch_norm_module(*key), None)
        return self._vms[key]

    def _call(self, entry: str, x: torch.Tensor, *args: torch.Tensor) -> list[torch.Tensor]:
        """The entry's outputs, those over all of ``x`` shaped as ``x``. The shape is set on TVM's
        side: a torch view would keep autograd from summing into a returned gradient in place (a
        fresh tensor and a pass over it each time a block's input gradient is summed)."""
        planes = _planes(x)
        tensors = [to_tvm(_planes(t) if t.dim() > 1 else t) for t in args]
        out = self.entries(*planes.shape[1:])[entry](*tensors)
        outs = [out] if isinstance(out, tvm.runtime.Tensor) else out
        return [torch.from_dlpack(o._create_view(x.shape) if len(o.shape) == 3 else o) for o in outs]

    def stats(self, x: torch.Tensor) -> torch.Tensor:
        """``[3, C]``: per channel the mean, the biased and the unbiased variance."""
        return self._call("batch_stats", x, x)[0]

    def normalize_relu(
        self,
        x: torch.Tensor,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """relu(normalized x * weight + bias [+ residual]), shaped as ``x``."""
        args = (x, mean, invstd, weight, bias) + (() if residual is None else (residual,))
        entry = "normalize_relu" if residual is None else "normalize_add_relu"
        return self._call(entry, x, *args)[0]

    def backward(
        self,
        g: torch.Tensor,
        x: torch.Tensor,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        weight: torch.Tensor,
        after: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The input gradient (shaped as ``x``), ``[2, C]`` (the bias and weight gradients), with
        ``g`` taken behind ``normalize_relu``'s ReLU where ``after`` is given: its bias (no residual)
        or its output (with one, whose gradient then comes third)."""
        entry = "backward" if after is None else "backward_relu" if after.dim() == 1 else "backward_add_relu"
        args = (g, x, mean, invstd, weight) + (() if after is None else (after,))
        return self._call(entry, x, *args)


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
    """Normalization by the batch's statistics, then with ``relu`` a ReLU (over the sum with
    ``residual`` where given); returns the statistics too (not differentiable)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, kernels, relu):  # noqa: ANN001, ANN205 - autograd's
        mean, var, unbiased = kernels.stats(x)
        invstd = torch.rsqrt(var + eps)
        if relu:
            scale = torch.ones_like(mean) if weight is None else weight.detach()
            shift = torch.zeros_like(mean) if bias is None else bias.detach()
            y = kernels.normalize_relu(x, mean, invstd, scale, shift, residual)
        else:
            y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        # the ReLU's gate: recomputed from x and the bias, or read from the output past a residual
        after = (shift if residual is None else y) if relu else None
        ctx.save_for_backward(x, weight, mean, invstd, *([] if after is None else [after]))
        ctx.kernels = kernels
        ctx.affine = weight is not None, bias is not None
        ctx.mark_non_differentiable(mean, unbiased)
        return y, mean, unbiased

    @staticmethod
    def backward(ctx, grad, _mean, _unbiased):  # noqa: ANN001, ANN205
        x, weight, mean, invstd, *after = ctx.saved_tensors
        scale = torch.ones_like(mean) if weight is None else weight
        dx, (gb, gw), *residual = ctx.kernels.backward(grad, x, mean, invstd, scale, *after)
        gw, gb = (gw if ctx.affine[0] else None), (gb if ctx.affine[1] else None)
        return dx, gw, gb, residual[0] if residual else None, None, None, None


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
    module: nn.modules.batchnorm._BatchNorm,
    kernels: BatchNormKernels,
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``module``'s own forward (a ``BatchNormReLU2d``'s takes ``residual``), in training by
    ``kernels``."""
    relu = isinstance(module, BatchNormReLU2d)
    plain = (x,) if not relu else (x, residual)
    fits = residual is None or (residual.shape == x.shape and vectorizable(residual))
    if not (module.training and vectorizable(x) and fits):
        return type(module).forward(module, *plain)
    module._check_input_dim(x)
    momentum = 0.0 if module.momentum is None else module.momentum
    tracked = module.track_running_stats
    if tracked and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:  # a cumulative average
            momentum = 1.0 / float(module.num_batches_tracked)
    y, mean, unbiased = _BatchNormTrain.apply(
        x, module.weight, module.bias, residual, module.eps, kernels, relu
    )
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
