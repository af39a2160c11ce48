"""The layering of src/pop3coexist (README "Layout"), checked by import-linter.

The contracts live in pyproject.toml (``[tool.importlinter]``): a layer may import the layers
below it, never one above; siblings separated by ``|`` may not import each other; every module
must be placed in a layer; no two modules of one package import each other in a circle.
Function-local and TYPE_CHECKING imports count like any other.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lint_imports(src: Path, config: Path) -> subprocess.CompletedProcess[str]:
    """Run the venv's ``lint-imports`` on the package under ``src`` with ``config``."""
    exe = Path(sys.executable).parent / "lint-imports"
    assert exe.exists(), f"{exe} is missing: install the test extra (pip install '.[test]')"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [str(exe), "--no-cache", "--no-logo", str(config)],
        cwd=config.parent, env=env, capture_output=True, text=True, timeout=120,
    )


def test_the_package_keeps_its_layering_contracts() -> None:
    """`lint-imports` passes on the source tree: no upward import, no import between
    independent siblings (pop3 | smtp, identity | store, ...), no module outside a layer and no
    import cycle inside a package."""
    result = _lint_imports(ROOT / "src", ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_contracts_catch_a_lazy_upward_import_and_a_cycle(tmp_path: Path) -> None:
    """The check bites: a copy of the package with a function-local import from the store up to
    the wiring (service) and a cycle inside identity/ fails, and the output names both."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "pop3coexist", src / "pop3coexist",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (src / "pop3coexist" / "store" / "queue.py").open("a") as f:
        f.write("\n\ndef _upward():\n    from pop3coexist import service\n\n    return service\n")
    with (src / "pop3coexist" / "identity" / "logins.py").open("a") as f:
        f.write("\n\ndef _circle():\n    from pop3coexist.identity import factory\n\n"
                "    return factory\n")
    result = _lint_imports(src, tmp_path / "pyproject.toml")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "pop3coexist.store is not allowed to import pop3coexist.service" in out, out
    assert "No cycles are allowed in pop3coexist.identity" in out, out
