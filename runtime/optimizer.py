"""MSGD: SGD on float32 master weights with the MARViN step of MARVIN.md section 3.

Usage::

    controller = PrecisionController()
    opt = MSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
               layers=quantizable_layers(model), controller=controller, seed=0)
    opt.register_precision_hook(lambda changes: driver.swap_kernels(changes))
    opt.quantize_params()          # first forward pass already at the initial precision
    for step in ...:
        for micro_batch in ...:    # gradient accumulation: just accumulate .grad, step once
            loss = model(x).loss / k; loss.backward()
        opt.step(loss=total_loss)  # the loss drives the push-up strategy rule
        opt.zero_grad()

Quantized layers are named by ``layers = {name: (weight, bias or None)}``; every other parameter
(batch norm, ...) gets plain SGD. With ``layers=None``, or with ``quantize_grads``,
``normalize_grads`` and ``quantize_weights`` all False and no controller, every update is
exactly torch.optim.SGD's. Each step the optimizer reports the layers whose precision changed:
``opt.precision_changes`` and the hooks from ``register_precision_hook`` both get
``{layer: (wl, fl)}``, after the parameters were rewritten at the new precision.

Deviations from the reference (lorenz0890/AdaPT ``MSGD_FP``): gradients of parameters outside
quantized layers are neither quantized nor normalised (the reference normalises every gradient);
``l1`` adds ``l1 * sign(master)`` after normalisation, next to weight decay, so its strength does
not depend on the gradient norm (the reference puts the L1 penalty in the loss; do that to get its
behaviour); ``p.grad`` is never modified, so accumulating gradients across steps stays correct.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from marvin_compile.fixed_point import check_precision, mark_on_grid, quantize_each

from .controller import PrecisionController

LayerParams = tuple[torch.Tensor, torch.Tensor | None]
PrecisionHook = Callable[[dict[str, tuple[int, int]]], None]
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def quantizable_layers(
    model: nn.Module, types: tuple[type[nn.Module], ...] = QUANTIZABLE_TYPES
) -> dict[str, LayerParams]:
    """``{module name: (weight, bias or None)}`` for the modules carrying the arithmetic (section 2)."""
    return {
        name: (module.weight, module.bias)
        for name, module in model.named_modules()
        if isinstance(module, types) and isinstance(getattr(module, "weight", None), torch.Tensor)
    }


class MSGD(torch.optim.Optimizer):
    """SGD (momentum, dampening, nesterov, L2 weight decay, optional L1) on float32 master weights.

    For a parameter of a quantized layer, each step: (1) its gradient is quantized stochastically at
    the layer's current (wl, fl) and normalised to unit L2 norm; (2) for the weight, the controller
    observes it and may decide a new precision from the master weight before the update; (3) SGD
    updates the master; (4) the parameter becomes Q(master; wl, fl, stochastic) at the layer's
    (possibly new) precision, marked as such (``fixed_point.mark_on_grid``: the bridged forward then
    takes it as it is); the bias always follows its weight. Without a controller the
    precision stays fixed at ``precision`` (one pair for all layers, or a pair per layer).

    Arguments beyond torch.optim.SGD's: ``l1`` (adds ``l1 * sign(master)`` to the update, like
    weight decay), ``layers`` (``{name: (weight, bias or None)}``, e.g. ``quantizable_layers(model)``),
    ``controller`` or ``precision`` (adaptive or fixed precision), ``quantize_grads`` /
    ``normalize_grads`` / ``quantize_weights`` (steps 1 and 4; a controller needs normalised
    gradients) and ``seed``. Param groups may override ``l1`` like any other hyperparameter.

    All stochastic rounding (and a stochastic push-down) draws from per-device generators seeded by
    ``seed`` (default ``torch.initial_seed()``); they, the master weights and the controller state
    are in ``state_dict()``, so a resume is exact. Masters are created from the parameters at their
    first step (or at ``quantize_params()``); later writes to the parameters are overwritten.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        l1: float = 0.0,
        *,
        layers: Mapping[str, LayerParams] | None = None,
        controller: PrecisionController | None = None,
        precision: tuple[int, int] | Mapping[str, tuple[int, int]] | None = None,
        quantize_grads: bool = True,
        normalize_grads: bool = True,
        quantize_weights: bool = True,
        seed: int | None = None,
    ) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("l1", l1)):
            if value < 0.0:
                raise ValueError(f"{name}={value} is out of range; accepted: {name} >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, l1=l1
        )
        super().__init__(params, defaults)

        self.layers: dict[str, LayerParams] = dict(layers or {})
        self._layer_of: dict[torch.Tensor, tuple[str, bool]] = {}
        known = {id(p) for group in self.param_groups for p in group["params"]}
        for name, (weight, bias) in self.layers.items():
            for p, is_weight in ((weight, True), (bias, False)):
                if p is None:
                    continue
                if id(p) not in known:
                    raise ValueError(f"layer {name!r}: a parameter is not among the optimizer's params")
                if p in self._layer_of:
                    raise ValueError(
                        f"layer {name!r}: a parameter already belongs to {self._layer_of[p][0]!r}"
                    )
                self._layer_of[p] = (name, is_weight)

        if controller is not None and precision is not None:
            raise ValueError("pass either controller (adaptive precision) or precision (fixed), not both")
        if controller is not None and not normalize_grads:
            raise ValueError("a controller needs normalize_grads=True: gradient diversity assumes unit norms")
        self.controller = controller
        self._fixed: dict[str, tuple[int, int]] = {}
        if controller is not None:
            for name in self.layers:
                controller.register(name)
        else:
            pairs = (
                precision
                if isinstance(precision, Mapping)
                else dict.fromkeys(self.layers, precision or (8, 4))
            )
            for name in self.layers:
                if name not in pairs:
                    raise ValueError(f"precision has no (wl, fl) for layer {name!r}")
                wl, fl = pairs[name]
                check_precision(wl, fl)
                self._fixed[name] = (int(wl), int(fl))

        self.quantize_grads = quantize_grads
        self.normalize_grads = normalize_grads
        self.quantize_weights = quantize_weights
        self._seed = torch.initial_seed() if seed is None else int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._precision_hooks: OrderedDict[int, PrecisionHook] = OrderedDict()
        self.precision_changes: dict[str, tuple[int, int]] = {}

    @property
    def precision(self) -> dict[str, tuple[int, int]]:
        """Current ``{layer: (wl, fl)}``: the precision of the parameters for the next forward pass."""
        if self.controller is None:
            return dict(self._fixed)
        return {name: self.controller.precision(name) for name in self.layers}

    def register_precision_hook(self, hook: PrecisionHook) -> RemovableHandle:
        """Call ``hook({layer: (wl, fl)})`` after every step that changed some layer's precision."""
        handle = RemovableHandle(self._precision_hooks)
        self._precision_hooks[handle.id] = hook
        return handle

    @torch.no_grad()
    def quantize_params(self) -> None:
        """Snapshot the masters and put the quantized layers' parameters on their grids now."""
        if not self.quantize_weights:
            return
        self._write_params(list(self._layer_of), self.precision)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, *, loss: float | torch.Tensor | None = None
    ) -> Any:
        """One update; `loss` (or the closure's) feeds the controller's strategy rule."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.controller is not None and loss is not None:
            self.controller.update_strategy(loss)

        before = self.precision
        stepped = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p, _ in stepped):
            raise RuntimeError("MSGD does not support sparse gradients")
        grads = self._marvin_grads([p for p, _ in stepped], before)
        for (p, group), grad in zip(stepped, grads, strict=True):
            master = self._master(p)
            name, is_weight = self._layer_of.get(p, (None, False))
            if is_weight and self.controller is not None:
                self.controller.observe(name, grad)
                self.controller.maybe_decide(name, master, self._generator(master.device))
            self._sgd(master, grad, self.state[p], group)
        after = self.precision
        self._write_params([p for p, _ in stepped], after)

        self.precision_changes = {name: pair for name, pair in after.items() if pair != before[name]}
        if self.precision_changes:
            for hook in list(self._precision_hooks.values()):
                hook(dict(self.precision_changes))
        return loss

    def _marvin_grads(
        self, params: list[torch.Tensor], precision: dict[str, tuple[int, int]]
    ) -> list[torch.Tensor]:
        """Section 3 step 1 for the quantized layers' parameters: stochastic quantization at the
        precision that produced the gradient, then unit L2 norm (a zero gradient stays zero; no host
        sync). Every other parameter's gradient as it is."""
        layer = [i for i, p in enumerate(params) if p in self._layer_of]
        grads = [p.grad for p in params]
        for i in layer:
            grads[i] = grads[i].to(torch.float32)
        if self.quantize_grads:
            qs = self._quantize(
                [grads[i] for i in layer], [precision[self._layer_of[params[i]][0]] for i in layer]
            )
            for i, q in zip(layer, qs, strict=True):
                grads[i] = q
        if self.normalize_grads:
            for i in layer:
                norm = torch.linalg.vector_norm(grads[i])
                grads[i] = grads[i] / torch.where(norm > 0, norm, torch.ones_like(norm))
        return grads

    def _write_params(self, params: list[torch.Tensor], precision: dict[str, tuple[int, int]]) -> None:
        """Step 4: each quantized layer's parameter becomes Q(master) at the layer's precision, every
        other parameter its master."""
        quantized = [p for p in params if p in self._layer_of] if self.quantize_weights else []
        pairs = [precision[self._layer_of[p][0]] for p in quantized]
        for p, q, pair in zip(
            quantized, self._quantize([self._master(p) for p in quantized], pairs), pairs, strict=True
        ):
            p.copy_(q)
            mark_on_grid(p, *pair)
        written = {id(p) for p in quantized}
        for p in params:
            if id(p) not in written:
                p.copy_(self._master(p))

    def _quantize(self, tensors: list[torch.Tensor], precisions: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Stochastic Q of each tensor at its precision, batched per device (``quantize_each``)."""
        out: list[torch.Tensor] = list(tensors)
        devices: dict[torch.device, list[int]] = {}
        for i, t in enumerate(tensors):
            devices.setdefault(t.device, []).append(i)
        for device, members in devices.items():
            qs = quantize_each(
                [tensors[i] for i in members],
                [precisions[i] for i in members],
                "stochastic",
                self._generator(device),
            )
            for i, q in zip(members, qs, strict=True):
                out[i] = q
        return out

    @staticmethod
    def _sgd(master: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """torch.optim.SGD's single-tensor update, operation for operation, plus the optional L1 term."""
        d_p = grad
        if group["weight_decay"] != 0:
            d_p = d_p.add(master, alpha=group["weight_decay"])
        if group["l1"] != 0:
            d_p = d_p.add(torch.sign(master), alpha=group["l1"])
        momentum = group["momentum"]
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = d_p.detach().clone()
                state["momentum_buffer"] = buf
            else:
                buf.mul_(momentum).add_(d_p, alpha=1 - group["dampening"])
            d_p = d_p.add(buf, alpha=momentum) if group["nesterov"] else buf
        master.add_(d_p, alpha=-group["lr"])

    def _master(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "master" not in state:
            state["master"] = p.detach().to(torch.float32, copy=True)
        return state["master"]

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._generators[key] = gen
        return gen

    def state_dict(self) -> dict[str, Any]:
        """torch's state (with momentum buffers and masters) plus generators and controller state."""
        state = super().state_dict()
        state["marvin"] = {
            "seed": self._seed,
            "generators": {key: gen.get_state() for key, gen in self._generators.items()},
            "controller": None if self.controller is None else self.controller.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        marvin = state_dict.pop("marvin", None)
        super().load_state_dict(state_dict)
        # The base class casts state to each parameter's dtype: restore float32 (independent) masters.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id, {})
            if "master" in saved:
                self.state[p]["master"] = saved["master"].to(device=p.device, dtype=torch.float32, copy=True)
        if marvin is None:
            return
        self._seed = int(marvin["seed"])
        self._generators = {}
        for key, gen_state in marvin["generators"].items():
            gen = torch.Generator(device=key)
            gen.set_state(gen_state)
            self._generators[key] = gen
        if marvin["controller"] is not None:
            if self.controller is None:
                raise ValueError("the checkpoint holds controller state but this optimizer has no controller")
            self.controller.load_state_dict(marvin["controller"])
