"""The code's shape, checked: the README's layout lists exactly the modules in the tree, every module's first
line says its job, no module is much over 250 lines, and no two modules import each other (even lazily)."""
import ast
import re
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("features", "pipeline")
MAX_LINES = 270  # "about 250": a little slack, never a second job


def _modules() -> dict[str, Path]:
    """'features.input.images' -> its path, for every module except package __init__ files."""
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            if f.name != "__init__.py" and "weights" not in f.parts:
                out[".".join(f.relative_to(ROOT).with_suffix("").parts)] = f
    return out


def test_readme_layout_lists_exactly_the_modules_in_the_tree():
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout"):].split("```")[1]
    listed, folder = set(), None
    for line in block.splitlines():
        m = re.match(r"^( *)([a-z_]+)/", line)
        if m:
            folder = m.group(2) if not m.group(1) else f"{folder.split('/')[0]}/{m.group(2)}"
        for name in re.findall(r"\b([a-z_0-9]+)\.py\b", line):
            listed.add(f"{folder}/{name}.py".replace("/", "."))
    actual = {name + ".py" for name in _modules()}
    assert listed == actual, (sorted(listed - actual), sorted(actual - listed))


def test_every_module_says_its_job_on_its_first_line_and_stays_small():
    for name, f in {**_modules(), **{p: ROOT / p.replace(".", "/") / "__init__.py" for p in
                                     ("features.input", "features.models", "features.storage", "pipeline.data",
                                      "pipeline.heads", "pipeline.stages", "pipeline.inference",
                                      "pipeline.analysis")}}.items():
        text = f.read_text()
        assert text.startswith('"""') and len(text.splitlines()[0]) > 20, f"{name}: no one-line job on line 1"
        if f.name != "__init__.py":
            assert len(text.splitlines()) <= MAX_LINES, f"{name}: {len(text.splitlines())} lines"


def test_no_import_cycles_even_through_lazy_imports():
    mods = _modules()
    graph = {name: set() for name in mods}
    for name, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in mods and t != name}
    state: dict[str, int] = {}

    def visit(n, path):
        state[n] = 1
        for m in graph[n]:
            assert state.get(m) != 1, "import cycle: " + " -> ".join(path + [n, m])
            if m not in state:
                visit(m, path + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])


# Lowest first: a module may import from its own layer and the ones above it in this list, never below. The
# top-level modules of each package are layers of their own: errors/text under everything, the stages on top.
LAYERS = (("features.errors", "features.text", "features.timing"), ("features.storage",), ("features.input",), ("features.models",),
          ("features.extract", "features.plan", "features.shards"),
          ("pipeline.transforms",), ("pipeline.params",), ("pipeline.data",), ("pipeline.heads",), ("pipeline.inference",),
          ("pipeline.analysis",), ("pipeline.selection",), ("pipeline.stages",), ("pipeline.cli",))


def _layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module}: in no layer of tests/test_layout.py LAYERS; add it where it belongs")


def test_data_flows_one_way_between_folders():
    """The README's 'one way' at folder level (issue #33): input <-> models and inference -> analysis -> heads ->
    inference went both ways."""
    mods = _modules()
    for name, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            targets = [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for t in targets:
                if t.split(".")[0] in PACKAGES and t not in ("features", "pipeline"):
                    assert _layer(t) <= _layer(name), f"{name} imports {t}, a layer above it (LAYERS)"
