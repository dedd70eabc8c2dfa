// The task browser: filter a run's proposed tasks, open one to read its executor trajectories.
import { el, fmt } from "./charts.js";
import { state, api, runPath } from "./state.js";

const filt = { iteration: "", status: "all", q: "", sort: "newest", offset: 0, limit: 25 };
let openTask = null, seq = 0;
const $ = (id) => document.getElementById(id);
const tableRun = () => $("f-run").value || state.selected[0];

export function initTasks() {
  const reload = () => { filt.offset = 0; renderTasks(false); };
  $("f-run").addEventListener("change", () => { filt.iteration = ""; openTask = null; renderDetail(null); reload(); });
  $("f-iteration").addEventListener("change", (e) => { filt.iteration = e.target.value; reload(); });
  $("f-sort").addEventListener("change", (e) => { filt.sort = e.target.value; reload(); });
  for (const b of $("f-status").querySelectorAll("button")) b.addEventListener("click", () => {
    filt.status = b.dataset.v;
    for (const o of $("f-status").querySelectorAll("button")) o.classList.toggle("on", o === b);
    reload();
  });
  let timer = null;
  $("f-q").addEventListener("input", (e) => { clearTimeout(timer); timer = setTimeout(() => { filt.q = e.target.value.trim(); reload(); }, 250); });
  $("prev").addEventListener("click", () => { filt.offset = Math.max(0, filt.offset - filt.limit); renderTasks(false); });
  $("next").addEventListener("click", () => { filt.offset += filt.limit; renderTasks(false); });
}

function syncRunSelect() {
  const sel = $("f-run"), keep = sel.value;
  sel.replaceChildren();
  for (const r of state.selected) el("option", { value: r }, sel, r);
  sel.value = state.selected.includes(keep) ? keep : state.selected[0];
  sel.hidden = state.selected.length < 2;
}

// resetRuns: the run selection changed. Otherwise only the data did (keep filters, page, open task).
export async function renderTasks(resetRuns) {
  if (resetRuns) syncRunSelect();
  const run = tableRun(), mine = ++seq;
  if (!run) return;
  const params = new URLSearchParams({ status: filt.status, sort: filt.sort, limit: filt.limit, offset: filt.offset });
  if (filt.iteration !== "") params.set("iteration", filt.iteration);
  if (filt.q) params.set("q", filt.q);
  let iterations, page;
  try {
    [iterations, page] = await Promise.all([api(`${runPath(run)}/iterations`), api(`${runPath(run)}/tasks?${params}`)]);
  } catch (e) {
    $("page-info").textContent = `cannot load tasks: ${e.message}`;
    return;
  }
  if (mine !== seq) return; // a newer request superseded this one
  const sel = $("f-iteration");
  sel.replaceChildren(el("option", { value: "" }, null, `all iterations (${iterations.length})`));
  for (const it of iterations) el("option", { value: String(it) }, sel, `iteration ${it}`);
  sel.value = filt.iteration;
  const band = state.data[run]?.difficulty?.band || [0, 1];
  const body = $("task-table").querySelector("tbody");
  body.replaceChildren();
  for (const t of page.rows) body.appendChild(taskRow(t, band, run));
  if (!page.rows.length) el("td", { colspan: 7, class: "muted empty-row" }, el("tr", {}, body), "no tasks match these filters");
  const end = Math.min(page.total, filt.offset + page.rows.length);
  $("page-info").textContent = page.total ? `${filt.offset + 1}–${end} of ${page.total}` : "0 tasks";
  $("prev").disabled = filt.offset === 0;
  $("next").disabled = end >= page.total;
}

