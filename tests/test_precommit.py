"""The pre-commit hooks of .pre-commit-hooks.yaml, run by pre-commit itself on a scratch repository.

The hooks are `language: system`: pre-commit installs nothing (no hook environment, so no TensorFlow
and no network) and runs the `modelxform` on the PATH. Here that is a two-line script running this
checkout's modelxform with the test's Python, standing for the console script an installation puts on
the PATH.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

try:
    import pre_commit  # noqa: F401  (the dev extra installs it)
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("pre-commit is not installed (./dev test installs the dev extra)", allow_module_level=True)

pytestmark = pytest.mark.slow

GOOD = 'recipe "good" version "1.0.0"\nselect where type=Dense\nscale kernel 0.9\n'
UNFORMATTED = 'recipe "loose" version "1.0.0"\nselect  where type=Dense ; scale kernel 90%\n'
BAD = 'recipe "bad" version "1.0.0"\nfreeze all\n'


def _git(cwd, *args, env):
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True)


@pytest.fixture
def scratch(tmp_path):
    """(project folder, environment): a git repository whose .pre-commit-config.yaml uses the hooks of
    a hook repository that holds this checkout's .pre-commit-hooks.yaml."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "PRE_COMMIT"))}
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "modelxform").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m modelxform "$@"\n')
    (shim / "modelxform").chmod(0o755)
    env.update({"PATH": f"{shim}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
                "PRE_COMMIT_HOME": str(tmp_path / "cache"), "XDG_CACHE_HOME": str(tmp_path / "xdg"),
                "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
                "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)})
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    shutil.copy(ROOT / ".pre-commit-hooks.yaml", hooks / ".pre-commit-hooks.yaml")
    _git(hooks, "init", "-q", env=env)
    _git(hooks, "add", ".", env=env)
    _git(hooks, "commit", "-q", "-m", "hooks", env=env)
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=hooks, env=env, check=True, capture_output=True,
                         text=True).stdout.strip()
    project = tmp_path / "project"
    (project / "recipes").mkdir(parents=True)
    (project / ".pre-commit-config.yaml").write_text(
        f"repos:\n- repo: {hooks}\n  rev: {rev}\n  hooks:\n  - id: modelxform-fmt\n  - id: modelxform-check\n")
    (project / "recipes" / "good.recipe").write_text(GOOD)
    (project / "recipes" / "loose.recipe").write_text(UNFORMATTED)
    (project / "recipes" / "bad.recipe").write_text(BAD)
    (project / "ci.yaml").write_text("jobs: {test: {run: make}}\n")  # not a recipe: the hooks leave it alone
    _git(project, "init", "-q", env=env)
    _git(project, "add", ".", env=env)
    return project, env


def _pre_commit(project, env, *args):
    return subprocess.run([sys.executable, "-m", "pre_commit", "run", "--color", "never", *args], cwd=project,
                          env=env, capture_output=True, text=True, timeout=300)


def _status(output: str, hook: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith(hook))
    return line.rsplit(".", 1)[-1].strip()


def test_hooks_pass_good_recipes_and_fail_bad_ones(scratch):
    project, env = scratch
    result = _pre_commit(project, env, "--all-files")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert _status(out, "modelxform fmt") == "Failed"
    assert _status(out, "modelxform check") == "Failed"
    # fmt --check names the unformatted recipe, and the one that does not compile, and not the good one
    assert "recipes/loose.recipe: not formatted" in out
    assert "recipes/good.recipe: not formatted" not in out
    # check points at the mistake and says what to write
    assert ("recipes/bad.recipe:2:8: error: `freeze` acts on the selected layers and takes no argument: "
            "write `select all; freeze`") in out
    assert "recipes/good.recipe: ok (3 statements)" in out
    assert "recipes/loose.recipe: ok (3 statements)" in out
    assert "ci.yaml" not in out
    # language: system: pre-commit made no environment of its own (no pip install, no TensorFlow)
    made = [p.name for p in (project.parent / "cache").rglob("*") if p.is_dir() and p.name.startswith("py_env")]
    assert made == []

    # the fixes the messages name make both hooks pass
    (project / "recipes" / "bad.recipe").write_text('recipe "bad" version "1.0.0"\nselect all; freeze\n')
    fixed = subprocess.run([sys.executable, "-m", "modelxform", "fmt", "recipes/bad.recipe", "recipes/loose.recipe"],
                           cwd=project, env=env, capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stderr
    assert (project / "recipes" / "loose.recipe").read_text() == (
        'recipe "loose" version "1.0.0"\nselect where type=Dense\nscale kernel 0.9\n')
    subprocess.run(["git", "add", "."], cwd=project, env=env, check=True)
    result = _pre_commit(project, env, "--all-files")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _status(result.stdout, "modelxform fmt") == "Passed"
    assert _status(result.stdout, "modelxform check") == "Passed"


def test_hooks_run_on_the_files_of_a_commit_only(scratch):
    project, env = scratch
    result = _pre_commit(project, env, "--files", "recipes/good.recipe", "ci.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _status(result.stdout, "modelxform fmt") == "Passed"
    assert _status(result.stdout, "modelxform check") == "Passed"
