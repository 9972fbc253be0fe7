"""The README and the pages of docs/ against the code: the docs build with MkDocs without a
warning, the README stays a tour that links to pages that exist, every shell command of their
code blocks is one the code accepts (``python train.py`` commands parsed and validated as the
command line does, each tool's command parsed by its own parser, benchmarks and files checked to
exist), every run file and mesh layout is read, and every Python snippet runs."""

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import train as cli
from jaxpar.core.mesh import check_batch_spec, check_hosts, parse_mesh
from jaxpar.run.config import Config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Python snippets that need a trained run, each run by a test of its own: marker -> that test.
RUN_ELSEWHERE = {
    "PyTreeCheckpointer": "tests/test_checkpoint.py::"
    "test_the_docs_orbax_recipe_works_as_pasted_with_a_relative_path",
    "moto_server": "tests/test_storage.py::test_the_docs_server_recipes_work_as_pasted",
    "gcp-storage-emulator": "tests/test_storage.py::test_the_docs_server_recipes_work_as_pasted",
}
# The README's set-up commands: .ci/run runs each of these itself.
SETUP = ("python3 -m venv .venv", ". .venv/bin/activate", "pip install -e .",
         "pip install -e '.[test]' torch==2.13.0", "python -m pytest")  # fmt: skip


def blocks(lang: str) -> list[tuple[str, str]]:
    """``(page, code)`` of every fenced block of `lang` in the README and the docs."""
    found = []
    for page in PAGES:
        fence = re.compile(r"^( *)```" + lang + r"\n(.*?)^\1```", re.S | re.M)
        for indent, code in fence.findall(page.read_text()):
            code = "\n".join(line.removeprefix(indent) for line in code.splitlines())
            found.append((page.name, code))
    return found


def commands() -> list[tuple[str, list[str]]]:
    """Every command of the shell blocks, as argument lists (continuations joined, comments
    dropped, ``a && b`` split)."""
    out = []
    for page, code in blocks("bash"):
        if any(marker in code for marker in RUN_ELSEWHERE):  # a test runs it as pasted
            continue
        for line in re.sub(r"\\\n\s*", " ", code).splitlines():
            if not shlex.split(line, comments=True):  # a comment, or an example's output
                continue
            out += [(page, shlex.split(part, comments=True)) for part in line.split("&&")]
    return out


def test_the_docs_build_without_warnings(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "site" / "composing" / "index.html").exists()


def test_the_readme_is_a_tour_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert len(links) >= 10
    for link in links:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"
    pages = {p.name for p in PAGES[1:]}
    linked = {Path(link).name for link in links if link.startswith("docs/")}
    assert pages <= linked, f"pages the README does not show: {sorted(pages - linked)}"


class Parsed(Exception):  # noqa: N818 - raised to stop a tool right after its flags parse
    def __init__(self, namespace):
        self.namespace = namespace


def parsed_by(module: str, argv: list[str]) -> argparse.Namespace:
    """`argv` as ``python -m MODULE`` parses it, without running the tool: the real parser, stopped
    right after it accepts the flags (a flag it does not know exits 2, failing the test)."""
    original = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = stop
    try:
        importlib.import_module(module).main(argv)
    except Parsed as p:
        return p.namespace
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"python -m {module} {' '.join(argv)} parsed no flags")


def placeholders(argv: list[str], here: Path) -> list[str]:
    """`argv` with the paths it names made to exist under `here` (the docs' placeholders: a
    workdir with a checkpoint, a weights file, a data folder, a user's module), and run files
    read from the repository."""
    out = list(argv)
    for i, arg in enumerate(argv[:-1]):
        value = argv[i + 1]
        if arg in ("--init-from", "--teacher") and value.endswith((".safetensors", ".pth")):
            (here / value).parent.mkdir(parents=True, exist_ok=True)
            (here / value).touch()
        elif arg in ("--init-from", "--teacher"):
            (here / value / "checkpoints").mkdir(parents=True, exist_ok=True)
        elif arg == "--data-dir":
            (here / value).mkdir(parents=True, exist_ok=True)
        elif arg == "--config":
            out[i + 1] = str(ROOT / value)
        elif arg in ("--model", "--dataset") and ":" in value and not value[0].isdigit():
            module, name = value.split(":")[0], value.split(":")[1]
            if not module.startswith(("synthetic", "jaxpar")):
                (here / f"{module}.py").write_text(f"def {name}(*args, **kwargs): ...\n")
    return out


