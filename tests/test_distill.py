"""Distillation (`jaxpar.modes.distill`): A = 0 is plain training exactly, the loss is Hinton et
al.'s, and a ResNet teacher teaches an MLP the same way on any mesh and across a resume."""

import json

import numpy as np
import pytest

import train as cli
from jaxpar.modes.distill import distill_loss


def losses(workdir):
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x.get("train_loss"), x.get("eval_loss")) for x in lines]


@pytest.fixture
def teacher(resnet8_run):
    return resnet8_run


def test_the_loss_is_hintons(teacher):
    s = np.array([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]])
    t = np.array([[1.0, 0.0, -1.0], [2.0, 2.0, 0.0]])
    labels, T, A = np.array([0, 2]), 3.0, 0.7

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p_t, p_s = softmax(t / T), softmax(s / T)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1)
    ce = -np.log(softmax(s)[np.arange(2), labels])
    expected = np.mean(A * T**2 * kl + (1 - A) * ce)
    np.testing.assert_allclose(distill_loss(s, t, labels, T, A), expected, rtol=1e-6)


PLAIN = ["--steps", "8", "--log-every", "2"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The MLP alone on 2x2: the metrics distillation is compared with."""
    workdir = tmp_path_factory.mktemp("plain")
    assert cli.main([*PLAIN, "--mesh", "2x2", "--workdir", str(workdir)]) == 0
    return losses(workdir)


@pytest.mark.slow
def test_weight_zero_is_plain_training_exactly(teacher, plain, tmp_path):
    assert cli.main([*PLAIN, "--mesh", "2x2", "--teacher", str(teacher), "--distill-weight", "0",
                     "--workdir", str(tmp_path / "zero")]) == 0  # fmt: skip
    assert losses(tmp_path / "zero") == plain


@pytest.mark.slow
def test_a_resnet_teaches_an_mlp_alike_on_every_mesh_and_across_a_resume(teacher, plain, tmp_path):
    """Stopped at step 4 on fsdp=4 and resumed on 2x2 (the teacher's parameters from the
    student's checkpoint), the run equals the one on 1 device."""
    args = ["--steps", "8", "--log-every", "2", "--teacher", str(teacher),
            "--distill-temperature", "2"]  # fmt: skip
    one, parts = tmp_path / "one", tmp_path / "parts"
    assert cli.main([*args, "--mesh", "1", "--workdir", str(one)]) == 0
    assert cli.main([*args[:1], "4", *args[2:], "--mesh", "fsdp=4", "--workdir", str(parts)]) == 0
    assert cli.main([*args, "--mesh", "2x2", "--workdir", str(parts)]) == 0
    a, b = losses(one), losses(parts)
    assert [x[0] for x in a] == [x[0] for x in b]
    values = lambda rows: [v for x in rows for v in x[1:] if v is not None]  # noqa: E731
    np.testing.assert_allclose(values(b), values(a), rtol=1e-5)
    assert plain[0][1] != pytest.approx(a[0][1], rel=1e-3)  # the teacher changes the loss


@pytest.mark.slow
def test_a_teacher_of_other_classes_is_refused(tmp_path, capsys):
    other = tmp_path / "five"
    assert cli.main(["--dataset", "synthetic:8x8x1:5", "--steps", "2", "--batch-size", "8",
                     "--workdir", str(other)]) == 0  # fmt: skip
    student = tmp_path / "student"
    assert cli.main(["--steps", "2", "--teacher", str(other), "--workdir", str(student)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was trained with num_classes 5; this run's data has 10" in err
    assert not student.exists()