function pHatCell(td, p, band) {
  const wrap = el("div", { class: "phat" }, td);
  el("span", { class: "phat-num" }, wrap, p === null ? "–" : p.toFixed(2));
  const bar = el("span", { class: "phat-bar" }, wrap);
  const zone = el("span", { class: "phat-band" }, bar);
  zone.style.left = `${band[0] * 100}%`; zone.style.width = `${(band[1] - band[0]) * 100}%`;
  if (p !== null) { const m = el("span", { class: "phat-mark" }, bar); m.style.left = `${p * 100}%`; }
}

// Why the loop rejected a proposal (selfplay/run/loop.py `admit`; parse reasons: roles/proposer.py).
const PARSE = { truncated: "cut off at proposer.max_tokens", no_question: "no <question> tag",
  unclosed_question: "<question> never closed", nested_tags: "nested tags", empty_question: "empty question",
  answer_leak: "the question gives its answer away" };
export function rejectReason(t, band) {
  const r = t.reject_reason || "";
  if (r.startsWith("parse:")) return { short: "unparseable", long: `unparseable proposal: ${PARSE[r.slice(6)] || r.slice(6)}` };
  if (r === "no_majority_answer") return { short: "no answers", long: "none of the executor's samples gave a final answer, so there is no label to vote on" };
  if (r === "too_easy") return { short: "too easy", long: `too easy: p̂ ${fmt(t.p_hat)} above the band's ${band[1].toFixed(2)}` };
  if (r === "too_hard") return { short: "too hard", long: `too hard: p̂ ${fmt(t.p_hat)} below the band's ${band[0].toFixed(2)}` };
  if (r === "duplicate") return { short: "duplicate", long: "duplicate: the pool already holds this question" };
  return { short: r || "rejected", long: r || "rejected" };
}

function verdictBadge(parent, t, band = [0, 1]) {
  if (t.accepted) return el("span", { class: "badge ok" }, parent, "accepted");
  const why = rejectReason(t, band);
  return el("span", { class: "badge no", title: why.long }, parent, why.short);
}

function taskRow(t, band, run) {
  const tr = el("tr", { "data-task-id": t.task_id, class: openTask === t.task_id ? "open" : "", tabindex: 0 });
  el("td", { class: "num" }, tr, String(t.iteration));
  pHatCell(el("td", {}, tr), t.p_hat, band);
  verdictBadge(el("td", {}, tr), t, band);
  el("td", { class: "num" }, tr, fmt(t.proposer_reward));
  const maj = el("td", { class: "maj" }, tr);
  el("code", {}, maj, t.pseudo_label ?? "–");
  if (t.n_samples) el("span", { class: "muted" }, maj, ` ${t.majority_count}/${t.n_samples}`);
  el("td", { class: "num" }, tr, t.mean_tool_calls === null ? "–" : fmt(t.mean_tool_calls));
  el("div", { class: "q" }, el("td", {}, tr), t.question);
  const open = () => openDetail(run, t.task_id);
  tr.addEventListener("click", open);
  tr.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
  return tr;
}

async function openDetail(run, taskId) {
  openTask = taskId;
  for (const tr of $("task-table").querySelectorAll("tbody tr")) tr.classList.toggle("open", tr.dataset.taskId === taskId);
  try {
    renderDetail(await api(`${runPath(run)}/tasks/${encodeURIComponent(taskId)}`), run);
  } catch (e) {
    $("detail").replaceChildren(el("p", { class: "error" }, null, e.message));
  }
}

// Trajectory text with its ```python``` tool calls and ```output``` results set apart.
function trajectoryBody(parent, text) {
  const re = /```(\w*)\n?([\s\S]*?)```/g;
  let last = 0, m;
  const plain = (s) => { s = s.replace(/^\n+|\n+$/g, ""); if (s.trim()) el("div", { class: "seg-text" }, parent, s); };
  while ((m = re.exec(text))) {
    plain(text.slice(last, m.index));
    el("pre", { class: m[1] === "output" ? "seg-output" : "seg-code", "data-lang": m[1] || "code" }, parent, m[2].replace(/\n+$/, ""));
    last = re.lastIndex;
  }
  plain(text.slice(last));
}

