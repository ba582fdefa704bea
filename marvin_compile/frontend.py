"""Export (torch -> ONNX) and import (ONNX -> Relax) with layer names kept.

Layer names are the torch module names (``conv1``, ``layer1.0.conv2``): the exporter names each
weight initializer ``<module>.weight``, and the importer keeps initializers as Relax parameters in
initializer order, so a Relax layer maps back to its torch module by position and name.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import tvm
from onnx import numpy_helper
from tvm.relax.frontend.onnx import from_onnx
from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

BATCH_DIM = "N"


class ModelError(ValueError):
    """A model file that is missing, malformed or uses operators we cannot import."""


def export_onnx(
    model: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike, fold_batchnorm: bool = True
) -> str:
    """Export in eval mode with a symbolic batch dimension, check with onnx.checker.

    ``fold_batchnorm=False`` keeps BatchNormalization nodes apart from the convolutions, so each
    Conv in the graph has exactly the torch module's parameters (what the training bridge needs).
    """
    path = os.fspath(path)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter keeps names
            torch.onnx.export(
                model,
                (example,),
                path,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: BATCH_DIM}, "y": {0: BATCH_DIM}},
                opset_version=17,
                dynamo=False,
                training=torch.onnx.TrainingMode.EVAL if fold_batchnorm else torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=fold_batchnorm,
            )
    finally:
        model.train(was_training)
    onnx.checker.check_model(onnx.load(path))
    return path


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX file, turning every failure into a one-line ModelError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"model file not found: {path} (expected an .onnx file)")
    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path} is not a valid ONNX model: {first}") from None
    initializers = {init.name for init in model.graph.initializer}
    if not [i for i in model.graph.input if i.name not in initializers]:
        raise ModelError(f"{path} has no graph input")
    return model


def check_supported(model: onnx.ModelProto) -> None:
    """Fail before import on any operator the Relax frontend cannot convert."""
    supported = _get_convert_map()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in supported:
            raise ModelError(
                f"unsupported ONNX operator {node.op_type!r} (domain {node.domain or 'ai.onnx'!r}) in node "
                f"{node.name or '<unnamed>'!r}; supported: the ai.onnx operators of TVM's Relax frontend, "
                "e.g. Conv, Gemm, MatMul, Relu, Add, MaxPool, AveragePool, GlobalAveragePool, Flatten"
            )


@dataclass
class ImportedModel:
    """A Relax module whose ``main`` takes (x, *params) plus the parameter values and names."""

    mod: tvm.IRModule
    params: dict[str, np.ndarray]  # Relax parameter name -> value
    onnx_names: dict[str, str]  # Relax parameter name -> ONNX initializer name
    input_name: str


def import_onnx(model: onnx.ModelProto) -> ImportedModel:
    """ONNX -> Relax with the batch dimension symbolic and parameters kept as inputs."""
    check_supported(model)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelError(f"expected exactly one graph input, found {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    if not dims or not dims[0].dim_param or any(d.dim_value <= 0 for d in dims[1:]):
        shape = [d.dim_param or d.dim_value for d in dims]
        raise ModelError(
            f"input {inputs[0].name!r} has shape {shape}; accepted: a symbolic batch dimension first "
            "and static sizes after it (export with dynamic_axes={'x': {0: 'N'}})"
        )
    try:
        mod = from_onnx(model, keep_params_in_input=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot import the ONNX graph into Relax: {first}") from None
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    values = [v.numpy() for v in main.attrs["params"]]
    relax_names = [p.name for p in main.params[num_input:]]
    inits = list(model.graph.initializer)
    onnx_names, params = {}, {}
    for rname, value in zip(relax_names, values, strict=True):
        match = next(i for i in inits if _sanitized(i.name) == rname or i.name == rname)
        if not np.array_equal(numpy_helper.to_array(match), value):
            raise AssertionError(f"initializer {match.name} does not match Relax parameter {rname}")
        onnx_names[rname] = match.name
        params[rname] = value
    mod = tvm.IRModule({"main": main.without_attr("params")})
    return ImportedModel(mod, params, onnx_names, main.params[0].name)


def _sanitized(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name.removeprefix("onnx::"))


def layer_name(weight_onnx_name: str) -> str:
    """The torch module name of a layer from its weight's initializer name."""
    if weight_onnx_name == "weight":  # the exported module is itself the layer
        return ""
    return weight_onnx_name.removesuffix(".weight")
