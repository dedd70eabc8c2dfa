// Small hand-written SVG charts (line, stacked bars, heatmap) with axes, legend and a hover readout.
// No library: the page must work offline, and these three shapes are all the dashboard draws.
// Every piece of text goes through textContent, never innerHTML: task text is model output.

const SVG = "http://www.w3.org/2000/svg";
export const PALETTE = ["#3b6fb6", "#e8833a", "#3a9e6e", "#d0495a", "#7c5cb8", "#a0782c", "#d770ad", "#5f6b7a",
  "#1f9fb4", "#b5b531", "#8fb3e8", "#2d2d6e"];
const M = { top: 18, right: 14, bottom: 24, left: 46 };  // top: room for the y unit above the axis

export function el(tag, attrs = {}, parent = null, text = null) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

export function fmt(v, kind = "auto") {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (kind === "pct") return `${(100 * v).toFixed(Math.abs(v) < 0.1 ? 1 : 0)}%`;
  if (kind === "int") return Math.round(v).toLocaleString();
  if (kind === "sec") return v >= 120 ? `${(v / 60).toFixed(1)} min` : `${v.toFixed(v < 10 ? 2 : 1)} s`;
  const a = Math.abs(v);
  if (a >= 1e6) return `${(v / 1e6).toFixed(2)}M`;
  if (a >= 1e4) return `${(v / 1e3).toFixed(1)}k`;
  if (a >= 100) return v.toFixed(0);
  if (a >= 1) return v.toFixed(2);
  if (a === 0) return "0";
  return a >= 0.001 ? v.toFixed(3) : v.toExponential(1);
}

// Axis labels with only the decimals the tick step needs (0.2 -> "0.2", not "0.200").
function tickFmt(t, step, kind) {
  if (kind === "int" || kind === "sec" || kind === "pct") {
    const scale = kind === "pct" ? 100 : 1, d = Math.max(0, -Math.floor(Math.log10(step * scale) + 1e-9));
    const v = (t * scale).toFixed(d);
    return kind === "pct" ? `${v}%` : kind === "sec" ? `${v}s` : Number(v).toLocaleString();
  }
  if (Math.abs(t) >= 1e4 || (step >= 1 && Math.abs(t) >= 1000)) return fmt(t);
  return t.toFixed(Math.max(0, -Math.floor(Math.log10(step) + 1e-9)));
}

// Round numbers covering [lo, hi]: the axis is widened to the ticks just outside the data.
function niceTicks(lo, hi, n = 5) {
  if (!(hi > lo)) { const d = Math.abs(lo) || 1; lo -= d / 2; hi += d / 2; }
  const raw = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(raw)), r = raw / mag;
  const step = (r > 5 ? 10 : r > 2 ? 5 : r > 1 ? 2 : 1) * mag;
  const first = Math.floor(lo / step + 1e-9), last = Math.ceil(hi / step - 1e-9), ticks = [];
  for (let i = first; i <= last; i++) ticks.push(i === 0 ? 0 : Number((i * step).toPrecision(12)));
  return { ticks, lo: ticks[0], hi: ticks[ticks.length - 1] };
}

function intTicks(lo, hi, n = 8) {
  const span = Math.max(1, hi - lo), step = Math.max(1, niceTicks(0, span, n).ticks[1] || 1);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi; t += step) out.push(t);
  return out;
}

export function emptyChart(node, message) {
  node.replaceChildren();
  node.classList.add("empty");
  el("div", { class: "empty-msg" }, node, message);
}

