"""The package as users install it: a non-editable install works outside the checkout, and the
declared dependencies are exactly what the code imports."""

import ast
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Code shipped or run by users; benchmarks and tests have their own (test extra) requirements.
SCANNED = ["cascade_jax", "convert", "sample", "train"]


def _setup_keywords() -> dict:
    call = next(node for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    return {kw.arg: kw.value for kw in call.keywords}


def _requirement_calls_named(node: ast.AST) -> ast.AST:
    """setup.py computes one requirement (``jax_tpu()``: jax[tpu] at the installed jax's version); read it as
    its package name, the part this test checks."""
    class Named(ast.NodeTransformer):
        def visit_Call(self, call):
            name = getattr(call.func, "id", "")
            if name == "jax_tpu":
                return ast.copy_location(ast.Constant("jax[tpu]"), call)
            raise AssertionError(f"setup.py: {name}() in extras_require: teach this test what it returns")

    return Named().visit(node)


def _names(requirements) -> set[str]:
    return {_normalise(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> tuple[set[str], set[str]]:
    """(runtime requirement names, names in any extra)."""
    kw = _setup_keywords()
    extras = ast.literal_eval(_requirement_calls_named(kw["extras_require"]))
    return _names(ast.literal_eval(kw["install_requires"])), _names(r for reqs in extras.values() for r in reqs)


# What inference needs (the pipelines, conversion, the sample and convert scripts) must import with the
# runtime requirements alone; other modules (training, the training data loader) may need an extra.
RUNTIME_ROOTS = ("cascade_jax.pipelines", "cascade_jax.weights", "cascade_jax.models", "cascade_jax.nn",
                 "cascade_jax.diffusion", "cascade_jax.conditioning", "cascade_jax.sharding", "convert", "sample")


def _is_root(module: str) -> bool:
    return module == "cascade_jax" or any(module == r or module.startswith((r + ".", r + "/")) for r in RUNTIME_ROOTS)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] != "cascade_jax":
        return "/".join(parts)  # scripts keep their path
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def scan() -> dict[str, dict]:
    """{module: {"internal": cascade_jax modules imported at module level (parents included),
    "module": third-party top-level names imported at module level, "lazy": ... inside functions}}."""
    found = {}
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")) if (REPO / folder).is_dir() else []:
            tree = ast.parse(path.read_text())
            lazy_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                          for n in ast.walk(f)}
            info = found.setdefault(_module_name(path), {"internal": set(), "module": set(), "lazy": set()})
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                lazy = id(node) in lazy_nodes
                for module in modules:
                    top = module.split(".")[0]
                    if top == "cascade_jax":
                        if not lazy:
                            parts = module.split(".")
                            info["internal"].update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
                    elif top not in sys.stdlib_module_names and not (path.parent / f"{top}.py").exists() \
                            and module == modules[0]:
                        info["lazy" if lazy else "module"].add(top)
    return found


def runtime_modules(found: dict) -> set[str]:
    """Modules imported, at module level, by the inference entry points (transitively)."""
    todo = [m for m in found if _is_root(m)]
    seen = set()
    while todo:
        module = todo.pop()
        if module in seen or module not in found:
            continue
        seen.add(module)
        todo.extend(found[module]["internal"])
    return seen


@functools.lru_cache(maxsize=1)
def _distributions() -> dict:
    return importlib.metadata.packages_distributions()  # scans every installed package: once


def distribution(module: str) -> str:
    dists = _distributions().get(module)
    if not dists:
        pytest.fail(f"{module} is imported but not installed in this environment; declare and install it")
    return _normalise(dists[0])


def test_declared_dependencies_are_exactly_what_the_code_imports():
    runtime, extras = declared()
    found = scan()
    inference = runtime_modules(found)
    problems, imported = [], set()
    for module, info in sorted(found.items()):
        for name in sorted(info["module"] | info["lazy"]):
            dist = distribution(name)
            imported.add(dist)
            if name in info["module"] and module in inference and dist not in runtime:
                problems.append(f"{dist} is imported at module level by {module}, which inference imports, but is "
                                "not in install_requires (declare it, or import it where it is used)")
            elif dist not in runtime | extras:
                problems.append(f"{dist} is imported by {module} but declared nowhere in setup.py (add it to an extra)")
    # jax's CPU backend (jaxlib) comes with jax; everything else declared must be imported.
    problems += [f"{name} is in install_requires but nothing in {SCANNED} imports it"
                 for name in sorted(runtime - imported - {"jaxlib"})]
    assert not problems, "\n".join(problems)


def test_inference_modules_import_without_the_optional_dependencies():
    """An environment check: with every package that only an extra brings (torch, diffusers, transformers,
    grain...) hidden, every module that inference imports still imports."""
    runtime, extras = declared()
    modules = sorted(m for m in runtime_modules(scan()) if m.startswith("cascade_jax"))
    hidden = sorted({m for m, dists in _distributions().items()
                     if {_normalise(d) for d in dists} <= (extras - runtime) and m.isidentifier()})
    script = textwrap.dedent(f"""
        import importlib, importlib.abc, sys
        HIDDEN = set({hidden!r})

        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in HIDDEN:
                    raise ModuleNotFoundError(f"{{name}} is hidden: an optional dependency", name=name)
                return None

        sys.meta_path.insert(0, Hide())
        for module in {modules!r}:
            importlib.import_module(module)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(modules) > 30


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A non-editable install of a copy of the package (no dependencies), as a wheel would install it."""
    root = tmp_path_factory.mktemp("install")
    source = root / "src"
    source.mkdir()
    shutil.copy2(REPO / "setup.py", source)
    for folder in ("cascade_jax", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    target = root / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                             "--no-compile", "--target", str(target), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.rmtree(source)  # nothing may be found through the source tree
    return target


def test_installed_package_loads_presets_and_converts_outside_the_checkout(installed, tmp_path):
    script = textwrap.dedent(f"""
        import numpy as np
        import cascade_jax
        from pathlib import Path
        assert Path(cascade_jax.__file__).is_relative_to({str(installed)!r}), cascade_jax.__file__
        from cascade_jax import load_model
        from cascade_jax.models.random_init import random_model
        from cascade_jax.models.registry import abstract_model, list_presets, load_config
        from cascade_jax.pipelines.loading import pipeline_set
        from cascade_jax.weights.convert import convert_checkpoint
        from cascade_jax.weights.export import export_official

        assert "stage_c_lite" in list_presets(), list_presets()
        model, config = load_config("stage_c_lite")
        abstract_model(model, config)
        name, tiny = pipeline_set("tiny")["stage_a"]
        source = random_model(name, tiny, seed=3)
        from cascade_jax.weights import checkpoint
        from cascade_jax.nn.params import named_variables
        arrays = {{k: np.asarray(v.get_value()) for k, v in named_variables(source).items()}}
        checkpoint.save("random_a", {{"model": name, "config": tiny, "dtype": "float32"}}, arrays)
        export_official("random_a", "stage_a.safetensors")
        convert_checkpoint(name, tiny, "stage_a.safetensors", "converted_a", dtype="float32")
        restored = load_model("converted_a")
        for key, var in named_variables(restored).items():
            np.testing.assert_array_equal(np.asarray(var.get_value()), arrays[key], err_msg=key)
        image = restored.decode(np.zeros((1, 8, 8, tiny["c_latent"]), np.float32))
        assert np.isfinite(np.asarray(image)).all()
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(installed)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
