"""Compilation targets: `cpu` (the detected host CPU), `cuda`, or a TVM JSON-dict target."""

from __future__ import annotations

import json
import os
from typing import Any

import tvm
from tvm.target import codegen


class TargetError(ValueError):
    """A target string that is neither a known alias nor a valid TVM JSON-dict target."""


def host_cpu() -> str:
    """The real host CPU name; TVM turns ``mcpu=native`` into a generic CPU, so ask LLVM."""
    return str(codegen.llvm_get_system_cpu())


def cpu_target_dict() -> dict[str, Any]:
    return {"kind": "llvm", "mcpu": host_cpu(), "num-cores": os.cpu_count() or 1}


def resolve_target(spec: str | dict[str, Any]) -> tvm.target.Target:
    """Turn ``cpu``, ``cuda``, a JSON dict or its text into a ``tvm.target.Target``."""
    if isinstance(spec, dict):
        config = spec
    elif spec == "cpu":
        config = cpu_target_dict()
    elif spec == "cuda":
        config = {"kind": "cuda", "arch": "sm_90"}
    else:
        try:
            config = json.loads(spec)
        except json.JSONDecodeError:
            raise TargetError(
                f"unknown target {spec!r}; accepted: cpu, cuda, or a TVM JSON-dict target such as "
                '\'{"kind": "llvm", "mcpu": "znver3"}\''
            ) from None
        if not isinstance(config, dict):
            raise TargetError(f"target JSON must be an object, got {type(config).__name__}")
    try:
        return tvm.target.Target(config)
    except Exception as exc:  # TVM raises its own error types for bad configs
        raise TargetError(f"invalid TVM target {json.dumps(config)}: {exc}".splitlines()[0]) from None


def target_key(target: tvm.target.Target) -> str:
    """A stable text form of a target for cache keys."""
    return json.dumps(target.export(), sort_keys=True, default=str)
