"""The torch bridge: Conv/Linear modules whose forward runs their layer's compiled variant.

Tensors cross into TVM through DLPack (zero-copy, CPU or CUDA). The forward computes
``Q(layer(Q(x), Q(w), Q(b)))`` in the variant of the layer's kernel class; gradients of the
activation quantizers are straight-through, so the backward is the float layer's backward taken
at the quantized input and weight (MARViN's reference behaviour, ``backward="float"``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import tvm
from torch import nn

from marvin_compile.fixed_point import Precision, quantize
from marvin_compile.kernel_classes import class_for_wl
from marvin_compile.runtime.compiled_model import Layer, precision_args
from marvin_compile.runtime.variant_store import Variant, VariantStore

BRIDGED = (nn.Conv1d, nn.Conv2d, nn.Linear)


def to_tvm(t: torch.Tensor) -> tvm.runtime.Tensor:
    return tvm.runtime.from_dlpack(t.detach().contiguous())


@dataclass
class CompiledLayer:
    """One layer's live state: precision, current variant, and the counters the driver reports."""

    layer: Layer
    store: VariantStore
    rounding: str
    precision: Precision | None = None
    variant: Variant | None = None
    swaps: int = 0
    _args: tuple = field(default=(), repr=False)

    def set_precision(self, p: Precision) -> None:
        """Switch precision; crossing a kernel-class boundary swaps the variant (a swap, not a build)."""
        if p == self.precision:
            return
        cls = class_for_wl(p.wl)
        if self.variant is not None and self.variant.kernel_class != cls.name:
            self.swaps += 1
        if self.variant is None or self.variant.kernel_class != cls.name:
            self.variant = self.store.get(self.layer.func, cls, self.rounding)
        self.precision = p
        self._args = precision_args(p, self.store.device)

    def run(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, seed: int) -> torch.Tensor:
        args = [to_tvm(x), to_tvm(w)] + ([to_tvm(b)] if b is not None else [])
        extra = list(self._args)
        if self.rounding == "stochastic":
            extra.append(tvm.runtime.tensor(np.array(seed, dtype=np.uint32), self.store.device))
        return torch.from_dlpack(self.variant.fn(*args, *extra))


class _QuantizedLayerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, module, seed):  # noqa: ANN001 - autograd signature
        layer: CompiledLayer = module.marvin
        p = layer.precision
        gen = module.marvin_generator
        xq = quantize(x, p.wl, p.fl, layer.rounding, gen)
        y = layer.run(xq, weight, bias, seed)
        ctx.save_for_backward(xq, weight)
        ctx.module = module
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        xq, weight = ctx.saved_tensors
        module = ctx.module
        grad = grad.contiguous()
        if isinstance(module, nn.Linear):
            gx = grad @ weight
            gw = grad.reshape(-1, grad.shape[-1]).t() @ xq.reshape(-1, xq.shape[-1])
            gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        else:
            conv_input, conv_weight = (
                (torch.nn.grad.conv2d_input, torch.nn.grad.conv2d_weight)
                if isinstance(module, nn.Conv2d)
                else (torch.nn.grad.conv1d_input, torch.nn.grad.conv1d_weight)
            )
            kw = dict(
                stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups
            )
            gx = conv_input(xq.shape, weight, grad, **kw)
            gw = conv_weight(xq, weight.shape, grad, **kw)
            gb = grad.sum(dim=[0, *range(2, grad.dim())]) if ctx.has_bias else None
        return gx, gw, gb, None, None


def _bridged_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if module.marvin.precision is None:
        raise RuntimeError(f"layer {module.marvin.layer.name} has no precision yet; call set_precision first")
    gen = module.marvin_generator
    seed = int(torch.randint(0, 2**32 - 1, (1,), generator=gen).item())
    return _QuantizedLayerFn.apply(x, module.weight, module.bias, module, seed)


def bridge(module: nn.Module, layer: CompiledLayer, generator: torch.Generator) -> None:
    """Route ``module``'s forward through its compiled variant; parameters and state_dict unchanged."""
    if not isinstance(module, BRIDGED):
        raise TypeError(f"cannot bridge {type(module).__name__}; accepted: Conv1d, Conv2d, Linear")
    if module.padding_mode != "zeros" if isinstance(module, nn.Conv1d | nn.Conv2d) else False:
        raise ValueError(f"layer {layer.layer.name}: padding_mode={module.padding_mode!r}; accepted: 'zeros'")
    module.marvin = layer
    module.marvin_generator = generator
    module.forward = functools.partial(_bridged_forward, module)
