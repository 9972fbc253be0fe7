"""Distillation (issue #15): the seed's MLP taught by a ResNet-18 against the same MLP alone.

The teacher trains on the digits (``--model resnet18``, its flags below), then the MLP trains the
seed's 30 epochs (330 steps, SGD 0.01, momentum 0.9) alone and with ``--teacher``, for each
temperature and weight given; test accuracy and test loss of each, in this process.

    python benchmarks/distill.py
    python benchmarks/distill.py --seeds 0 1 2 --temperatures 2 4 --weights 0.5 0.9
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train.py is not installed
import train as cli  # noqa: E402


def final(workdir: Path) -> dict:
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in lines if "eval_accuracy" in x][-1]
    return {"accuracy": last["eval_accuracy"], "loss": last["eval_loss"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[4.0])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.9])
    parser.add_argument("--teacher-epochs", type=int, default=30)
    a = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher"
        assert cli.main(["--model", "resnet18", "--epochs", str(a.teacher_epochs), "--lr", "0.05",
                         "--workdir", str(teacher)]) == 0  # fmt: skip
        rows.append({"run": "teacher resnet18", **final(teacher)})
        for seed in a.seeds:
            alone = Path(tmp) / f"alone-{seed}"
            assert cli.main(["--seed", str(seed), "--workdir", str(alone)]) == 0
            rows.append({"run": f"mlp alone, seed {seed}", **final(alone)})
            for t in a.temperatures:
                for w in a.weights:
                    student = Path(tmp) / f"student-{seed}-{t}-{w}"
                    assert cli.main(["--seed", str(seed), "--teacher", str(teacher),
                                     "--distill-temperature", str(t), "--distill-weight", str(w),
                                     "--workdir", str(student)]) == 0  # fmt: skip
                    rows.append({"run": f"mlp taught, seed {seed}, T {t:g}, A {w:g}",
                                 **final(student)})  # fmt: skip
    for r in rows:
        print(f"{r['run']:36} test accuracy {r['accuracy']:.4f}  test loss {r['loss']:.4f}")
    print(json.dumps({"benchmark": "distill", "rows": rows}))


if __name__ == "__main__":
    main()
