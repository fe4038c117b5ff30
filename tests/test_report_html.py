"""The visual report (modelxform/report_html.py): `diff --html` and `plan --html`.

The page is checked as data (which layer gets which colour, the statements that touched it, nothing
loaded from the network), as a layout (Graphviz places DenseNet121's 428 layers without overlaps), and
in a real browser: headless Chromium renders the report of a recipe on ResNet50 and the screenshot's
pixels must show the changed layers in their colours. Without Chromium that test is skipped, except in
CI (CI=true), where it fails.
"""
from __future__ import annotations

import html as htmlmod
import json
import os
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import ROOT, make_cnn, make_nested, run_cli

keras = pytest.importorskip("keras")

from modelxform import compile_recipe  # noqa: E402
from modelxform.diff import diff, snapshot  # noqa: E402
from modelxform.keras_io.files import save_model  # noqa: E402
from modelxform.report_html import STATUS_COLORS, write_report  # noqa: E402

pytestmark = pytest.mark.slow

needs_dot = pytest.mark.skipif(shutil.which("dot") is None and os.environ.get("CI") != "true",
                               reason="Graphviz's dot is not installed (./dev test installs it when run as root)")


def write(path, text):
    path.write_text(text)
    return path


def page_data(path) -> dict:
    text = pathlib.Path(path).read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="mx-data">(.*?)</script>', text, re.S)
    assert m, "the page carries its data"
    return json.loads(m.group(1))


def node_of(data, path) -> dict:
    found = [n for n in data["nodes"].values() if n["path"] == path]
    assert len(found) == 1, (path, len(found))
    return found[0]


def svg_groups(text) -> dict:
    """data-path -> (status, fill colour of its shape, bounding box) for every node group of the SVG."""
    out = {}
    for m in re.finditer(r'<g id="mxn\d+" class="node[^"]*" data-path="([^"]*)" data-status="([^"]*)"[^>]*>(.*?)</g>',
                         text, re.S):
        body = m.group(3)
        fill = re.search(r'<(?:path|polygon) fill="([^"]+)"', body).group(1)
        shape = re.search(r'<(?:path|polygon) [^>]*(?:d|points)="([^"]+)"', body).group(1)
        nums = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", shape)]
        xs, ys = nums[0::2], nums[1::2]
        out[htmlmod.unescape(m.group(1))] = (m.group(2), fill, (min(xs), min(ys), max(xs), max(ys)))
    return out


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "cnn.keras"
    save_model(make_cnn(), path)
    return path


# ---- the page as data -----------------------------------------------------------------------------------

@needs_dot
def test_plan_html_colours_and_statements(tmp_path, cnn_path):
    recipe = write(tmp_path / "r.recipe", "replace MaxPooling2D with AveragePooling2D\n"
                                          "select dense_1\nscale weights 0.5\n"
                                          "select conv2d_2\nfreeze\n"
                                          "remove dropout\n"
                                          "tap conv2d_1\n")
    report = tmp_path / "plan.html"
    r = run_cli("plan", recipe, cnn_path, "--html", report, "--seed", "2")
    assert r.status == 0, r.err
    assert f"wrote the report {report}" in r.out
    assert "dense_1: kernel (1936, 32) × 0.5" in r.out  # the usual plan is printed too
    data = page_data(report)
    expected = {"max_pooling2d": ["replaced"], "dense_1": ["weights"], "conv2d_2": ["frozen"],
                "dropout": ["removed"], "conv2d_1": ["tapped"], "dense_2": ["rewired"], "flatten": [],
                "dense_3": []}
    for path, tags in expected.items():
        assert node_of(data, path)["tags"] == tags, path
    stmts = node_of(data, "dense_1")["statements"]
    assert [s["text"] for s in stmts] == ["scale weights 0.5"]
    assert stmts[0]["location"].endswith("r.recipe:3:1")
    assert stmts[0]["changes"] == ["dense_1: kernel (1936, 32) × 0.5", "dense_1: bias (32,) × 0.5"]
    assert [s["text"] for s in node_of(data, "max_pooling2d")["statements"]] == [
        "replace MaxPooling2D with AveragePooling2D"]
    assert node_of(data, "max_pooling2d")["type"] == "AveragePooling2D"
    assert node_of(data, "dense_1")["params"] == 1936 * 32 + 32
    assert node_of(data, "conv2d_1")["output_shape"] == "(None, 26, 26, 8)"
    # the drawing: fill colours and data attributes on the nodes dot placed
    groups = svg_groups(report.read_text(encoding="utf-8"))
    for path, tags in expected.items():
        status, fill, _ = groups[path]
        assert status == (tags[0] if tags else "unchanged")
        assert fill == (STATUS_COLORS[tags[0]] if tags else "#ffffff"), path
    assert {"image", "output 0", "output 1"} <= set(groups)
    counts = {s["key"]: s["count"] for s in data["statuses"]}
    assert counts == {"removed": 1, "added": 0, "replaced": 1, "renamed": 0, "tapped": 1, "quantized": 0, "cast": 0,
                      "lora": 0, "weights": 1, "frozen": 1, "unfrozen": 0, "config": 0, "rewired": 1}


