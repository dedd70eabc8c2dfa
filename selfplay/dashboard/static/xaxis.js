// Every chart's x axis (iteration, wall time, generated tokens) and smoothing, as TensorBoard and W&B
// offer them. Wall time is the running sum of time/total (the iterations' own wall time, so a run that was
// stopped and resumed has no gap); tokens the running sum of throughput/tokens (generated per iteration).
import { fmt } from "./charts.js";
import { state } from "./state.js";

const KINDS = {
  iteration: { name: (x) => `iteration ${x}` },
  wall: { key: "time/total", name: (x) => `${fmt(x, "sec")} of run time`,
    fmt: (t, step) => (step >= 3600 || t >= 7200 ? `${+(t / 3600).toFixed(step >= 3600 ? 0 : 1)}h` : step >= 60 || t >= 600 ? `${+(t / 60).toFixed(step >= 60 ? 0 : 1)}m` : `${t}s`) },
  tokens: { key: "throughput/tokens", name: (x) => `${fmt(x)} tokens generated`, fmt: (t) => fmt(t) },
};

export const xAxis = {
  kind: "iteration",
  smoothing: 0,
  // iteration -> x for one run (null: the run does not log what this axis needs)
  mapping(run) {
    const key = KINDS[this.kind].key;
    if (!key) return null;
    const s = state.data[run]?.scalars?.[key];
    if (!s) return undefined;
    const out = new Map();
    let acc = 0;
    s.x.forEach((it, i) => { acc += s.y[i] || 0; out.set(it, acc); });
    return out;
  },
  // series with x in this axis's unit; a run without the needed scalar draws nothing on it
  apply(run, series) {
    const m = this.mapping(run);
    if (m === null) return series;
    if (m === undefined) return [];
    return series.map((s) => {
      const keep = s.x.map((x, i) => i).filter((i) => m.has(s.x[i]));
      const out = { ...s, x: keep.map((i) => m.get(s.x[i])), y: keep.map((i) => s.y[i]) };
      if (s.lo && s.hi) Object.assign(out, { lo: keep.map((i) => s.lo[i]), hi: keep.map((i) => s.hi[i]) });
      return out;
    });
  },
  // iteration -> [x0, x1], the stretch of this axis the iteration covers (wall time: from the end of the
  // previous iteration to its own end), for the charts that draw an iteration as a bar or a column.
  // null: the iteration axis (the chart centres iteration i on i); undefined: the run lacks the scalar.
  spans(run) {
    const m = this.mapping(run);
    if (!m) return m;
    const out = new Map();
    let prev = 0;
    for (const [it, x] of [...m.entries()].sort((a, b) => a[0] - b[0])) { out.set(it, [prev, x]); prev = x; }
    return out;
  },
  fmt() { return KINDS[this.kind].fmt; },
  needs() { return KINDS[this.kind].key; },
  name() { return KINDS[this.kind].name; },
};

export function initControls(redraw) {
  const sel = document.getElementById("x-axis"), range = document.getElementById("smoothing");
  const shown = document.getElementById("smoothing-val");
  sel.addEventListener("change", () => { xAxis.kind = sel.value; redraw(); });
  range.addEventListener("input", () => {
    xAxis.smoothing = Number(range.value);
    shown.textContent = xAxis.smoothing.toFixed(2);
    redraw();
  });
}
