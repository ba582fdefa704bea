"""The torch bridge: Conv/Linear modules whose forward runs their layer's compiled variant.

Tensors cross into TVM through DLPack (zero-copy, CPU or CUDA). The forward computes
``Q(layer(Q(x), Q(w), Q(b)))`` in the variant of the layer's kernel class; gradients of the
activation quantizers are straight-through, so the backward is the layer's backward taken at the
quantized input and weight: in float32 PyTorch (MARViN's reference behaviour, ``backward="float"``)
or, with ``backward="lowbit"`` and an integer class, in the layer's integer gradient kernels with
the incoming gradient quantized stochastically at a per-call dynamic scale.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import tvm
from torch import nn

from marvin_compile.fixed_point import Precision, on_grid, quantize
from marvin_compile.kernel_classes import class_for_wl
from marvin_compile.runtime.compiled_model import Layer, precision_args
from marvin_compile.runtime.variant_store import Variant, VariantStore

BRIDGED = (nn.Conv1d, nn.Conv2d, nn.Linear)
BACKWARDS = ("float", "lowbit")


def interleave_with_torch() -> None:
    """Training interleaves TVM kernels with torch ops: TVM's idle workers must not spin against
    torch's. Read when TVM's pool starts, at the first parallel kernel; deployed inference, whose
    kernels run back to back, keeps TVM's spinning default."""
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")


def to_tvm(t: torch.Tensor) -> tvm.runtime.Tensor:
    """``t`` for a TVM call, zero-copy where it can be: TVM takes only data aligned to 64 bytes, so
    a view that starts elsewhere (a slice of a batch) is copied."""
    t = t.detach().contiguous()
    return tvm.runtime.from_dlpack(t if t.data_ptr() % 64 == 0 else t.clone())


def small_tensor(values: float | list[float], dtype: str, device: tvm.runtime.Device) -> tvm.runtime.Tensor:
    """A small run-time argument (a seed, a scale) on ``device``. On the CPU torch makes it and
    DLPack passes it: 5 us, where ``tvm.runtime.tensor`` takes 22-28 us (88 of them in a ResNet-20
    low-bit step)."""
    if device.dlpack_device_type() == tvm.cpu().dlpack_device_type():
        return tvm.runtime.from_dlpack(torch.tensor(values, dtype=getattr(torch, dtype)))
    return tvm.runtime.tensor(np.array(values, dtype=dtype), device)


