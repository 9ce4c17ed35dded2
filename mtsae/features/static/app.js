/* mtsae feature dashboard. Data come from <script> files (data/index.js, data/features/<id>.js), which
   load from file:// with no server; the page makes no network request. */
"use strict";

function el(tag, attrs, children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v;
    else if (k === "style") e.style.cssText = v;
    else e.setAttribute(k, v);
  }
  for (const c of children || []) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  return e;
}

function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "\u2014";
  if (v !== 0 && Math.abs(v) < 1e-3) return v.toExponential(1);
  return v.toFixed(digits === undefined ? 3 : digits);
}

function pct(v) { return v === null || v === undefined ? "\u2014" : (100 * v).toFixed(v < 0.001 ? 4 : 2) + "%"; }

function header(meta, title) {
  const parts = [`${meta.n_features_shown} of ${meta.d_sae} features`, `d_in ${meta.d_in}`,
    `${meta.n_tokens.toLocaleString()} tokens (${meta.n_rows} sequences, split ${meta.split})`,
    meta.dilations.length ? `MTSAE, dilations [${meta.dilations.join(", ")}], receptive field ${meta.receptive_field}`
      : "per-token SAE", `activation ${meta.activation}`];
  if (meta.model) parts.unshift(meta.model);
  if (meta.source) parts.unshift(meta.source);
  return el("header", {}, [el("h1", { text: title }), el("div", { class: "meta", text: parts.join(" \u00b7 ") })]);
}

/* ------------------------------------------------------------------------------------------ index */
const COLUMNS = [
  { key: "id", label: "feature", digits: 0 },
  { key: "density", label: "density", render: (r) => pct(r.density) },
  { key: "max_act", label: "max act" },
  { key: "mean_act", label: "mean act" },
  { key: "context_share", label: "context share", mtsae: true,
    render: (r) => r.context_share === null || r.context_share === undefined ? "\u2014"
      : fmt(r.context_share, 2) },
  { key: "ablated_ratio", label: "act. without context", mtsae: true,
    render: (r) => r.ablated_ratio === null || r.ablated_ratio === undefined ? "\u2014" : pct(r.ablated_ratio) },
  { key: "truth_group", label: "true feature (group, cos)", truth: true, text: true,
    render: (r) => r.truth_group === undefined ? "\u2014" : `${r.truth_feature} (${r.truth_group}, ${fmt(r.truth_cos, 2)})` },
  { key: "top_token", label: "top promoted token", logits: true, text: true },
];

function renderIndex() {
  const data = window.MTSAE_INDEX;
  const meta = data.meta;
  document.body.prepend(header(meta, "mtsae features"));
  const cols = COLUMNS.filter((c) => (!c.mtsae || meta.dilations.length) && (!c.truth || meta.has_truth)
    && (!c.logits || meta.has_logits));
  const table = document.getElementById("index-table");
  const headRow = el("tr");
  for (const c of cols) {
    headRow.appendChild(el("th", { "data-sort": c.key, class: c.text ? "text" : "", text: c.label }));
  }
  table.appendChild(el("thead", {}, [headRow]));
  const body = el("tbody");
  table.appendChild(body);
  const rows = data.rows.slice();
  const state = { key: "id", dir: 1, query: "" };

  function draw() {
    const q = state.query.trim();
    const shown = rows.filter((r) => q === "" || String(r.id).startsWith(q) || String(r.id) === q);
    shown.sort((a, b) => {
      const x = a[state.key], y = b[state.key];
      if (x === y) return a.id - b.id;
      if (x === null || x === undefined) return 1;  /* missing values last, whatever the direction */
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * state.dir;
    });
    body.replaceChildren(...shown.map((r) => {
      const tr = el("tr", { "data-id": r.id });
      for (const c of cols) {
        const td = el("td", { class: c.text ? "text" : "" });
        if (c.key === "id") td.appendChild(el("a", { href: `feature.html#${r.id}`, text: `#${r.id}` }));
        else td.textContent = c.render ? c.render(r) : (r[c.key] === undefined ? "\u2014" : fmt(r[c.key], c.digits));
        tr.appendChild(td);
      }
      return tr;
    }));
    for (const th of headRow.children) {
      th.classList.toggle("sorted-asc", th.dataset.sort === state.key && state.dir === 1);
      th.classList.toggle("sorted-desc", th.dataset.sort === state.key && state.dir === -1);
    }
    document.getElementById("count").textContent = `${shown.length} of ${rows.length} features`;
  }
  headRow.addEventListener("click", (ev) => {
    const key = ev.target.dataset.sort;
    if (!key) return;
    state.dir = state.key === key ? -state.dir : (key === "id" ? 1 : -1);  /* numbers: largest first */
    state.key = key;
    draw();
  });
  const search = document.getElementById("search");
  search.addEventListener("input", () => { state.query = search.value; draw(); });
  search.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && /^\d+$/.test(search.value.trim())) location.href = `feature.html#${search.value.trim()}`;
  });
  draw();
}

