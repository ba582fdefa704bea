"""The compile pipeline, in named phases (mlc-llm style: small passes, one place that orders them).

- partition: split each quantizable layer out of ``main`` (model level, once per model), marking
             those fed by a ReLU (``nonneg_inputs``: int8 runs them on byte products);
- quantize:  insert runtime-precision fixed-point quantize nodes (per layer, per rounding);
- lower:     integer kernels of the layer's kernel class (packed dot-product kernels on x86;
             the float32 class's product on the packed FMA kernel), then dead-code cleanup;
- lower (backward): integer input- and weight-gradient products for ``backward="lowbit"``;
- batch norm: training's statistics and gradients over ``[N, C, plane]`` (``te_norm``, scheduled by
             ``schedule_norm``), which ``runtime/batch_norm`` runs in place of PyTorch's;
- freeze:    deployment: precisions and weights become constants, folded into integer containers
             (packed for the dot-product kernels), layers hand each other int16 levels
             (``integer_activations``; not on AMX), and layers are inlined into ``main`` so TVM's
             fusion appends each layer's ReLU / residual add to its kernel (a ReLU and max pool
             after an AMX conv fuse into its levels unpacking: ``fuse_pool``);
- glue:      ``main`` calls layers through the runtime dispatcher;
- build:     TVM's Relax lowering and fusion, CPU schedules (``schedule_dot`` for the packed
             kernels, ``schedule_cpu`` for the rest), codegen for the target (``relax.build``; on
             the CPU ``main`` itself is compiled to machine code, not interpreted VM bytecode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from marvin_compile import te_norm
from marvin_compile.dot_isa import DotISA, dot_isa
from marvin_compile.fixed_point import Precision
from marvin_compile.frontend import layer_name
from marvin_compile.kernel_classes import KernelClass, class_for_wl
from marvin_compile.passes.bind_dispatch import BindLayerDispatch
from marvin_compile.passes.extract_layers import ExtractLayers
from marvin_compile.passes.freeze_precision import FreezeLayerPrecision
from marvin_compile.passes.fuse_pool import FuseMaxPoolIntoLevels
from marvin_compile.passes.gradient_kernels import AddGradientKernels
from marvin_compile.passes.insert_quantize import InsertFixedPointQuantize, input_quantizer
from marvin_compile.passes.integer_activations import IntegerActivations
from marvin_compile.passes.lower_float_dot import LowerFloatDotKernels
from marvin_compile.passes.lower_integer import LowerToIntegerKernels
from marvin_compile.passes.nonneg_inputs import MarkNonNegativeInputs
from marvin_compile.passes.schedule_cpu import ScheduleCPU
from marvin_compile.passes.utils import LAYER_ATTR, layer_functions, param

if TYPE_CHECKING:
    from marvin_compile.tuning import TuningDatabase

CODEGEN_REVISION = 59  # part of every cache key: bump when the same inputs compile to other code
EXEC_MODES = ("compiled", "bytecode")


def codegen_key(target: tvm.target.Target) -> str:
    """What decides the generated code besides the inputs: the revision and the kernel family the
    target gets here (AMX use depends on the OS and ``MARVIN_AMX``, not on the target alone)."""
    return f"{CODEGEN_REVISION}:{_isa(target)}"


def _isa(target: tvm.target.Target | None) -> DotISA | None:
    return None if target is None else dot_isa(target)


def bind_batch(mod: tvm.IRModule, batch: int) -> tvm.IRModule:
    """``main`` for one static batch size: its symbolic batch dimension bound, so no shape is
    computed at run time (the imported model's first input is batch first)."""
    n = mod["main"].params[0].ty.shape[0]
    return relax.transform.BindSymbolicVars({n: batch})(mod)


def partition(mod: tvm.IRModule) -> tvm.IRModule:
    """Phase partition: main plus one float Relax function per quantizable layer, those fed by a ReLU
    marked (``NONNEG_ATTR``)."""
    return tvm.transform.Sequential([ExtractLayers(), MarkNonNegativeInputs()], name="partition")(mod)


def layer_module(func: relax.Function) -> tvm.IRModule:
    """A module holding one layer function as ``layer``: the unit that is compiled and swapped."""
    return tvm.IRModule({"layer": func.with_attr("global_symbol", "layer")})


def variant_module(
    func: relax.Function, kernel_class: KernelClass, rounding: str, target: tvm.target.Target | None = None
) -> tvm.IRModule:
    """Phases quantize and lower for one layer and one kernel class (packed kernels where
    ``target`` has integer dot-product instructions)."""
    seq = tvm.transform.Sequential(
        [
            InsertFixedPointQuantize(rounding),
            LowerToIntegerKernels(kernel_class, _isa(target)),
            LowerFloatDotKernels(_isa(target)),
            relax.transform.DeadCodeElimination(["layer"]),
        ],
        name="quantize_lower",
    )
    return seq(layer_module(func))


def input_quantizer_module(func: relax.Function, rounding: str) -> tvm.IRModule:
    """The layer's input quantizer alone (``quantize_input``), for the straight-through backward."""
    return input_quantizer(func, rounding)


def batch_norm_module(channels: int, plane: int) -> tvm.IRModule:
    """Batch norm in training over ``[N, channels, plane]`` (``te_norm``): ``batch_stats(x)``;
    ``normalize_relu(x, mean, invstd, weight, bias[, residual])`` (``normalize_add_relu`` with the
    residual); ``backward(g, x, mean, invstd, weight)`` -> (input gradient, [bias; weight]
    gradients), behind ``normalize_relu``'s ReLU: ``backward_relu`` taking the bias last (the ReLU's
    gate recomputed from x), ``backward_add_relu`` the ReLU's output, returning the residual's
    gradient third."""
    bb = relax.BlockBuilder()
    n = tirx.Var("n", "int64")

    def planes(name: str) -> relax.Var:
        return param(name, (n, channels, plane), "float32")

    def vectors(*names: str) -> list[relax.Var]:
        return [param(name, (channels,), "float32") for name in names]

    x = planes("x")
    with bb.function("batch_stats", [x]):
        bb.emit_func_output(bb.emit(bb.call_te(te_norm.batch_stats, x, primfunc_name_hint="marvin_bn_stats")))
    for name, residual in (("normalize_relu", False), ("normalize_add_relu", True)):
        x, stats = planes("x"), vectors("mean", "invstd", "weight", "bias")
        args = [x, *stats] + ([planes("residual")] if residual else [])
        with bb.function(name, args):
            y = bb.call_te(te_norm.normalize_relu, *args, primfunc_name_hint="marvin_bn_relu")
            bb.emit_func_output(bb.emit(y))
    for name in ("backward", "backward_relu", "backward_add_relu"):
        g, x, stats = planes("g"), planes("x"), vectors("mean", "invstd", "weight")
        after = {"backward": [], "backward_relu": vectors("bias"), "backward_add_relu": [planes("out")]}[name]
        with bb.function(name, [g, x, *stats, *after]):
            sums = bb.emit(
                bb.call_te(te_norm.grad_sums, g, x, *stats, *after, primfunc_name_hint="marvin_bn_grad_sums")
            )
            dx = bb.call_te(
                te_norm.input_grad, g, x, *stats, sums, *after, primfunc_name_hint="marvin_bn_input_grad"
            )
            results = [bb.emit(dx), sums]
            if name == "backward_add_relu":
                results.append(
                    bb.emit(bb.call_te(te_norm.gated_grad, g, *after, primfunc_name_hint="marvin_relu_grad"))
                )
            bb.emit_func_output(relax.Tuple(results))
    return bb.get()


def gradient_module(
    func: relax.Function,
    kernel_class: KernelClass,
    target: tvm.target.Target | None = None,
    rounding: str = "nearest",
) -> tvm.IRModule:
    """Phase lower for the low-bit backward: the layer's integer ``dx`` and ``dw`` products (packed
    kernels where ``target`` has integer dot-product instructions); ``dw`` quantizes the layer's
    input as the forward at ``rounding`` did (taking its seed last where stochastic)."""
    seq = tvm.transform.Sequential(
        [
            AddGradientKernels(kernel_class, _isa(target), rounding),
            relax.transform.DeadCodeElimination(["dx", "dw"]),
        ],
        name="gradient_lower",
    )
    return seq(layer_module(func))


def freeze(
    mod: tvm.IRModule,
    precision: Mapping[str, Precision],
    params: Mapping[str, np.ndarray],
    target: tvm.target.Target | None = None,
    tuned: bool = False,
) -> tvm.IRModule:
    """Deployment: every layer quantized (nearest) at its own class and precision, weights folded
    (``tuned``: the kernels will be scheduled from a tuning database, see ``LowerToIntegerKernels``)."""
    return tvm.transform.Sequential(freeze_passes(precision, params, target, tuned), name="freeze")(mod)


def freeze_passes(
    precision: Mapping[str, Precision],
    params: Mapping[str, np.ndarray],
    target: tvm.target.Target | None = None,
    tuned: bool = False,
) -> list[tvm.transform.Pass]:
    """Phase freeze's passes, in order (``freeze``)."""
    classes = {name: class_for_wl(p.wl) for name, p in precision.items()}
    weights = {layer_name(k): np.asarray(v) for k, v in params.items() if k.endswith("weight")}
    frozen = {name: (weights[name], p) for name, p in precision.items() if name in weights}
    isa = _isa(target)
    # integer levels between layers where the packed kernels take them (AMX's tile kernels hand
    # on float32 fused into the next packing instead)
    levels = [IntegerActivations(precision)] if isa is not None and not isa.amx else []
    return [
        InsertFixedPointQuantize("nearest"),
        *levels,
        LowerToIntegerKernels(classes, isa, frozen, biased_int8=not tuned),
        LowerFloatDotKernels(isa),
        relax.transform.BindParams("main", dict(params)),
        FreezeLayerPrecision(precision),
        FuseMaxPoolIntoLevels(),
        relax.transform.FoldConstant(),
        relax.transform.DeadCodeElimination(["main"]),
    ]


def glue_module(mod: tvm.IRModule) -> tvm.IRModule:
    """Phase glue: main with layer calls bound to the runtime dispatcher, layer bodies dropped."""
    out = BindLayerDispatch()(mod)
    return relax.transform.DeadCodeElimination(["main"])(out)


def build(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    tuning: TuningDatabase | None = None,
    exec_mode: str = "compiled",
) -> relax.VMExecutable:
    """Phase build: TVM's Relax lowering (legalize, fuse), our CPU schedules on LLVM targets (tuned
    register tiles from ``tuning`` where it has them; TVM's GPU pipeline brings its own dlight schedules),
    then codegen. On LLVM targets ``exec_mode="compiled"`` compiles ``main`` too, sparing each kernel
    call the bytecode interpreter (ResNet-20 at batch 1: 4% faster); ``"bytecode"`` keeps the VM's
    per-call instrumentation hooks, which profilers need."""
    if exec_mode not in EXEC_MODES:
        raise ValueError(f"exec_mode {exec_mode!r} is not one of {EXEC_MODES}")
    if target.kind.name != "llvm":
        return tvm.compile(mod, target=target)
    seq = tvm.transform.Sequential(
        cpu_generic.library_dispatch_passes(target)
        + cpu_generic.legalize_passes(target)
        + [ScheduleCPU(tuning)]
        + cpu_generic.dataflow_lower_passes(target)
        + cpu_generic.finalize_passes(target),
        name="cpu_build",
    )

    @tvm.transform.module_pass(opt_level=0, name="MarvinCPUPipeline")
    def _pipeline(m: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return seq(m)

    with _keeping_64bit_indices():
        return relax.build(mod, target=target, relax_pipeline=_pipeline, exec_mode=exec_mode)


def _keeping_64bit_indices() -> tvm.transform.PassContext:
    """The current pass context, with TIR's ``NarrowDataType`` off. Relax builds every kernel with
    64-bit indices; in a kernel with static shapes (a library for one batch size) that pass narrows
    them to 32 bits, and LLVM, seeing sign-extended addresses, no longer shared the loads of input
    words that neighbouring taps read: LeNet-5's conv2 at batch 64 took 41 broadcasts per 50
    multiply-adds instead of 14, and 0.167 ms instead of 0.155 (the whole model 0.417 -> 0.39 ms;
    ResNet-20 at batch 1 and 64 unchanged). Over a symbolic batch nothing narrows anyway."""
    current = tvm.transform.PassContext.current()
    return tvm.transform.PassContext(
        opt_level=current.opt_level,
        required_pass=list(current.required_pass),
        disabled_pass=[*current.disabled_pass, "tirx.NarrowDataType"],
        instruments=list(current.instruments),
        config=dict(current.config),
    )


__all__ = [
    "LAYER_ATTR",
    "bind_batch",
    "build",
    "glue_module",
    "layer_functions",
    "layer_module",
    "partition",
    "variant_module",
]
