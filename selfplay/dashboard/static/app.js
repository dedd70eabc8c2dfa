// The dashboard page: picks runs, polls each run's revision, refetches and redraws when it moves.
import { PALETTE, el, fmt, lineChart, stackedBars, heatmap, emptyChart } from "./charts.js";
import { state, api, runPath } from "./state.js";
import { renderTasks, initTasks } from "./tasks.js";
import { xAxis, initControls } from "./xaxis.js";

const POLL_MS = 2000;
const DASHES = [null, "6 3", "2 3", "9 3 2 3"];
const SANDBOX_COLORS = { ok: "#3a9e6e", error: "#e8833a", timeout: "#d0495a", memory_limit: "#7c5cb8",
  output_limit: "#a0782c", killed: "#5f6b7a", sandbox_error: "#1a1a1a" };

// Each grid chart: which scalar keys it draws (a list, or a regex whose group 1 names the series), the unit
// of its y axis, and why it can be empty (`why(config)`: a reason from the run's config, else null).
const CHARTS = [
  { id: "accept", title: "Accepted-task rate", sub: "share of proposed tasks inside the band", keys: ["tasks/accepted_rate"], yFmt: "pct", yMin: 0, yMax: 1, unit: "% of proposals" },
  { id: "pool", title: "Pool, replay and proposals", sub: "tasks per iteration; pool = accepted tasks kept", keys: ["pool/size", "replay/size", "tasks/proposed", "tasks/accepted"], yFmt: "int", unit: "tasks" },
  { id: "proposer", title: "Proposer reward", sub: "mean reward, its components, share zeroed by the agreement gate", keys: ["proposer/reward_mean", "proposer/reward/uncertainty", "proposer/reward/tool", "proposer/reward/repetition", "proposer/reward/agreement_gate"], unit: "reward" },
  { id: "executor", title: "Executor vs. pseudo-labels", sub: "accuracy against the majority vote; format and parse rates", keys: ["executor/accuracy", "executor/format_rate", "executor/answer_rate", "proposer/parse_rate"], yFmt: "pct", yMin: 0, yMax: 1, unit: "%" },
  { id: "tools", title: "Tool calls per trajectory", sub: "mean Python tool calls by the executor", keys: ["executor/tool_calls_mean"], unit: "calls", why: (c) => c.use_tools === false ? "tools off: executor.use_tools = false" : null },
  { id: "sandbox", title: "Sandbox outcomes", sub: "share of tool calls by result", type: "stack", prefix: "sandbox/status/", normalize: true, yFmt: "int", unit: "% of calls", why: (c) => c.use_tools === false ? "tools off: executor.use_tools = false" : null },
  { id: "entropy", title: "Policy entropy", sub: "per role; a collapse to 0 means no exploration", pattern: /^learner\/(.+)\/entropy$/, unit: "nats/token" },
  { id: "kl", title: "KL to reference", sub: "per role", pattern: /^learner\/(.+)\/kl$/, unit: "nats/token", why: (c) => c.kl_coef === 0 ? "KL off: learner.kl_coef = 0 (no reference model, nothing to measure)" : null },
  { id: "clip", title: "Clipped fraction (high)", sub: "tokens hitting the upper ratio clip", pattern: /^learner\/(.+)\/clip_frac_high$/, yFmt: "pct", unit: "% of tokens" },
  { id: "loss", title: "Learner loss", sub: "per role", pattern: /^learner\/(.+)\/loss$/, unit: "loss" },
  { id: "grad", title: "Gradient norm", sub: "before clipping", pattern: /^learner\/(.+)\/grad_norm$/, unit: "L2 norm" },
  { id: "throughput", title: "Throughput", sub: "generated tokens per second of generation", keys: ["throughput/tokens_per_s"], unit: "tokens/s" },
  // time/stage/* are disjoint and, with "other", sum to time/total: the bar's height is the iteration's wall time
  { id: "time", title: "Time per iteration", sub: "seconds by stage (disjoint); bar height = the iteration's wall time", type: "stack", prefix: "time/stage/", yFmt: "sec", unit: "seconds" },
  // busy time per actor overlaps the stages and each other: drawn beside them, never stacked
  { id: "busy", title: "Actor busy time", sub: "seconds each actor worked in the iteration (overlapping), learner∥rollout overlap, and wall time", pattern: /^time\/(busy\/.+|overlap|total)$/, yFmt: "sec", unit: "seconds" },
  { id: "eval", title: "Evaluation", sub: "held-out benchmarks: pass@1, maj@k, answered", pattern: /^eval\/(.+\/(?:pass@1|maj@k|answered))$/, yFmt: "pct", yMin: 0, yMax: 1, unit: "% of problems", why: (c) => !c.eval_benchmark || !c.eval_every ? "no evaluation configured (eval.benchmark and eval.every)" : null },
  { id: "evaltools", title: "Evaluation tool use", sub: "mean Python tool calls per held-out problem", pattern: /^eval\/(.+)\/tool_calls_mean$/, unit: "calls", why: (c) => !c.eval_benchmark || !c.eval_every ? "no evaluation configured (eval.benchmark and eval.every)" : null },
  { id: "faults", title: "Faults and parse failures", sub: "actor restarts; unparseable outputs per role", pattern: /^(faults\/.+|parse_failures\/.+)$/, yFmt: "int", unit: "count" },
];