/* ---------------------------------------------------------------------------------------- feature */
function histogram(hist) {
  const W = 360, H = 110, pad = 18;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "hist");
  svg.setAttribute("width", W);
  svg.setAttribute("height", H + pad);
  const n = hist.counts.length;
  if (!n) return svg;
  const top = Math.max(...hist.counts);
  const bw = W / n;
  hist.counts.forEach((c, i) => {
    const h = top ? Math.max(c ? 1 : 0, (H * Math.log1p(c)) / Math.log1p(top)) : 0;
    const r = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    r.setAttribute("x", i * bw); r.setAttribute("y", H - h);
    r.setAttribute("width", Math.max(bw - 1, 1)); r.setAttribute("height", h);
    const t = document.createElementNS("http://www.w3.org/2000/svg", "title");
    t.textContent = `[${fmt(i * hist.width)}, ${fmt((i + 1) * hist.width)}): ${c} tokens`;
    r.appendChild(t);
    svg.appendChild(r);
  });
  for (const [x, anchor, v] of [[0, "start", 0], [W, "end", n * hist.width]]) {
    const t = document.createElementNS("http://www.w3.org/2000/svg", "text");
    t.setAttribute("x", x); t.setAttribute("y", H + 13); t.setAttribute("text-anchor", anchor);
    t.textContent = fmt(v, 2);
    svg.appendChild(t);
  }
  return svg;
}

function shade(a, max) {
  const s = max > 0 ? Math.max(0, Math.min(1, a / max)) : 0;
  return s > 0 ? `background: rgba(236, 112, 20, ${(0.12 + 0.88 * s).toFixed(3)})` : "";
}

function exampleRow(ex, f, meta) {
  const maxAct = f.max_act;
  const label = ex.kind === "top" ? `top #${ex.rank}` : `${ex.kind.slice(1)}th pct`;
  const lab = el("span", { class: "label", text: `${label} \u00b7 ${fmt(ex.acts[ex.pos - ex.start], 2)}` +
    (ex.attr ? ` \u00b7 no ctx ${fmt(ex.attr.ablated, 2)}` : "") });
  const toks = el("span", { class: "toks" });
  const line = el("div", { class: meta.has_tokens ? "example text" : "example", "data-kind": ex.kind }, [lab, toks]);
  /* positions without text: blank cells before a window cut by the sequence start align the maxima */
  const pad = meta.has_tokens ? 0 : Math.max(0, meta.context_before - (ex.pos - ex.start));
  for (let i = 0; i < pad; i++) toks.appendChild(el("span", { class: "tok pos pad" }));
  ex.acts.forEach((a, i) => {
    const p = ex.start + i;
    const cls = ["tok"];
    if (a > 0) cls.push("on");
    if (p === ex.pos) cls.push("max");
    if (!ex.valid[i]) cls.push("invalid");
    let text = ex.text ? ex.text[i] : "";
    if (!meta.has_tokens) cls.push("pos");
    text = text.replace(/\n/g, "\u21b5");
    toks.appendChild(el("span", { class: cls.join(" "), style: shade(a, maxAct), "data-act": a,
      title: `position ${p}: activation ${fmt(a)}` + (ex.truth ? `, true feature ${fmt(ex.truth[i], 2)}` : "")
        + (ex.sink && ex.sink[i] ? " (activation sink: not read by the SAE)" : ""),
      text }));
  });
  const out = [line];
  if (ex.truth) {
    const gmax = Math.max(...ex.truth, 1e-9);
    const gt = el("div", { class: "example gtrow" }, [el("span", { class: "label", text: "true feature" })]);
    for (let i = 0; i < pad; i++) gt.appendChild(el("span", { class: "tok pos pad" }));
    ex.truth.forEach((c) => gt.appendChild(el("span", { class: "tok pos gt",
      style: c > 0 ? `background: rgba(74, 155, 74, ${(0.2 + 0.8 * c / gmax).toFixed(3)})` : "" })));
    out.push(gt);
  }
  return out;
}

function attribution(f, meta) {
  const tops = f.examples.filter((e) => e.kind === "top" && e.attr);
  if (!tops.length) return null;
  const S = meta.dilations.length;
  const mean = (k, s) => tops.reduce((acc, e) => acc + e.attr[k][s], 0) / tops.length;
  const table = el("table", { class: "attr" }, [el("tr", {}, ["branch", "from the token", "from earlier tokens"]
    .map((t) => el("th", { text: t })))]);
  for (let s = 0; s < S; s++) {
    const r = meta.dilations[s];
    table.appendChild(el("tr", { "data-branch": s }, [el("td", { text: `r = ${r} (t\u2212${r}, t\u2212${2 * r})` }),
      el("td", { text: fmt(mean("self", s)) }), el("td", { text: fmt(mean("context", s)) })]));
  }
  const share = f.context_share || 0;
  return el("div", { class: "attribution" }, [
    el("div", {}, [`context share ${fmt(share, 2)} `,
      el("span", { class: "share" }, [el("span", { style: `width: ${(100 * share).toFixed(1)}%` })]),
      el("span", { class: "muted", text: `  with earlier tokens removed: ${pct(f.ablated_ratio)} of the activation` })]),
    el("div", { class: "muted", text: `mean contribution to the pre-activation at the maximum of the ${tops.length} top examples` }),
    table]);
}

