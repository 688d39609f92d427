"""The page's stylesheet and script, kept as Python strings so they ship inside the package.

The script reads the JSON block ``#evomerge-data`` and builds every piece of text with
``textContent`` (never ``innerHTML``), so names from configs cannot inject markup.
"""

CSS = r"""
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f5f7fa; --card:#ffffff; --accent:#d62728;
        --blue:#4C78A8; font-size:15px; }
* { box-sizing:border-box; }
body { margin:0; background:var(--bg); color:var(--ink); line-height:1.45;
       font-family:Inter,"Segoe UI",system-ui,-apple-system,Helvetica,Arial,sans-serif; }
header { background:linear-gradient(135deg,#1f2d3d 0%,#33475b 100%); color:#fff; padding:22px 32px 20px; }
header .brand { font-size:12px; letter-spacing:.12em; text-transform:uppercase; opacity:.75; }
header .brand span { font-weight:600; }
header h1 { margin:4px 0 2px; font-size:26px; font-weight:650; word-break:break-all; }
header .sub { margin:0 0 16px; opacity:.85; font-size:14px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(150px,1fr)); gap:12px; }
.card { background:rgba(255,255,255,.1); border:1px solid rgba(255,255,255,.18); border-radius:10px; padding:10px 14px; }
.card .k { font-size:11px; text-transform:uppercase; letter-spacing:.08em; opacity:.75; }
.card .v { font-size:22px; font-weight:650; font-variant-numeric:tabular-nums; }
.card .s { font-size:12px; opacity:.7; min-height:1em; }
main { max-width:1500px; margin:0 auto; padding:8px 24px 24px; }
section { background:var(--card); border:1px solid var(--line); border-radius:12px; padding:18px 22px;
          margin:18px 0; box-shadow:0 1px 2px rgba(15,23,42,.04); }
h2 { font-size:18px; margin:0 0 4px; }
h3 { font-size:16px; margin:18px 0 8px; }
h4 { font-size:13px; margin:16px 0 6px; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); }
.hint, .muted { color:var(--muted); font-size:13px; margin:2px 0 10px; }
.split { display:grid; grid-template-columns:minmax(0,3fr) minmax(340px,2fr); gap:20px; align-items:start; }
@media (max-width:1100px) { .split { grid-template-columns:1fr; } }
.plot { width:100%; min-height:300px; }
aside#details { border-left:3px solid var(--line); padding:4px 0 4px 18px; min-height:300px; }
aside#details h3 { margin:4px 0 2px; font-size:20px; }
.badges { display:flex; gap:6px; flex-wrap:wrap; margin:4px 0 6px; }
.badge { font-size:11px; font-weight:600; padding:2px 8px; border-radius:999px; background:#e4e7eb; color:#323f4b; }
.badge.pareto { background:#fde2e1; color:#a61b1b; }
.badge.best { background:#e3f2e1; color:#1e6b2a; }
.badge.failed { background:#fbe9d0; color:#8a4b08; }
.meta { color:var(--muted); font-size:13px; margin:0 0 8px; word-break:break-word; }
table { border-collapse:collapse; font-size:13px; }
table.grid { width:100%; }
table.grid th, table.grid td, table.metrics th, table.metrics td { padding:5px 10px; border-bottom:1px solid var(--line);
  text-align:left; vertical-align:top; }
table.grid th, table.metrics th { font-weight:600; font-size:12px; color:#3e4c59; background:#f8fafc; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.path { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12px; word-break:break-all; }
td.reason { max-width:800px; word-break:break-word; }
tr.pick { cursor:pointer; } tr.pick:hover { background:#f0f4f8; } tr.pick.sel { background:#fff4e5; }
.cmd { background:#0f172a; color:#e2e8f0; border-radius:8px; padding:8px 10px; margin:10px 0; position:relative; }
.cmd .label { font-size:11px; text-transform:uppercase; letter-spacing:.08em; color:#94a3b8; }
.cmd code { display:block; font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12.5px;
  white-space:pre-wrap; word-break:break-all; margin-top:3px; padding-right:52px; }
.cmd button { position:absolute; top:8px; right:8px; font-size:11px; background:#334155; color:#e2e8f0;
  border:0; border-radius:5px; padding:3px 8px; cursor:pointer; }
.chip, .slot { display:inline-block; border-radius:6px; padding:2px 8px; font-size:12px; font-weight:600;
  background:color-mix(in srgb, var(--c) 18%, white); border:1px solid var(--c); color:#1f2933; }
.flow { display:flex; flex-wrap:wrap; gap:4px; align-items:center; }
.flow .slot { min-width:44px; text-align:center; line-height:1.2; padding:3px 6px; }
.flow .slot small { display:block; font-weight:400; font-size:10px; color:#52606d; }
.flow .end { font-size:12px; color:var(--muted); padding:0 4px; }
.legend { display:flex; gap:8px; flex-wrap:wrap; margin:6px 0; font-size:12px; }
pre { background:#f8fafc; border:1px solid var(--line); border-radius:8px; padding:10px; font-size:12px;
  overflow:auto; max-height:420px; font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; }
pre.error { background:#fff7ed; border-color:#fed7aa; color:#7c2d12; white-space:pre-wrap; }
button.linkish { margin-top:10px; font:inherit; font-size:13px; color:#1f4e79; background:#eef4fb;
  border:1px solid #c9dcf0; border-radius:6px; padding:4px 10px; cursor:pointer; }
button.linkish:hover { background:#dde9f7; }
details summary { cursor:pointer; color:#334e68; font-size:13px; margin:8px 0; }
dl.facts { display:grid; grid-template-columns:max-content 1fr; gap:4px 18px; font-size:14px; margin:8px 0 0; }
dl.facts dt { color:var(--muted); } dl.facts dd { margin:0; word-break:break-word; }
footer { text-align:center; color:var(--muted); font-size:12px; padding:10px 0 28px; }
"""

JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("evomerge-data").textContent);
  var CONFIG = {displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"]};
  var current = null;

  function el(tag, cls) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      e.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "—";
    var a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return Number(v).toExponential(3);
    return String(Number(Number(v).toPrecision(4)));
  }
  function color(alias) { return D.colors[alias] || "#9aa5b1"; }

  function metricsTable(rows, cols, first) {
    var t = el("table", "metrics");
    var hr = el("tr", null, el("th", null, first || "objective"));
    cols.forEach(function (c) { hr.appendChild(el("th", null, c[1])); });
    t.appendChild(el("thead", null, hr));
    var tb = el("tbody");
    rows.forEach(function (r) {
      var tr = el("tr", null, el("td", null, r.objective));
      cols.forEach(function (c) { tr.appendChild(el("td", "num", fmt(r[c[0]]))); });
      tb.appendChild(tr);
    });
    t.appendChild(tb);
    return t;
  }

  function heatmap(container, grid) {
    var div = el("div", "heat");
    container.appendChild(div);
    var small = grid.columns.length <= 26 && grid.rows.length <= 16;
    var layout = JSON.parse(JSON.stringify(D.heatmap_layout));
    layout.height = 60 + 28 * grid.rows.length;
    Plotly.newPlot(div, [{
      type: "heatmap", z: grid.z, x: grid.columns, y: grid.rows, colorscale: "YlGnBu", reversescale: true,
      zmin: D.heatmap_range ? D.heatmap_range[0] : undefined, zmax: D.heatmap_range ? D.heatmap_range[1] : undefined,
      xgap: 1, ygap: 1, texttemplate: small ? "%{z:.2f}" : "", textfont: {size: 10},
      hovertemplate: "%{y}<br>%{x}: %{z:.4f}<extra></extra>", colorbar: {thickness: 10, outlinewidth: 0}
    }], layout, {displaylogo: false, responsive: true, displayModeBar: false});
  }

  function flowDiagram(flow) {
    var box = el("div", "flow");
    var emb = el("span", "slot", "embed", el("small", null, flow.embed_from));
    emb.style.setProperty("--c", color(flow.embed_from));
    emb.title = "embeddings from " + flow.embed_from;
    box.appendChild(emb);
    box.appendChild(el("span", "end", "→"));
    flow.slots.forEach(function (s, i) {
      var chip = el("span", "slot", s.model, el("small", null, "L" + s.layer + (s.scale !== 1 ? " ×" + fmt(s.scale) : "")));
      chip.style.setProperty("--c", color(s.model));
      chip.title = "position " + i + ": block " + s.layer + " of " + s.model + ", input scale " + s.scale;
      box.appendChild(chip);
    });
    box.appendChild(el("span", "end", "→ head"));
    return box;
  }

  function copyButton(text) {
    var b = el("button", null, "copy");
    b.type = "button";
    b.addEventListener("click", function () {
      if (navigator.clipboard) navigator.clipboard.writeText(text).then(function () { b.textContent = "copied"; });
    });
    return b;
  }

  function renderTrial(box, t) {
    box.appendChild(el("h3", null, "Trial " + t.id));
    var badges = el("div", "badges");
    if (t.pareto) badges.appendChild(el("span", "badge pareto", "Pareto set"));
    if (t.best) badges.appendChild(el("span", "badge best", "best fitness"));
    if (t.status !== "ok") badges.appendChild(el("span", "badge failed", t.status));
    if (t.recipe) badges.appendChild(el("span", "badge", t.recipe.method));
    box.appendChild(badges);
    var meta = [];
    if (t.optimizer) meta.push("optimizer " + t.optimizer);
    if (t.generation !== null && t.generation !== undefined) meta.push("generation " + t.generation);
    if (t.source && t.source !== t.optimizer) meta.push("proposed by " + t.source);
    if (t.seconds !== "—") meta.push("took " + t.seconds);
    if (t.hash) meta.push("recipe " + t.hash);
    box.appendChild(el("p", "meta", meta.join(" · ")));
    if (t.error) box.appendChild(el("pre", "error", t.error));
    var rows = t.metrics.slice();
    if (t.fitness !== null) rows.push({objective: "fitness (Σ weight × value)", search: t.fitness, validation: null});
    box.appendChild(metricsTable(rows, [["search", "search split"], ["validation", "validation split"]]));
    if (t["export"]) {
      box.appendChild(el("div", "cmd", el("div", "label", "export this merge"), el("code", null, t["export"]),
                         copyButton(t["export"])));
    }
    if (t.recipe) {
      box.appendChild(el("h4", null, "Recipe"));
      var p = el("p", "meta", t.recipe.summary + (t.recipe.base ? " · base " + t.recipe.base : ""));
      box.appendChild(p);
      var legend = el("div", "legend");
      t.recipe.models.forEach(function (m) {
        var c = el("span", "chip", m.alias);
        c.style.setProperty("--c", color(m.alias));
        c.title = m.path;
        legend.appendChild(c);
      });
      box.appendChild(legend);
    }
    if (t.recipe_note) box.appendChild(el("p", "meta", t.recipe_note));
    if (t.grid) {
      box.appendChild(el("h4", null, "Parameters per layer group"));
      heatmap(box, t.grid);
    }
    if (t.flow) {
      box.appendChild(el("h4", null, "Layer flow (source model per position)"));
      box.appendChild(flowDiagram(t.flow));
      box.appendChild(el("p", "meta", "Each box is one block of the merged network: its source model and layer; " +
                         "×s scales the residual stream entering it (folded into the weights on export)."));
    }
    if (t.recipe_yaml) {
      box.appendChild(el("details", null, el("summary", null, "recipe (evomerge YAML)"), el("pre", "yaml", t.recipe_yaml)));
    }
  }

  function renderParent(box, p) {
    box.appendChild(el("h3", null, "Parent: " + p.alias));
    box.appendChild(el("div", "badges", el("span", "badge", p.role)));
    box.appendChild(el("p", "meta", p.path));
    box.appendChild(metricsTable(p.metrics, [["search", "search split"], ["validation", "validation split"]]));
  }

  function renderPredicted(box, q) {
    box.appendChild(el("h3", null, "Predicted point " + q.index));
    box.appendChild(el("div", "badges", el("span", "badge", q.method)));
    box.appendChild(el("p", "meta", "Predicted by the surrogate; not evaluated. Export the nearest evaluated trial, " +
      "or evaluate this point with a new search."));
    box.appendChild(metricsTable(q.metrics, [["predicted", "predicted"]]));
    if (q.coefficients.length) {
      box.appendChild(el("h4", null, "Merge coefficients"));
      var rows = q.coefficients.map(function (c) { return {objective: c.name, value: c.value}; });
      box.appendChild(metricsTable(rows, [["value", "value"]], "gene"));
    }
    if (q.nearest !== null && q.nearest !== undefined) {
      var b = el("button", "linkish", "show nearest evaluated trial (" + q.nearest + ")");
      b.type = "button";
      b.addEventListener("click", function () { show("trial", q.nearest); });
      box.appendChild(b);
    }
  }

  function point(kind, item) {
    var rows = item.metrics || [];
    var key = kind === "predicted" ? "predicted" : "search";
    return D.objectives.map(function (name) {
      var r = rows.filter(function (x) { return x.objective === name; })[0];
      return r ? r[key] : null;
    });
  }

  function markSelected(kind, item) {
    var gd = document.getElementById("pareto");
    if (!gd || !gd.data) return;
    var v = point(kind, item);
    var idx = [], xs = [], ys = [];
    gd.data.forEach(function (tr, i) {
      if (!Array.isArray(tr.meta) || tr.meta[0] !== "selected") return;
      var a = tr.meta[1], b = tr.meta[2];
      var ok = a >= 0 && v[a] !== null && v[b] !== null;
      idx.push(i); xs.push(ok ? [v[a]] : []); ys.push(ok ? [v[b]] : []);
    });
    if (idx.length) Plotly.restyle(gd, {x: xs, y: ys}, idx);
  }

  function show(kind, key) {
    var item = kind === "trial" ? D.trials[String(key)] : kind === "parent" ? D.parents[key] : D.predicted[key];
    if (!item) return;
    var box = document.getElementById("details");
    box.querySelectorAll(".heat").forEach(function (h) { Plotly.purge(h); });
    box.textContent = "";
    box.setAttribute("data-kind", kind);
    box.setAttribute("data-key", String(key));
    if (kind === "trial") renderTrial(box, item);
    else if (kind === "parent") renderParent(box, item);
    else renderPredicted(box, item);
    document.querySelectorAll("tr.pick").forEach(function (tr) {
      tr.classList.toggle("sel", kind === "trial" && tr.getAttribute("data-trial") === String(key));
    });
    current = [kind, key];
    markSelected(kind, item);
  }

  function plot(id, fig) {
    var div = document.getElementById(id);
    if (!div) return;
    if (!fig) { div.remove(); return; }
    Plotly.newPlot(div, fig.data, fig.layout, CONFIG);
    div.on("plotly_click", function (ev) {
      var p = ev && ev.points && ev.points[0];
      if (p && Array.isArray(p.customdata)) show(p.customdata[0], p.customdata[1]);
    });
  }

  plot("pareto", D.figures.pareto);
  plot("parcoords", D.figures.parcoords);
  plot("progress", D.figures.progress);
  document.querySelectorAll("tr.pick").forEach(function (tr) {
    tr.addEventListener("click", function () {
      show("trial", Number(tr.getAttribute("data-trial")));
      document.getElementById("front-section").scrollIntoView({behavior: "smooth"});
    });
  });
  if (D.initial !== null) show("trial", D.initial);
  window.evomergeReport = {data: D, show: show, current: function () { return current; }};
  document.body.setAttribute("data-report-ready", "1");
})();
"""