@needs_dot
def test_page_is_self_contained(tmp_path, cnn_path):
    report = tmp_path / "same.html"
    r = run_cli("diff", cnn_path, cnn_path, "--html", report)
    assert r.status == 0, r.err
    text = report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # the only URLs are the SVG namespaces, which are names, not downloads
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", text))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls
    assert not re.search(r"<link\b|<img\b|<iframe\b|\bsrc=|@import|url\(", text)
    assert text.count("<script") == 2 and "<style>" in text  # inline script and data, inline CSS
    assert "{{" not in text  # every placeholder was filled
    assert "no layer changed" in text
    assert all(n["tags"] == [] for n in page_data(report)["nodes"].values())


@needs_dot
def test_diff_html_names_statements_from_provenance(tmp_path, cnn_path):
    recipe = write(tmp_path / "r.recipe", 'select dense_2\nrename to "fc"\nselect dense_3\nfreeze\n')
    b = tmp_path / "b.keras"
    assert run_cli("apply", recipe, cnn_path, "-o", b).status == 0
    report = tmp_path / "diff.html"
    r = run_cli("diff", cnn_path, b, "--html", report)
    assert r.status == 1, r.err
    data = page_data(report)
    fc = node_of(data, "fc")
    assert fc["tags"] == ["renamed"]
    assert [s["text"] for s in fc["statements"]] == ['rename to "fc"']
    assert "renamed from dense_2" in fc["lines"]
    assert [s["text"] for s in node_of(data, "dense_3")["statements"]] == ["freeze"]
    assert node_of(data, "dense_3")["tags"] == ["frozen"]
    assert node_of(data, "dense_1")["statements"] == []
    # the same diff with an unrelated A: the record does not describe it, so no statements are claimed
    other = tmp_path / "other.keras"
    from modelxform.samples import cnn
    save_model(cnn(seed=5), other)
    run_cli("diff", other, b, "--html", report)
    assert all(n["statements"] == [] for n in page_data(report)["nodes"].values())


@needs_dot
def test_nested_models_are_drawn_as_boxes(tmp_path):
    a, b = make_nested(), make_nested()
    b.get_layer("backbone").get_layer("block").get_layer("conv_a").trainable = False
    report = tmp_path / "nested.html"
    write_report(report, diff(snapshot(a), snapshot(b)), title="nested")
    text = report.read_text(encoding="utf-8")
    clusters = {}
    for m in re.finditer(r'<g id="mxc\d+" class="cluster">.*?<(?:path|polygon) [^>]*(?:d|points)="([^"]+)".*?'
                         r'<text[^>]*>([^<]*)</text>', text, re.S):
        nums = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", m.group(1))]
        clusters[htmlmod.unescape(m.group(2))] = (min(nums[0::2]), min(nums[1::2]), max(nums[0::2]), max(nums[1::2]))
    assert set(clusters) == {"backbone (Functional)", "backbone/block (Sequential)"}
    groups = svg_groups(text)

    def inside(box, outer):
        return outer[0] <= box[0] and outer[1] <= box[1] and box[2] <= outer[2] and box[3] <= outer[3]
    assert groups["backbone/block/conv_a"][0] == "frozen"
    assert inside(groups["backbone/block/conv_a"][2], clusters["backbone/block (Sequential)"])
    assert inside(groups["backbone/conv1"][2], clusters["backbone (Functional)"])
    assert not inside(groups["backbone/conv1"][2], clusters["backbone/block (Sequential)"])
    assert not inside(groups["head"][2], clusters["backbone (Functional)"])


def test_missing_dot_is_a_clear_error(tmp_path, cnn_path, monkeypatch):
    import modelxform.report_html as report_html
    monkeypatch.setattr(report_html.shutil, "which", lambda name: None)
    recipe = write(tmp_path / "r.recipe", "select dense_1\nfreeze\n")
    report = tmp_path / "plan.html"
    for argv in (["plan", recipe, cnn_path, "--html", report], ["diff", cnn_path, cnn_path, "--html", report]):
        r = run_cli(*argv)
        assert r.status == 2, r.err
        assert "needs Graphviz's `dot`" in r.err and "apt-get install graphviz" in r.err
        assert r.out == "" and not report.exists()


# ---- DenseNet121: readable -----------------------------------------------------------------------------

