"""The import graph of the product folders: no circles, and every layer imports only downwards.

Read with `ast`, nothing is imported: each folder is the `mobillm.<folder>` package that
pyproject's package-dir maps it to (bench/ is `mobillm.bench`, mapped by setup.py's editable
install only), and relative imports resolve against it. Every import counts, also those inside
functions and under `if TYPE_CHECKING:`.

Layers: kernels < common < export, edge_runtime, trainer < bench. The device side (edge_runtime)
never imports trainer, export or torch; the trainer never imports edge_runtime; nothing imports bench.
"""

import ast
import functools
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "common", "export", "edge_runtime", "trainer", "bench")
ALLOWED = {  # folder -> the mobillm folders it may import
    "kernels": {"kernels"},
    "common": {"common", "kernels"},
    "edge_runtime": {"edge_runtime", "common", "kernels"},
    "trainer": {"trainer", "common", "kernels"},
    "export": {"export", "edge_runtime", "common", "kernels"},  # verify opens the engine as the device would
    "bench": {"bench", "trainer", "export", "edge_runtime", "common", "kernels"},
}
DEVICE_FORBIDDEN = ("torch", "transformers", "optimum", "peft")


def product_modules() -> dict[str, Path]:
    """Module name -> file, for the mapped folders (bench/ included)."""
    modules = {}
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(("mobillm",) + parts)] = path
    return modules


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports_of(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(modules of `known` that `name` imports, top-level names of every absolute import)."""
    tree = ast.parse(path.read_text(), str(path))
    targets: set[str] = set()
    roots: set[str] = set()
    def resolve(module: str) -> str | None:
        while module and module not in known:  # `import a.b.c`: the deepest module that is ours
            module = module.rpartition(".")[0]
        return module or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                roots.add(alias.name.split(".")[0])
                hit = resolve(alias.name)
                if hit:
                    targets.add(hit)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(name, path).split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
                roots.add(module.split(".")[0])
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
                hit = f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else resolve(module)
                if hit:
                    targets.add(hit)
    targets.discard(name)
    return targets, roots


@functools.lru_cache(maxsize=1)
def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = product_modules()
    known = set(modules)
    graph, roots = {}, {}
    for name, path in modules.items():
        graph[name], roots[name] = imports_of(name, path, known)
    return graph, roots


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def folder(module: str) -> str:
    return module.split(".")[1]


def test_cycle_finder_finds_a_circle_and_ignores_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_resolves_the_mobillm_mapping():
    graph, roots = import_graph()
    # Absolute, relative and `from pkg import module` imports all resolve, bench's too.
    assert "mobillm.kernels.codec" in graph["mobillm.common.wire"]
    assert "mobillm.trainer.core" in graph["mobillm.trainer.policy"]
    assert "mobillm.kernels.codec" in graph["mobillm.kernels.onnx_codec"]
    assert "mobillm.bench.paper.paper_bytes" in graph["mobillm.bench.paper.compare_report"]
    assert "mobillm.bench.paths" in graph["mobillm.bench.micro.device_memory"]
    assert "torch" in roots["mobillm.trainer.core"]
    assert sum(len(t) for t in graph.values()) > 200


def test_no_import_circles():
    graph, _ = import_graph()
    assert cycles(graph) == []


def test_layers_import_only_downwards():
    graph, _ = import_graph()
    wrong = [f"{m} -> {t}" for m, targets in graph.items() if m.startswith("mobillm.")
             for t in targets if t.startswith("mobillm.") and folder(t) not in ALLOWED[folder(m)]]
    assert wrong == []


def test_the_device_side_never_imports_torch():
    _, roots = import_graph()
    wrong = {m: sorted(roots[m] & set(DEVICE_FORBIDDEN)) for m in roots
             if m.startswith("mobillm.edge_runtime.") and roots[m] & set(DEVICE_FORBIDDEN)}
    assert wrong == {}


def test_bench_imports_as_mobillm_bench_from_the_checkout():
    """Every bench/ folder of modules is a package of setup.py's editable mapping, found in this checkout
    (scripts run as `python -m mobillm.bench.<folder>.<name>`, never through sys.path)."""
    folders = sorted(p.name for p in (ROOT / "bench").iterdir() if p.is_dir() and any(p.glob("*.py")))
    assert folders == ["ci", "micro", "paper"]
    for path in [ROOT / "bench" / "paths.py", *(min((ROOT / "bench" / f).glob("*.py")) for f in folders)]:
        name = ".".join(("mobillm", *path.relative_to(ROOT).with_suffix("").parts))
        spec = importlib.util.find_spec(name)
        assert spec is not None and Path(spec.origin) == path, name
