"""What code produced an output: the project source files a module imports, and one hash over them.

    from lora_module.code_identity import code_fingerprint, import_closure
    import_closure(["lora_pipeline.data.prepare"])   # [.../data/prepare.py, .../lora_module/prompt.py, ...]
    key = code_fingerprint(["lora_pipeline.data.prepare"])   # changes when any of those files changes

Cache keys (prepared data, the base evaluation) hash this closure instead of a hand-kept list of
modules, so a module that joins the code path (a new metric, the prompt truncation) invalidates the
cache without anyone remembering to add it. The closure follows `import` and `from ... import`
statements read with `ast` (imports inside functions too, `if TYPE_CHECKING:` blocks not), plus the
`__init__.py` of every package on the way, and only into the project's own packages: `lora_module.*`
and `lora_pipeline.*`. A name a package imports lazily (PEP 562) through its `_LAZY` table, as
`from lora_module import LoraModel` does, is followed to its module; other imports by computed name
(`importlib.import_module(x)`) are not.

Files are found through `importlib.util.find_spec` of the top-level packages (a checkout and an
installed wheel alike), or under `root`, a source tree laid out like the repository. Each file is
hashed under its module path (`lora_pipeline/data/prepare.py`), so the key is the same wherever the
code lives. Standard library only.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

# The project's packages and their folders in the repository (pyproject's package-dir): installed, the
# folders data/, flows/, deploy/ and benchmarks/ are the lora_pipeline.* packages.
PACKAGE_DIRS = {
    "lora_module": "lora_module",
    "lora_pipeline.data": "data",
    "lora_pipeline.flows": "flows",
    "lora_pipeline.deploy": "deploy",
    "lora_pipeline.benchmarks": "benchmarks",
}


class _Source:
    """The project's module files: a dotted module name -> its .py file, under a root or as installed."""

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.dirs = {pkg: self._package_dir(pkg, root) for pkg in PACKAGE_DIRS}

    @staticmethod
    def _package_dir(package: str, root: str | os.PathLike | None) -> Path | None:
        if root is not None:
            return Path(root) / PACKAGE_DIRS[package]
        spec = importlib.util.find_spec(package)  # finds the package without running its __init__
        locations = spec.submodule_search_locations if spec is not None else None
        return Path(next(iter(locations))) if locations else None

    def file(self, module: str) -> Path | None:
        """The file of `module` (a module's .py or a package's __init__.py), None outside the project."""
        for package, folder in self.dirs.items():
            if folder is None or not (module == package or module.startswith(package + ".")):
                continue
            parts = module[len(package):].lstrip(".").split(".") if module != package else []
            base = folder.joinpath(*parts)
            for candidate in (base / "__init__.py", base.with_name(base.name + ".py") if parts else None):
                if candidate is not None and candidate.is_file():
                    return candidate
        return None

    def name_of(self, path: Path) -> str:
        """`path` as its module path under the installed package names, e.g. `lora_pipeline/data/x.py`."""
        for package, folder in self.dirs.items():
            if folder is not None and path.is_relative_to(folder):
                return "/".join([*package.split("."), *path.relative_to(folder).parts])
        raise ValueError(f"{path} is not a file of the project's packages {sorted(PACKAGE_DIRS)}")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(nodes: Iterable[ast.AST]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in `nodes`, at any depth, except in the body of `if TYPE_CHECKING:`."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_nodes(node.orelse)  # only the branch that runs
        else:
            yield from _import_nodes(ast.iter_child_nodes(node))


def _with_parents(module: str) -> list[str]:
    """`a.b.c` -> [a, a.b, a.b.c]: importing a module runs its packages' __init__ first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _imported_names(path: Path, module: str) -> Iterator[str]:
    """The dotted names `path` (the file of `module`) imports, with relative imports made absolute.

    For `from X import y` both X and X.y are named: y may be a submodule or just an attribute of X.
    """
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in _import_nodes([tree]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _with_parents(alias.name)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        yield from _with_parents(base)
        for alias in node.names:
            if alias.name != "*":
                yield f"{base}.{alias.name}"


def _lazy_table(init: Path) -> dict[str, str]:
    """A package's PEP 562 table `_LAZY = {"Name": "module.path", ...}`: names its __getattr__ imports."""
    for node in ast.parse(init.read_bytes(), filename=str(init)).body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)):
            return {k.value: v.value for k, v in zip(node.value.keys, node.value.values, strict=True)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
    return {}


def _closure(modules: Sequence[str], source: _Source) -> list[Path]:
    missing = [m for m in modules if source.file(m) is None]
    if missing:
        raise ValueError(f"not modules of the project's packages {sorted(PACKAGE_DIRS)}: {missing}")
    seen: set[Path] = set()
    todo = [name for m in modules for name in _with_parents(m)]
    while todo:
        name = todo.pop()
        path = source.file(name)
        if path is None:  # maybe a name a package imports lazily (`from lora_module import LoraModel`)
            package, _, attr = name.rpartition(".")
            init = source.file(package) if package else None
            if init is not None and init.name == "__init__.py" and attr in _lazy_table(init):
                todo.append(_lazy_table(init)[attr])
            continue
        if path not in seen:
            seen.add(path)
            todo.extend(_imported_names(path, name))
    return sorted(seen, key=source.name_of)


def import_closure(modules: Sequence[str], root: str | os.PathLike | None = None) -> list[Path]:
    """The project source files that importing `modules` runs, transitively, sorted by module path.

    `root`: a source tree laid out like the repository to read instead of the importable packages.
    """
    return _closure(modules, _Source(root))


def _fingerprint(modules: Sequence[str], source: _Source) -> str:
    h = hashlib.sha256()
    for path in _closure(modules, source):
        name = source.name_of(path).encode()
        content = path.read_bytes()
        # Lengths delimit the fields, so no two different closures feed the hash the same bytes.
        h.update(b"%d:%s%d:" % (len(name), name, len(content)) + content)
    return h.hexdigest()


@functools.cache
def _imported_code_fingerprint(modules: tuple[str, ...]) -> str:
    return _fingerprint(modules, _Source(None))


def code_fingerprint(modules: Sequence[str], root: str | os.PathLike | None = None) -> str:
    """Hex SHA-256 over the module path and content of every file in `import_closure(modules, root)`.

    For the importable code (no root) it is computed once per process: the code that runs is the code
    that was imported, whatever the files on disk say later. Under a `root` it is read afresh each time.
    """
    if root is None:
        return _imported_code_fingerprint(tuple(modules))
    return _fingerprint(modules, _Source(root))
