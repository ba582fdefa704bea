"""Deployment: compiled library, ONNX QDQ and the training-time model agree on digits."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tvm
from torch import nn

from marvin_compile.api import MarvinConfig, quantize_
from marvin_compile.data import load_dataset
from marvin_compile.fixed_point import Precision
from marvin_compile.frontend import ModelError
from marvin_compile.models import lenet5, resnet20
from marvin_compile.runtime.deploy import BATCH_LIBRARY, LIBRARY, QDQ, STAGED_BYTES, deploy, load

B1, B3 = BATCH_LIBRARY.format(1), BATCH_LIBRARY.format(3)

PRECISION = {"conv1": (8, 5), "conv2": (8, 4), "fc1": (8, 4), "fc2": (12, 8), "fc3": (16, 10)}


def ties_to_even_reference(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """float64 evaluation of the fixed-point semantics with ONNX's round-half-to-even."""
    import copy

    def q(v, wl, fl):
        return torch.clamp(torch.round(v * 2.0**fl), -(2 ** (wl - 1)), 2 ** (wl - 1) - 1) * 2.0**-fl

    m = copy.deepcopy(model).double().eval()
    for name, mod in m.named_modules():
        if name in PRECISION:
            wl, fl = PRECISION[name]
            with torch.no_grad():
                mod.weight.copy_(q(mod.weight, wl, fl))
                mod.bias.copy_(q(mod.bias, wl, fl))
            mod.register_forward_pre_hook(lambda _m, a, wl=wl, fl=fl: (q(a[0], wl, fl),))
            mod.register_forward_hook(lambda _m, _a, out, wl=wl, fl=fl: q(out, wl, fl))
    with torch.no_grad():
        return m(torch.from_numpy(x).double()).numpy().astype(np.float32)


@pytest.fixture(scope="module")
def digits():
    train, test, _ = load_dataset("digits", None, 32, 1)
    return train, test


