"""The lock files: they satisfy pyproject.toml, agree with each other, and are what ./run.sh installs.

Run: .venv/bin/pytest tests/test_lock.py -q

requirements/cuda.lock pins every package for Linux x86_64 with PyPI's CUDA build of torch;
requirements/cpu.lock is the same resolution without the CUDA-only packages. A dependency added to
pyproject.toml without `requirements/refresh.sh` fails here, naming it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = {name: ROOT / "requirements" / f"{name}.lock" for name in ("cpu", "cuda")}
CUDA_ONLY = re.compile(r"^(nvidia-.+|cuda-.+|triton)$")


def read_lock(path: Path) -> dict[str, Version]:
    """{canonical name: pinned version} of a lock file; every requirement line must be `name==version`."""
    pins: dict[str, Version] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"{path.name}:{number}: {raw!r} is not pinned as name==version"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_pins_every_requirement_of_pyproject_within_its_range(lock: str) -> None:
    pins = read_lock(LOCKS[lock])
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is in pyproject.toml but not in {lock}.lock: run requirements/refresh.sh"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{lock}.lock pins {name}=={pins[name]}, outside pyproject.toml's {req}: "
            "run requirements/refresh.sh"
        )


def test_cpu_lock_is_the_cuda_lock_without_the_cuda_only_packages() -> None:
    cpu, cuda = read_lock(LOCKS["cpu"]), read_lock(LOCKS["cuda"])
    assert not [n for n in cpu if CUDA_ONLY.match(n)]
    assert {n: v for n, v in cuda.items() if not CUDA_ONLY.match(n)} == cpu
    assert [n for n in cuda if CUDA_ONLY.match(n)], "cuda.lock should pin torch's nvidia packages"


def test_torch_in_the_locks_is_the_cpu_build_that_run_sh_installs() -> None:
    """run.sh installs the CPU build first; the lock's torch line must be the same version, or pip
    would replace it with PyPI's CUDA build."""
    setup = (ROOT / "run.sh").read_text()
    (spec,) = re.findall(r"TORCH_SPEC:-torch==([\d.]+)", setup)
    assert read_lock(LOCKS["cpu"])["torch"] == read_lock(LOCKS["cuda"])["torch"] == Version(spec)


def test_run_sh_installs_from_the_lock_and_readme_names_the_refresh() -> None:
    setup = (ROOT / "run.sh").read_text()
    assert 'pip" install -q -r "$lock"' in setup and "requirements/$(" in setup
    assert (ROOT / "requirements" / "refresh.sh").stat().st_mode & 0o111, "refresh.sh must be executable"
    assert "requirements/refresh.sh" in (ROOT / "README.md").read_text()