def check_train(argv: list[str], processes: int | None, here: Path) -> None:
    """A ``python train.py`` command as train.py's main checks it before any device starts."""
    cfg = cli.parse_args(placeholders(argv, here)).validate()
    if cfg.parallelism.mesh:
        spec = parse_mesh(cfg.parallelism.mesh)
        if processes is not None:
            check_hosts(spec, processes)
        if cfg.federated.clients is None:
            check_batch_spec(cfg.optimization.batch_size, spec)


def check(words: list[str], here: Path, processes: int | None = 1) -> None:
    while "=" in words[0] and not words[0].startswith("-"):  # VAR=value before the command
        words = words[1:]
    if words[0] == "srun":  # as many processes as the script's #SBATCH lines ask: not checked
        words, processes = words[1:], None
    program, rest = words[0], words[1:]
    if program in ("python", "python3") and rest[:1] == ["train.py"]:
        check_train(rest[1:], processes, here)
    elif program in ("python", "python3") and rest[:1] == ["-m"] and rest[1] == "jaxpar.launch":
        launch = parsed_by("jaxpar.launch", rest[2:])
        inner = [w for w in launch.command if w != "--"]
        check(inner, here, launch.num_processes)
    elif program in ("python", "python3") and rest[:1] == ["-m"] and rest[1].startswith("jaxpar."):
        parsed_by(rest[1], rest[2:])
    elif program in ("python", "python3") and rest[0].startswith("benchmarks/"):
        assert (ROOT / rest[0]).is_file(), f"{rest[0]} does not exist"
    else:
        assert words in [shlex.split(c) for c in SETUP], f"no check knows {shlex.join(words)}"
        ci = [
            shlex.split(line, comments=True)
            for line in (ROOT / ".ci" / "run").read_text().splitlines()
        ]
        assert words in ci or words[0] == "." or words[1] == "-m" and words[2] == "venv", (
            f"{shlex.join(words)} is not what .ci/run runs"
        )


@pytest.mark.parametrize(
    "page,words", commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x)[:60]
)
def test_every_shell_command_is_one_the_code_accepts(page, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # a user's module:attribute, from the folder
    check(words, tmp_path)


def test_the_commands_are_found():
    found = commands()
    assert len(found) >= 60 and any(w[:2] == ["python", "train.py"] for _, w in found)


@pytest.mark.parametrize("page,code", blocks("toml"), ids=lambda x: x[:40])
def test_every_run_file_and_mesh_layout_is_read(page, code, tmp_path):
    path = tmp_path / "snippet.toml"
    path.write_text(code)
    if "description" in code:  # a mesh layout (meshes/)
        assert parse_mesh(str(path)).size > 1
    else:  # a run file
        Config.of(**cli.run_file(str(path))).validate()


PYTHON = blocks("python")


@pytest.mark.parametrize("page,code", PYTHON, ids=lambda x: x[:40])
def test_every_python_snippet_runs(page, code, tmp_path):
    if marker := next((m for m in RUN_ELSEWHERE if m in code), None):
        test = RUN_ELSEWHERE[marker]
        path, _, name = test.partition("::")
        assert f"def {name}" in (ROOT / path).read_text(), f"{test} no longer exists"
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("marker", RUN_ELSEWHERE)
def test_the_blocks_run_elsewhere_are_in_the_docs_and_their_tests_exist(marker):
    assert any(marker in code for lang in ("bash", "python") for _, code in blocks(lang))
    path, _, name = RUN_ELSEWHERE[marker].partition("::")
    assert f"def {name}" in (ROOT / path).read_text(), f"{RUN_ELSEWHERE[marker]} does not exist"


def test_the_python_snippets_are_found():
    assert len(PYTHON) >= 3 and any("PyTreeCheckpointer" in code for _, code in PYTHON)