function logitTable(items, cls) {
  return el("table", { class: "logits" }, items.map(([t, id, v]) => el("tr", {},
    [el("td", { text: JSON.stringify(t).slice(1, -1), title: `token id ${id}` }), el("td", { class: `v ${cls}`, text: fmt(v, 3) })])));
}

function featureCard(f, meta) {
  const card = el("div", { class: "card feature-card", id: `feature-${f.id}`, "data-id": f.id });
  card.appendChild(el("h2", { text: `Feature ${f.id}` }));
  card.appendChild(el("div", { class: "stats" }, [
    el("span", {}, ["density ", el("b", { text: pct(f.density) }), f.density > 0 ? ` (1 in ${Math.round(1 / f.density).toLocaleString()} tokens)` : ""]),
    el("span", {}, ["max act ", el("b", { text: fmt(f.max_act) })]),
    el("span", {}, ["mean act when firing ", el("b", { text: fmt(f.mean_act) })]),
    el("span", {}, ["fires on ", el("b", { text: f.n_fire.toLocaleString() }), " tokens"])]));
  if (f.truth) {
    const span = f.truth.span === null || f.truth.span === undefined ? "" : `, mean span ${f.truth.span} tokens`;
    card.appendChild(el("div", { class: "truth", text: `matched true feature ${f.truth.feature} (cosine ${fmt(f.truth.cos, 3)}), timescale group \u201c${f.truth.group}\u201d${span}` }));
  }
  if (!f.n_fire) {
    card.appendChild(el("p", { class: "muted", text: `never fired on the ${meta.n_tokens.toLocaleString()} tokens read (dead)` }));
    return card;
  }
  const cols = el("div", { class: "cols" });
  cols.appendChild(el("div", {}, [el("h3", { text: "activation histogram (log count)" }), histogram(f.hist)]));
  const attr = attribution(f, meta);
  if (attr) cols.appendChild(el("div", {}, [el("h3", { text: "context attribution" }), attr]));
  if (f.promoted) {
    cols.appendChild(el("div", {}, [el("h3", { text: "promoted tokens" }), logitTable(f.promoted, "pos-v")]));
    cols.appendChild(el("div", {}, [el("h3", { text: "suppressed tokens" }), logitTable(f.suppressed, "neg-v")]));
  }
  card.appendChild(cols);
  let rank = 0;
  const tops = el("div", { class: "examples" });
  const lower = el("div", { class: "examples" });
  for (const ex of f.examples) {
    if (ex.kind === "top") ex.rank = ++rank;
    for (const row of exampleRow(ex, f, meta)) (ex.kind === "top" ? tops : lower).appendChild(row);
  }
  card.appendChild(el("h3", { text: "top activations (one per sequence, maximum outlined)" }));
  card.appendChild(tops);
  if (lower.children.length) {
    card.appendChild(el("h3", { text: "lower quantiles of the firing sequences" }));
    card.appendChild(lower);
  }
  return card;
}

function renderFeature() {
  const data = window.MTSAE_INDEX;
  const meta = data.meta;
  document.body.prepend(header(meta, "mtsae features"));
  const ids = data.rows.map((r) => r.id).sort((a, b) => a - b);
  const host = document.getElementById("feature");
  function show() {
    const id = parseInt(location.hash.slice(1), 10);
    const target = Number.isNaN(id) ? ids[0] : id;
    const i = ids.indexOf(target);
    const nav = el("div", { class: "nav" }, [el("a", { href: "index.html", text: "\u2190 index" })]);
    if (i > 0) nav.appendChild(el("a", { href: `#${ids[i - 1]}`, text: `\u2039 #${ids[i - 1]}` }));
    if (i >= 0 && i < ids.length - 1) nav.appendChild(el("a", { href: `#${ids[i + 1]}`, text: `#${ids[i + 1]} \u203a` }));
    if (i < 0) { host.replaceChildren(nav, el("p", { class: "missing", text: `feature ${target} is not in this dashboard` })); return; }
    const have = (window.MTSAE_FEATURES || {})[target];
    if (have) { host.replaceChildren(nav, featureCard(have, meta)); document.title = `mtsae feature ${target}`; return; }
    const s = document.createElement("script");
    s.src = `data/features/${target}.js`;
    s.onload = show;
    s.onerror = () => host.replaceChildren(nav, el("p", { class: "missing", text: `cannot load data/features/${target}.js` }));
    document.head.appendChild(s);
  }
  window.addEventListener("hashchange", show);
  show();
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.getElementById("index-table")) renderIndex();
  else renderFeature();
});
