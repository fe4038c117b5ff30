"""The visual report: one self-contained HTML file drawing a model's graph, with every layer coloured
by what happened to it (added, removed, replaced, renamed, quantized, cast, LoRA, weights changed,
frozen, tapped, …).

The layout is Graphviz's ``dot`` (a layered layout made for directed graphs: it keeps a 400-layer
DenseNet readable, with nested models drawn as boxes around their layers). This module writes the graph
in the DOT language, runs ``dot -Tsvg`` and inlines the SVG in the page together with the layer details
as JSON and a small script for zoom, pan, search and the details panel. Nothing is loaded from the
network: the page works offline and can be mailed or attached to a review::

    modelxform diff base.keras tuned.keras --html report.html
    modelxform plan prep.recipe base.keras --html report.html
"""
from __future__ import annotations

import html
import json
import pathlib
import re
import shutil
import subprocess
from dataclasses import dataclass, field

from .errors import UsageError

# What can happen to a layer, in the order that decides a node's fill colour (the first tag wins; a
# second tag colours the border). The colours are part of the page's contract: the browser test looks
# for them in a screenshot.
STATUSES = [
    ("removed", "removed", "#e45756", "in the first model only"),
    ("added", "added", "#54a24b", "in the second model only"),
    ("replaced", "replaced", "#f58518", "same path, another layer type (or a `replace` statement)"),
    ("renamed", "renamed", "#72b7b2", "another name, same type, config and weights"),
    ("tapped", "tapped", "#b279a2", "became a model output"),
    ("quantized", "quantized", "#3b3b98", "its dtype policy became a quantized one (int8, int4, float8)"),
    ("cast", "dtype changed", "#bcbd22", "its dtype policy changed (bfloat16, float16, mixed, …)"),
    ("lora", "LoRA", "#17becf", "LoRA adapters added, changed or merged"),
    ("weights", "weights changed", "#4c78a8", "at least one weight array differs"),
    ("frozen", "frozen", "#9ecae9", "trainable: True -> False"),
    ("unfrozen", "unfrozen", "#eeca3b", "trainable: False -> True"),
    ("config", "config changed", "#ff9da6", "a config field differs"),
    ("rewired", "rewired", "#9d755d", "its inputs come from other layers"),
]
STATUS_COLORS = {key: color for key, _, color, _ in STATUSES}
UNCHANGED_FILL = "#ffffff"
INPUT_FILL = "#e8e8e8"
OUTPUT_FILL = "#f2f2f2"


def dot_executable() -> str | None:
    return shutil.which("dot")


def require_dot() -> str:
    """The path of Graphviz's ``dot``, or a clear error saying how to install it."""
    exe = dot_executable()
    if exe is None:
        raise UsageError("--html needs Graphviz's `dot` program to lay out the graph, and it is not on PATH",
                         hint="install Graphviz (Debian/Ubuntu: apt-get install graphviz; macOS: brew install "
                              "graphviz); ./dev test and ./dev demo install it when run as root")
    return exe


# ---- the view: nodes, edges and clusters with their tags and details -------------------------------

@dataclass
class Node:
    id: str
    path: str
    type: str
    kind: str = "layer"  # layer, input or output
    tags: list = field(default_factory=list)
    container: str = ""
    details: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.tags[0] if self.tags else ("input" if self.kind == "input" else
                                               "output" if self.kind == "output" else "unchanged")


@dataclass
class View:
    title: str
    subtitle: str
    nodes: list
    edges: list  # (src id, dst id, style) with style "same", "old" (first model only), "new"
    clusters: dict  # container path -> type name (a nested model's, or a composite layer's)
    summary: list  # lines
    statements: list  # [{"text", "location", "changes"}]
    counts: dict = field(default_factory=dict)  # status -> number of layers with that tag
    # edge index -> (tail cluster path, head cluster path): an edge from or to a composite layer is drawn
    # from or to the box around its sublayers (which are not nodes of the graph themselves)
    edge_ends: dict = field(default_factory=dict)
    composites: list = field(default_factory=list)  # cluster paths that are composite layers, not models


def _tokens_of(text: str) -> set[str]:
    return set(re.findall(r"[\w./-]+", text))