const runColor = (id) => PALETTE[state.runs.findIndex((r) => r.id === id) % PALETTE.length];
const runLabel = (id) => id;
const lastOf = (s) => { if (!s) return null; for (let i = s.y.length - 1; i >= 0; i--) if (s.y[i] !== null) return { x: s.x[i], y: s.y[i] }; return null; };

function showError(msg) { const e = document.getElementById("error"); e.hidden = !msg; e.textContent = msg || ""; }

// A series with its 95% interval (`<key>_ci95_lo/_hi`, logged beside rates) as lo/hi aligned to its x.
function withInterval(scalars, key) {
  const s = scalars[key], lo = scalars[`${key}_ci95_lo`], hi = scalars[`${key}_ci95_hi`];
  if (!s || !lo || !hi) return s;
  const at = (t) => { const m = new Map(t.x.map((x, i) => [x, t.y[i]])); return s.x.map((x) => m.get(x) ?? null); };
  return { ...s, lo: at(lo), hi: at(hi) };
}

// The series one chart draws for one run, as {name, x, y} (+ lo/hi where an interval is logged).
function pick(def, scalars) {
  const out = [], strip = def.keys && def.keys.length > 1 ? commonPrefix(def.keys) : "";
  if (def.keys) for (const k of def.keys) if (scalars[k]) out.push({ name: k.slice(strip.length), ...withInterval(scalars, k) });
  if (def.pattern) for (const k of Object.keys(scalars).sort()) {
    const m = k.match(def.pattern);
    if (m) out.push({ name: m[1], ...withInterval(scalars, k) });
  }
  return out;
}

function commonPrefix(keys) { // "proposer/reward_mean", "proposer/reward/tool" -> "proposer/"
  let p = keys[0].slice(0, keys[0].lastIndexOf("/") + 1);
  while (p && !keys.every((k) => k.startsWith(p))) p = p.slice(0, p.slice(0, -1).lastIndexOf("/") + 1);
  return p;
}

// One run: colour by series. Several runs: colour by run, dash by series, label "run · series".
function styled(perRun) {
  const multi = perRun.length > 1, out = [];
  for (const { run, series } of perRun) series.forEach((s, i) => out.push({ ...s,
    label: multi ? `${runLabel(run)} · ${s.name}` : s.name,
    color: multi ? runColor(run) : s.color || PALETTE[i % PALETTE.length], dash: multi ? DASHES[i % DASHES.length] : null }));
  return out;
}

