"""JAX's persistent compilation cache (`jaxpar.run.compile_cache`, issue #35): on by default in a
per-user folder, moved or turned off by --compile-cache; a second run finds its train step."""

from pathlib import Path

import pytest

import jaxpar
from jaxpar.run.compile_cache import folder
from jaxpar.run.config import Config


def test_the_folder_is_the_flags_the_environments_or_the_users(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXPAR_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert folder(None) == tmp_path / "xdg" / "jaxpar" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert folder(None) == Path.home() / ".cache" / "jaxpar" / "jax"
    monkeypatch.setenv("JAXPAR_COMPILE_CACHE", str(tmp_path / "env"))
    assert folder(None) == tmp_path / "env"
    assert folder(str(tmp_path / "flag")) == tmp_path / "flag" and folder("off") is None
    monkeypatch.setenv("JAXPAR_COMPILE_CACHE", "off")
    assert folder(None) is None


@pytest.mark.slow
def test_a_second_run_finds_its_train_step_in_the_cache(tmp_path, capsys):
    run = dict(steps=2, mesh="2", batch_size=32, eval_examples=0, compile_cache=str(tmp_path / "c"))
    jaxpar.train(Config.of(**run, workdir=str(tmp_path / "a")))
    assert f"the train step compiled and saved to the compilation cache {tmp_path / 'c'}" in (
        capsys.readouterr().out
    )
    assert any((tmp_path / "c").iterdir())
    jaxpar.train(Config.of(**run, workdir=str(tmp_path / "b")))
    assert f"the train step found in the compilation cache {tmp_path / 'c'}" in (
        capsys.readouterr().out
    )
    jaxpar.train(Config.of(**{**run, "compile_cache": "off"}, workdir=str(tmp_path / "d")))
    assert "compilation cache off: the train step compiled" in capsys.readouterr().out


def test_a_file_for_a_cache_folder_exits_2(tmp_path, refuses):
    (tmp_path / "f").write_text("")
    refuses(f"--compile-cache {tmp_path / 'f'}", f"--compile-cache {tmp_path / 'f'} is a file")