def build_view(d, *, title: str, subtitle: str = "", statements=None) -> View:
    """The graph to draw for a ModelDiff ``d``: B's layers, plus A's removed layers drawn where they were.

    ``statements`` (optional): [{"text", "location", "tag", "layers", "changes"}], the recipe statements
    that made B from A; each layer lists the statements that name it, and a statement's tag (its kind's
    plan_tag) marks what a plan cannot show in the weights (a plan changes no arrays).
    """
    a, b = d.a, d.b
    ids: dict[str, str] = {}

    def nid(key: str) -> str:
        if key not in ids:
            ids[key] = f"mxn{len(ids)}"
        return ids[key]

    tags: dict[str, list[str]] = {}

    def tag(path: str, what: str) -> None:
        lst = tags.setdefault(path, [])
        if what not in lst:
            lst.append(what)

    rename_back = {pb: pa for pa, pb in d.renamed}
    rename = dict(d.renamed)
    for p in d.removed:
        tag(p, "removed")
    for p in d.added:
        tag(p, "added")
    for p, _, _ in d.replaced:
        tag(p, "replaced")
    for _, pb in d.renamed:
        tag(pb, "renamed")
    outs_a = {rename.get(o["layer"], o["layer"]) for o in a.outputs}
    for o in b.outputs:
        if o["layer"] and o["layer"] not in outs_a and o["layer"] not in d.added:
            tag(o["layer"], "tapped")
    for c in d.changed:
        if c.policy:
            tag(c.path, "quantized" if c.quantized else "cast")
        if c.lora:
            tag(c.path, "lora")
        if c.weights:
            tag(c.path, "weights")
        if c.trainable:
            tag(c.path, "frozen" if c.trainable == (True, False) else "unfrozen")
        if c.config:
            tag(c.path, "config")
        if c.inbound:
            tag(c.path, "rewired")

    # statements: which ones name each layer
    touched: dict[str, list[dict]] = {}
    statements = list(statements or [])
    for index, s in enumerate(statements):
        layers = list(s.get("layers") or [])
        if not layers:  # from provenance: find the layers the statement's lines name
            words = set()
            for line in s.get("changes", []):
                words |= _tokens_of(line)
            layers = [p for p in list(b.layers) + d.removed if p in words or p.rstrip(":") in words]
        for p in layers:
            mine = [line for line in s.get("changes", []) if p in _tokens_of(line) or f"{p}:" in line]
            touched.setdefault(p, []).append({"index": index, "text": s["text"], "location": s.get("location", ""),
                                              "changes": (mine or list(s.get("changes", [])))[:8]})
            plan_tag = s.get("tag")  # the statement kind's plan_tag (modelxform/statements/)
            if plan_tag == "weights" and p in b.layers and b.layers[p].weights:
                tag(p, "weights")
            elif plan_tag in STATUS_COLORS and plan_tag != "weights" and (p in b.layers or p in b.input_names):
                tag(p, plan_tag)  # replaced, config (an input whose shape `set input shape` changed), …

    order = [key for key, _, _, _ in STATUSES]
    nodes: list[Node] = []
    clusters: dict[str, str] = {}
    for s in (a.submodels + b.submodels):
        clusters.setdefault(s["path"], s["type"])
    for path, c in list(b.composites.items()) + list(a.composites.items()):
        clusters.setdefault(path, c["type"])

    def layer_node(path: str, facts, snap_name: str) -> Node:
        tl = sorted(tags.get(path, []), key=order.index)
        details = {"path": path, "type": facts.type, "input_shape": facts.input_shape,
                   "output_shape": facts.output_shape, "params": facts.params,
                   "trainable": facts.trainable, "calls": facts.calls, "from": snap_name, "lines": []}
        change = d.change(path)
        if change is not None:
            details["lines"] = change.lines()
        for p, ta, tb in d.replaced:
            if p == path:
                old = a.layers[p]
                details["lines"].insert(0, f"type: {ta} -> {tb}; params {old.params:,} -> {facts.params:,}; "
                                           f"output {old.output_shape} -> {facts.output_shape}")
        if path in rename_back:
            details["lines"].insert(0, f"renamed from {rename_back[path]}")
        details["statements"] = touched.get(path, []) + (
            touched.get(rename_back[path], []) if path in rename_back else [])
        return Node(nid(path), path, facts.type, "layer", tl, facts.container, details)

    # inputs of both models (B's first), then B's layers with A's removed ones next to their neighbours
    input_names = list(b.input_names) + [n for n in a.input_names if n not in b.input_names]
    for name in input_names:
        spec = next((i for i in b.inputs if i["name"] == name), None)
        removed = spec is None
        spec = spec or next(i for i in a.inputs if i["name"] == name)
        input_tags = ["removed"] if removed else [t for t in tags.get(name, []) if t != "removed"]
        nodes.append(Node(nid(name), name, "Input", "input", input_tags, "",
                          {"path": name, "type": "Input", "output_shape": spec["shape"], "dtype": spec["dtype"],
                           "lines": [], "statements": []}))
    for path, facts in b.layers.items():
        nodes.append(layer_node(path, facts, b.name))
    for path in d.removed:
        nodes.append(layer_node(path, a.layers[path], a.name))
    for k, o in enumerate(b.outputs):
        key = f"\0output{k}"
        nodes.append(Node(nid(key), f"output {k}", "Output", "output", [], "",
                          {"path": f"output {k}", "type": "model output", "output_shape": o["shape"],
                           "layer": o["layer"], "lines": [], "statements": []}))

    edges_b = {(src, dst) for src, dst in b.edges}
    edges_a = {(rename.get(src, src), rename.get(dst, dst)) for src, dst in a.edges}
    members: dict[str, list[str]] = {}
    for n in nodes:
        if n.kind == "layer":
            parts = n.path.split("/")
            for k in range(1, len(parts)):
                members.setdefault("/".join(parts[:k]), []).append(n.id)
    composites = set(a.composites) | set(b.composites)

    def end(path: str, first: bool):
        """(node id, cluster path or None) standing for a path: its node, or for a composite layer the
        first (for an edge into it) or last (out of it) of its sublayers' nodes."""
        if path in ids and path not in composites:
            return ids[path], None
        inside = members.get(path)
        if path in composites and inside:
            return (inside[0] if first else inside[-1]), path
        return None, None

    edges, edge_ends = [], {}

    def add(src: str, dst: str, style: str) -> None:
        (s_id, s_cluster), (d_id, d_cluster) = end(src, False), end(dst, True)
        if s_id is not None and d_id is not None and s_id != d_id:
            if s_cluster or d_cluster:
                edge_ends[len(edges)] = (s_cluster, d_cluster)
            edges.append((s_id, d_id, style))
    for src, dst in b.edges:
        add(src, dst, "same" if (src, dst) in edges_a or not a.connected else "new")
    for src, dst in sorted(edges_a - edges_b):
        if b.connected:
            add(src, dst, "old")
    for k, o in enumerate(b.outputs):
        if o["layer"] is not None:
            ids.setdefault(f"\0output{k}", nid(f"\0output{k}"))
            add(o["layer"], f"\0output{k}", "new" if "tapped" in tags.get(o["layer"], []) else "same")

    counts = {key: 0 for key in order}
    for n in nodes:
        if n.kind == "layer":
            for t in n.tags:
                counts[t] += 1
    summary = [d.summary()]
    if d.inputs:
        summary.append("model inputs changed")
    if d.outputs:
        summary.append("model outputs: " + ", ".join(f"{o['layer'] or '?'} {o['shape']}" for o in d.outputs[0])
                       + " -> " + ", ".join(f"{o['layer'] or '?'} {o['shape']}" for o in d.outputs[1]))
    return View(title, subtitle, nodes, edges, clusters, summary,
                [{"text": s["text"], "location": s.get("location", ""), "changes": list(s.get("changes", []))[:50]}
                 for s in statements], counts, edge_ends, sorted(composites))