// Why a chart is empty, in words: a reason from the run's config, else what it waits for.
function emptyReason(def, run) {
  const cfg = state.runs.find((r) => r.id === run)?.config || {};
  const why = def.why && def.why(cfg);
  if (why) return why;
  const it = state.data[run]?.version?.last_iteration;
  return it === null || it === undefined ? "the run has not logged an iteration yet" : `not logged by this run (${def.title.toLowerCase()})`;
}

function renderGridChart(def, node) {
  const empty = emptyReason(def, state.selected[0]);
  if (def.type === "stack") {
    node.replaceChildren();
    for (const run of state.selected) {
      const scalars = state.data[run]?.scalars || {};
      const keys = Object.keys(scalars).filter((k) => k.startsWith(def.prefix) && !(def.exclude || []).includes(k)).sort();
      const sub = el("div", { class: "stack-run" }, node);
      if (state.selected.length > 1) el("div", { class: "mini-title" }, sub, runLabel(run));
      const box = el("div", { class: "chart-inner" }, sub);
      const x = [...new Set(keys.flatMap((k) => scalars[k].x))].sort((a, b) => a - b);
      const stacks = keys.map((k, i) => {
        const name = k.slice(def.prefix.length), s = scalars[k];
        return { label: name, color: SANDBOX_COLORS[name] || PALETTE[i % PALETTE.length],
          values: x.map((it) => { const j = s.x.indexOf(it); return j < 0 ? 0 : s.y[j] || 0; }) };
      });
      stackedBars(box, x, stacks, { normalize: def.normalize, yFmt: def.yFmt, emptyText: emptyReason(def, run),
        yUnit: def.unit, height: state.selected.length > 1 ? 140 : 190, ...onAxis(run) });
    }
    return;
  }
  const series = styled(state.selected.map((run) => ({ run, series: xAxis.apply(run, pick(def, state.data[run]?.scalars || {})) })));
  lineChart(node, series, { yFmt: def.yFmt, yMin: def.yMin, yMax: def.yMax, emptyText: empty, yUnit: def.unit,
    smooth: xAxis.smoothing, xFmt: xAxis.fmt(), xName: xAxis.name() });
}

function renderSkill() {
  const node = document.querySelector('[data-chart="skill"]');
  const perRun = state.selected.map((run) => {
    const d = state.data[run] || {}, scalars = d.scalars || {}, per = d.difficulty?.per_iteration || [];
    const series = [];
    if (per.length) series.push({ name: "mean p̂", color: "#e8833a", x: per.map((p) => p.iteration), y: per.map((p) => p.mean_p_hat) });
    if (scalars["executor/accuracy"]) series.push({ name: "executor accuracy", color: "#3b6fb6", ...scalars["executor/accuracy"] });
    const evals = Object.keys(scalars).filter((k) => /^eval\/.+\/pass@1$/.test(k)).sort();
    evals.forEach((k, i) => series.push({ name: k.slice(5), color: PALETTE[2 + i * 2 % 8], ...scalars[k] }));
    // pseudo-label accuracy on known-answer probes (verifier.probes), with its 95% interval
    if (scalars["verifier/label_accuracy"]) series.push({ name: "label accuracy (probes)", color: "#7c5cb8",
      ...withInterval(scalars, "verifier/label_accuracy") });
    return { run, series };
  });
  const band = state.data[state.selected[0]]?.difficulty?.band;
  lineChart(node, styled(perRun.map(({ run, series }) => ({ run, series: xAxis.apply(run, series) }))), { yFmt: "float",
    yMin: 0, yMax: 1, band, height: 260, emptyText: "no tasks or accuracy logged yet", yUnit: "p̂ / accuracy",
    smooth: xAxis.smoothing, xFmt: xAxis.fmt(), xName: xAxis.name() });
}

// What a bar or column chart needs to follow the x-axis choice for one run (nothing on the iteration axis).
function onAxis(run) {
  const spans = xAxis.spans(run);
  if (spans === null) return {};
  return { spans: spans || new Map(), xFmt: xAxis.fmt(), xName: xAxis.name(),
    emptyText: `this run logs no ${xAxis.needs()}, which the x axis (${xAxis.kind}) is made of` };
}