// A chart frame: svg sized to the container, y axis with grid, x axis of integer iterations.
function frame(node, { height, xLo, xHi, yLo, yHi, yFmt, band, yTicks, xFmt, yUnit, yLabels }) {
  node.replaceChildren();
  node.classList.remove("empty");
  const width = Math.max(240, node.clientWidth || 400);
  const svg = el("svg:svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "chart-svg" }, node);
  const iw = width - M.left - M.right, ih = height - M.top - M.bottom;
  const xs = (x) => M.left + (xHi === xLo ? iw / 2 : ((x - xLo) / (xHi - xLo)) * iw);
  const ys = (y) => M.top + ih - ((y - yLo) / (yHi - yLo)) * ih;
  if (band) el("svg:rect", { x: M.left, width: iw, y: ys(band[1]), height: ys(band[0]) - ys(band[1]), class: "band" }, svg);
  const axis = el("svg:g", { class: "axis" }, svg);
  const ticks = yTicks || niceTicks(yLo, yHi, Math.max(2, Math.round(ih / 38))).ticks;
  const step = ticks.length > 1 ? ticks[1] - ticks[0] : 1;
  for (const t of ticks) {
    if (t < yLo - 1e-12 || t > yHi + 1e-12) continue;
    el("svg:line", { x1: M.left, x2: M.left + iw, y1: ys(t), y2: ys(t), class: "grid" }, axis);
    el("svg:text", { x: M.left - 6, y: ys(t) + 3.5, "text-anchor": "end", class: "ytick", "data-value": t }, axis,
      yLabels ? yLabels(t) : tickFmt(t, step, yFmt));
  }
  if (yUnit) el("svg:text", { x: 2, y: M.top - 9, class: "axis-unit" }, axis, yUnit);
  if (xFmt) {  // wall time or tokens: round numbers of that unit
    const n = niceTicks(xLo, xHi, Math.max(2, Math.round(iw / 70)));
    const xstep = n.ticks.length > 1 ? n.ticks[1] - n.ticks[0] : 1;
    for (const t of n.ticks) if (t >= xLo - 1e-9 && t <= xHi + 1e-9)
      el("svg:text", { x: xs(t), y: height - 7, "text-anchor": "middle", class: "xtick", "data-value": t }, axis, xFmt(t, xstep));
  } else for (const t of intTicks(xLo, xHi, Math.max(2, Math.round(iw / 60)))) {
    el("svg:text", { x: xs(t), y: height - 7, "text-anchor": "middle", class: "xtick", "data-value": t }, axis, String(t));
  }
  el("svg:line", { x1: M.left, x2: M.left + iw, y1: M.top + ih, y2: M.top + ih, class: "baseline" }, axis);
  return { svg, xs, ys, iw, ih, width };
}

function legend(node, items) {
  const box = el("div", { class: "legend" }, node);
  for (const it of items) {
    const row = el("span", { class: "legend-item" }, box);
    const sw = el("span", { class: it.dash ? "swatch dashed" : "swatch" }, row);
    sw.style.background = it.dash ? "transparent" : it.color;
    sw.style.borderColor = it.color;
    el("span", {}, row, it.label);
  }
}

// Hover readout: a vertical rule at the nearest x and a box listing every series' value there.
// pos: where x sits on the chart's axis (a bar's centre when the axis is wall time or tokens).
function hover(node, f, xValues, rows, title = (x) => `iteration ${x}`, pos = (x) => x) {
  const tip = el("div", { class: "tip" }, node);
  const rule = el("svg:line", { class: "rule", y1: M.top, y2: M.top + f.ih, visibility: "hidden" }, f.svg);
  const pad = el("svg:rect", { x: M.left, y: M.top, width: f.iw, height: f.ih, class: "hover-pad" }, f.svg);
  pad.addEventListener("mousemove", (ev) => {
    const box = f.svg.getBoundingClientRect(), px = ev.clientX - box.left;
    let best = xValues[0];
    for (const x of xValues) if (Math.abs(f.xs(pos(x)) - px) < Math.abs(f.xs(pos(best)) - px)) best = x;
    const at = f.xs(pos(best));
    rule.setAttribute("x1", at); rule.setAttribute("x2", at); rule.setAttribute("visibility", "visible");
    tip.replaceChildren();
    el("div", { class: "tip-title" }, tip, title(best));
    for (const r of rows(best)) {
      const line = el("div", { class: "tip-row" }, tip);
      const sw = el("span", { class: "swatch" }, line); sw.style.background = r.color;
      el("span", { class: "tip-label" }, line, r.label);
      el("span", { class: "tip-value" }, line, r.value);
    }
    tip.style.display = "block";
    const left = at + 12, w = tip.offsetWidth;
    tip.style.left = `${left + w > f.width ? at - w - 12 : left}px`;
    tip.style.top = `${M.top}px`;
  });
  pad.addEventListener("mouseleave", () => { tip.style.display = "none"; rule.setAttribute("visibility", "hidden"); });
}

// TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0.
export function smooth(ys, weight) {
  if (!(weight > 0)) return ys.slice();
  let last = 0, n = 0;
  return ys.map((y) => {
    if (y === null) return null;
    last = last * weight + (1 - weight) * y; n += 1;
    return last / (1 - weight ** n);
  });
}

// series: [{label, color, dash, x: [], y: []}]; y null = gap. opts: yMin, yMax, yFmt, yUnit, band, height,
// smooth (0..1: EMA weight; the raw series stays as a faint line), xFmt/xName (x axis other than iterations).
export function lineChart(node, series, opts = {}) {
  const live = series.filter((s) => s.y.some((v) => v !== null));
  if (!live.length) return emptyChart(node, opts.emptyText || "no data yet");
  const xsAll = [...new Set(live.flatMap((s) => s.x))].sort((a, b) => a - b);
  const ysAll = live.flatMap((s) => s.y.filter((v) => v !== null));
  let yLo = opts.yMin ?? Math.min(...ysAll), yHi = opts.yMax ?? Math.max(...ysAll);
  if (opts.yMin === undefined && opts.yMax === undefined) ({ lo: yLo, hi: yHi } = niceTicks(yLo, yHi));
  else if (yHi <= yLo) yHi = yLo + 1;
  const f = frame(node, { height: opts.height || 190, xLo: xsAll[0], xHi: xsAll[xsAll.length - 1], yLo, yHi,
    yFmt: opts.yFmt, band: opts.band, xFmt: opts.xFmt, yUnit: opts.yUnit });
  const plot = el("svg:g", { class: "plot" }, f.svg);
  const pathOf = (s, ys) => {
    let d = "", pen = false;
    s.x.forEach((x, i) => {
      const y = ys[i];
      if (y === null || y === undefined) { pen = false; return; }
      d += `${pen ? "L" : "M"}${f.xs(x).toFixed(1)},${f.ys(Math.min(yHi, Math.max(yLo, y))).toFixed(1)}`;
      pen = true;
    });
    return d;
  };
  const drawn = live.map((s) => ({ ...s, sy: smooth(s.y, opts.smooth) }));
  for (const s of drawn) if (s.lo && s.hi) { // 95% interval band (unsmoothed: it belongs to the raw values)
    const pts = s.x.map((x, i) => [x, s.lo[i], s.hi[i]]).filter((p) => p[1] !== null && p[1] !== undefined && p[2] !== null && p[2] !== undefined);
    if (!pts.length) continue;
    const at = (x, y) => `${f.xs(x).toFixed(1)},${f.ys(Math.min(yHi, Math.max(yLo, y))).toFixed(1)}`;
    const d = pts.map((p, i) => `${i ? "L" : "M"}${at(p[0], p[2])}`).join("")
      + pts.slice().reverse().map((p) => `L${at(p[0], p[1])}`).join("") + "Z";
    const band = el("svg:path", { d, class: "ci-band", fill: s.color, stroke: s.color }, plot);
    band.dataset.label = s.label;
  }
  for (const s of drawn) {
    if (opts.smooth > 0) el("svg:path", { d: pathOf(s, s.y), class: "raw", stroke: s.color }, plot);
    const path = el("svg:path", { d: pathOf(s, s.sy), class: "series", stroke: s.color, "stroke-dasharray": s.dash || null }, plot);
    path.dataset.label = s.label;
    path.dataset.points = JSON.stringify(s.x.map((x, i) => [x, s.sy[i]]).filter((p) => p[1] !== null));
    const n = s.y.filter((v) => v !== null).length;
    if (n <= 40) s.x.forEach((x, i) => { if (s.sy[i] !== null) el("svg:circle", { cx: f.xs(x), cy: f.ys(s.sy[i]), r: 2.4, fill: s.color, class: "dot" }, plot); });
  }
  legend(node, live);
  hover(node, f, xsAll, (x) => drawn.map((s) => {
    const i = s.x.indexOf(x);
    const ci = i >= 0 && s.lo && s.hi && s.lo[i] !== null && s.hi[i] !== null ? ` [${fmt(s.lo[i], opts.yFmt)}, ${fmt(s.hi[i], opts.yFmt)}]` : "";
    return { label: s.label, color: s.color, value: i < 0 ? "–" : fmt(s.sy[i], opts.yFmt) + ci };
  }), opts.xName);
}

// Where each iteration sits on the x axis: iteration i spans [i - 0.5, i + 0.5] on the iteration axis;
// on a wall-time or token axis `spans` gives its stretch [x0, x1] (an iteration without one is not drawn).
function placement(x, spans) {
  if (!spans) return { its: x, span: (it) => [it - 0.5, it + 0.5] };
  return { its: x.filter((it) => spans.has(it)), span: (it) => spans.get(it) };
}

// x: iterations; stacks: [{label, color, values}] aligned with x. normalize: show shares of each bar.
// opts.spans (Map iteration -> [x0, x1]) with opts.xFmt/xName: the bars on a wall-time or token axis, each
// as wide as the stretch of that axis its iteration covers (from the previous iteration's end to its own).
export function stackedBars(node, x, stacks, opts = {}) {
  const live = stacks.filter((s) => s.values.some((v) => v));
  const { its, span } = placement(x, opts.spans);
  if (!its.length || !live.length) return emptyChart(node, opts.emptyText || "no data yet");
  const idx = new Map(x.map((it, i) => [it, i]));
  const totals = x.map((_, i) => live.reduce((a, s) => a + (s.values[i] || 0), 0));
  const yHi = opts.normalize ? 1 : niceTicks(0, Math.max(...its.map((it) => totals[idx.get(it)]))).hi;
  const f = frame(node, { height: opts.height || 190, xLo: Math.min(...its.map((it) => span(it)[0])),
    xHi: Math.max(...its.map((it) => span(it)[1])), yLo: 0, yHi, yFmt: opts.normalize ? "pct" : opts.yFmt,
    yUnit: opts.yUnit, xFmt: opts.spans ? opts.xFmt : undefined });
  const step = its.length > 1 ? (f.xs(its[its.length - 1]) - f.xs(its[0])) / (its[its.length - 1] - its[0]) : f.iw / 2;
  const bw = Math.max(1, Math.min(28, step * 0.8));
  const box = (it) => {  // [left, width] in pixels
    if (!opts.spans) return [f.xs(it) - bw / 2, bw];
    const [a, b] = span(it), w = f.xs(b) - f.xs(a);
    return [f.xs(a) + (w > 4 ? 0.5 : 0), Math.max(1, w > 4 ? w - 1 : w)];  // a hairline between neighbours
  };
  const plot = el("svg:g", { class: "plot" }, f.svg);
  for (const it of its) {
    const i = idx.get(it), [left, width] = box(it), [x0, x1] = span(it);
    let acc = 0;
    const total = totals[i] || 1;
    for (const s of live) {
      const v = (s.values[i] || 0) / (opts.normalize ? total : 1);
      if (v <= 0) continue;
      el("svg:rect", { x: left, width, y: f.ys(acc + v), height: f.ys(acc) - f.ys(acc + v), fill: s.color,
        class: "series bar", "data-x": it, "data-x0": x0, "data-x1": x1, "data-label": s.label,
        "data-value": s.values[i] || 0 }, plot);
      acc += v;
    }
  }
  legend(node, live);
  const name = opts.spans && opts.xName ? (it) => `iteration ${it} · ${opts.xName(span(it)[1])}` : undefined;
  hover(node, f, its, (it) => {
    const i = idx.get(it);
    const rows = live.map((s) => ({ label: s.label, color: s.color,
      value: opts.normalize ? `${fmt(s.values[i] || 0, opts.yFmt)} (${fmt((s.values[i] || 0) / (totals[i] || 1), "pct")})`
        : fmt(s.values[i] || 0, opts.yFmt) }));
    if (!opts.normalize) rows.push({ label: "total", color: "transparent", value: fmt(totals[i], opts.yFmt) });
    return rows;
  }, name, (it) => (span(it)[0] + span(it)[1]) / 2);
}

function heatColor(share) { // pale -> deep blue; share is relative to the fullest cell
  const t = Math.min(1, Math.max(0, share)) ** 0.75;
  const c0 = [232, 239, 250], c1 = [16, 52, 112];
  return `rgb(${c0.map((a, k) => Math.round(a + (c1[k] - a) * t)).join(",")})`;
}

// The fraction j/k as text ("1/4"), reduced; k = bins.
function frac(j, k) {
  const g = (a, b) => (b ? g(b, a % b) : a), d = g(j, k) || 1;
  return j === 0 ? "0" : j === k ? "1" : `${j / d}/${k / d}`;
}

// difficulty: the /difficulty payload. Row j (0..bins) holds the tasks with p_hat = j/bins (bins = k, the
// samples per task, so each possible p_hat has its own row); its tick sits at the row's centre. The band is
// drawn at the edges of the rows it admits (never through a row); an extra bottom row counts tasks without
// a p_hat (unparseable). A colour scale says what the shades mean; the mean p_hat is a line on top.
// opts.spans/xFmt/xName: a wall-time or token x axis (each iteration a column as wide as its stretch, as the
// bars); opts.xLo/xHi: the x range in the axis's unit, shared by the runs shown one above the other.
export function heatmap(node, diff, opts = {}) {
  const { its: iters, span } = placement(diff.per_iteration.map((p) => p.iteration), opts.spans);
  const kept = new Set(iters), per = diff.per_iteration.filter((p) => kept.has(p.iteration));
  const cells = diff.cells.filter((c) => kept.has(c.iteration));
  if (!per.length) return emptyChart(node, diff.per_iteration.length ? opts.emptyText || "not logged by this run" : "no tasks logged yet");
  const lo = Math.min(...iters.map((it) => span(it)[0]), opts.xLo ?? Infinity);
  const hi = Math.max(...iters.map((it) => span(it)[1]), opts.xHi ?? -Infinity);
  const mid = (it) => (span(it)[0] + span(it)[1]) / 2;
  const nb = diff.bins, height = opts.height || 260;
  const half = 0.5 / nb;
  const every = Math.max(1, Math.ceil((nb + 1) / Math.max(2, Math.floor((height - 40) / 16))));  // labels that fit
  const yTicks = [];
  for (let j = 0; j <= nb; j += every) yTicks.push(j / nb);
  const f = frame(node, { height, xLo: lo, xHi: hi, yLo: -half - 1 / nb, yHi: 1 + half, yFmt: "float",
    yTicks, yLabels: (t) => frac(Math.round(t * nb), nb), yUnit: "p̂", xFmt: opts.spans ? opts.xFmt : undefined });
  const cellH = f.ys(0) - f.ys(1 / nb);
  const column = (it) => { const [a, b] = span(it); return { x: f.xs(a), width: Math.max(1, f.xs(b) - f.xs(a)) + 0.3 }; };
  const byIt = new Map(per.map((p) => [p.iteration, p]));
  const maxShare = Math.max(1e-9, ...cells.map((c) => c.count / (byIt.get(c.iteration)?.tasks || 1)));
  const plot = el("svg:g", { class: "plot" }, f.svg);
  for (const c of cells) {
    const p = byIt.get(c.iteration), share = p && p.tasks ? c.count / p.tasks : 0;
    const r = el("svg:rect", { ...column(c.iteration), y: f.ys(c.bin / nb + half), height: cellH + 0.3,
      fill: heatColor(share / maxShare), class: "series cell" }, plot);
    Object.assign(r.dataset, { iteration: c.iteration, bin: c.bin, count: c.count, share: share.toFixed(4),
      x0: span(c.iteration)[0], x1: span(c.iteration)[1] });
  }
  for (const p of per) {
    if (!p.unscored) continue;
    const r = el("svg:rect", { ...column(p.iteration), y: f.ys(-half), height: cellH + 0.3,
      fill: "#d0495a", "fill-opacity": Math.min(1, 0.25 + p.unscored / p.tasks), class: "series cell unscored" }, plot);
    Object.assign(r.dataset, { iteration: p.iteration, count: p.unscored, x0: span(p.iteration)[0], x1: span(p.iteration)[1] });
  }
  el("svg:text", { x: M.left - 6, y: f.ys(-half - 0.5 / nb) + 3.5, "text-anchor": "end", class: "axis-note" }, f.svg, "none");
  const [bl, bh] = diff.band;
  const admitted = [];
  for (let j = 0; j <= nb; j++) if (j / nb >= bl - 1e-9 && j / nb <= bh + 1e-9) admitted.push(j);
  if (admitted.length) {
    const edges = [[(admitted[admitted.length - 1] + 0.5) / nb, `band high ${bh.toFixed(2)}`],
      [(admitted[0] - 0.5) / nb, `band low ${bl.toFixed(2)}`]];
    for (const [v, name] of edges) {
      el("svg:line", { x1: M.left, x2: M.left + f.iw, y1: f.ys(v), y2: f.ys(v), class: "band-line", "data-edge": v }, f.svg);
      el("svg:text", { x: M.left + f.iw - 4, y: f.ys(v) - 4, "text-anchor": "end", class: "band-label" }, f.svg, name);
    }
  }
  const means = per.filter((p) => p.mean_p_hat !== null);
  if (means.length) {
    const d = means.map((p, i) => `${i ? "L" : "M"}${f.xs(mid(p.iteration)).toFixed(1)},${f.ys(p.mean_p_hat).toFixed(1)}`).join("");
    el("svg:path", { d, class: "series mean-line" }, plot).dataset.points = JSON.stringify(means.map((p) => [mid(p.iteration), p.mean_p_hat]));
  }
  const scale = el("div", { class: "color-scale" }, node);
  el("span", {}, scale, "share of the iteration's tasks: 0");
  const bar = el("span", { class: "color-bar" }, scale);
  bar.style.background = `linear-gradient(to right, ${[0, 0.25, 0.5, 0.75, 1].map(heatColor).join(", ")})`;
  el("span", { class: "color-max" }, scale, fmt(maxShare, "pct"));
  legend(node, [{ label: "mean p̂", color: "#e8833a" },
    { label: `acceptance band (admits p̂ = ${admitted.map((j) => frac(j, nb)).join(", ") || "none"})`, color: "#3a9e6e", dash: true },
    { label: "no p̂ (unparseable proposal)", color: "#d0495a" }]);
  const name = opts.spans && opts.xName ? (it) => `iteration ${it} · ${opts.xName(span(it)[1])}` : undefined;
  hover(node, f, iters, (it) => {
    const p = byIt.get(it), mine = cells.filter((c) => c.iteration === it);
    const dist = mine.map((c) => `${frac(c.bin, nb)}×${c.count}`).join(" ");
    return [
      { label: "tasks", color: "#5f6b7a", value: `${p.tasks} (${p.accepted} accepted)` },
      { label: "below / in / above band", color: "#3a9e6e", value: `${p.below} / ${p.inside} / ${p.above}` },
      { label: "mean p̂", color: "#e8833a", value: fmt(p.mean_p_hat) },
      { label: "no p̂", color: "#d0495a", value: String(p.unscored) },
      { label: "p̂×count", color: heatColor(0.6), value: dist || "–" },
    ];
  }, name, mid);
}