def statements_from_report(report) -> list[dict]:
    """The recipe statements of a Plan, for build_view (selections left out: they change nothing)."""
    out = []
    for s in report.statements:
        if s.statement.role == "select":
            continue
        out.append({"text": str(s.statement), "location": s.location, "tag": s.statement.plan_tag,
                    "layers": list(s.layers), "changes": list(s.changes) + [f"({n})" for n in s.notes]})
    return out


def statements_from_provenance(record: dict | None, input_sha256: str) -> list[dict]:
    """The statements of the last recipe in a provenance record, if it was applied to this input."""
    if not record or not record.get("chain"):
        return []
    step = record["chain"][-1]
    if step.get("input_sha256") != input_sha256:
        return []
    out = []
    for line in step.get("statements", []):
        text, _, details = line.partition(" :: ")
        if text.startswith("select"):
            continue
        out.append({"text": text, "location": "", "tag": None, "layers": [],
                    "changes": [x.strip() for x in details.split("; ") if x.strip()] if details else []})
    return out


# ---- DOT and the layout ------------------------------------------------------------------------------

def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dark(color: str) -> bool:
    """Whether white text reads better than black on this fill (relative luminance, WCAG)."""
    def channel(c):
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    lum = 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)
    return (1.05 / (lum + 0.05)) > ((lum + 0.05) / 0.05)


