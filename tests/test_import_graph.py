"""Imports only point downward: no cycles between modules or between subpackages, no layer of cascade_jax
imports one above it (nn -> models -> weights/diffusion/data -> pipelines/training -> app), and the script folders
(benchmarks/, sample/, train/, convert/) sit on top: they import the library and their own folder, the library
never imports them, and no script folder imports another.

Imports inside functions count too: a lazy import hides a cycle from Python, not from the design.
"""

import ast
import functools
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cascade_jax"
# Folders of scripts run as `python FOLDER/x.py`: a bare `import x` there means the sibling FOLDER/x.py.
SCRIPT_FOLDERS = ("benchmarks", "sample", "train", "convert")

# Lower numbers are lower layers; a module may import its own layer or lower ones.
LAYERS = {"storage": 0, "nn": 0, "sharding": 0, "named_weights": 0, "accelerators": 0,
          "compile_report": 0, "models": 1, "weights": 2, "diffusion": 2, "data": 2, "conditioning": 2,
          "pipelines": 3, "training": 3, "demo": 4, "app": 4,
          **{folder: 5 for folder in SCRIPT_FOLDERS}}
# The library proper; the demo (cascade_jax/demo) is a project built on it, which none of these may know.
CORE = ("nn", "models", "diffusion", "weights", "data", "pipelines", "training", "storage")


def modules() -> dict[str, Path]:
    found = {}
    paths = [*PACKAGE.rglob("*.py"), *(p for folder in SCRIPT_FOLDERS for p in (REPO / folder).glob("*.py"))]
    for path in paths:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def resolve(target: str, source: str, known: dict[str, Path]) -> str:
    """``target`` as a module name; in a script folder an unknown bare name is the sibling script."""
    folder = source.split(".")[0]
    if target not in known and folder in SCRIPT_FOLDERS and f"{folder}.{target.split('.')[0]}" in known:
        return f"{folder}.{target}" if f"{folder}.{target}" in known else f"{folder}.{target.split('.')[0]}"
    return target


@functools.cache  # every test reads the same tree: parse it once
def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                # `from pkg import module` imports the module; `from module import name` the module itself.
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
        targets = {resolve(t, name, known) for t in targets}
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] in SCRIPT_FOLDERS:
        return parts[0]  # a script folder is one layer, above the whole library
    return parts[1] if len(parts) > 1 else "<root>"  # the package root: a facade above every layer


def test_no_import_cycles_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycles_between_subpackages():
    graph = {}
    for source, targets in import_graph().items():
        graph.setdefault(layer(source), set()).update(layer(t) for t in targets if layer(t) != layer(source))
    for targets in list(graph.values()):
        for t in targets:
            graph.setdefault(t, set())
    assert cycles(graph) == []


def test_layers_only_import_downward():
    upward = []
    for source, targets in import_graph().items():
        for target in targets:
            src, dst = LAYERS.get(layer(source)), LAYERS.get(layer(target))
            if layer(target) == "<root>":
                continue  # `from cascade_jax import load_model`: the root only re-exports
            if src is not None and dst is not None and dst > src:
                upward.append(f"{source} ({layer(source)}) imports {target} ({layer(target)})")
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


def test_no_core_package_imports_or_names_the_demo():
    """The demo reaches the library through its extension points (named weight sets, a task and a loss-weight
    plug-in named in its configs, the folder data source); the library never reaches back."""
    offenders = [f"{source} imports {target}" for source, targets in import_graph().items()
                 if layer(source) in CORE for target in targets if layer(target) == "demo"]
    offenders += [f"{name} names cascade_jax.demo" for name, path in modules().items()
                  if layer(name) in CORE and "cascade_jax.demo" in path.read_text()]
    assert not offenders, "\n".join(offenders)


def test_the_graph_covers_the_script_folders():
    graph = import_graph()
    for folder in SCRIPT_FOLDERS:
        assert any(name.startswith(f"{folder}.") for name in graph), folder
    # Both import styles resolve: a package import in benchmarks/ and a bare sibling import (`python sample/x.py`
    # puts sample/ first on sys.path; no script uses one today, the app's parts being cascade_jax.app).
    assert "benchmarks.harness" in graph["benchmarks.run_cpu"]
    assert resolve("helper", "sample.app", {"sample.helper": Path("sample/helper.py")}) == "sample.helper"
    assert "cascade_jax.app.service" in graph["sample.app"]


def test_script_folders_import_only_the_library_and_themselves():
    crossing = [f"{source} imports {target}" for source, targets in import_graph().items() for target in targets
                if layer(source) in SCRIPT_FOLDERS and layer(target) in SCRIPT_FOLDERS
                and layer(source) != layer(target)]
    assert not crossing, "a script folder imports another:\n" + "\n".join(crossing)


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
