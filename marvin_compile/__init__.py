"""marvin-compile: MARViN fixed-point training with real low-bit kernels compiled through TVM."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# TVM's thread pool defaults to cores / 2 (it assumes SMT siblings): use every CPU this process may
# run on, as PyTorch does, unless the user chose. Read when TVM first runs a parallel kernel.
if hasattr(os, "sched_getaffinity"):
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

# In a training step torch's OpenMP workers and TVM's pool take turns on the same cores. An idle
# OpenMP worker spins (libgomp's default), keeping its core from TVM's kernels, and on a loaded
# machine it makes torch's own parallel regions crawl. libgomp reads this when torch loads, so it
# takes effect when marvin_compile is imported before torch (the CLI does).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Passive, a worker sleeps at once, and every parallel torch op pays a wake-up: 80 us on this
# 2-vCPU VM, 9x a 37k-element multiply (a weight's stochastic quantize, 8 ops: 1.2 -> 0.3 ms). A
# short spin (1000 iterations, ~20 us) keeps back-to-back ops awake and gives the core up soon.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

if TYPE_CHECKING:
    from marvin_compile.runtime.deploy import DeployedModel


def load(model_dir: str | os.PathLike) -> DeployedModel:
    """Load a deployed model directory (checksums and permissions verified) as a callable."""
    from marvin_compile.runtime.deploy import load as _load

    return _load(model_dir)