@dataclass
class CompiledLayer:
    """One layer's live state: precision, current variant, and the counters the driver reports."""

    layer: Layer
    store: VariantStore
    rounding: str
    backward: str = "float"
    precision: Precision | None = None
    variant: Variant | None = None
    gradients: Variant | None = None  # integer dx/dw kernels (lowbit backward, integer classes)
    input_quantizer: Variant | None = None  # Q(x) as the variants compute it, for the float backward
    swaps: int = 0
    _args: tuple = field(default=(), repr=False)

    def set_precision(self, p: Precision) -> None:
        """Switch precision; crossing a kernel-class boundary swaps the variant (a swap, not a build)."""
        if p == self.precision:
            return
        if self.input_quantizer is None:
            self.input_quantizer = self.store.get_input_quantizer(self.layer.func, self.rounding)
        cls = class_for_wl(p.wl)
        if self.variant is not None and self.variant.kernel_class != cls.name:
            self.swaps += 1
        if self.variant is None or self.variant.kernel_class != cls.name:
            self.variant = self.store.get(self.layer.func, cls, self.rounding)
            lowbit = self.backward == "lowbit" and cls.is_integer
            self.gradients = self.store.get_gradients(self.layer.func, cls, self.rounding) if lowbit else None
        self.precision = p
        self._args = precision_args(p, self.store.device)

    def run(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, seed: int) -> torch.Tensor:
        args = [to_tvm(x), to_tvm(w)] + ([to_tvm(b)] if b is not None else [])
        return torch.from_dlpack(self.variant.fn(*args, *self._precision_args(seed)))

    def quantize_input(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """The Q(x) that ``run(x, ..., seed)`` used, recomputed in one compiled pass."""
        return torch.from_dlpack(self.input_quantizer.fn(to_tvm(x), *self._precision_args(seed)))

    def _precision_args(self, seed: int) -> list:
        return [*self._args, *self._seed_args(seed)]

    def _seed_args(self, seed: int) -> list:
        """A stochastic variant's last argument: the seed of its draws (none for nearest)."""
        if self.rounding != "stochastic":
            return []
        return [small_tensor(seed, "uint32", self.store.device)]

    def run_gradients(
        self,
        g: torch.Tensor,
        x: torch.Tensor,
        w: torch.Tensor,
        seeds: tuple[int, int],
        input_grad: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(dx, dw) in integer kernels; g is scaled so its largest magnitude fills the word length.
        ``x`` is the forward's input, quantized by dw as ``run(x, ..., seeds[0])`` did; ``seeds[1]``
        draws g's stochastic rounding. ``input_grad=False`` (the input needs no gradient, e.g. the
        first layer) skips dx: None."""
        p = self.precision
        lo, hi = torch.aminmax(g)  # one pass, no |g| temporary (abs().max() cost ~0.6 ms a call here)
        amax = max(-float(lo), float(hi))
        if amax == 0.0:
            return (torch.zeros_like(x) if input_grad else None), torch.zeros_like(w)
        if not math.isfinite(amax):
            raise FloatingPointError(
                f"layer {self.layer.name}: its output gradient is not finite (the training diverged; "
                "a lower learning rate may help)"
            )
        scale = min(max(math.floor(math.log2(p.int_max / amax)), -126), 126)
        dev = self.store.device
        qp_g = small_tensor([2.0**scale, 2.0**-scale, p.int_min, p.int_max], "float32", dev)
        qp, seed_g = self._args[0], small_tensor(seeds[1], "uint32", dev)
        vm, gt = self.gradients.fn, to_tvm(g)
        gx = torch.from_dlpack(vm["dx"](gt, to_tvm(w), qp_g, qp, seed_g)) if input_grad else None
        gw = vm["dw"](to_tvm(x), gt, qp, qp_g, seed_g, *self._seed_args(seeds[0]))
        return gx, torch.from_dlpack(gw)


def _quantized_params(
    weight: torch.Tensor, bias: torch.Tensor | None, p: Precision, rounding: str, seed: int
) -> list[torch.Tensor | None]:
    """Q(weight), Q(bias), each as it is where MSGD just put it on this grid (``fixed_point.on_grid``).
    Stochastic draws come from a generator seeded by the call's ``seed``, so whether they are drawn
    does not move the layer's generator: a resumed run (whose loaded parameters are not marked)
    draws the same seeds as an uninterrupted one."""
    gen = None
    out = []
    for t in (weight, bias):
        if t is None or on_grid(t, p.wl, p.fl):
            out.append(None if t is None else t.detach())
            continue
        if gen is None and rounding == "stochastic":
            gen = torch.Generator(device=t.device).manual_seed(seed)
        out.append(quantize(t.detach(), p.wl, p.fl, rounding, gen))
    return out


class _QuantizedLayerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, module, seed, grad_seed):  # noqa: ANN001 - autograd signature
        layer: CompiledLayer = module.marvin
        p = layer.precision
        # Q(w) is an operand of the straight-through gradients: quantize the (small) parameters here
        # (a no-op in the kernel, where quantizing on-grid values is exact), unless MSGD just put them
        # on this grid. The backward quantizes x again, bit for bit, from x and the same seed (in dw's
        # kernel on the low-bit path).
        wq, bq = _quantized_params(weight, bias, p, layer.rounding, seed)
        x = x.detach().contiguous()
        y = layer.run(x, wq, bq, seed)
        ctx.save_for_backward(x, wq)
        ctx.module = module
        ctx.has_bias = bias is not None
        ctx.seeds = (seed, grad_seed)
        ctx.precision = p
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        x, weight = ctx.saved_tensors
        module = ctx.module
        grad = grad.contiguous()
        layer: CompiledLayer = module.marvin
        if layer.precision != ctx.precision:
            raise RuntimeError(f"layer {layer.layer.name}: precision changed between forward and backward")
        need_x = ctx.needs_input_grad[0]  # False for a first layer: skip its input gradient
        if layer.gradients is not None:
            gx, gw = layer.run_gradients(grad, x, weight, ctx.seeds, need_x)
            gb = grad.sum(dim=[0, *range(2, grad.dim())]) if ctx.has_bias else None
            return gx, gw, gb, None, None, None
        xq = layer.quantize_input(x, ctx.seeds[0])
        if isinstance(module, nn.Linear):
            gx = grad @ weight if need_x else None
            gw = grad.reshape(-1, grad.shape[-1]).t() @ xq.reshape(-1, xq.shape[-1])
            gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        else:  # one call for all three, as autograd makes it (shared layout conversions)
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad,
                xq,
                weight,
                [weight.shape[0]] if ctx.has_bias else None,
                module.stride,
                module.padding,
                module.dilation,
                False,
                [0] * (weight.dim() - 2),
                module.groups,
                [need_x, True, ctx.has_bias],
            )
        return gx, gw, gb, None, None, None


def _bridged_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if module.marvin.precision is None:
        raise RuntimeError(f"layer {module.marvin.layer.name} has no precision yet; call set_precision first")
    gen = module.marvin_generator
    seed, grad_seed = (int(s) for s in torch.randint(0, 2**32 - 1, (2,), generator=gen))
    return _QuantizedLayerFn.apply(x, module.weight, module.bias, module, seed, grad_seed)


def bridge(module: nn.Module, layer: CompiledLayer, generator: torch.Generator) -> None:
    """Route ``module``'s forward through its compiled variant; parameters and state_dict unchanged."""
    if not isinstance(module, BRIDGED):
        raise TypeError(f"cannot bridge {type(module).__name__}; accepted: Conv1d, Conv2d, Linear")
    if isinstance(module, nn.Conv1d | nn.Conv2d) and module.padding_mode != "zeros":
        raise ValueError(f"layer {layer.layer.name}: padding_mode={module.padding_mode!r}; accepted: 'zeros'")
    module.marvin = layer
    module.marvin_generator = generator
    module.forward = functools.partial(_bridged_forward, module)
