"""Deployed layers hand each other integer levels (``IntegerActivations``): exact against float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from torch.nn import functional as F
from tvm import relax, te

from marvin_compile import te_ops
from marvin_compile.dot_isa import dot_isa
from marvin_compile.fixed_point import Precision
from marvin_compile.frontend import import_onnx, load_onnx
from marvin_compile.passes import pipeline
from marvin_compile.passes.integer_activations import INPUT_LEVELS_ATTR
from marvin_compile.runtime.deploy import deploy, load
from marvin_compile.target import resolve_target
from tests.test_semantics import q_ref, reference


class Residual(nn.Module):
    """conv - ReLU - conv + skip - ReLU - grouped conv - max pool - flatten - Linear: levels go
    down a grid (rounding, clamping), up one (a shift), across a residual add of two grids, through
    a pool and a reshape, into a kernel TVM's generic path runs (grouped) and into ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.conv1(x))
        b = F.relu(self.conv2(a) + a)
        return self.fc(F.max_pool2d(self.conv3(b), 2).flatten(1))


@pytest.mark.parametrize("fc", [(16, 10), (20, 10)], ids=["int16-fc", "float-class-fc"])
def test_deployed_levels_between_layers_match_float64(tmp_path, fc: tuple[int, int]):
    """conv1 (12, 6) feeds conv2 (8, 4) two steps coarser, past its clamp (its outputs reach 10,
    conv2's top is 127/16); the add aligns conv2's fl 4 with conv1's fl 6; conv3 (8, 5) is fed a
    step coarser; fc either takes the pooled levels 5 steps finer (int16 class) or dequantized
    (the float32 class). The library equals the float64 reference, and on the packed kernels the
    activations between layers are int16."""
    torch.manual_seed(0)
    model = Residual().eval()
    with torch.no_grad():
        model.conv1.weight.mul_(3)
    prec = {"conv1": (12, 6), "conv2": (8, 4), "conv3": (8, 5), "fc": fc}
    x = np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32) * 2
    with torch.no_grad():
        assert F.relu(model.conv1(torch.from_numpy(x))).max() > 10  # conv2's input clamp is reached
    deploy(
        model, torch.from_numpy(x), {k: Precision(*p) for k, p in prec.items()}, tmp_path / "d", batches=(4,)
    )
    want = reference(model, x, prec).astype(np.float32)
    ours = load(tmp_path / "d")
    np.testing.assert_array_equal(ours(x), want)  # model_b4.so
    np.testing.assert_array_equal(ours(x[:3]), want[:3])  # model.so

    target = resolve_target("cpu")
    isa = dot_isa(target)
    imported = import_onnx(load_onnx(tmp_path / "d" / "model.float.onnx"))
    frozen = pipeline.freeze(
        pipeline.partition(imported.mod), {k: Precision(*p) for k, p in prec.items()}, imported.params, target
    )
    dtypes: dict[str, set[str]] = {}
    for b in frozen["main"].body.blocks[0].bindings:
        if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op):
            dtypes.setdefault(b.value.op.name, set()).add(str(b.var.ty.dtype))
    if isa is not None and not isa.amx:
        assert dtypes["relax.nn.relu"] == dtypes["relax.nn.max_pool2d"] == {"int16"}
        assert "int16" in dtypes["relax.add"]  # the residual add (a float class fc adds its bias)
    else:
        assert dtypes["relax.nn.relu"] == {"float32"}


@pytest.mark.parametrize("shift", [-3, -1, 0, 2])
def test_rescaled_levels_equal_quantizing_their_values(shift: int):
    """``rescale_levels`` against quantizing the levels' float64 values at the finer or coarser grid
    (ties up, clamped to wl 8), on every int16 level from -600 to 600."""
    fl_in = 4
    p = Precision(8, fl_in + shift)
    levels = np.arange(-600, 601, dtype=np.int16)
    t = te.placeholder(levels.shape, "int16", name="t")
    out = te_ops.rescale_levels(t, shift, (p.int_min, p.int_max), "int8")
    f = tvm.compile(te.create_prim_func([t, out]), target="llvm")
    got = tvm.runtime.tensor(np.zeros(levels.shape, np.int8))
    f(tvm.runtime.tensor(levels), got)
    values = torch.from_numpy(levels.astype(np.float64) * 2.0**-fl_in)
    want = (q_ref(values, p.wl, p.fl) * 2.0**p.fl).numpy()
    np.testing.assert_array_equal(got.numpy(), want)


