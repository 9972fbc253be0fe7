"""The persistent compilation cache (issue #35): each case run twice in a fresh process against
one empty cache folder, the first run filling it, the second reading it. Reported: the time from
the process's start to its first training line (``--log-every 1``: the first step done,
imports and set-up included) and the whole wall time, and the second run's ratio to the first.

    python benchmarks/compile_cache.py
"""

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "main job (mlp, digits, 2x2)": ["--mesh", "2x2"],
    "resnet18 (synthetic 32x32, 2x2, 20 steps)": ["--model", "resnet18", "--dataset",
                                                  "synthetic:32x32x3:10", "--mesh", "2x2",
                                                  "--steps", "20", "--batch-size", "32",
                                                  "--eval-examples", "256"],
}  # fmt: skip


def timed(flags: list[str], cache: Path, workdir: Path) -> dict:
    """Seconds to the first training line and to the end of one run of train.py."""
    argv = [sys.executable, str(ROOT / "train.py"), *flags, "--log-every", "1",
            "--compile-cache", str(cache), "--workdir", str(workdir)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, first = workdir / "metrics.jsonl", None
    while proc.poll() is None:
        if first is None and metrics.exists() and "train_loss" in metrics.read_text():
            first = time.perf_counter() - start
        time.sleep(0.01)
    wall = time.perf_counter() - start
    out = proc.stdout.read()
    assert proc.returncode == 0, out
    said = next(line for line in out.splitlines() if "the train step" in line)
    return {"first_step_s": round(first or wall, 2), "wall_s": round(wall, 2), "said": said}


def main() -> None:
    report = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores"}
    for name, flags in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            cold = timed(flags, Path(tmp) / "cache", Path(tmp) / "cold")
            warm = timed(flags, Path(tmp) / "cache", Path(tmp) / "warm")
        report[name] = {"cold": cold, "warm": warm,
                        "first_step_speedup": round(cold["first_step_s"] / warm["first_step_s"], 2),
                        "wall_speedup": round(cold["wall_s"] / warm["wall_s"], 2)}  # fmt: skip
        print(json.dumps({name: report[name]}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
