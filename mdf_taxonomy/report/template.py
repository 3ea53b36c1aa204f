# ruff: noqa: E501 - the page's script and style are kept as written, one statement a line
"""The report page (a jinja2 template): plotly.js and the facts JSON are inlined; the
script below builds every chart and table from the facts alone."""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<link rel="icon" href="data:,">
<style>
body{font:14px system-ui,sans-serif;margin:0;color:#222}
header{padding:10px 18px;background:#12355b;color:#fff}
header h1{margin:0;font-size:20px} header p{margin:4px 0 0}
section{padding:8px 18px;border-bottom:1px solid #ddd}
h2{font-size:17px;margin:8px 0}
#tree-wrap{display:flex;gap:12px}
#treemap{flex:1;min-width:0;height:560px}
#panel{width:380px;max-height:560px;overflow:auto;border:1px solid #ccc;padding:8px;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:4px 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f2f2f2} td.l,th.l{text-align:left}
.better{background:#e3f5e1} .muted{color:#777} a.kid{cursor:pointer;color:#0645ad}
.thumbs img{height:60px;margin:2px}
.row{display:flex;gap:12px;flex-wrap:wrap} .row>div{flex:1;min-width:420px}
</style>
<script>{{ plotly|safe }}</script>
</head><body>
<header><h1>mdf-taxonomy report</h1>
<p id="summary"></p></header>
<section><h2>Tree</h2>
<p class="muted">Click a node: the panel shows it; the treemap drills into its children (click
the bar on top to go back up). Sizes: <span id="sizes-from"></span>.</p>
<label><input type="checkbox" id="thumbs"> load image thumbnails (needs network)</label>
<div id="tree-wrap"><div id="treemap"></div><div id="panel">Click a node.</div></div>
<p id="hidden" class="muted"></p></section>
<section id="labels-sec"><h2>Against labels</h2>
<p class="muted">AMI / NMI / ARI of each level's nodes against each label column, on the
sampled rows, beside a flat k-means (scikit-learn, seed 0) with the same number of clusters
on the same rows; the better AMI is shaded.</p>
<div id="agreement"></div>
<h3>Where does a label land</h3>
<select id="land-col"></select> <div id="landing"></div></section>
<section><h2>Balance and convergence</h2><div class="row">
<div><div id="balance"></div><div id="sizes-chart" style="height:300px"></div></div>
<div><div id="conv"></div><div id="inertia" style="height:300px"></div></div></div></section>
<section id="dedup-sec"><h2>For dedup and sampling</h2><div class="row">
<div><div id="nn-chart" style="height:300px"></div><div id="dedup"></div></div>
<div><div id="sampling"></div></div></div></section>
<section id="map-sec"><h2>2-D map</h2><p class="muted" id="map-note"></p>
<div id="map" style="height:600px"></div></section>
<script id="facts" type="application/json">{{ facts_json|safe }}</script>
<script>
"use strict";
const F = JSON.parse(document.getElementById("facts").textContent);
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
const fmt = v => v === null || v === undefined ? "–" : (typeof v === "number" && !Number.isInteger(v) ? v.toFixed(4) : String(v));
function table(head, rows) {
  return "<table><tr>" + head.map(h => `<th>${esc(h)}</th>`).join("") + "</tr>" +
    rows.map(r => "<tr>" + r.map(c => typeof c === "object" && c !== null ? `<td class="${c.cls||""}">${c.html}</td>` : `<td>${esc(fmt(c))}</td>`).join("") + "</tr>").join("") + "</table>";
}
const byId = {}; const kids = {};
const ROOT = "root";
const UNIT = F.data ? "rows" : "leaves";  // without --data a node's size is its leaf count
const total = F.nodes.filter(n => n.level === 1).reduce((a, n) => a + n.size, 0);
for (const n of F.nodes) { const p = n.parent || ROOT; byId[n.id] = n; (kids[p] = kids[p] || []).push(n); }
const T = F.taxonomy, D = F.data;
let s = `snapshot ${esc(T.version)} · ${T.nodes_per_level.length} levels (${T.nodes_per_level.join(" / ")} nodes) · ${esc(T.metric)} · dim ${T.dim}`;
if (D) {
  const rej = Object.entries(D.rejected).map(([k, v]) => `${k}: ${v}`).join(", ") || "none";
  s += ` · rows ${D.rows}, labelled ${D.labelled}, rejected ${D.rows - D.labelled} (${esc(rej)}) · sampled ${D.sampled} (≤ ${D.cap_per_leaf} per leaf)`;
}
document.getElementById("summary").innerHTML = s;
document.getElementById("sizes-from").textContent = F.sizes_from;
const hid = F.hidden.filter(h => h.nodes > 0).map(h => `level ${h.level}: +${h.rows} rows in ${h.nodes} nodes not drawn`);
document.getElementById("hidden").textContent = hid.length ? "Summarised, not drawn: " + hid.join("; ") + " (each shown parent has a '+N rows in M nodes' entry)." : "Every node is drawn.";

function showNode(id) {
  const n = id === ROOT ? null : byId[id];
  const list = kids[id] || [];
  let h = "";
  if (!n) h += `<b>root</b>: ${total} ${UNIT}<br>`;
  else {
    h += `<b>path ${esc(n.path)}</b> (level ${n.level})<br>size ${n.size} ${UNIT} · ${(100 * (n.share || 0)).toFixed(1)}% of its parent`;
    if (n.more_nodes) h += `<br>${esc(n.label)}: the smaller nodes of this parent, not drawn one by one`;
    if (n.cohesion !== undefined) h += `<br>cohesion (mean distance to centroid, ${n.sampled} sampled rows): ${fmt(n.cohesion)}`;
    if (n.siblings) h += `<br>nearest sibling centroids: ` + (n.siblings.map(([s, d]) => `${s} (${d.toFixed(4)})`).join(", ") || "none (only child)");
    h += `<br>children: ${n.children}`;
    if (n.members) {
      h += `<br>members nearest the centroid:<br>` + n.members.map(esc).join("<br>");
      if (n.images && document.getElementById("thumbs").checked)
        h += `<div class="thumbs">` + n.images.map(u => `<img loading="lazy" src="${esc(u)}" alt="">`).join("") + `</div>`;
    }
    if (n.labels) for (const [c, v] of Object.entries(n.labels)) if (v)
      h += `<br><i>${esc(c)}</i>: purity ${v.purity.toFixed(3)}, entropy ${v.entropy.toFixed(2)} bits · ` + v.top.map(([l, p]) => `${esc(l)} ${(100 * p).toFixed(0)}%`).join(", ");
  }
  if (list.length) {
    h += `<h4>children (${list.length} shown)</h4><ul id="children">` + list.map(k =>
      `<li><a class="kid" data-id="${esc(k.id)}">${esc(k.label || k.path)}</a> · ${k.size} ${UNIT}</li>`).join("") + "</ul>";
  } else if (n && n.children) h += `<p class="muted">children below the drawn depth (${F.depth_shown} levels drawn)</p>`;
  const panel = document.getElementById("panel");
  panel.innerHTML = h; panel.dataset.node = id;
  for (const a of panel.querySelectorAll("a.kid")) a.onclick = () => showNode(a.dataset.id);
}

function nodeText(n) {  // the deepest label column that holds most of the node, else the first
  const v = n.labels ? Object.values(n.labels).filter(Boolean) : [];
  const pure = v.filter(l => l.purity >= 0.5);
  const best = pure.length ? pure[pure.length - 1] : v[0];
  return best ? `${best.top[0][0]} (${(100 * best.purity).toFixed(0)}%)` : "";
}
const ids = [ROOT], labels = ["root"], parents = [""], values = [total], text = [""];
for (const n of F.nodes) {
  ids.push(n.id); parents.push(n.parent || ROOT); values.push(n.size);
  labels.push(n.label || n.path); text.push(nodeText(n));
}
Plotly.newPlot("treemap", [{type: "treemap", ids, labels, parents, values, text, branchvalues: "total",
  maxdepth: 2, textinfo: "label+value+text", hovertemplate: `%{label}<br>%{value} ${UNIT}<br>%{text}<extra></extra>`}],
  {margin: {t: 30, l: 0, r: 0, b: 0}}, {displaylogo: false});
document.getElementById("treemap").on("plotly_click", ev => { if (ev.points && ev.points.length) showNode(ev.points[0].id); });
showNode(ROOT);
document.getElementById("thumbs").onchange = () => showNode(document.getElementById("panel").dataset.node);

if (F.agreement) {
  const rows = F.agreement.map(a => {
    const t = a.tree || {}, k = a.kmeans || {};
    const better = t.ami !== undefined && k.ami !== undefined ? (t.ami >= k.ami ? 0 : 1) : -1;
    return [a.level, {html: esc(a.label), cls: "l"}, a.k, a.rows,
      {html: fmt(t.ami), cls: better === 0 ? "better" : ""}, {html: fmt(k.ami), cls: better === 1 ? "better" : ""},
      fmt(t.nmi), fmt(k.nmi), fmt(t.ari), fmt(k.ari), {html: esc(a.kmeans_skipped || ""), cls: "l"}];
  });
  document.getElementById("agreement").innerHTML = table(["level", "label", "K", "rows", "AMI tree", "AMI k-means", "NMI tree", "NMI k-means", "ARI tree", "ARI k-means", "note"], rows);
  const sel = document.getElementById("land-col");
  sel.innerHTML = Object.keys(F.landing).map(c => `<option>${esc(c)}</option>`).join("");
  const land = () => { document.getElementById("landing").innerHTML = table(["value", "sampled rows", "largest level-1 nodes (share)", "leaves holding it"],
    F.landing[sel.value].map(r => [{html: esc(r.value), cls: "l"}, r.n, {html: r.l1.map(([n, p]) => `${n} (${(100 * p).toFixed(0)}%)`).join(", "), cls: "l"}, r.leaves])); };
  sel.onchange = land; land();
  if (D) document.getElementById("landing").insertAdjacentHTML("beforebegin", `<p class="muted">Unlabelled sampled rows per column: ${esc(JSON.stringify(D.unlabelled))}</p>`);
} else document.getElementById("labels-sec").innerHTML += "<p>No label columns given (--labels).</p>";

document.getElementById("balance").innerHTML = table(["level", "nodes", "empty", "min", "median", "max", "Gini"],
  F.balance.map(b => [b.level, b.nodes, b.empty, b.min, b.median, b.max, b.gini]));
Plotly.newPlot("sizes-chart", F.balance.map(b => ({type: "bar", name: `level ${b.level}`, x: b.histogram_edges.slice(0, -1), y: b.histogram})),
  {title: {text: "node sizes (rows) per level"}, barmode: "overlay", margin: {t: 40}, xaxis: {title: {text: "rows in node"}}, yaxis: {title: {text: "nodes"}}}, {displaylogo: false});
document.getElementById("conv").innerHTML = table(["level", "passes", "Lloyd passes", "final inertia", "repairs", "empty (last)", "capped parents", "children not made"],
  F.convergence.map(c => [c.level, c.passes, c.lloyd_passes, c.inertia.length ? c.inertia[c.inertia.length - 1] : null, c.repaired, c.empty_last_pass, c.capped_parents, c.capped_children]));
Plotly.newPlot("inertia", F.convergence.map(c => ({type: "scatter", mode: "lines+markers", name: `level ${c.level}`, y: c.inertia, x: c.inertia.map((_, i) => i + 1)})),
  {title: {text: "inertia per Lloyd pass"}, margin: {t: 40}, xaxis: {title: {text: "pass"}}}, {displaylogo: false});

if (F.dedup) {
  const d = F.dedup;
  Plotly.newPlot("nn-chart", [{type: "bar", x: d.edges.slice(0, -1), y: d.histogram}],
    {title: {text: `within-leaf nearest-neighbour cosine similarity (${d.rows} sampled rows)`}, margin: {t: 40}}, {displaylogo: false});
  document.getElementById("dedup").innerHTML = `<p class="muted">kept share per eps, from ${esc(d.source)}</p>` +
    table(["eps", "kept share", "lowest level-1 node"], Object.entries(d.keep).map(([e, k]) => {
      const v = Object.entries(k.l1).sort((a, b) => a[1] - b[1])[0] || ["–", null];
      return [e, k.kept_share, `${v[0]} (${fmt(v[1])})`]; }));
} else document.getElementById("dedup-sec").innerHTML += "<p>No labelled data given (--data).</p>";
if (F.sampling) document.getElementById("sampling").innerHTML = "<p class='muted'>balanced sampling (ssl-data-curation's allocation) per target</p>" +
  table(["target", "level", "nodes kept", "of", "min quota", "max quota"], F.sampling.flatMap(t => t.levels.map(l => [t.target, l.level, l.nodes_kept, l.nodes, l.min_quota, l.max_quota])));

if (F.map) {
  const m = F.map;
  document.getElementById("map-note").textContent = `${m.x.length} sampled rows (≤ ${D.cap_per_leaf} per leaf), ${m.method.toUpperCase()}, coloured by level-1 node; points in map.parquet (id, taxonomy_path, x, y).`;
  Plotly.newPlot("map", [{type: "scattergl", mode: "markers", x: m.x, y: m.y, text: m.ids,
    marker: {size: 4, color: m.l1, colorscale: "Turbo", showscale: true, colorbar: {title: {text: "l1"}}}}],
    {margin: {t: 10}, hovermode: "closest"}, {displaylogo: false});
} else document.getElementById("map-sec").innerHTML += "<p>No labelled data given (--data).</p>";
window.reportReady = true;
</script></body></html>
"""