@needs_dot
def test_densenet121_layout_is_readable(tmp_path):
    model = keras.applications.DenseNet121(input_shape=(32, 32, 3), weights=None, classes=10)
    new, _ = compile_recipe("replace MaxPooling2D with AveragePooling2D\n"
                            "select \"conv5_*\"\nfreeze\n"
                            "select \"conv4_block*_1_conv\"\nscale weights 0.9\n", "d.recipe").apply(model, seed=1)
    report = tmp_path / "densenet.html"
    view = write_report(report, diff(snapshot(model), snapshot(new)), title="DenseNet121")
    groups = svg_groups(report.read_text(encoding="utf-8"))
    layers = [g for g in groups.values() if g[0] not in ("input", "output")]
    assert len(layers) == len(model.layers) - 1  # every layer drawn (the input separately)
    assert groups["pool1"][:2] == ("replaced", STATUS_COLORS["replaced"])
    assert groups["conv4_block7_1_conv"][:2] == ("weights", STATUS_COLORS["weights"])
    assert groups["conv5_block16_concat"][:2] == ("frozen", STATUS_COLORS["frozen"])
    assert sum(1 for s, _, _ in groups.values() if s == "frozen") == view.counts["frozen"] > 100
    # no two layer boxes overlap, and every box is large enough for its 10 pt label
    boxes = np.array([b for _, _, b in groups.values()])
    assert (boxes[:, 3] - boxes[:, 1] >= 20).all() and (boxes[:, 2] - boxes[:, 0] >= 30).all()
    x0, y0, x1, y1 = (boxes[:, i][:, None] for i in range(4))
    overlap = (x0 < x1.T) & (x0.T < x1) & (y0 < y1.T) & (y0.T < y1)
    np.fill_diagonal(overlap, False)
    assert not overlap.any()


# ---- ResNet50 in headless Chromium -----------------------------------------------------------------------

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1600, 1000)


@pytest.fixture(scope="module")
def browser():
    exe = os.environ.get("MODELXFORM_CHROMIUM") or next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no Chromium is installed: .ci/run must install Debian's chromium "
                        "(./dev test does, when run as root)")
        pytest.skip("no Chromium installed (Debian: apt-get install chromium; ./dev test installs it as root)")
    if shutil.which("dot") is None:
        pytest.fail("Chromium is installed but Graphviz's dot is not")
    return exe


def screenshot(browser, page: pathlib.Path, png: pathlib.Path, fragment: str = ""):
    profile = png.with_suffix(".profile")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=5000",
           f"--screenshot={png}", page.resolve().as_uri() + (f"#{fragment}" if fragment else "")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    shutil.rmtree(profile, ignore_errors=True)
    from PIL import Image
    with Image.open(png) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=np.int16)
    assert pixels.shape == (WINDOW[1], WINDOW[0], 3)
    return pixels


def dump_dom(browser, page: pathlib.Path, fragment: str, folder: pathlib.Path) -> str:
    """The page's DOM after its script ran (the details panel is filled in by the script)."""
    profile = folder / f"dom-{fragment}.profile"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
           "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri() + f"#{fragment}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0 and "<html" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def canvas(pixels):
    """The drawing only: without the header (legend swatches use the same colours) and the side panel."""
    css = (ROOT / "modelxform" / "report_assets" / "report.css").read_text()
    header = int(re.search(r"--mx-header:\s*(\d+)px", css).group(1))
    panel = int(re.search(r"--mx-panel:\s*(\d+)px", css).group(1))
    return pixels[header + 2:, : pixels.shape[1] - panel - 2]


def count(pixels, colour: str, tolerance: int = 6) -> int:
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    return int((np.abs(pixels - rgb).max(axis=2) <= tolerance).sum())


RESNET_RECIPE = """\
replace MaxPooling2D with AveragePooling2D
select "conv5_*"
freeze
select predictions
scale weights 0.5
tap conv3_block4_out
"""


@pytest.fixture(scope="module")
def resnet_reports(tmp_path_factory, browser):
    folder = tmp_path_factory.mktemp("resnet")
    model = keras.applications.ResNet50(input_shape=(32, 32, 3), weights=None, classes=10,
                                        classifier_activation=None)
    path = folder / "resnet50.keras"
    save_model(model, path)
    recipe = write(folder / "finetune.recipe", RESNET_RECIPE)
    plan = folder / "plan.html"
    r = run_cli("plan", recipe, path, "--html", plan)
    assert r.status == 0, r.err
    unchanged = folder / "unchanged.html"
    write_report(unchanged, diff(snapshot(model), snapshot(model)), title="ResNet50, unchanged")
    return plan, unchanged


