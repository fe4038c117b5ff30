"""The package's layers import one way only (docs/architecture.md): import-linter checks the contracts
in .importlinter — the layer order, the language free of Keras, TensorFlow, h5py, the engine and
keras_io, batch free of the CLI, only keras_io importing a Keras backend's library (TensorFlow, JAX,
torch), and no import cycles (function-level imports included)."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from conftest import ROOT


def lint_imports(root: pathlib.Path, config: pathlib.Path) -> subprocess.CompletedProcess:
    exe = pathlib.Path(sys.executable).parent / "lint-imports"
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([str(exe), str(config), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    proc = lint_imports(ROOT, ROOT / ".importlinter")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_a_broken_layer_is_caught(tmp_path):
    """The contracts are not vacuous: a copy of the package whose language imports the engine fails."""
    import shutil
    shutil.copytree(ROOT / "modelxform", tmp_path / "modelxform",
                    ignore=shutil.ignore_patterns("__pycache__", "report_assets"))
    bad = tmp_path / "modelxform" / "lang" / "fmt.py"
    bad.write_text(bad.read_text() + "\n\ndef _sneak():\n    from ..engine import runner  # noqa: F401\n")
    proc = lint_imports(tmp_path, ROOT / ".importlinter")
    assert proc.returncode != 0
    assert "modelxform.lang.fmt -> modelxform.engine.runner" in proc.stdout