@pytest.fixture(scope="module")
def trained_lenet(digits):
    """LeNet-5 trained briefly in float32: enough for meaningful predictions."""
    train, _ = digits
    torch.manual_seed(0)
    model = lenet5()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = train.tensors
    for _ in range(8):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def deployed(trained_lenet, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("deployed")
    prec = {n: Precision(*p) for n, p in PRECISION.items()}
    manifest = deploy(trained_lenet, digits[1].tensors[0][:2], prec, out, batches=(3, 1))
    return out, manifest


def test_three_forms_agree_on_digits(trained_lenet, digits, deployed, cache_dir):
    out, _ = deployed
    x, y = (t.numpy() for t in digits[1].tensors)
    tvm_logits = load(out)(x)
    qdq_logits = ort.InferenceSession(str(out / QDQ), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]

    import copy

    train_time = copy.deepcopy(trained_lenet)
    handle = quantize_(
        train_time, torch.from_numpy(x[:2]), MarvinConfig(rounding="nearest", cache_dir=cache_dir)
    )
    handle.set_precision(PRECISION)
    with torch.no_grad():
        ref_logits = train_time.eval()(torch.from_numpy(x)).numpy()

    np.testing.assert_array_equal(tvm_logits, ref_logits)  # same semantics, same integer kernels
    # ONNX rounds ties to even: the QDQ model is exactly MARViN's semantics with that one change ...
    np.testing.assert_array_equal(qdq_logits, ties_to_even_reference(trained_lenet, x))
    # ... so it differs from the ties-up model only where a tie flipped a rounding somewhere upstream.
    agree = np.mean(qdq_logits.argmax(1) == ref_logits.argmax(1))
    assert agree >= 0.995, agree
    assert np.abs(qdq_logits - ref_logits).max() <= 0.05 * np.abs(ref_logits).max()
    acc = {
        k: float(np.mean(v.argmax(1) == y))
        for k, v in [("tvm", tvm_logits), ("qdq", qdq_logits), ("ref", ref_logits)]
    }
    assert acc["ref"] > 0.9, acc
    assert abs(acc["tvm"] - acc["ref"]) <= 0.002 and abs(acc["qdq"] - acc["ref"]) <= 0.002, acc


def test_manifest_sizes_are_measured_and_smaller(deployed):
    out, manifest = deployed
    size = manifest["size"]
    assert size["qdq_onnx_bytes"] == (out / QDQ).stat().st_size
    assert size["qdq_onnx_bytes"] < size["float32_onnx_bytes"]
    assert size["parameter_bytes"] < size["float32_parameter_bytes"]
    assert {lay["name"]: (lay["wl"], lay["fl"]) for lay in manifest["layers"]} == PRECISION
    assert json.loads((out / "manifest.json").read_text())["checksums"][LIBRARY]


def test_specialized_batches_run_their_libraries(deployed, digits):
    """Batches of 1 and 3 go to model_b1.so / model_b3.so (static shapes): the same outputs as
    model.so, and the libraries are checksummed and checked like it; other sizes take model.so."""
    out, manifest = deployed
    assert manifest["batch_libraries"] == {"1": B1, "3": B3}
    for name in (B1, B3):
        assert name in manifest["checksums"]
    sizes = {b: (out / f).stat().st_size for b, f in manifest["batch_libraries"].items()}
    assert manifest["size"]["batch_library_bytes"] == sizes
    model = load(out)
    assert model.specialized_batches == (1, 3)
    x = digits[1].tensors[0][:5].numpy()
    generic = relax_entry(out / LIBRARY)
    for n in (1, 3, 5):
        want = generic(tvm.runtime.tensor(x[:n], tvm.cpu())).numpy()
        np.testing.assert_array_equal(model(x[:n]), want)
    np.testing.assert_array_equal(model(np.asfortranarray(x[:3], np.float64)), model(x[:3]))
    batch1 = relax_entry(out / B1)
    with pytest.raises(Exception, match="shape|Shape"):  # static: it takes one sample only
        batch1(tvm.runtime.tensor(x[:2], tvm.cpu()))


def test_batch_sizes_are_checked(trained_lenet, tmp_path):
    from marvin_compile.runtime.deploy import batch_sizes

    assert batch_sizes((np.int64(64), 1, 1)) == [1, 64]
    with pytest.raises(ValueError, match="positive integers, got \\[0\\]"):
        deploy(trained_lenet, torch.randn(2, 1, 32, 32), {}, tmp_path / "d", batches=(1, 0))


def test_build_names_the_accepted_exec_modes():
    from marvin_compile.passes import pipeline
    from marvin_compile.target import resolve_target

    with pytest.raises(ValueError, match="'jit' is not one of \\('compiled', 'bytecode'\\)"):
        pipeline.build(tvm.IRModule(), resolve_target("cpu"), exec_mode="jit")


def relax_entry(path):
    return tvm.relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())["main"]


def test_loader_works_on_torch_tensors(deployed, digits):
    """Torch tensors in, torch tensors out (results come out by DLPack): the outputs match a
    float64 numpy input, and a later call leaves an earlier result intact."""
    out, _ = deployed
    model = load(out)
    x = digits[1].tensors[0][:6].clone()
    assert x.data_ptr() % 64 == 0
    for batch in (1, 3):  # model_b1.so, model_b3.so
        first = model(x[:batch])
        kept = first.clone()
        second = model(x[batch : 2 * batch])
        assert isinstance(first, torch.Tensor) and first.shape == (batch, 10)
        assert torch.equal(first, kept) and not torch.equal(first, second)
        np.testing.assert_array_equal(first.numpy(), model(x[:batch].numpy().astype(np.float64)))
    large = digits[1].tensors[0][:20].clone()  # past STAGED_BYTES: goes in by DLPack, not copied
    assert large.numpy().nbytes > STAGED_BYTES and large.data_ptr() % 64 == 0
    np.testing.assert_array_equal(model(large).numpy(), model(large.numpy().astype(np.float64)))


