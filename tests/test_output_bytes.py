"""The bytes modelxform writes are pinned: every recipe in recipes/ and every benchmark case, applied
to models built here from fixed seeds, must give files with the sha256 recorded in
tests/golden/output_sha256.json — both with the archive engine and with the input model loaded
(MODELXFORM_FASTPATH=0).

This guards refactorings of the engine: they must not change a byte of any output. The digests hold
for the pinned versions in constraints.txt on this machine type; after a deliberate change of the
output format or a version bump, regenerate them with

    MODELXFORM_UPDATE_PINS=1 ./dev test tests/test_output_bytes.py

and say in the commit why the bytes changed. tests/test_backends.py holds the outputs made under
KERAS_BACKEND=jax to the same digests (the provenance's record of the backend aside).
"""
from __future__ import annotations

import json
import os

import pytest

from conftest import PINNED_KINDS, ROOT, run_cli
from modelxform.keras_io.files import sha256_file

PINS = ROOT / "tests" / "golden" / "output_sha256.json"
UPDATE = os.environ.get("MODELXFORM_UPDATE_PINS") == "1"

# (case, model kind, recipe path relative to the repository, seed, params)
CASES = [
    ("recipe-example", "cnn", "recipes/example.recipe", 7, ()),
    ("recipe-perturb-dense-params", "cnn", "recipes/perturb-dense.recipe", 3, ("stddev=0.2", "sparsity=25")),
    ("recipe-freeze-features", "cnn", "recipes/freeze-features.recipe", 7, ()),
    ("recipe-perturb-dense", "cnn", "recipes/perturb-dense.recipe", 7, ()),
    ("recipe-feature-extractor", "cnn", "recipes/feature-extractor.recipe", 7, ()),
    ("recipe-new-head", "cnn", "recipes/new-head.recipe", 7, ()),
    ("recipe-dropout-before-classifier", "cnn", "recipes/dropout-before-classifier.recipe", 7, ()),
    ("recipe-resnet50-finetune", "resnet50", "recipes/resnet50-finetune.recipe", 7, ()),
    ("recipe-resnet50-features", "resnet50", "recipes/resnet50-features.yaml", 7, ()),
    ("recipe-resnet50-headless", "resnet50", "recipes/resnet50-headless.recipe", 7, ()),
    ("recipe-resnet50-deploy", "resnet50", "recipes/resnet50-deploy.recipe", 7, ()),
    # the benchmark cases (benchmarks/README.md), on the same architectures at a small input size
    ("bench-cnn-design-card", "cnn", "recipes/example.recipe", 7, ()),
    ("bench-vgg16-replace-pooling", "vgg16", "benchmarks/recipes/replace-pooling.recipe", 0, ()),
    ("bench-vgg16-scale-dense", "vgg16", "benchmarks/recipes/scale-dense.recipe", 0, ()),
    ("bench-resnet50-replace-pooling", "resnet50", "benchmarks/recipes/replace-pooling.recipe", 0, ()),
    ("bench-resnet50-freeze-but-conv5", "resnet50", "benchmarks/recipes/freeze-but-conv5.recipe", 0, ()),
    ("bench-resnet50-replace-one", "resnet50", "benchmarks/recipes/replace-one.recipe", 0, ()),
    ("bench-resnet50-replace-ten", "resnet50", "benchmarks/recipes/replace-ten.recipe", 0, ()),
    ("bench-resnet50-fold-batchnorm", "resnet50", "benchmarks/recipes/fold-batchnorm.recipe", 0, ()),
]


@pytest.fixture(scope="module")
def inputs(pinned_inputs):
    return {kind: pinned_inputs(kind) for kind in PINNED_KINDS}


@pytest.fixture(scope="module")
def pins():
    recorded = json.loads(PINS.read_text()) if PINS.exists() else {}
    before = dict(recorded)
    yield recorded
    if UPDATE:  # (each xdist worker updates its own cases: merged into the file as it is now, under a lock)
        import fcntl
        with open(PINS.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            now = json.loads(PINS.read_text()) if PINS.exists() else {}
            now.update({key: value for key, value in recorded.items() if before.get(key) != value})
            PINS.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")


@pytest.mark.slow
def test_input_models_are_the_pinned_ones(inputs, pins):
    """The inputs must be what the pins were made from, or every other digest means nothing."""
    for kind, path in inputs.items():
        digest = sha256_file(path)
        if UPDATE:
            pins[f"input-{kind}"] = digest
        assert digest == pins.get(f"input-{kind}"), f"the {kind} input model is not the one the pins were made from"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["archive", "loaded"])
@pytest.mark.parametrize("case,kind,recipe,seed,params", CASES, ids=[c[0] for c in CASES])
def test_output_bytes_are_pinned(case, kind, recipe, seed, params, engine, inputs, pins, tmp_path, monkeypatch):
    if engine == "loaded":
        monkeypatch.setenv("MODELXFORM_FASTPATH", "0")
    out = tmp_path / "out.keras"
    argv = ["apply", ROOT / recipe, inputs[kind], "-o", out, "--seed", seed]
    for item in params:
        argv += ["--param", item]
    result = run_cli(*argv)
    assert result.status == 0, result.err
    digest = sha256_file(out)
    if UPDATE and engine == "archive":
        pins[case] = digest
    assert digest == pins.get(case), f"{case} ({engine}): the output bytes changed"