def to_dot(view: View) -> str:
    lines = ["digraph model {",
             '  graph [rankdir=TB, nodesep=0.18, ranksep=0.28, newrank=true, bgcolor="transparent", '
             'fontname="Helvetica", fontsize=11, labeljust=l, margin=0.2];',
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, height=0.32, '
             'width=0.6, margin="0.08,0.03", color="#8a8a8a", fillcolor="#ffffff", penwidth=1];',
             '  edge [color="#9a9a9a", arrowsize=0.5, penwidth=1];']
    by_container: dict[str, list[Node]] = {}
    for n in view.nodes:
        by_container.setdefault(n.container, []).append(n)

    def node_line(n: Node) -> str:
        name = n.path.split("/")[-1]
        label = f"{name}\n{n.type}" if n.kind == "layer" else f"{n.path}\n{n.details.get('output_shape', '')}"
        if n.kind == "layer" and n.details.get("calls", 1) > 1:
            label += f" ×{n.details['calls']}"
        attrs = {"id": n.id, "label": label, "class": f"mx_{n.status}"}
        if n.kind == "input":
            attrs.update(shape="box", style="filled", fillcolor=INPUT_FILL)
        elif n.kind == "output":
            attrs.update(shape="box", style="filled,dashed", fillcolor=OUTPUT_FILL)
        if n.tags:
            attrs["fillcolor"] = STATUS_COLORS[n.tags[0]]
            attrs["color"] = STATUS_COLORS[n.tags[1]] if len(n.tags) > 1 else "#555555"
            attrs["penwidth"] = "3" if len(n.tags) > 1 else "1.2"
            if n.tags[0] == "removed":
                attrs["style"] = "rounded,filled,dashed"
            if _dark(STATUS_COLORS[n.tags[0]]):
                attrs["fontcolor"] = "#ffffff"
        return f"{n.id} [" + ", ".join(f"{k}={_q(str(v))}" for k, v in attrs.items()) + "];"

    containers = sorted(set(view.clusters) | {c for c in by_container if c})
    children: dict[str, list[str]] = {}
    for c in containers:
        parent = "/".join(c.split("/")[:-1])
        children.setdefault(parent, []).append(c)

    def emit(container: str, indent: str) -> None:
        for n in by_container.get(container, []):
            lines.append(indent + node_line(n))
        for child in children.get(container, []):
            k = containers.index(child)
            lines.append(f"{indent}subgraph cluster_{k} {{")
            lines.append(f'{indent}  id="mxc{k}"; label={_q(child + " (" + view.clusters.get(child, "model") + ")")}; '
                         f'style="rounded,dashed"; color="#7f7f7f"; fontcolor="#555555";')
            emit(child, indent + "  ")
            lines.append(indent + "}")
    emit("", "  ")
    # a composite layer's sublayers are no nodes of the graph: stack them in their box, one under the other
    tops = [c for c in view.composites if not any(c.startswith(o + "/") for o in view.composites)]
    for top in tops:
        stack = [n.id for n in view.nodes if n.kind == "layer" and n.path.startswith(top + "/")]
        for upper, lower in zip(stack, stack[1:]):
            lines.append(f"  {upper} -> {lower} [style=invis];")
    for k, (src, dst, style) in enumerate(view.edges):
        attrs = {"id": f"mxe{k}"}
        # (an edge into or out of a composite layer meets the first or last layer of its box: Graphviz's
        # lhead/ltail, which would end it at the box, fails an assertion on such nested boxes)
        if style == "old":
            attrs.update(color=STATUS_COLORS["removed"], style="dashed", constraint="false")
        elif style == "new":
            attrs.update(color=STATUS_COLORS["added"], penwidth="1.6")
        lines.append(f"  {src} -> {dst} ["
                     + ", ".join(f"{k2}={_q(v)}" for k2, v in attrs.items()) + "];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def layout_svg(dot_text: str, *, timeout: float = 300) -> str:
    """Run ``dot -Tsvg`` on ``dot_text``; the SVG, ready to inline (no XML prolog, no titles)."""
    exe = require_dot()
    try:
        proc = subprocess.run([exe, "-Tsvg"], input=dot_text.encode("utf-8"), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UsageError(f"Graphviz's dot took more than {timeout:.0f} s to lay out the graph") from None
    if proc.returncode != 0:
        message = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise UsageError("Graphviz's dot failed to lay out the graph: " + (message[-1] if message else "no message"))
    svg = proc.stdout.decode("utf-8")
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    svg = re.sub(r"<title>.*?</title>", "", svg, flags=re.S)
    # the page sizes the drawing; dot's width/height in points would fix it at print size
    svg = re.sub(r'<svg width="[^"]*" height="[^"]*"', '<svg id="mx-svg" width="100%" height="100%"', svg, count=1)
    return svg


def _annotate(svg: str, view: View) -> str:
    """data-* attributes on each node's group, so that styles and scripts can find them by path."""
    by_id = {n.id: n for n in view.nodes}

    def fix(match):
        node = by_id.get(match.group(1))
        if node is None:
            return match.group(0)
        return (f'<g id="{node.id}" class="node mx_{node.status}" data-path="{html.escape(node.path, quote=True)}" '
                f'data-status="{node.status}" data-tags="{" ".join(node.tags)}"')
    return re.sub(r'<g id="(mxn\d+)" class="[^"]*"', fix, svg)


# ---- the page ----------------------------------------------------------------------------------------

_ASSET_DIR = pathlib.Path(__file__).with_name("report_assets")


def _asset(name: str) -> str:
    return (_ASSET_DIR / name).read_text(encoding="utf-8")


def render_html(view: View, svg: str) -> str:
    data = {"title": view.title, "nodes": {n.id: {"path": n.path, "type": n.type, "kind": n.kind, "tags": n.tags,
                                                  "status": n.status, **n.details} for n in view.nodes},
            "edges": [[s, t, style] for s, t, style in view.edges],
            "statuses": [{"key": k, "label": label, "color": c, "help": h, "count": view.counts.get(k, 0)}
                         for k, label, c, h in STATUSES],
            "statements": view.statements, "summary": view.summary}
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    legend = "".join(
        f'<button class="mx-legend" data-status="{k}" title="{html.escape(h)}: click to visit them in turn">'
        f'<span class="mx-swatch" style="background:{c}"></span>{html.escape(label)} '
        f'<b>{view.counts.get(k, 0)}</b></button>'
        for k, label, c, h in STATUSES if view.counts.get(k, 0))
    if not legend:
        legend = '<span class="mx-nochange">no layer changed</span>'
    summary = "".join(f"<div>{html.escape(line)}</div>" for line in view.summary)
    values = {"TITLE": html.escape(view.title), "SUBTITLE": html.escape(view.subtitle), "SUMMARY": summary,
              "LEGEND": legend, "CSS": _asset("report.css"), "SVG": _annotate(svg, view), "DATA": payload,
              "JS": _asset("report.js")}
    # one pass, so that text inside a value (a layer name, say) is never taken for a placeholder
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda m: values[m.group(1)], _asset("report.html"))


def write_html(path, text: str) -> None:
    """Write the page atomically (temporary file in the destination folder, then rename;
    keras_io.outputs.write_text_atomically)."""
    from .keras_io.outputs import write_text_atomically
    write_text_atomically(path, text)


def write_report(path, d, *, title: str, subtitle: str = "", statements=None) -> View:
    """Lay out and write the report of ModelDiff ``d`` to ``path``; returns the View drawn."""
    view = build_view(d, title=title, subtitle=subtitle, statements=statements)
    svg = layout_svg(to_dot(view))
    write_html(path, render_html(view, svg))
    return view