function renderDifficulty() {
  const box = document.getElementById("difficulty");
  box.replaceChildren();
  // one x range for the runs shown one above the other, in the axis's unit
  const edges = state.selected.flatMap((run) => {
    const its = (state.data[run]?.difficulty?.per_iteration || []).map((p) => p.iteration), spans = xAxis.spans(run);
    if (spans === null) return its.flatMap((it) => [it - 0.5, it + 0.5]);
    return its.filter((it) => spans?.has(it)).flatMap((it) => spans.get(it));
  });
  const xLo = edges.length ? Math.min(...edges) : undefined, xHi = edges.length ? Math.max(...edges) : undefined;
  for (const run of state.selected) {
    const wrap = el("div", { class: "heat-run" }, box);
    if (state.selected.length > 1) {
      const t = el("div", { class: "mini-title" }, wrap);
      el("span", { class: "swatch" }, t).style.background = runColor(run);
      el("span", {}, t, runLabel(run));
    }
    const node = el("div", { class: "chart", "data-chart": `difficulty-${run}` }, wrap);
    const diff = state.data[run]?.difficulty;
    if (diff) heatmap(node, diff, { height: state.selected.length > 1 ? 200 : 260, xLo, xHi, ...onAxis(run) });
    else emptyChart(node, "loading…");
  }
}

// Where the curriculum stands, from the last iterations' proposals relative to the band. Unparseable
// proposals count: they are proposals the executor never saw, so they are neither in the band nor scored.
function verdict(per, band) {
  const recent = per.slice(-3), sum = (k) => recent.reduce((a, p) => a + (p[k] || 0), 0);
  const total = sum("tasks"), scored = sum("scored"), unscored = total - scored;
  if (!total) return { cls: "neutral", word: "–", detail: "no proposals yet" };
  const n = recent.length, span = n === 1 ? "last iteration" : `last ${n} iterations`;
  const inside = sum("inside") / total, above = sum("above") / total, below = sum("below") / total;
  const bad = unscored / total;
  const parts = [`${sum("inside")} of ${total} proposals (${fmt(inside, "pct")}) in band ${band[0].toFixed(2)}–${band[1].toFixed(2)} over the ${span}`];
  if (unscored) parts.push(`${unscored} unparseable`);
  const detail = parts.join("; ");
  if (bad >= 0.5) return { cls: "warn", word: "unparseable", detail: `${detail}: the proposer's output is mostly not a task` };
  if (inside >= 0.5) return { cls: "good", word: "on target", detail };
  if (bad >= Math.max(above, below)) return { cls: "warn", word: "off target", detail: `${detail}: too few parseable proposals` };
  return above > below ? { cls: "warn", word: "too easy", detail: `${detail}; ${fmt(above, "pct")} above` }
    : { cls: "warn", word: "too hard", detail: `${detail}; ${fmt(below, "pct")} below` };
}

function trend(s, window = 5) { // last value minus the mean of the `window` values before it
  if (!s) return null;
  const ys = s.y.filter((v) => v !== null);
  if (ys.length < 2) return null;
  const prev = ys.slice(-1 - window, -1);
  return ys[ys.length - 1] - prev.reduce((a, b) => a + b, 0) / prev.length;
}

function kpi(parent, label, value, sub, opts = {}) {
  const card = el("div", { class: `kpi ${opts.cls || ""}`, "data-kpi": opts.id || label }, parent);
  el("div", { class: "kpi-label" }, card, label);
  const v = el("div", { class: "kpi-value" }, card, value);
  if (opts.delta !== undefined && opts.delta !== null && Math.abs(opts.delta) > 1e-9) {
    el("span", { class: `delta ${opts.neutral ? "" : opts.delta > 0 ? "up" : "down"}` }, v,
      `${opts.delta > 0 ? "▲" : "▼"} ${opts.deltaFmt === "pct" ? `${(100 * Math.abs(opts.delta)).toFixed(Math.abs(opts.delta) < 0.1 ? 1 : 0)} pp` : fmt(Math.abs(opts.delta), opts.deltaFmt)}`);
  }
  el("div", { class: "kpi-sub" }, card, sub || "");
}

