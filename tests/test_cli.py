"""The CLI end to end: compile, run, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

CLI = [sys.executable, "-m", "marvin_compile.cli"]


def run_cli(*args, cache=None) -> subprocess.CompletedProcess:
    env = None
    if cache is not None:
        import os

        env = {**os.environ, "MARVIN_COMPILE_CACHE": str(cache)}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def compiled_dir(small_cnn, tmp_path_factory):
    _, path = small_cnn
    out = tmp_path_factory.mktemp("compiled")
    cache = tmp_path_factory.mktemp("cli-cache")
    r = run_cli("compile", path, "--target", "cpu", "--out", out, "--word-lengths", "8,16", cache=cache)
    assert r.returncode == 0, r.stderr
    return out


def test_compile_writes_manifest(compiled_dir):
    manifest = json.loads((compiled_dir / "manifest.json").read_text())
    assert [lay["name"] for lay in manifest["layers"]] == ["conv1", "grouped", "depthwise", "conv2", "fc"]
    assert manifest["kernel_classes"] == ["int8", "int16"]
    for lay in manifest["layers"]:
        for cls in ("int8", "int16"):
            assert (compiled_dir / "variants" / f"{lay['variants'][cls]['nearest']}.so").is_file()
    assert manifest["layers"][0]["weight_shape"] == [8, 2, 3, 3]
    assert manifest["input"]["shape"] == ["N", 2, 16, 16]


def test_run_uniform_and_per_layer(compiled_dir, small_cnn, tmp_path):
    from tests.test_semantics import reference

    model, _ = small_cnn
    x = np.random.default_rng(1).normal(size=(3, 2, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = run_model(compiled_dir, tmp_path, "y.npy", "--wl", 8, "--fl", 4)
    assert r.returncode == 0, r.stderr
    names = ["conv1", "grouped", "depthwise", "conv2", "fc"]
    np.testing.assert_array_equal(
        np.load(tmp_path / "y.npy"), reference(model, x, {n: (8, 4) for n in names})
    )
    config = {n: {"wl": 8 if i % 2 else 14, "fl": 4 if i % 2 else 9} for i, n in enumerate(names)}
    (tmp_path / "p.json").write_text(json.dumps(config))
    r = run_model(compiled_dir, tmp_path, "y2.npy", "--precision", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    want = reference(model, x, {n: (c["wl"], c["fl"]) for n, c in config.items()})
    np.testing.assert_array_equal(np.load(tmp_path / "y2.npy"), want)


def run_model(compiled_dir, tmp_path, output: str, *args) -> subprocess.CompletedProcess:
    """``marvin-compile run`` on tmp_path/x.npy, writing tmp_path/OUTPUT."""
    return run_cli("run", compiled_dir, "--input", tmp_path / "x.npy", "--output", tmp_path / output, *args)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("marvin-compile: error:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_model_file(tmp_path):
    assert_one_line_error(
        run_cli("compile", tmp_path / "nope.onnx", "--out", tmp_path / "o"), "not found", ".onnx"
    )


def test_malformed_model_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not protobuf \x00\xff" * 10)
    assert_one_line_error(run_cli("compile", bad, "--out", tmp_path / "o"), "not a valid ONNX model")


def test_unsupported_operator(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    node = helper.make_node("LpNormalization", ["x"], ["y"], name="norm0")
    model = helper.make_model(
        helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    path = tmp_path / "lp.onnx"
    onnx.save(model, path)
    assert_one_line_error(
        run_cli("compile", path, "--out", tmp_path / "o"), "LpNormalization", "norm0", "supported"
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--wl", 40, "--fl", 3), "2 <= wl <= 32"),
        (("--wl", 8, "--fl", 8), "0 <= fl < wl"),
        (("--wl", 8), "--wl N --fl M"),
    ],
)
def test_bad_precision(compiled_dir, tmp_path, args, needle):
    np.save(tmp_path / "x.npy", np.zeros((1, 2, 16, 16), np.float32))
    r = run_model(compiled_dir, tmp_path, "y.npy", *args)
    assert_one_line_error(r, needle)


def test_bad_word_lengths_and_target(small_cnn, tmp_path):
    _, path = small_cnn
    assert_one_line_error(
        run_cli("compile", path, "--out", tmp_path / "o", "--word-lengths", "8,33"), "wl=33"
    )
    assert_one_line_error(run_cli("compile", path, "--out", tmp_path / "o", "--target", "tpu"), "cpu, cuda")


def test_bad_input_shape(compiled_dir, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 16, 16), np.float32))
    r = run_model(compiled_dir, tmp_path, "y.npy", "--wl", 8, "--fl", 4)
    assert_one_line_error(r, "(batch, 2, 16, 16)")
