// modelxform report: zoom and pan on the SVG's viewBox, a details panel, search and the legend's visits.
// Kept small and dependency-free: the page must work offline, opened straight from disk.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("mx-data").textContent);
  var canvas = document.getElementById("mx-canvas");
  var svg = document.getElementById("mx-svg");
  var details = document.getElementById("mx-details");
  if (!svg) { return; }
  var base = svg.viewBox.baseVal;
  var full = { x: base.x, y: base.y, w: base.width, h: base.height };
  var vb = { x: full.x, y: full.y, w: full.w, h: full.h };
  var selected = null;

  function apply() {
    svg.setAttribute("viewBox", vb.x + " " + vb.y + " " + vb.w + " " + vb.h);
    if (typeof updateOverview === "function") { updateOverview(); }
  }
  function fit() {
    // the whole graph, but a small one no larger than 1.5 px per point (huge boxes read worse)
    var box = canvas.getBoundingClientRect();
    var s = Math.min(box.width / full.w, box.height / full.h);
    if (s > 1.5 && box.width > 0) {
      var w = box.width / 1.5, h = box.height / 1.5;
      vb = { x: full.x + full.w / 2 - w / 2, y: full.y + full.h / 2 - h / 2, w: w, h: h };
    } else {
      vb = { x: full.x, y: full.y, w: full.w, h: full.h };
    }
    apply();
  }
  function scale() { var m = svg.getScreenCTM(); return m ? m.a : 1; }
  function toSvg(cx, cy) {
    var m = svg.getScreenCTM();
    if (!m) { return { x: vb.x, y: vb.y }; }
    var p = svg.createSVGPoint(); p.x = cx; p.y = cy;
    p = p.matrixTransform(m.inverse());
    return { x: p.x, y: p.y };
  }
  function zoomAt(cx, cy, k) {
    var p = toSvg(cx, cy);
    var w = vb.w * k;
    if (w < 40 || w > full.w * 8) { return; }
    vb.x = p.x - (p.x - vb.x) * k; vb.y = p.y - (p.y - vb.y) * k;
    vb.w = w; vb.h = vb.h * k; apply();
  }
  function zoomCentre(k) {
    var r = canvas.getBoundingClientRect();
    zoomAt(r.left + r.width / 2, r.top + r.height / 2, k);
  }
  var READABLE = 1.3;  // screen pixels per SVG point when showing one layer: 10 pt labels at 13 px
  function showNode(g) {
    // centre the node, at a scale where labels are readable
    var r = g.getBoundingClientRect();
    var c = toSvg(r.left + r.width / 2, r.top + r.height / 2);
    var box = canvas.getBoundingClientRect();
    var w = box.width / READABLE, h = box.height / READABLE;
    vb = { x: c.x - w / 2, y: c.y - h / 2, w: w, h: h }; apply();
  }
  function initialView() {
    // small graphs: all of it; large ones (a DenseNet is ~100 times taller than wide) would be specks,
    // so show the first changed layer at a readable scale and leave the whole to the overview
    var box = canvas.getBoundingClientRect();
    var fitScale = Math.min(box.width / full.w, box.height / full.h);
    if (fitScale >= 0.6) { fit(); return; }
    var first = null, top = Infinity;
    Array.prototype.forEach.call(svg.querySelectorAll("g.node"), function (g) {
      if (!(data.nodes[g.id] && data.nodes[g.id].tags.length)) { return; }
      var y = g.getBoundingClientRect().top;
      if (y < top) { top = y; first = g; }
    });
    if (first) { showNode(first); return; }
    var w = box.width / READABLE, h = box.height / READABLE;
    vb = { x: full.x + full.w / 2 - w / 2, y: full.y, w: w, h: h }; apply();
  }

  // the overview: the whole graph, small, with the visible part outlined; click or drag to move there
  var overview = document.getElementById("mx-overview");
  var ovSvg = null, ovRect = null;
  function setupOverview() {
    var box = canvas.getBoundingClientRect();
    var fitScale = Math.min(box.width / full.w, box.height / full.h);
    if (fitScale >= 0.6 || !overview) { if (overview) { overview.style.display = "none"; } return; }
    var ns = "http://www.w3.org/2000/svg";
    var height = box.height - 16;
    var width = Math.max(40, Math.min(box.width * 0.3, height * full.w / full.h));
    overview.style.width = width + "px";
    ovSvg = document.createElementNS(ns, "svg");
    ovSvg.setAttribute("viewBox", full.x + " " + full.y + " " + full.w + " " + full.h);
    ovSvg.setAttribute("width", "100%"); ovSvg.setAttribute("height", "100%");
    var use = document.createElementNS(ns, "use");
    use.setAttribute("href", "#graph0");
    ovSvg.appendChild(use);
    ovRect = document.createElementNS(ns, "rect");
    ovRect.setAttribute("class", "mx-viewport");
    ovSvg.appendChild(ovRect);
    overview.appendChild(ovSvg);
    var moving = false;
    function moveTo(e) {
      var m = ovSvg.getScreenCTM(); if (!m) { return; }
      var p = ovSvg.createSVGPoint(); p.x = e.clientX; p.y = e.clientY; p = p.matrixTransform(m.inverse());
      vb.x = p.x - vb.w / 2; vb.y = p.y - vb.h / 2; apply();
    }
    overview.addEventListener("mousedown", function (e) { moving = true; moveTo(e); e.stopPropagation(); e.preventDefault(); });
    overview.addEventListener("click", function (e) { e.stopPropagation(); });
    overview.addEventListener("wheel", function (e) { e.stopPropagation(); }, { passive: true });
    window.addEventListener("mousemove", function (e) { if (moving) { moveTo(e); } });
    window.addEventListener("mouseup", function () { moving = false; });
  }
  function updateOverview() {
    if (!ovRect) { return; }
    // the part of the graph the main view shows (the viewBox, widened by the letterboxing)
    var box = canvas.getBoundingClientRect();
    var a = toSvg(box.left, box.top), b = toSvg(box.right, box.bottom);
    ovRect.setAttribute("x", a.x); ovRect.setAttribute("y", a.y);
    ovRect.setAttribute("width", Math.max(1, b.x - a.x)); ovRect.setAttribute("height", Math.max(1, b.y - a.y));
  }

  canvas.addEventListener("wheel", function (e) {
    e.preventDefault();
    zoomAt(e.clientX, e.clientY, Math.exp(e.deltaY * (e.deltaMode === 1 ? 0.05 : 0.0015)));
  }, { passive: false });
  var drag = null;
  canvas.addEventListener("mousedown", function (e) {
    if (e.button !== 0) { return; }
    drag = { x: e.clientX, y: e.clientY, vx: vb.x, vy: vb.y, moved: false, s: scale() };
    canvas.classList.add("mx-dragging");
  });
  window.addEventListener("mousemove", function (e) {
    if (!drag) { return; }
    var dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) { drag.moved = true; }
    vb.x = drag.vx - dx / drag.s; vb.y = drag.vy - dy / drag.s; apply();
  });
  window.addEventListener("mouseup", function () {
    canvas.classList.remove("mx-dragging");
    setTimeout(function () { drag = null; }, 0);
  });

  function esc(s) {
    return String(s === undefined || s === null ? "" : s).replace(/[&<>"]/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c];
    });
  }
  var colors = {}, labels = {};
  data.statuses.forEach(function (s) { colors[s.key] = s.color; labels[s.key] = s.label; });

  function render(id) {
    var n = data.nodes[id];
    if (!n) { return; }
    var h = "<h2>" + esc(n.path) + "</h2><div>";
    (n.tags || []).forEach(function (t) {
      h += '<span class="mx-tag" style="background:' + colors[t] + '">' + esc(labels[t]) + "</span>";
    });
    if (!n.tags || !n.tags.length) { h += '<span class="mx-tag">' + esc(n.status) + "</span>"; }
    h += "</div><table>";
    var rows = [["type", n.type], ["input shape", n.input_shape], ["output shape", n.output_shape],
                ["params", n.params === undefined ? undefined : Number(n.params).toLocaleString("en-US")],
                ["trainable", n.trainable === undefined ? undefined : (n.trainable ? "yes" : "no")],
                ["dtype", n.dtype], ["layer", n.layer],
                ["calls", n.calls > 1 ? n.calls + " (shared layer)" : undefined]];
    rows.forEach(function (r) {
      if (r[1] !== undefined && r[1] !== null) { h += "<tr><td>" + esc(r[0]) + "</td><td>" + esc(r[1]) + "</td></tr>"; }
    });
    h += "</table>";
    if (n.lines && n.lines.length) {
      h += "<b>What changed</b><ul>";
      n.lines.forEach(function (l) { h += "<li><code>" + esc(l) + "</code></li>"; });
      h += "</ul>";
    }
    if (n.statements && n.statements.length) {
      h += "<b>Statements that touched it</b>";
      n.statements.forEach(function (s) {
        h += '<div class="mx-stmt"><code>' + esc(s.text) + "</code>" +
             (s.location ? ' <span class="mx-hint">' + esc(s.location) + "</span>" : "") + "<ul>";
        (s.changes || []).forEach(function (c) { h += "<li><code>" + esc(c) + "</code></li>"; });
        h += "</ul></div>";
      });
    }
    details.innerHTML = h;
  }

  function mark(id, on) {
    var g = document.getElementById(id);
    if (g) { g.classList.toggle("mx-selected", on); }
    data.edges.forEach(function (e, k) {
      var eg = document.getElementById("mxe" + k);
      if (!eg) { return; }
      if (e[1] === id) { eg.classList.toggle("mx-in", on); }
      if (e[0] === id) { eg.classList.toggle("mx-out", on); }
    });
  }
  function select(id) {
    if (selected) { mark(selected, false); }
    selected = id;
    if (id) { mark(id, true); render(id); }
    // the address names the selected layer, so a link to it can be shared (report.html#conv1_conv)
    if (window.history && history.replaceState) {
      var path = id && data.nodes[id] ? data.nodes[id].path : "";
      try { history.replaceState(null, "", path ? "#" + encodeURIComponent(path) : location.pathname + location.search); } catch (err) { /* file: URLs in some browsers */ }
    }
  }
  function fromHash() {
    var want = decodeURIComponent((location.hash || "").slice(1));
    if (!want) { return false; }
    var found = null;
    Array.prototype.forEach.call(svg.querySelectorAll("g.node"), function (g) {
      if (!found && g.getAttribute("data-path") === want) { found = g; }
    });
    if (!found) { return false; }
    showNode(found); select(found.id);
    return true;
  }

  Array.prototype.forEach.call(svg.querySelectorAll("g.node"), function (g) {
    g.addEventListener("mouseenter", function () { if (!selected) { render(g.id); } });
    g.addEventListener("click", function (e) {
      if (drag && drag.moved) { return; }
      e.stopPropagation(); select(g.id);
    });
  });
  canvas.addEventListener("click", function () { if (!(drag && drag.moved)) { select(null); } });

  // legend: each click visits the next layer with that status
  var visits = {};
  Array.prototype.forEach.call(document.querySelectorAll(".mx-legend"), function (b) {
    b.addEventListener("click", function () {
      var key = b.getAttribute("data-status");
      var ids = Object.keys(data.nodes).filter(function (id) { return (data.nodes[id].tags || []).indexOf(key) >= 0; });
      if (!ids.length) { return; }
      visits[key] = ((visits[key] === undefined ? -1 : visits[key]) + 1) % ids.length;
      var g = document.getElementById(ids[visits[key]]);
      if (g) { showNode(g); select(g.id); }
    });
  });

  // search: Enter goes to the next layer whose path contains the text
  var search = document.getElementById("mx-search"), hits = [], hit = -1;
  search.addEventListener("input", function () {
    var q = search.value.trim().toLowerCase();
    hits = []; hit = -1;
    Array.prototype.forEach.call(svg.querySelectorAll("g.node"), function (g) {
      var on = q !== "" && (g.getAttribute("data-path") || "").toLowerCase().indexOf(q) >= 0;
      g.classList.toggle("mx-match", on);
      if (on) { hits.push(g); }
    });
  });
  search.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && hits.length) {
      hit = (hit + 1) % hits.length; showNode(hits[hit]); select(hits[hit].id);
    }
  });
  document.getElementById("mx-fit").addEventListener("click", fit);
  document.getElementById("mx-zoom-in").addEventListener("click", function () { zoomCentre(1 / 1.4); });
  document.getElementById("mx-zoom-out").addEventListener("click", function () { zoomCentre(1.4); });
  window.addEventListener("keydown", function (e) {
    if (e.target === search) { return; }
    if (e.key === "f") { fit(); } else if (e.key === "+" || e.key === "=") { zoomCentre(1 / 1.4); }
    else if (e.key === "-") { zoomCentre(1.4); } else if (e.key === "Escape") { select(null); }
  });
  setupOverview();
  if (!fromHash()) { initialView(); }
  apply();
  window.addEventListener("hashchange", fromHash);
}());