def test_loader_stages_unaligned_numpy_inputs(deployed, digits):
    """Numpy inputs off the 64-byte boundary (and small ones) go through one reused staging tensor
    per thread: each call sees its own input, and results of earlier calls stay intact."""
    out, _ = deployed
    model = load(out)
    x = digits[1].tensors[0][:6].numpy()
    raw = np.empty(x.size + 16, np.float32)  # room to start 16 bytes past a 64-byte boundary
    shifted = raw[(16 - raw.ctypes.data % 64) % 64 // 4 :][: x.size].reshape(x.shape)
    shifted[...] = x
    assert shifted.ctypes.data % 64 != 0
    for batch in (1, 3, 2):  # model_b1.so, model_b3.so, model.so
        first = model(shifted[:batch])
        kept = first.copy()
        second = model(shifted[batch : 2 * batch])
        assert np.array_equal(first, kept) and not np.array_equal(first, second)
        np.testing.assert_array_equal(second, model(torch.from_numpy(x[batch : 2 * batch]).clone()))


def test_load_refuses_tampered_and_shared_directories(deployed, tmp_path):
    import shutil

    src, _ = deployed
    bad = tmp_path / "tampered"
    shutil.copytree(src, bad)
    with open(bad / QDQ, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="checksum mismatch"):
        load(bad)
    shutil.copy(src / LIBRARY, bad / B1)  # a valid library, but not the deployed one
    shutil.copy(src / QDQ, bad / QDQ)
    with pytest.raises(ModelError, match=f"checksum mismatch for .*{B1}"):
        load(bad)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(src, elsewhere)
    manifest = json.loads((elsewhere / "manifest.json").read_text())
    manifest["batch_libraries"]["1"] = "../elsewhere/model.so"
    (elsewhere / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="accepted: model_b<N>.so"):
        load(elsewhere)
    shared = tmp_path / "shared"
    shutil.copytree(src, shared)
    os.chmod(shared, 0o777)
    with pytest.raises(PermissionError, match="writable by group or others"):
        load(shared)


def test_resnet20_folds_batchnorm_and_deploys(tmp_path):
    torch.manual_seed(0)
    model = resnet20(in_channels=1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    prec = {n: Precision(8, 4) if i % 2 else Precision(12, 6) for i, n in enumerate(names)}
    manifest = deploy(model, torch.randn(2, 1, 32, 32), prec, tmp_path / "r20", batches=())
    assert manifest["batch_libraries"] == {} and not list((tmp_path / "r20").glob("model_b*.so"))
    folded = [lay for lay in manifest["layers"] if lay["batchnorm_folded"]]
    assert len(folded) == len(names) - 1  # every conv has a batch norm; the classifier has none
    x = np.random.default_rng(0).normal(size=(4, 1, 32, 32)).astype(np.float32)
    got = load(tmp_path / "r20")(x)
    qdq = ort.InferenceSession(str(tmp_path / "r20" / QDQ), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    assert np.abs(got - qdq).max() <= 2.0**-3
    np.testing.assert_array_equal(load(tmp_path / "r20")(x[:1]), got[:1])  # model.so serves batch 1


def test_identical_folded_biases_deploy(tmp_path):
    """Default batch-norm statistics fold to equal biases, which the exporter dedupes (Identity)."""
    model = resnet20(in_channels=1, num_classes=4)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    prec = {n: Precision(8, 4) for n in names}
    manifest = deploy(model, torch.randn(2, 1, 32, 32), prec, tmp_path / "d", batches=())
    x = np.random.default_rng(0).normal(size=(2, 1, 32, 32)).astype(np.float32)
    qdq = ort.InferenceSession(str(tmp_path / "d" / QDQ), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    assert qdq.shape == (2, 4) and len(manifest["layers"]) == len(names)


def test_cli_deploys_a_training_run_and_runs_it(tmp_path, cache_dir):
    import subprocess
    import sys

    from marvin_compile.runtime.driver import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(out=str(run), epochs=1, cache_dir=str(cache_dir), progress=False))
    cli = [sys.executable, "-m", "marvin_compile.cli"]
    r = subprocess.run(
        [*cli, "deploy", str(run), "--out", str(tmp_path / "dep"), "--batches", "none"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "model.so, model.qdq.onnx" in r.stdout and "model_b" not in r.stdout
    manifest = json.loads((tmp_path / "dep" / "manifest.json").read_text())
    assert manifest["batch_libraries"] == {}
    trained = torch.load(run / "checkpoint.pt", weights_only=True)["precision"]
    assert {lay["name"]: [lay["wl"], lay["fl"]] for lay in manifest["layers"]} == trained  # LeNet: no BN
    x = np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run(
        [
            *cli,
            "run",
            str(tmp_path / "dep"),
            "--input",
            str(tmp_path / "x.npy"),
            "--output",
            str(tmp_path / "y.npy"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), load(tmp_path / "dep")(x))
    r = subprocess.run(
        [*cli, "deploy", str(tmp_path / "nope"), "--out", str(tmp_path / "d2")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "not a training run" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [*cli, "deploy", str(run), "--out", str(tmp_path / "d3"), "--batches", "1,0"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "positive integers" in r.stderr and not (tmp_path / "d3").exists()


@pytest.mark.parametrize("scale", [1.0, 8.0], ids=["byte-weights", "int16-weights"])
def test_frozen_int16_layer_takes_the_int32_kernel_when_its_weights_allow(tmp_path, scale: float):
    """K = 576 at wl 12 exceeds the worst-case int32 bound, but trained-size weights do not: the
    deployed layer runs the packed int32 kernel (AMX tiles, where present) with no run-time branch,
    and stays exact, whether its weight levels fit a byte (on AMX: two byte products) or not."""
    from marvin_compile.dot_isa import dot_isa
    from marvin_compile.fixed_point import quantize_np
    from marvin_compile.frontend import import_onnx, load_onnx
    from marvin_compile.passes import pipeline
    from marvin_compile.passes.lower_integer import INT32_MAX, fits_byte, int32_max_wl, weight_bound
    from marvin_compile.target import resolve_target

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 8, 3, padding=1, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.mul_(scale)
    p = Precision(12, 9)
    weight = model[0].weight.detach().numpy()
    assert int32_max_wl(64 * 9) < p.wl and weight_bound(weight, p) <= INT32_MAX
    assert fits_byte(weight, p) == (scale == 1.0)
    deploy(model, torch.randn(2, 64, 6, 6), {"0": p}, tmp_path / "d", batches=())
    imported = import_onnx(load_onnx(tmp_path / "d" / "model.float.onnx"))
    frozen = pipeline.freeze(
        pipeline.partition(imported.mod), {"0": p}, imported.params, resolve_target("cpu")
    )
    text = frozen.script()
    isa = dot_isa(resolve_target("cpu"))
    if isa is not None:  # no int64 fallback branch; on AMX, 64 channels take the tiles at any wl
        assert ("marvin_amx_dot" if isa.amx else "marvin_dot_conv2d") in text and "R.nn.conv2d" not in text
    x = np.random.default_rng(0).normal(size=(3, 64, 6, 6)).astype(np.float32)
    got = load(tmp_path / "d")(x)
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(quantize_np(x.astype(np.float64), p.wl, p.fl)),
        torch.from_numpy(quantize_np(weight.astype(np.float64), p.wl, p.fl)),
        padding=1,
    ).numpy()
    np.testing.assert_array_equal(got, quantize_np(ref, p.wl, p.fl))


def test_requantize_stays_exact_where_only_the_bias_leaves_int32(tmp_path):
    """The products' sum fits int32 (so the int32 kernel runs), but with the bias shifted onto its
    grid it does not: the requantize must stay int64. At the extreme input, int32 would wrap the
    sum negative and clamp it to the lowest level instead of the highest."""
    from marvin_compile.fixed_point import quantize_np
    from marvin_compile.passes.lower_integer import INT32_MAX, weight_bound

    p = Precision(16, 8)
    top = (2**15 - 1) / 2**p.fl  # the largest value at (16, 8)
    model = nn.Sequential(nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, :2] = torch.tensor([32767.0, 32640.0]) / 2**p.fl
        model[0].weight[1, :2] = torch.tensor([1.0, -1.0])
        model[0].bias.fill_(top)
    weight = model[0].weight.detach().numpy()
    assert weight_bound(weight, p) <= INT32_MAX < weight_bound(weight, p) + 2 ** (p.wl - 1 + p.fl)
    deploy(model, torch.randn(2, 8), {"0": p}, tmp_path / "d", batches=())
    x = np.full((1, 8), top, np.float32)
    got = load(tmp_path / "d")(x)
    q = {k: quantize_np(v.detach().double().numpy(), p.wl, p.fl) for k, v in model[0].state_dict().items()}
    ref = quantize_np(quantize_np(x.astype(np.float64), p.wl, p.fl) @ q["weight"].T + q["bias"], p.wl, p.fl)
    assert got[0, 0] == top
    np.testing.assert_array_equal(got, ref)


def test_frozen_int16_layer_past_the_int32_bound_takes_the_wide_kernel_without_a_run_time_check(tmp_path):
    """Weight levels at the clamp (wl 16) over K = 64 put the sums past int32 (``weight_bound``):
    the deployed layer's weights are constants, so it takes the exact wide kernel (AMX byte
    products, else float64) outright: no run-time branch (whose int32 side, and its packed weight,
    the library would carry dead), and it stays exact at the extreme input."""
    from tvm import relax

    from marvin_compile.fixed_point import quantize_np
    from marvin_compile.frontend import import_onnx, load_onnx
    from marvin_compile.passes import pipeline
    from marvin_compile.passes.lower_integer import INT32_MAX, weight_bound
    from marvin_compile.target import resolve_target

    p = Precision(16, 8)
    top = (2**15 - 1) / 2**p.fl
    model = nn.Sequential(nn.Linear(64, 4)).eval()  # with a bias: the layer keeps its module's name
    with torch.no_grad():
        model[0].bias.zero_()
        model[0].weight.fill_(-top)
        model[0].weight[1::2] = top
    weight = model[0].weight.detach().numpy()
    assert weight_bound(weight, p) > INT32_MAX
    deploy(model, torch.randn(2, 64), {"0": p}, tmp_path / "d", batches=())
    imported = import_onnx(load_onnx(tmp_path / "d" / "model.float.onnx"))
    frozen = pipeline.freeze(
        pipeline.partition(imported.mod), {"0": p}, imported.params, resolve_target("cpu")
    )
    branches = [
        b.value
        for func in frozen.functions.values()
        if isinstance(func, relax.Function)
        for block in func.body.blocks
        for b in block.bindings
        if isinstance(b.value, relax.If)
    ]
    assert not branches
    x = np.full((2, 64), -(2.0**15) / 2**p.fl, np.float32)
    x[1, ::3] = top
    got = load(tmp_path / "d")(x)
    q = quantize_np(weight.astype(np.float64), p.wl, p.fl)
    ref = quantize_np(quantize_np(x.astype(np.float64), p.wl, p.fl) @ q.T, p.wl, p.fl)
    np.testing.assert_array_equal(got, ref)


def test_deployed_weights_are_stored_in_integer_containers():
    """Freezing folds each weight's quantization (and, on the packed kernels, its packing) into
    an integer constant: the only float32 constants left are the 4-element precision vectors."""
    import tvm
    from tvm import relax

    from marvin_compile.frontend import export_onnx, import_onnx, load_onnx
    from marvin_compile.passes import pipeline
    from marvin_compile.target import resolve_target

    torch.manual_seed(0)
    model = lenet5().eval()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"lenet-{os.getpid()}.onnx")
    export_onnx(model, torch.randn(2, 1, 32, 32), path)
    imported = import_onnx(load_onnx(path))
    os.remove(path)
    prec = {name: Precision(*p) for name, p in PRECISION.items()}
    frozen = pipeline.freeze(pipeline.partition(imported.mod), prec, imported.params, resolve_target("cpu"))

    def constants(e: relax.Expr) -> list[np.ndarray]:
        if isinstance(e, tvm.ir.expr.Constant):
            return [e.value.numpy()]
        parts = e.args if isinstance(e, relax.Call) else e.fields if isinstance(e, relax.Tuple) else []
        return [c for part in parts for c in constants(part)]

    found = [
        c
        for func in frozen.functions.values()
        if isinstance(func, relax.Function)
        for block in func.body.blocks
        for b in block.bindings
        for c in constants(b.value)
    ]
    weights = [c for c in found if c.size > 4]
    assert len(weights) >= 2 * len(PRECISION)  # a weight and a bias per layer, at least
    assert all(np.issubdtype(c.dtype, np.integer) for c in weights), sorted({str(c.dtype) for c in weights})


def test_byte_weights_are_checked_on_the_rounded_levels():
    """The narrow-weight test sees the levels deployment stores: 127.5 steps round up to 128 (no
    longer a byte), -128.5 rounds to -128 (still one)."""
    from marvin_compile.passes.lower_integer import fits_byte

    p = Precision(12, 4)  # one step is 1/16
    assert fits_byte(np.array([[127.49 / 16, -128.5 / 16]], np.float32), p)
    assert not fits_byte(np.array([[127.5 / 16]], np.float32), p)
    assert not fits_byte(np.array([[-128.51 / 16]], np.float32), p)


def test_a_linear_layer_at_a_static_batch_of_1_keeps_the_packed_kernel(tmp_path):
    """At batch 1 a tile product would pad the matmul's one row to 32, in three calls (pack,
    tiles, unpack); the batch-specialized library keeps the single packed kernel, the any-batch one
    the tiles (where present). Both against float64."""
    from marvin_compile.dot_isa import dot_isa
    from marvin_compile.fixed_point import quantize_np
    from marvin_compile.frontend import import_onnx, load_onnx
    from marvin_compile.passes import pipeline
    from marvin_compile.target import resolve_target

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    p = Precision(8, 4)
    deploy(model, torch.randn(2, 64), {"0": p}, tmp_path / "d", batches=(1,))
    imported = import_onnx(load_onnx(tmp_path / "d" / "model.float.onnx"))
    target = resolve_target("cpu")
    texts = {
        batch: pipeline.freeze(pipeline.partition(mod), {"0": p}, imported.params, target).script()
        for batch, mod in ((1, pipeline.bind_batch(imported.mod, 1)), (None, imported.mod))
    }
    isa = dot_isa(target)
    if isa is not None:
        assert "marvin_dot_matmul" in texts[1] and "marvin_amx_dot" not in texts[1]
        assert ("marvin_amx_dot" if isa.amx else "marvin_dot_matmul") in texts[None]
    x = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    w, b = (quantize_np(t.detach().double().numpy(), p.wl, p.fl) for t in (model[0].weight, model[0].bias))
    ref = quantize_np(quantize_np(x.astype(np.float64), p.wl, p.fl) @ w.T + b, p.wl, p.fl)
    ours = load(tmp_path / "d")
    np.testing.assert_array_equal(ours(x[:1]), ref[:1])  # model_b1.so
    np.testing.assert_array_equal(ours(x), ref)  # model.so


def test_relu_and_max_pool_after_a_tile_conv_fuse_into_its_unpacking(tmp_path):
    """conv - ReLU - max pool: on AMX one reduction over the conv's levels (``FuseMaxPoolIntoLevels``);
    a padded pool stays TVM's. Both exact against float64."""
    from marvin_compile.dot_isa import dot_isa
    from marvin_compile.frontend import import_onnx, load_onnx
    from marvin_compile.passes import pipeline
    from marvin_compile.target import resolve_target
    from tests.test_semantics import reference

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 8, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
    ).eval()
    prec = {"0": Precision(8, 4), "3": Precision(8, 3)}
    deploy(model, torch.randn(2, 8, 15, 15), prec, tmp_path / "d", batches=())
    imported = import_onnx(load_onnx(tmp_path / "d" / "model.float.onnx"))
    target = resolve_target("cpu")
    text = pipeline.freeze(pipeline.partition(imported.mod), prec, imported.params, target).script()
    isa = dot_isa(target)
    if isa is not None and isa.amx:
        assert text.count("R.nn.max_pool2d") == 1 and "marvin_amx_unpack_pool" in text
    x = (np.random.default_rng(0).normal(size=(3, 8, 15, 15)) * 2).astype(np.float32)
    want = reference(model, x, {k: (p.wl, p.fl) for k, p in prec.items()})
    np.testing.assert_array_equal(load(tmp_path / "d")(x), want.astype(np.float32))


@pytest.mark.parametrize("relu", [True, False], ids=["relu-fed", "signed"])
@pytest.mark.parametrize("levels", [2, 128], ids=["pairs-fit-int16", "full-range"])
def test_int8_layer_sums_pairs_in_int16_only_where_its_weights_allow(tmp_path, levels: int, relu: bool):
    """A deployed int8 conv on the byte chain: weight levels in [-1, 1] keep every pair lane inside
    int16, so the kernel accumulates there (``te_dot.int16_sums_fit``), a signed input packed as
    x + 128; full-range levels do not, and it keeps its int32 kernel (whose sums
    ``test_nonneg_inputs`` and ``test_dot_kernels`` check). Both equal the float64 reference on
    inputs that reach the extreme levels."""
    from marvin_compile.dot_isa import dot_isa
    from marvin_compile.frontend import import_onnx, load_onnx
    from marvin_compile.passes import pipeline
    from marvin_compile.target import resolve_target
    from marvin_compile.te_dot import INT16_SUMS_ATTR, int16_sums_fit
    from tests.test_semantics import reference

    p = Precision(8, 4)
    model = nn.Sequential(nn.ReLU() if relu else nn.Identity(), nn.Conv2d(16, 16, 3, padding=1, bias=False))
    model = model.eval()
    rng = np.random.default_rng(3)
    w_levels = rng.integers(1 - levels, levels, size=model[1].weight.shape)
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(w_levels * 2.0**-p.fl))
    assert int16_sums_fit(w_levels, 255) == (levels == 2)
    x = (rng.integers(-160, 160, size=(2, 16, 8, 8)) * 2.0**-p.fl).astype(np.float32)
    deploy(model, torch.from_numpy(x), {"1": p}, tmp_path / "d", batches=())
    imported = import_onnx(load_onnx(tmp_path / "d" / "model.float.onnx"))
    target = resolve_target("cpu")
    frozen = pipeline.freeze(pipeline.partition(imported.mod), {"1": p}, imported.params, target)
    isa = dot_isa(target)
    pairs = isa is not None and not isa.amx and isa.pairs_in_int16("uint8")
    assert (INT16_SUMS_ATTR in frozen.script()) == (pairs and levels == 2)
    got = load(tmp_path / "d")(x)
    exact = reference(model, x, {"1": (p.wl, p.fl)})
    assert (x * 2**p.fl).max() >= 127 and (x * 2**p.fl).min() <= -128  # inputs at the extreme levels
    if levels == 2:  # most outputs inside the word: the sums are checked, not the clamp
        assert (np.abs(exact * 2**p.fl) < 127).mean() > 0.3
    np.testing.assert_array_equal(got, exact)
