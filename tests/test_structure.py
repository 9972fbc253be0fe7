"""How jaxpar's modules import each other: no module imports one that imports it back (an
import circle), and a package imports from the rest of jaxpar only what its ``__init__``
docstring says it may."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The packages in their layers: each imports, from the rest of jaxpar, only the packages before
# it, as its __init__ docstring states. Nothing imports the tools but their entry points.
LAYERS = ["core", "cost", "models", "data", "modes", "run", "tools"]
MAY_IMPORT = {
    "jaxpar.core": set(),
    "jaxpar.cost": {"jaxpar.core"},
    "jaxpar.models": {"jaxpar.core"},
    "jaxpar.data": {"jaxpar.core"},
    "jaxpar.modes": {"jaxpar.core", "jaxpar.models", "jaxpar.data"},
    "jaxpar.run": {"jaxpar.core", "jaxpar.cost", "jaxpar.models", "jaxpar.data", "jaxpar.modes"},
    "jaxpar.tools": {
        "jaxpar.core",
        "jaxpar.cost",
        "jaxpar.models",
        "jaxpar.data",
        "jaxpar.modes",
        "jaxpar.run",
    },  # fmt: skip
}
# Beside the packages, only the public names (`__init__`) and the commands users know.
ENTRY_POINTS = {"checkpoint", "compress", "launch", "play", "plot", "predict", "weights"}


def modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "jaxpar").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known) -> set[str]:
    """The jaxpar modules `path` imports, at its top or inside functions (both bind at run
    time), each by its own name (``from jaxpar.data import x`` is `jaxpar.data`, or
    `jaxpar.data.x` where that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:  # jaxpar.data.x -> jaxpar.data when x is a name
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {}
    for name, path in mods.items():
        own = name if path.name == "__init__.py" else None  # a package's own modules
        edges[name] = {m for m in imports(path, mods) if m != name and m != "jaxpar"
                       and not (own and m.startswith(own + "."))}  # fmt: skip
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_one_that_imports_it_back():
    assert circles(graph()) == []


def test_the_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_packages_import_only_what_they_declare():
    edges = graph()
    for package, allowed in MAY_IMPORT.items():
        doc = ast.get_docstring(ast.parse((ROOT / Path(*package.split(".")) / "__init__.py")
                                          .read_text()))  # fmt: skip
        assert all(f"`{m}`" in doc for m in allowed), f"{package}'s docstring does not say so"
        outside = {m for name, deps in edges.items() if name == package or name.startswith(
            package + ".") for m in deps if not m.startswith(package)}  # fmt: skip
        extra = {m for m in outside if not any(m == a or m.startswith(a + ".") for a in allowed)}
        assert not extra, f"{package} imports {sorted(extra)}"


def test_every_module_sits_in_a_package():
    flat = {p.stem for p in (ROOT / "jaxpar").glob("*.py")} - {"__init__"}
    assert flat == ENTRY_POINTS, f"modules beside the packages: {sorted(flat - ENTRY_POINTS)}"
    packages = {p.name for p in (ROOT / "jaxpar").iterdir() if (p / "__init__.py").exists()}
    assert packages == set(LAYERS) and set(MAY_IMPORT) == {f"jaxpar.{p}" for p in LAYERS}


def test_entry_points_only_run_their_tool():
    for name in ENTRY_POINTS:
        path = ROOT / "jaxpar" / f"{name}.py"
        deps = imports(path, modules())
        assert len(deps) == 1 and deps.pop().endswith(f".{name}"), f"jaxpar/{name}.py: {deps}"
        assert len(path.read_text().splitlines()) < 12, f"jaxpar/{name}.py is not thin"