function renderDetail(t, run) {
  const box = $("detail");
  box.replaceChildren();
  if (!t) { el("p", { class: "muted" }, box, "Select a task to see its trajectories."); return; }
  const head = el("div", { class: "detail-head" }, box);
  el("h3", {}, head, t.task_id);
  const band = state.data[run]?.difficulty?.band || [0, 1];
  verdictBadge(head, t, band);
  el("div", { class: "muted" }, box, `${run} · iteration ${t.iteration}`);
  if (!t.accepted) el("p", { class: "reject-why" }, box, rejectReason(t, band).long);
  el("div", { class: "question" }, box, t.question);
  const facts = el("dl", { class: "facts" }, box);
  const fact = (k, v) => { el("dt", {}, facts, k); el("dd", {}, facts, v); };
  const noPhat = (t.reject_reason || "").startsWith("parse:") ? "– (the proposal was not a parseable task; the executor never tried it)"
    : "– (no executor sample gave a final answer)";
  fact("p̂", t.p_hat === null ? noPhat : `${t.p_hat.toFixed(2)} (${t.majority_count}/${t.n_samples} agree)`);
  fact("pseudo-label", t.pseudo_label ?? "–");
  fact("proposer reward", fmt(t.proposer_reward));
  fact("tool calls (mean)", t.mean_tool_calls === null ? "–" : fmt(t.mean_tool_calls));
  const comps = el("div", { class: "chips" }, box);
  for (const [k, v] of Object.entries(t.reward_components || {}))
    el("span", { class: "chip-static" }, comps, `${k}: ${typeof v === "number" ? fmt(v) : String(v)}`);
  const votes = Object.entries(t.agreement || {}).sort((a, b) => b[1] - a[1]);
  if (votes.length) {
    el("h4", {}, box, "Executor answers");
    const agree = el("div", { class: "agree" }, box);
    for (const [ans, n] of votes.slice(0, 8)) {
      const row = el("div", { class: "agree-row" }, agree);
      el("code", {}, row, ans);
      const bar = el("span", { class: "agree-bar" }, row);
      bar.style.width = `${(100 * n) / Math.max(1, t.n_samples)}%`;
      if (ans === t.pseudo_label) bar.classList.add("major");
      el("span", { class: "muted" }, row, String(n));
    }
  }
  el("h4", {}, box, `Trajectories (${t.trajectories.length})`);
  if (!t.trajectories.length) el("p", { class: "muted" }, box, (t.reject_reason || "").startsWith("parse:")
    ? "none: an unparseable proposal is never given to the executor"
    : "none kept for this task (the run keeps metrics.verification_samples_per_task answers per task and metrics.trajectories_per_iteration practice trajectories)");
  for (const tr of t.trajectories) {
    const card = el("details", { class: "traj", "data-traj-id": tr.traj_id }, box);
    if (t.trajectories.length <= 3) card.open = true;
    const sum = el("summary", {}, card);
    el("span", { class: `mark ${tr.correct === true ? "ok" : tr.correct === false ? "no" : ""}` }, sum,
      tr.correct === true ? "✓" : tr.correct === false ? "✗" : "·");
    el("code", {}, sum, tr.answer ?? "no answer");
    if (tr.iteration !== t.iteration) el("span", { class: "chip-static" }, sum, `practice · it ${tr.iteration}`);
    el("span", { class: "muted" }, sum, ` ${tr.role} · reward ${fmt(tr.reward)} · ${tr.n_tool_calls} tool call${tr.n_tool_calls === 1 ? "" : "s"} · ${tr.finish_reason || "?"}`);
    for (const s of tr.sandbox_statuses) el("span", { class: `status st-${s.replace(/[^a-z_]/g, "")}` }, sum, s);
    trajectoryBody(el("div", { class: "traj-body" }, card), tr.text);
  }
}
