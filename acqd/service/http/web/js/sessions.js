// Sessions: every session under the data root with its state, size and duration; finalize and export with
// progress bars driven by the pushed job events; after finalize, the QC report (verdict, plots, paths).

import { command, el, fetchBlobUrl, fmtBytes, fmtDuration, request } from "./api.js";

export function createSessions({ bus, info, onError }) {
  const body = document.querySelector("#sessions tbody");
  const detail = document.getElementById("session-detail");
  const rows = new Map();
  let shown = null;
  let loading = null;
  let again = false;  // a reload asked for while one was in flight: its answer may predate what asked

  function progress(job) {
    const bar = el("progress", { max: 1, value: job.fraction ?? 0 });
    const text = job.state === "running" ? `${job.kind} ${job.stage} ${Math.round(100 * (job.fraction ?? 0))}%`
      : job.state === "failed" ? `${job.kind} failed: ${job.error}` : `${job.kind} done`;
    return el("span", { class: `job ${job.state}` }, job.state === "running" ? bar : null, el("span", {}, text));
  }

  function actions(s) {
    const out = [];
    const running = Object.values(s.jobs || {}).some((j) => j.state === "running");
    if (["closed", "interrupted", "finalizing"].includes(s.state)) {
      out.push(el("button", { type: "button", class: "finalize", disabled: running, onclick: () => start("finalize", s) },
        "Finalize"));
    }
    out.push(el("button", { type: "button", class: "log", onclick: () => showLog(s.session_id) }, "Log"));
    if (s.state === "finalized" || s.state === "export stale") {
      out.push(el("button", { type: "button", class: "qc", onclick: () => showQc(s.session_id) }, "QC report"));
      // "export stale": amended after its export; exporting again rebuilds it with the amended metadata.
      out.push(el("button", { type: "button", class: "export", disabled: running, onclick: () => start("export", s) },
        s.state === "export stale" ? "Rebuild export" : "Export"));
    }
    return out;
  }

  function draw(sessions) {
    rows.clear();
    body.replaceChildren(...[...sessions].reverse().map((s) => {
      const jobCell = el("td", { class: "jobs" }, ...Object.values(s.jobs || {}).map(progress));
      // A finalized session is sealed; it is verified only once the scrub has read every sealed byte again.
      const scrub = ["finalized", "exported", "export stale"].includes(s.state) && s.verification
        ? `, ${s.verification}` : "";
      const bad = s.incomplete || s.state === "export stale" || ["failed", "stale"].includes(s.verification);
      const stateCell = el("td", { class: `state ${bad ? "bad" : ""}`,
        title: s.state === "export stale" ? "amended after it was exported: the export holds the old metadata" : "" },
        s.state + scrub + (s.incomplete ? " (incomplete)" : ""));
      const tr = el("tr", { "data-session": s.session_id },
        el("td", {}, s.session_id), stateCell, el("td", {}, fmtBytes(s.size_bytes)),
        el("td", {}, fmtDuration(s.duration_s)), el("td", {}, (s.created || "").replace("T", " ").slice(0, 19)),
        el("td", { class: "actions" }, ...actions(s), jobCell));
      rows.set(s.session_id, { tr, jobCell, session: s });
      return tr;
    }));
  }

  /** Redraw from the daemon; resolves once the list drawn is at least as new as this call. */
  function load() {
    if (loading) {
      again = true;
      return loading;
    }
    loading = (async () => {
      do {
        again = false;
        try {
          const { sessions, data_root } = await request("GET", "/api/console/sessions");
          document.getElementById("data-root").textContent = data_root;
          draw(sessions);
          if (shown) showQc(shown, false);
        } catch (err) { onError(err); }
      } while (again);
      loading = null;
    })();
    return loading;
  }

  async function start(kind, s) {
    try {
      const reply = kind === "finalize" ? await command("finalize", { session: s.session_id })
        : await command("export", { session: s.session_id, out: info.export_dir });
      onJob({ kind, ...reply });
    } catch (err) { onError(err); }
  }

  function onJob(job) {
    const row = rows.get(job.session);
    if (!row) return load();
    row.session.jobs = { ...(row.session.jobs || {}), [job.kind]: job };
    row.jobCell.replaceChildren(...Object.values(row.session.jobs).map(progress));
    if (job.state !== "running") {
      load().then(() => { if (job.kind === "finalize" && job.state === "done") showQc(job.session); });
    }
  }

  async function showQc(sessionId, scroll = true) {
    shown = sessionId;
    try {
      const qc = await request("GET", `/api/console/sessions/${encodeURIComponent(sessionId)}/qc`);
      const verdict = qc.verdict || {};
      const imgs = await Promise.all(qc.plots.map(async (p) => {
        const img = el("img", { class: "qc-plot", alt: `QC plots of ${p.stream}` });
        img.src = await fetchBlobUrl(p.url);
        return el("figure", {}, img, el("figcaption", {}, p.stream));
      }));
      detail.replaceChildren(el("div", { class: "card qc", "data-session": sessionId },
        el("h3", {}, `QC report: ${sessionId}`),
        el("p", { class: `qc-verdict ${verdict.level || ""}` },
          `verdict: ${verdict.text || "unknown"}`),
        el("ul", { class: "qc-reasons" }, ...(verdict.reasons || []).map((r) => el("li", {}, r))),
        el("dl", { class: "paths" },
          el("dt", {}, "master NWB"), el("dd", {}, el("code", {}, qc.master || "–")),
          el("dt", {}, "report folder"), el("dd", {}, el("code", {}, qc.qc_dir || "–")),
          qc.index_url ? el("dt", {}, "report page") : null,
          qc.index_url ? el("dd", {}, el("a", { href: qc.index_url, target: "_blank" }, "qc/index.html")) : null),
        el("div", { class: "qc-plots" }, ...imgs)));
      if (scroll) detail.scrollIntoView({ block: "nearest" });
    } catch (err) { onError(err); }
  }

  /** What the daemon logged while the session recorded (log.jsonl): the last lines, warnings in red. */
  async function showLog(sessionId) {
    shown = null;
    try {
      const log = await request("GET", `/api/console/sessions/${encodeURIComponent(sessionId)}/log?tail=300`);
      const items = log.lines.map((l) => el("li", { class: `log-line ${l.level}` },
        el("time", {}, (l.time || "").replace("T", " ").slice(11, 23)), " ", el("span", { class: "level" }, l.level),
        " ", l.message));
      detail.replaceChildren(el("div", { class: "card session-log", "data-session": sessionId },
        el("h3", {}, `Session log: ${sessionId}`),
        el("p", { class: "info" }, log.total > log.lines.length ? `last ${log.lines.length} of ${log.total} lines`
          : `${log.total} lines`),
        el("ul", { class: "feed" }, ...items)));
      detail.scrollIntoView({ block: "nearest" });
    } catch (err) { onError(err); }
  }

  bus.on("job", onJob);
  bus.on("session-closed", load);
  bus.on("session-started", load);
  load();
}
