"""Autotuning with meta_schedule: records are written, a tuned build is used and stays exact,
an interrupted or repeated tune measures nothing twice, and bad requests fail clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tvm
from torch import nn

from marvin_compile import tuning
from marvin_compile.cli import main
from marvin_compile.frontend import export_onnx, import_onnx, load_onnx
from marvin_compile.kernel_classes import CLASS_BY_NAME
from marvin_compile.passes import pipeline
from marvin_compile.runtime.variant_store import VariantStore
from marvin_compile.target import resolve_target

pytestmark = pytest.mark.skipif(
    tuning.dot_isa(resolve_target("cpu")) is None, reason="host CPU has no x86 integer dot products"
)


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory):
    torch.manual_seed(0)  # 75 window bytes: the packed dot-product kernel, tunable, even on AMX hosts
    model = nn.Conv2d(3, 16, 5, padding=2).eval()
    path = tmp_path_factory.mktemp("tune") / "conv.onnx"
    export_onnx(model, torch.randn(2, 3, 8, 8), path)
    return model, path


@pytest.fixture(scope="module")
def tuned(conv_model, tmp_path_factory):
    db = tmp_path_factory.mktemp("db")
    lines: list[str] = []
    result = tuning.tune(
        conv_model[1], resolve_target("cpu"), 3, db, batch=4, classes=["int8"], log=lines.append
    )
    return db, result, lines


def test_tune_writes_records_and_reports_progress(tuned):
    db, result, lines = tuned
    (task,) = result["tasks"].values()
    assert task["users"] == ["layer_0/int8"] or task["users"][0].endswith("/int8")
    assert task["trials"] == 3 and task["best_ms"] > 0
    assert len(tuning.TuningDatabase(db, resolve_target("cpu"))) == 1
    assert any("trials 3/3" in line for line in lines) and any("best" in line for line in lines)


def test_tune_resumes_without_measuring_again(conv_model, tuned):
    db, result, _ = tuned
    lines: list[str] = []
    again = tuning.tune(
        conv_model[1], resolve_target("cpu"), 3, db, batch=4, classes=["int8"], log=lines.append
    )
    assert again["tasks"] == result["tasks"]
    assert not any("this session" in line for line in lines)  # nothing was measured


def test_tuned_build_is_used_and_exact(conv_model, tuned, tmp_path, monkeypatch):
    model, path = conv_model
    db, _, _ = tuned
    target = resolve_target("cpu")
    database = tuning.TuningDatabase(db, target)
    applied = []
    original = tuning.TuningDatabase.schedule
    monkeypatch.setattr(
        tuning.TuningDatabase, "schedule", lambda self, f: applied.append(original(self, f)) or applied[-1]
    )
    ((_, func),) = pipeline.layer_functions(pipeline.partition(import_onnx(load_onnx(path)).mod))
    tuned_store = VariantStore(target, tmp_path / "tuned", database)
    plain_store = VariantStore(target, tmp_path / "plain")
    cls = CLASS_BY_NAME["int8"]
    tuned_variant = tuned_store.get(func, cls, "nearest")
    assert any(a is not None for a in applied), "the tuned trace was not applied"
    assert tuned_variant.key != plain_store.get(func, cls, "nearest").key

    wl, fl = 8, 4
    x = np.random.default_rng(1).normal(size=(5, 3, 8, 8)).astype(np.float32)
    qp = np.array([2.0**fl, 2.0**-fl, -(2.0 ** (wl - 1)), 2.0 ** (wl - 1) - 1], np.float32)
    w, b = (t.detach().numpy() for t in (model.weight, model.bias))
    args = [tvm.runtime.tensor(a) for a in (x, w, b, qp, np.array(fl, np.int32))]
    got = tuned_variant.fn(*args).numpy()

    def q(v):
        return (
            np.clip(np.floor(np.asarray(v, np.float64) * 2.0**fl + 0.5), -(2 ** (wl - 1)), 2 ** (wl - 1) - 1)
            * 2.0**-fl
        )

    ref = torch.nn.functional.conv2d(
        torch.from_numpy(q(x)), torch.from_numpy(q(w)), torch.from_numpy(q(b)), padding=2
    ).numpy()
    np.testing.assert_array_equal(got, q(ref))


def test_compile_cli_records_the_database(conv_model, tuned, tmp_path):
    db, _, _ = tuned
    out = tmp_path / "compiled"
    assert (
        main(["compile", str(conv_model[1]), "--out", str(out), "--word-lengths", "8", "--db", str(db)]) == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tuning"]["digest"] == tuning.TuningDatabase(db, resolve_target("cpu")).digest


def test_bad_requests_fail_clearly(conv_model, tmp_path, capsys):
    assert (
        main(["compile", str(conv_model[1]), "--out", str(tmp_path / "c"), "--db", str(tmp_path / "none")])
        == 2
    )
    assert "no tuning database" in capsys.readouterr().err
    assert main(["tune", str(conv_model[1]), "--trials", "0", "--db", str(tmp_path / "d")]) == 2
    assert "--trials must be at least 1" in capsys.readouterr().err
    assert main(["tune", str(conv_model[1]), "--classes", "float32", "--db", str(tmp_path / "d")]) == 2
    assert "accepted: int8, int16" in capsys.readouterr().err
    assert main(["tune", str(conv_model[1]), "--target", "cuda", "--db", str(tmp_path / "d")]) == 2
    assert "no packed integer kernels" in capsys.readouterr().err


def test_a_database_keeps_one_tuning_batch(conv_model, tuned, capsys):
    db, _, _ = tuned
    assert main(["tune", str(conv_model[1]), "--db", str(db), "--batch", "8", "--classes", "int8"]) == 2
    assert "tuned at batch 4, not 8" in capsys.readouterr().err


def test_a_record_that_does_not_fit_falls_back_to_the_default(conv_model, tuned, monkeypatch):
    db, _, _ = tuned
    target = resolve_target("cpu")
    ((_, func),) = pipeline.layer_functions(pipeline.partition(import_onnx(load_onnx(conv_model[1])).mod))
    kernel = tuning._dot_kernel(pipeline.variant_module(func, CLASS_BY_NAME["int8"], "nearest", target))
    assert tuning.TuningDatabase(db, target).schedule(kernel) is not None
    monkeypatch.setattr(tuning, "_tile_of", lambda trace: (7, 7))  # 7 divides none of the loops
    with pytest.warns(UserWarning, match="does not apply"):
        assert tuning.TuningDatabase(db, target).schedule(kernel) is None


def test_deployed_fused_kernel_uses_the_tuned_tile_and_stays_exact(tuned, tmp_path, monkeypatch):
    """The deployed kernel differs from the tuned one (packed constant weight, ReLU fused in), but
    its dot block is the same, so the tuned tile applies; the result is exact."""
    from marvin_compile.fixed_point import Precision, quantize_np
    from marvin_compile.runtime.deploy import deploy, load

    db, _, _ = tuned
    applied = []
    original = tuning.TuningDatabase.schedule
    monkeypatch.setattr(
        tuning.TuningDatabase,
        "schedule",
        lambda self, f: applied.append((f, original(self, f))) or applied[-1][1],
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 5, padding=2), nn.ReLU()).eval()
    p = Precision(8, 4)
    deploy(model, torch.randn(2, 3, 8, 8), {"0": p}, tmp_path / "d", db=db)
    (kernel, scheduled), *_ = applied
    assert scheduled is not None
    assert "fxp_requantize_intermediate" in kernel.script()  # the ReLU consumes it inside the kernel

    x = np.random.default_rng(2).normal(size=(3, 3, 8, 8)).astype(np.float32)
    w, b = (
        quantize_np(t.detach().numpy().astype(np.float64), p.wl, p.fl)
        for t in (model[0].weight, model[0].bias)
    )
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(quantize_np(x.astype(np.float64), p.wl, p.fl)),
        torch.from_numpy(w),
        torch.from_numpy(b),
        padding=2,
    ).numpy()
    np.testing.assert_array_equal(load(tmp_path / "d")(x), np.maximum(quantize_np(ref, p.wl, p.fl), 0))
