// Page state shared by the charts view (app.js) and the task browser (tasks.js), and the one fetch helper.
export const state = { runs: [], selected: [], data: {}, live: {}, lastChange: {} };

export async function api(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail || detail; } catch { /* not JSON */ }
    throw new Error(`${r.status} ${detail}`);
  }
  return r.json();
}

export const runPath = (run) => `/api/runs/${encodeURIComponent(run)}`;
