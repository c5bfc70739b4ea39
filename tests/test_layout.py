"""The layout's promises, checked on the source text: imports run one way, no circles, short functions.

    .venv/bin/pytest tests/test_layout.py -q

Every module of `lora_module` and of the repo folders installed as `lora_pipeline.*` (data, flows,
deploy, benchmarks) is parsed with `ast`; each import statement, also one inside a function (it
still runs, only later), is an edge to the project module it names. Imports under
`if TYPE_CHECKING:` never run and are left out. Repeated blocks are checked with the `duplicates`
tool where developers have it (it is not installed on CI, so there is no test for it here).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Repo folder -> import name (pyproject.toml's package-dir mapping).
PACKAGES = {
    "lora_module": "lora_module",
    "data": "lora_pipeline.data",
    "flows": "lora_pipeline.flows",
    "deploy": "lora_pipeline.deploy",
    "benchmarks": "lora_pipeline.benchmarks",
}
CORE_STAGES = ("lora_module.training", "lora_module.evaluation", "lora_module.registry",
               "lora_module.serving")
# What serving may read of the registry: resolving and downloading versions, never registering them.
REGISTRY_FOR_SERVING = ("lora_module.registry", "lora_module.registry.store", "lora_module.registry.bases",
                        "lora_module.registry.retry", "lora_module.registry.tracking")
HEAVY_FRAMEWORKS = ("lightning", "mlflow", "prefect")
MAX_FUNCTION_LINES = 60


def _module_files() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for file in sorted((ROOT / folder).rglob("*.py")):
            parts = file.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = file
    return out


MODULES = _module_files()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(module: str, file: Path) -> list[str]:
    """Every module name an import statement of `file` names: `from a import b` gives a.b, and a too
    unless every imported name is a submodule (then only those submodules run: a parent package's
    `__init__` importing its own submodules is no circle)."""
    is_package = file.name == "__init__.py"
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            subs = [f"{base}.{alias.name}" for alias in node.names]
            names.extend(subs)
            if not all(sub in MODULES for sub in subs):
                names.append(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(file.read_text()))
    return names


def _project_imports(module: str) -> set[str]:
    """The project modules `module` imports (a name that is not a module, e.g. a class, is dropped)."""
    return {n for n in _imported_names(module, MODULES[module]) if n in MODULES and n != module}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := dfs(start)):
            return found
    return None


def test_the_walk_sees_the_packages():
    assert {"lora_module.model", "lora_module.adapter_io", "lora_module.training.module",
            "lora_pipeline.data.prepare", "lora_pipeline.flows.pipeline"} <= set(MODULES)
    assert "lora_module.adapter_io" in _project_imports("lora_module.model")


def test_no_import_cycles():
    graph = {m: _project_imports(m) for m in MODULES}
    cycle = _find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_find_cycle_reports_a_circle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def _violations(prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for module, file in MODULES.items():
        if module != prefix and not module.startswith(prefix + "."):
            continue
        for name in _imported_names(module, file):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                out.append(f"{module} imports {name}")
    return sorted(set(out))


def _core_modules() -> list[str]:
    """The LoRA core: modules directly in lora_module/ (not its stage subpackages)."""
    return [m for m in MODULES if m == "lora_module" or (m.count(".") == 1 and m.startswith("lora_module."))
            and not m.startswith(CORE_STAGES)]


@pytest.mark.parametrize(("prefix", "forbidden"), [
    ("lora_module.training", ("lora_module.registry", "lora_module.serving", "lora_pipeline.flows")),
    ("lora_module.evaluation", ("lora_module.training", "lora_module.registry", "lora_module.serving",
                                "lora_pipeline.flows")),
    ("lora_module.serving", ("lora_module.training", "lora_pipeline")),
    ("lora_module", ("lora_pipeline.flows",)),
])
def test_imports_run_one_way(prefix, forbidden):
    assert _violations(prefix, forbidden) == []


def test_serving_reads_the_registry_only_through_the_store():
    bad = [f"{m} imports {n}" for m, file in MODULES.items() if m.startswith("lora_module.serving")
           for n in _imported_names(m, file)
           if n.startswith("lora_module.registry") and n in MODULES and n not in REGISTRY_FOR_SERVING]
    assert bad == []
    # ... and those modules do not reach registration either.
    reached = {n for m in REGISTRY_FOR_SERVING for n in _project_imports(m)}
    assert not {"lora_module.registry.register", "lora_module.registry.gate"} & reached


def test_layers_hold_no_serving_state():
    """The core's LoRA layer reads like loralib: mixed-adapter batching lives in mixed_batch.py."""
    text = MODULES["lora_module.layers"].read_text()
    assert not any(word in text for word in ("row_groups", "row_weights", "mixed"))


def test_core_imports_no_stage_and_no_framework():
    bad = []
    for module in _core_modules():
        for name in _imported_names(module, MODULES[module]):
            # No lora_pipeline either: data imports the core (errors, files, the prompt cutting), not back.
            if name.startswith((*CORE_STAGES, "lora_pipeline")) or name.split(".")[0] in HEAVY_FRAMEWORKS:
                bad.append(f"{module} imports {name}")
    assert "lora_module.model" in _core_modules() and "lora_module.training" not in _core_modules()
    assert bad == []


def test_no_function_over_60_lines_outside_benchmarks():
    long = []
    for module, file in MODULES.items():
        if module.startswith("lora_pipeline.benchmarks"):
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{file.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