function renderKpis() {
  const box = document.getElementById("kpis");
  box.replaceChildren();
  const run = state.selected[0], d = state.data[run];
  if (!d) return;
  const s = d.scalars || {}, diff = d.difficulty || { per_iteration: [], band: [0, 1] }, cfg = state.runs.find((r) => r.id === run)?.config || {};
  const v = verdict(diff.per_iteration, diff.band);
  const lastMean = lastOf({ x: diff.per_iteration.map((p) => p.iteration), y: diff.per_iteration.map((p) => p.mean_p_hat) });
  kpi(box, "Curriculum", v.word, v.detail, { cls: `verdict ${v.cls}`, id: "verdict" });
  const it = d.version?.last_iteration;
  kpi(box, "Iteration", it === null || it === undefined ? "–" : String(it),
    cfg.iterations ? `of ${cfg.iterations} planned · ${runLabel(run)}` : runLabel(run), { id: "iteration" });
  kpi(box, "Mean p̂", fmt(lastMean?.y), "last iteration; higher = easier", { id: "p_hat",
    delta: trend({ y: diff.per_iteration.map((p) => p.mean_p_hat) }), deltaFmt: "float", neutral: true });
  const acc = s["tasks/accepted_rate"];
  kpi(box, "Accepted", fmt(lastOf(acc)?.y, "pct"), s["pool/size"] ? `pool ${fmt(lastOf(s["pool/size"])?.y, "int")} tasks` : "of proposed tasks",
    { id: "accepted", delta: trend(acc), deltaFmt: "pct" });
  const ex = s["executor/accuracy"];
  kpi(box, "Executor accuracy", fmt(lastOf(ex)?.y, "pct"), "vs pseudo-labels", { id: "exec", delta: trend(ex), deltaFmt: "pct" });
  const evalKey = Object.keys(s).filter((k) => /^eval\/.+\/pass@1$/.test(k)).sort()[0];
  const noEval = cfg.eval_benchmark && cfg.eval_every ? `none yet (every ${cfg.eval_every} iterations)` : "no evaluation configured";
  kpi(box, "Eval pass@1", fmt(lastOf(s[evalKey])?.y, "pct"), evalKey ? evalKey.slice(5, -7) : noEval,
    { id: "eval", delta: trend(s[evalKey], 1), deltaFmt: "pct" });
  const calls = lastOf(s["sandbox/calls"]), errRate = lastOf(s["sandbox/error_rate"]);
  if (calls && calls.y > 0) {
    const failed = Math.round((errRate?.y || 0) * calls.y);
    kpi(box, "Sandbox", failed ? `${fmt(errRate.y, "pct")} failing` : "healthy",
      failed ? `${failed} of ${fmt(calls.y, "int")} tool calls failed inside the sandbox (python -m sandbox doctor)`
        : `${fmt(calls.y, "int")} tool calls, none failed in the sandbox`, { id: "sandbox", cls: `health ${failed ? "bad" : "good"}` });
  } else {
    kpi(box, "Sandbox", "–", cfg.use_tools === false ? "tools off" : "no tool calls in the last iteration", { id: "sandbox" });
  }
  const tps = lastOf(s["throughput/tokens_per_s"]), tt = lastOf(s["time/total"]);
  kpi(box, "Throughput", tps ? `${fmt(tps.y)} tok/s` : "–", tt ? `${fmt(tt.y, "sec")} per iteration` : "", { id: "throughput" });
}