def test_a_layer_fed_levels_must_be_deployed(tmp_path):
    """Training variants take float32: levels in and out are a deployed layer's interface only."""
    from marvin_compile.frontend import export_onnx
    from marvin_compile.kernel_classes import class_for_wl
    from marvin_compile.passes.insert_quantize import InsertFixedPointQuantize
    from marvin_compile.passes.lower_integer import LowerToIntegerKernels
    from marvin_compile.passes.utils import layer_functions

    export_onnx(nn.Sequential(nn.Conv2d(2, 4, 3)).eval(), torch.randn(1, 2, 6, 6), tmp_path / "m.onnx")
    mod = InsertFixedPointQuantize("nearest")(
        pipeline.partition(import_onnx(load_onnx(tmp_path / "m.onnx")).mod)
    )
    (gv, func), *_ = layer_functions(mod)
    mod[gv] = func.with_attr(INPUT_LEVELS_ATTR, [4, 0, 127])
    with pytest.raises(ValueError, match="deployed"):
        LowerToIntegerKernels(class_for_wl(8), dot_isa(resolve_target("cpu")))(mod)


class ByteFed(nn.Module):
    """conv1 (int8) - [ReLU] - [conv2 (int8) + skip - ReLU] - conv3 (int16): conv3 is fed conv1's
    (or the residual sum's) levels two steps coarser than its own grid."""

    def __init__(self, relu: bool, residual: bool) -> None:
        super().__init__()
        self.relu, self.residual = relu, residual
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        a = F.relu(a) if self.relu else a
        if self.residual:
            a = F.relu(self.conv2(a) + a)
        return self.conv3(a)


BYTE_CASES = {  # (relu, residual, conv3's weight levels in (-n, n), the operand, int16 sums)
    "relu-fed": (True, False, 2, "uint8", True),
    "relu-fed-byte-weights": (True, False, 128, "uint8", False),
    "residual-up-to-254": (True, True, 2, "uint8", True),
    "residual-pairs-inside-int16": (True, True, 40, "uint8", False),
    "residual-pairs-past-int16": (True, True, 128, "int16", False),
    "signed": (False, False, 2, "int8+128", True),
    "weights-past-a-byte": (True, False, 2048, "int16", False),
}


@pytest.mark.parametrize("case", list(BYTE_CASES))
def test_int16_layer_on_bytes_where_its_weights_and_input_levels_fit(tmp_path, case: str):
    """A deployed int16 layer (12, 6) fed int8 levels (fl 4: up to 127, 254 after a residual add,
    or signed) multiplies them unshifted on the byte chain where its weight levels fit a byte:
    in int16 sums where they keep the pair lanes inside int16, else on int32 sums where no pair of
    products leaves int16 (always, for inputs up to 127); other weights keep the int16 kernel.
    Every case equals the float64 reference on inputs that reach conv1's top level."""
    from marvin_compile.passes.lower_integer import OPERAND_ATTR
    from marvin_compile.passes.utils import LAYER_ATTR, layer_functions
    from marvin_compile.te_dot import INT16_SUMS_ATTR

    relu, residual, n, operand, sums = BYTE_CASES[case]
    torch.manual_seed(0)
    model = ByteFed(relu, residual).eval()
    p3 = Precision(12, 6)
    w_levels = np.random.default_rng(1).integers(1 - n, n, size=model.conv3.weight.shape)
    with torch.no_grad():
        model.conv3.weight.copy_(torch.from_numpy(w_levels * 2.0**-p3.fl))
    prec = {"conv1": (8, 4), "conv3": (p3.wl, p3.fl), **({"conv2": (8, 4)} if residual else {})}
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32) * 8
    with torch.no_grad():
        assert model.conv1(torch.from_numpy(x)).abs().max() > 8  # conv1's levels reach its clamp
    precision = {k: Precision(*p) for k, p in prec.items()}
    deploy(model, torch.from_numpy(x), precision, tmp_path / "d", batches=())
    np.testing.assert_array_equal(load(tmp_path / "d")(x), reference(model, x, prec).astype(np.float32))

    target = resolve_target("cpu")
    isa = dot_isa(target)
    if isa is None or isa.amx or not isa.pairs_in_int16("uint8"):
        pytest.skip(f"the byte chain runs on AVX2 / AVX-512 without AMX, not on {target}")
    imported = import_onnx(load_onnx(tmp_path / "d" / "model.float.onnx"))
    mod = pipeline.partition(imported.mod)
    for p in pipeline.freeze_passes(precision, imported.params, target):  # up to the lowering
        mod = p(mod)
        if p.info.name == "LowerToIntegerKernels":
            break
    (conv3,) = [f for _, f in layer_functions(mod) if str(f.attrs[LAYER_ATTR]) == "conv3"]
    assert str(conv3.attrs[OPERAND_ATTR]) == operand
    (kernel,) = [gv for gv in relax.analysis.all_global_vars(conv3) if "marvin_dot" in gv.name_hint]
    assert (INT16_SUMS_ATTR in mod[kernel].script()) == sums
