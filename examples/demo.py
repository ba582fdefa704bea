"""MARViN demo: LeNet-5 on scikit-learn's digits, on the CPU, against its float32 counterpart.

Every Conv/Linear layer runs a compiled fixed-point kernel whose word length MARViN changes while
it trains; the float32 baseline trains the same model from the same weights on the same batches.
Writes runs/demo (overwritten): metrics.json, precision.png, checkpoint.pt. The first run also
compiles the kernel variants (cached, so later runs start in seconds).

    python examples/demo.py          # or: make demo
"""

from __future__ import annotations

import time
from pathlib import Path

from marvin_compile.runtime.driver import TrainConfig, summary, train

RUN = Path(__file__).resolve().parent.parent / "runs" / "demo"


def main() -> None:
    start = time.perf_counter()
    # The driver's defaults are the digits/LeNet-5 setting: 25 epochs, batch 128, lr 0.05 (cosine).
    config = TrainConfig(model="lenet5", dataset="digits", target="cpu", out=str(RUN), baseline=True)
    metrics = train(config)
    print()
    print(summary(metrics, RUN))
    print(f"demo finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