function renderLive() {
  const box = document.getElementById("live"), text = document.getElementById("live-text");
  const run = state.selected[0], v = state.data[run]?.version;
  if (!v) return;
  const age = v.updated_at ? Date.now() / 1000 - v.updated_at : null;
  const status = v.state?.status;
  const isLive = age !== null && age < 900 && !["finished", "failed", "stopped"].includes(status);
  box.dataset.state = state.live[run] === false ? "offline" : isLive ? "live" : "idle";
  const ago = age === null ? "nothing logged yet" : `updated ${age < 90 ? `${Math.max(0, Math.round(age))} s` : age < 5400 ? `${Math.round(age / 60)} min` : `${(age / 3600).toFixed(1)} h`} ago`;
  text.textContent = `${state.live[run] === false ? "server unreachable" : isLive ? "live" : status || "idle"} · ${ago}`;
}

function renderChips() {
  const box = document.getElementById("run-chips");
  box.replaceChildren();
  for (const r of state.runs) {
    const on = state.selected.includes(r.id);
    const chip = el("button", { class: `chip ${on ? "on" : ""}`, "data-run": r.id, title: r.error || r.dir_name }, box);
    el("span", { class: "swatch" }, chip).style.background = runColor(r.id);
    el("span", {}, chip, r.id);
    chip.addEventListener("click", () => {
      if (on && state.selected.length === 1) return; // keep at least one run
      state.selected = on ? state.selected.filter((x) => x !== r.id) : [...state.selected, r.id];
      state.selected.sort((a, b) => state.runs.findIndex((x) => x.id === a) - state.runs.findIndex((x) => x.id === b));
      renderChips();
      Promise.all(state.selected.map(load)).then(renderAll);
    });
  }
  document.getElementById("foot-runs").textContent = state.runs.map((r) => r.dir_name).join(", ");
}

function renderCharts() {
  renderKpis(); renderDifficulty(); renderSkill(); renderLive();
  const grid = document.getElementById("grid");
  if (!grid.children.length) for (const def of CHARTS) {
    const card = el("article", { class: "card" }, grid);
    const head = el("header", {}, card);
    el("h2", {}, head, def.title); el("p", { class: "sub" }, head, def.sub);
    el("div", { class: "chart", "data-chart": def.id }, card);
  }
  for (const def of CHARTS) renderGridChart(def, grid.querySelector(`[data-chart="${def.id}"]`));
}

function renderAll() { renderCharts(); renderTasks(true); }

// Fetch one run's data when its revision moved (or was never seen). Returns true if it changed.
async function load(run) {
  const v = await api(`${runPath(run)}/version`);
  state.live[run] = true;
  const d = state.data[run];
  if (d && d.version.revision === v.revision) { d.version = v; return false; }
  const [scalars, difficulty] = await Promise.all([
    api(`${runPath(run)}/scalars`), api(`${runPath(run)}/difficulty`)]);
  state.data[run] = { version: v, scalars, difficulty };
  state.lastChange[run] = Date.now();
  return true;
}

async function poll() {
  let changed = false, tableChanged = false;
  for (const run of state.selected) {
    try {
      const c = await load(run);
      changed ||= c;
      if (c && run === document.getElementById("f-run").value) tableChanged = true;
      showError("");
    } catch (e) {
      state.live[run] = false;
      showError(`Cannot read run ${run}: ${e.message}. Retrying every ${POLL_MS / 1000} s.`);
    }
  }
  if (changed) renderCharts(); else renderLive();
  if (tableChanged) renderTasks(false);
  setTimeout(poll, POLL_MS);
}

async function main() {
  try {
    state.runs = await api("/api/runs");
  } catch (e) {
    showError(`Cannot reach the dashboard server: ${e.message}`);
    return;
  }
  state.selected = state.runs.filter((r) => !r.error).map((r) => r.id);  // every run named on the command line
  if (!state.selected.length) state.selected = state.runs.slice(0, 1).map((r) => r.id);
  renderChips();
  initTasks();
  initControls(renderCharts);
  await Promise.all(state.selected.map((r) => load(r).catch((e) => showError(e.message))));
  renderAll();
  let timer = null;
  window.addEventListener("resize", () => { clearTimeout(timer); timer = setTimeout(renderCharts, 150); });
  setTimeout(poll, POLL_MS);
}

main();
