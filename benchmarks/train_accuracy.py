"""MARViN against float32 on digits/LeNet-5, several seeds: accuracy, precision, measured step time.

Each seed runs ``marvin_compile.runtime.driver.train`` with its defaults and ``baseline=True``
(the same model, data order and epochs trained by torch.optim.SGD in float32), then the table
gives both accuracies, their difference, swaps, compilations after warm-up, final word lengths and
the measured step times of the two runs (same process, one after the other).

Usage::

    .venv/bin/python benchmarks/train_accuracy.py [--seeds 0,1,2] [--epochs 25] [--write-md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import tempfile

from marvin_compile.runtime.driver import TrainConfig, train

from common import REPO, machine, markers, write_section

BEGIN, END = markers("training")


def run_seeds(seeds: list[int], epochs: int | None, backward: str) -> list[dict]:
    rows = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as out:
            kw = {"epochs": epochs} if epochs is not None else {}
            m = train(TrainConfig(out=out, seed=seed, baseline=True, progress=False, backward=backward, **kw))
        moved = sum(1 for h in m["layers"].values() if _moves_both_ways(h["wl"]))
        rows.append({"seed": seed, **m, "layers_down_and_up": moved})
    return rows


def _moves_both_ways(wl: list[int]) -> bool:
    steps = [b - a for a, b in zip(wl, wl[1:], strict=False)]
    return any(s < 0 for s in steps) and any(s > 0 for s in steps)


def table(rows: list[dict]) -> str:
    head = (
        "| seed | MARViN acc | float32 acc | diff (pp) | swaps | compilations after warm-up | layers down+up "
        "| final wl per layer | MARViN step ms | float32 step ms | speedup |\n"
        "|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|\n"
    )
    lines = []
    for r in rows:
        final = " ".join(f"{p['wl']}" for p in r["final_precision"].values())
        cells = [
            r["seed"],
            f"{r['accuracy']:.4f}",
            f"{r['baseline_accuracy']:.4f}",
            f"{r['accuracy_diff_pp']:+.2f}",
            r["variant_swaps"],
            r["compilations_after_warmup"],
            f"{r['layers_down_and_up']}/{len(r['layers'])}",
            final,
            f"{1000 * r['step_time_s']:.1f}",
            f"{1000 * r['baseline_step_time_s']:.1f}",
            f"{r['speedup']:.2f}x",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return head + "\n".join(lines) + "\n"


def section(rows: list[dict], backward: str) -> str:
    diffs = [abs(r["accuracy_diff_pp"]) for r in rows]
    return (
        f"{BEGIN}\n## Training: MARViN vs float32 on digits / LeNet-5\n\n"
        f"- Machine: {machine()}\n"
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- Command: `{shlex.join([sys.executable.split('/')[-1], *sys.argv])}`\n"
        f"- Driver defaults (`TrainConfig`, `DIGITS_CONTROLLER`), batch 128, backward `{backward}`; accuracy"
        " on the fixed digits test split (450 images); step time = mean wall time of a training step.\n"
        f"- Largest |accuracy difference|: {max(diffs):.2f} pp (target: within 0.5 pp of float32, i.e. not"
        " more than 0.5 pp below it).\n\n" + table(rows) + f"{END}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=None, help="default: the driver's")
    p.add_argument("--backward", default="float", choices=("float", "lowbit"))
    p.add_argument("--write-md", action="store_true")
    args = p.parse_args()
    rows = run_seeds([int(s) for s in args.seeds.split(",")], args.epochs, args.backward)
    text = section(rows, args.backward)
    print(text)
    if args.write_md:
        write_section(REPO / "BENCHMARKS.md", "training", text)


if __name__ == "__main__":
    main()
