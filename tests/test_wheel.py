"""The built wheel works on its own: it carries the grammar, and its `modelxform check` runs in a fresh
virtual environment that sees neither the repository nor the editable development install."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import venv
import zipfile

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

DEV_SITE = ROOT / ".venv" / "lib" / "python3.11" / "site-packages"
TIMEOUT = 300


def _run(argv, **kwargs):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    outdir = tmp_path_factory.mktemp("dist")
    proc = _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", outdir],
                cwd=ROOT, env=_clean_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(outdir.glob("modelxform-*.whl"))
    assert len(wheels) == 1, list(outdir.iterdir())
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """(modelxform executable, environment, work folder): the wheel in a fresh venv, with only lark and
    interegular (its parsing dependencies) visible through PYTHONPATH."""
    base = tmp_path_factory.mktemp("wheel-env")
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    proc = _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], env=_clean_env(),
                cwd=base)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    deps = base / "deps"
    deps.mkdir()
    for name in ("lark", "interegular"):
        source = DEV_SITE / name
        assert source.is_dir(), f"{name} is not installed in the development venv"
        (deps / name).symlink_to(source, target_is_directory=True)
    work = base / "work"  # outside the repository: its grammar/ folder must not be found by accident
    work.mkdir()
    env = _clean_env(PYTHONPATH=str(deps), XDG_CACHE_HOME=str(base / "cache"))
    exe = env_dir / "bin" / "modelxform"
    assert exe.is_file()
    return exe, env, work


def test_wheel_contains_grammar(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "modelxform/grammar/recipe.lark" in names
    assert "modelxform/cli/__init__.py" in names
    assert any(n.endswith(".dist-info/entry_points.txt") for n in names)
    with zipfile.ZipFile(wheel) as zf:
        grammar = zf.read("modelxform/grammar/recipe.lark").decode("utf-8")
    assert grammar == (ROOT / "grammar" / "recipe.lark").read_text(encoding="utf-8")


def test_installed_wheel_is_isolated_from_the_repository(installed):
    exe, env, work = installed
    python = exe.parent / "python"
    proc = _run([python, "-c", "import modelxform, sys; print(modelxform.__file__); "
                               "print(any(p.endswith('.pth') for p in sys.path))"], env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr
    location = pathlib.Path(proc.stdout.splitlines()[0]).resolve()
    assert ROOT not in location.parents, location
    assert (location.parent / "grammar" / "recipe.lark").is_file()
    proc = _run([python, "-c", "import keras"], env=env, cwd=work)
    assert proc.returncode != 0  # nothing but lark and interegular leaks in


def test_installed_check_ok(installed):
    exe, env, work = installed
    recipe = work / "good.recipe"
    recipe.write_text('recipe "wheel" version "1.0.0"\nselect where type=Dense\nscale kernel 0.5\n',
                      encoding="utf-8")
    proc = _run([exe, "check", recipe.name], env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "good.recipe: ok (3 statements)" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_installed_check_syntax_error(installed):
    exe, env, work = installed
    recipe = work / "bad.recipe"
    recipe.write_text("select all\nfreeze unfreeze\n", encoding="utf-8")
    proc = _run([exe, "check", recipe.name], env=env, cwd=work)
    assert proc.returncode == 2
    assert "bad.recipe:2:8: error:" in proc.stderr
    assert "freeze unfreeze" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "ok" not in proc.stdout
