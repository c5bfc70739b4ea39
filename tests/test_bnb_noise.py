"""bitsandbytes' import-time noise about its optional CPU kernel is hidden for every harmless cause, on
every CPU (#25 item 1; the filter is `lora_module.qlora.MissingKernelsFilter`).

    .venv/bin/pytest tests/test_bnb_noise.py -q

bitsandbytes tries to load the kernel (`kernels.get_kernel`) only on CPUs with AVX512-BF16, so
tests/test_tidy_surfaces.py, which imports it as it is, checks nothing on other CPUs. Here a
subprocess makes bitsandbytes believe the CPU has AVX512-BF16 (an import hook patches
`bitsandbytes.functional.has_avx512bf16` before the CPU backend reads it, and prints a marker when it
is asked), so the kernel path runs on any machine, for each cause:
- `kernels` not installed (None in sys.modules: its import raises ModuleNotFoundError);
- `kernels` installed, the Hub offline and an empty cache (the real package's messages);
- a `kernels` that is there but broken (a stand-in on PYTHONPATH whose get_kernel raises ImportError):
  a real failure, which must still be shown.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

MARKER = "bnb-asked-for-avx512bf16"
# Runs before anything imports bitsandbytes: patch has_avx512bf16 as bitsandbytes.functional is loaded.
FORCE_KERNEL_PATH = f"""
import importlib.abc, importlib.util, sys

def _yes():
    print("{MARKER}", flush=True)
    return True

class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = _yes
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Patch())
"""
BROKEN_KERNELS = """
def get_kernel(repo, version=None):
    raise ImportError("undefined symbol: gemm_4bit_impl")
"""


def _import_output(setup: str, tmp_path: Path, python_path: str = "") -> str:
    """stdout + stderr of importing lora_module.qlora then bitsandbytes, offline, with an empty HF cache."""
    code = FORCE_KERNEL_PATH + setup + "\nimport lora_module.qlora, bitsandbytes\n"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": python_path}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert MARKER in out.stdout, "bitsandbytes never asked for AVX512-BF16: the kernel path was not taken"
    return out.stdout + out.stderr


@pytest.mark.parametrize("setup", ["sys.modules['kernels'] = None", "import kernels"],
                         ids=["kernels-missing", "kernels-installed-offline-not-cached"])
def test_harmless_causes_print_nothing_about_the_kernel_on_any_cpu(setup, tmp_path):
    output = _import_output(setup, tmp_path)
    assert "kernels-community" not in output and "gemm_4bit_forward" not in output, output


def test_a_broken_kernels_package_is_still_reported(tmp_path):
    fake = tmp_path / "fake"
    (fake / "kernels").mkdir(parents=True)
    (fake / "kernels" / "__init__.py").write_text(BROKEN_KERNELS)
    output = _import_output("", tmp_path, python_path=str(fake))
    assert "Failed to load CPU gemm_4bit_forward from kernels-community: undefined symbol" in output