def test_resnet50_report_in_chromium(browser, resnet_reports, tmp_path):
    plan, unchanged = resnet_reports
    data = page_data(plan)
    assert node_of(data, "pool1_pool")["tags"] == ["replaced"]
    assert node_of(data, "conv5_block2_2_conv")["tags"] == ["frozen"]
    assert node_of(data, "predictions")["tags"] == ["weights"]
    assert node_of(data, "conv3_block4_out")["tags"] == ["tapped"]

    # One layer drawn at the readable scale (1.3 px per point, boxes at least 56 x 30 px) covers well
    # over 800 pixels of its colour; in the overview strip it is a speck of a few dozen.
    first = canvas(screenshot(browser, plan, tmp_path / "plan.png"))
    assert count(first, STATUS_COLORS["replaced"]) > 800  # the page opens on the first change, pool1_pool
    # the overview shows the whole graph: the 32 frozen layers are small there, but present
    assert count(first, STATUS_COLORS["frozen"]) > 100
    for fragment, status in [("conv5_block2_2_conv", "frozen"), ("predictions", "weights"),
                             ("conv3_block4_out", "tapped")]:
        shot = canvas(screenshot(browser, plan, tmp_path / f"{fragment}.png", fragment))
        assert count(shot, STATUS_COLORS[status]) > 800, fragment
        # pool1_pool is far away now: only its speck in the overview is left
        assert 0 < count(shot, STATUS_COLORS["replaced"]) < 200, fragment
    # the details panel, as the script fills it for the layer the address names
    dom = dump_dom(browser, plan, "predictions", tmp_path)
    panel = re.search(r'<div id="mx-details">(.*?)</aside>', dom, re.S).group(1)
    assert "<h2>predictions</h2>" in panel and "weights changed" in panel
    assert "<td>params</td><td>20,490</td>" in panel and "<td>output shape</td><td>(None, 10)</td>" in panel
    assert "<code>scale weights 0.5</code>" in panel and "predictions: kernel (2048, 10) × 0.5" in panel
    assert re.search(r'<g id="mxn\d+" class="node mx_weights mx-selected" data-path="predictions"', dom)
    # the same model unchanged: none of the colours anywhere in the drawing
    control = canvas(screenshot(browser, unchanged, tmp_path / "unchanged.png"))
    for key, colour in STATUS_COLORS.items():
        assert count(control, colour) < 20, key
    assert count(control, "#ffffff") > 2000  # while the (white) layers are drawn


@pytest.mark.parametrize("recipe_text", [
    "replace MaxPooling2D with AveragePooling2D\nselect dense_1\nscale weights 0.5\nselect conv2d_2\nfreeze\n",
    "select where type=Dense\nadd noise normal(stddev=0.01) to kernel\nappend Dense(units=3, name=\"extra\")\n",
])
def test_plan_html_from_the_archive_is_the_page_from_the_loaded_model(tmp_path, cnn_path, monkeypatch, recipe_text):
    """plan --html runs the plan on the model built from the archive (large values left in the file, as
    inspect and diff do): the same page, byte for byte, as from the model Keras loads whole."""
    from modelxform import session
    recipe = write(tmp_path / "r.recipe", recipe_text)
    pages = []
    for fastpath in ("1", "0"):
        monkeypatch.setenv(session.DISABLE_ENV, fastpath)
        report = tmp_path / f"plan-{fastpath}.html"
        r = run_cli("plan", recipe, cnn_path, "--html", report, "--seed", "2")
        assert r.status == 0, r.err
        pages.append(report.read_bytes())
    assert pages[0] == pages[1]


def test_plan_html_reads_no_large_array(tmp_path, cnn_path, monkeypatch):
    """A plan changes no array, and the model before and the one after take their large arrays from the
    same archive: plan --html compares them without reading a value (variables over 1 KiB count as
    large here), and draws the same page as with every array copied."""
    from modelxform import diff as diff_module
    from modelxform.keras_io import variables
    recipe = write(tmp_path / "r.recipe", "select dense_1\nscale weights 0.5\ninsert Dropout(rate=0.1) before dense_2\n")
    copied = tmp_path / "copied.html"
    assert run_cli("plan", recipe, cnn_path, "--html", copied, "--seed", "2").status == 0
    monkeypatch.setattr(variables, "LARGE_ARRAY", 1 << 10)
    stored, read = [], []
    real_init = diff_module.StoredValues.__init__
    monkeypatch.setattr(diff_module.StoredValues, "__init__", lambda self, var: stored.append(var.path) or real_init(self, var))
    monkeypatch.setattr(diff_module.StoredValues, "rows", lambda self, a, b: read.append(self.var.path))
    in_place = tmp_path / "in-place.html"
    r = run_cli("plan", recipe, cnn_path, "--html", in_place, "--seed", "2")
    assert r.status == 0, r.err
    assert "dense_1/kernel" in stored and read == []
    assert in_place.read_bytes() == copied.read_bytes()
