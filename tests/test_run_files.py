"""Runs described by TOML files (``python train.py --config run.toml [--flag value ...]``): the
shipped files equal their command lines, flags override a file, a file's values count as given
(a model's recipe does not replace them), bad files exit 2 with one line, and config.json
records the effective configuration."""

import dataclasses
import json
from pathlib import Path

import pytest

import train as cli
from jaxpar.core.errors import UserError
from jaxpar.run.config import Config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# Each shipped run file and the command line it stands for (as its comment and docs/flags.md say).
SHIPPED = {
    "mlp-digits.toml": "--mesh 2x2",
    "vit-lite-digits.toml": "--model vit-lite --mesh 2x2",
    "vit-tiny-pipeline.toml": "--model vit-tiny --mesh stage=2,data=2,fsdp=2 --microbatches 4",
    "fedavg-2nn.toml": "--model 2nn --clients 20 --clients-per-round 10 --local-epochs 1 "
    "--local-batch 10 --rounds 60 --lr 0.05 --partition shards:2 --eval-every 5",
    "alphazero-tic-tac-toe.toml": "--game tic_tac_toe --mesh 2x2",
}


def test_every_shipped_run_file_is_listed_here():
    assert sorted(p.name for p in CONFIGS.glob("*.toml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_run_file_is_its_command_line(name):
    from_file = cli.parse_args(["--config", str(CONFIGS / name)])
    assert from_file == cli.parse_args(SHIPPED[name].split())
    from_file.validate()  # a run the checks accept


def test_flags_override_the_file_and_the_files_values_override_a_recipe(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nmodel = "vit-lite"\n[optimization]\noptimizer = "sgd"\nlr = 0.1\n')
    cfg = cli.parse_args(["--config", str(path), "--lr", "0.2", "--mesh", "4"])
    assert (
        cfg.model.model,
        cfg.optimization.optimizer,
        cfg.optimization.lr,
        cfg.parallelism.mesh,
    ) == ("vit-lite", "sgd", 0.2, "4")
    # given in the file, as on the command line: the ViT recipe's AdamW does not replace it
    flags = ["--model", "vit-lite", "--optimizer", "sgd", "--lr", "0.2", "--mesh", "4"]
    assert cfg == cli.parse_args(flags)
    assert (
        cfg.optimization.schedule == "cosine"
    )  # what the file leaves out still follows the recipe


BAD = {  # run file -> the one line train.py prints
    "[model]\nbatch-size = 3\n": "[model] has no key batch-size; it belongs in [optimization]",
    "[optim]\nlr = 3\n": "unknown section [optim]; sections are parallelism, model, data, "
    "optimization, federated, game, checkpoint, job, metrics",
    "lr = 3\n": "lr is outside any section; put it in [optimization]",
    '[optimization]\nlr = "x"\n': "[optimization] lr must be a number, got 'x'",
    "[optimization]\nsteps = 2.5\n": "[optimization] steps must be an integer, got 2.5",
    '[model]\nprecision = "fp16"\n': "[model] precision must be one of fp32, bf16, got 'fp16'",
    '[model]\nfreeze = "head"\n': "[model] freeze must be one of backbone, got 'head'",
    '[checkpoint]\nrestart = "yes"\n': "[checkpoint] restart must be true or false, got 'yes'",
    "[optimization\n": "is not valid TOML: Expected ']' at the end of a table declaration",
    "[optimization]\nbatch-size = 64\nbatch_size = 32\n": "[optimization] gives batch-size twice",
}


@pytest.mark.parametrize("text", BAD)
def test_a_bad_run_file_exits_2_with_one_line_and_writes_nothing(text, tmp_path, capsys):
    path, workdir = tmp_path / "run.toml", tmp_path / "w"
    path.write_text(text)
    assert cli.main(["--config", str(path), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --config {path}") and err.count("\n") == 1, err
    assert BAD[text] in err
    assert not workdir.exists()


def test_a_file_that_is_not_text_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_bytes(b"[optimization]\nlr = 0.1 # \xff\n")
    assert cli.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --config {path} is not valid TOML") and err.count("\n") == 1


def test_a_flag_turns_off_what_the_file_turns_on(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[checkpoint]\nrestart = true\n[metrics]\ndry-run = true\n")
    assert cli.parse_args(["--config", str(path)]).metrics.dry_run
    cfg = cli.parse_args(["--config", str(path), "--no-dry-run", "--no-restart"])
    assert not cfg.metrics.dry_run and not cfg.checkpoint.restart


def test_a_missing_run_file_is_named(tmp_path, capsys):
    assert cli.main(["--config", str(tmp_path / "none.toml")]) == 2
    missing = tmp_path / "none.toml"
    assert capsys.readouterr().err == f"error: --config {missing}: no such file or directory\n"


@pytest.mark.slow
def test_config_json_records_the_effective_configuration(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[optimization]\nsteps = 30\nlr = 0.05\n[metrics]\nlog-every = 2\n")
    args = ["--config", str(path), "--steps", "2", "--workdir", str(tmp_path / "w")]
    assert cli.main(args) == 0
    saved = json.loads((tmp_path / "w" / "config.json").read_text())
    o, m = saved["optimization"], saved["metrics"]
    assert (o["steps"], o["lr"], m["log_every"]) == (2, 0.05, 2)


def test_the_sections_are_the_help_groups_and_hold_every_flag():
    from jaxpar.run.config import SECTIONS

    assert list(cli.FLAGS) == list(SECTIONS)
    for name, section in SECTIONS.items():
        fields = [f.name for f in dataclasses.fields(section)]
        assert [flag[2:].replace("-", "_") for flag, _, _ in cli.FLAGS[name]] == fields, name


def test_a_section_refuses_its_own_bad_values_alone():
    from jaxpar.run.config import Federated, Optimization, Parallelism

    with pytest.raises(UserError, match="--lr must be positive"):
        Optimization(lr=-1.0).check()
    with pytest.raises(UserError, match="--local-batch goes with --clients"):
        Federated(local_batch=5).check()
    with pytest.raises(UserError, match="--outer-lr and --outer-momentum go with --sync diloco"):
        Parallelism(outer_lr=0.5).check()
    Optimization(lr=0.5).check()


def test_config_json_in_sections_and_the_old_flat_form_give_the_same_config():
    cfg = Config.of(mesh="2x2", lr=0.05, clients=4, eval_every=3)
    assert Config.from_json(json.loads(cfg.to_json())) == cfg
    assert Config.from_json(cfg.flat()) == cfg  # as config.json was before sections
    assert Config.from_json({**cfg.flat(), "retired_flag": 1}) == cfg
    with pytest.raises(TypeError, match="no field 'nope'"):
        Config.of(nope=1)


@pytest.mark.slow
def test_a_checkpoint_saved_with_a_flat_config_resumes(tmp_path, capsys):
    """A run saved before the sections (flat config.json and manifest) resumes; the resume
    check reads the old manifest's momentum."""
    workdir = tmp_path / "w"
    assert cli.main(["--steps", "2", "--momentum", "0.5", "--workdir", str(workdir)]) == 0
    flat = lambda path: path.write_text(json.dumps(Config.from_json(json.loads(  # noqa: E731
        path.read_text())).flat()))  # fmt: skip
    flat(workdir / "config.json")
    manifest = workdir / "checkpoints" / "2" / "manifest" / "metadata"
    saved = json.loads(manifest.read_text())
    assert "optimization" in saved["config"]  # what this version writes, made flat as before
    saved["config"] = Config.from_json(saved["config"]).flat()
    manifest.write_text(json.dumps(saved))
    capsys.readouterr()
    assert cli.main(["--steps", "4", "--momentum", "0", "--workdir", str(workdir)]) == 2
    assert "trained with --momentum 0.5" in capsys.readouterr().err
    assert cli.main(["--steps", "4", "--momentum", "0.5", "--workdir", str(workdir)]) == 0
    assert "resumed from step 2" in capsys.readouterr().out
