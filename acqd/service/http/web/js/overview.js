// Rig overview: the mode and the buttons that make sense in it, the session and its elapsed time, disk free
// and time left, and one card per stream, with its live sync lock and drift sparkline. Drawn from the pushed
// status snapshots (no polling).

import { command, el, fmtBytes, fmtDuration } from "./api.js";

const BUTTONS = {
  IDLE: [["Acquire", "acquire", {}]],
  ACQUIRE: [["Stop acquiring", "stop", { idle: true }]],
  RECORD: [["Stop recording", "stop", {}], ["Stop and go idle", "stop", { idle: true }]],
};

/** The writer's load, in words: "ok", or how far behind it is and what it sheds (issue 24; acqd.record.load). */
export function loadText(s) {
  const load = s.load || {};
  if (s.closing) return `closing: encoder ${s.closing.encoder_backlog ?? 0} frames to go`;
  if (!Object.keys(load).length) return "–";
  const parts = [];
  if (load.overloaded) parts.push(`behind ${(load.behind_s ?? 0).toFixed(1)} s, ${load.backlog_messages ?? 0} msgs`);
  if (load.encoder_limit) parts.push(`encoder ${load.encoder_backlog ?? 0}/${load.encoder_limit}`);
  parts.push(`flush ${((load.flush_max_s ?? 0) * 1000).toFixed(0)} ms`);
  return (load.overloaded ? "" : "ok · ") + parts.join(" · ");
}

/** What is wrong with a stream, in words (an empty list: nothing). */
export function streamProblems(s, silentAfter, mode) {
  const out = [];
  if (s.state === "failed" || s.state === "stopped_failed") out.push(`stopped: ${s.reason || s.state}`);
  if (mode !== "IDLE" && s.state !== "stopped") {
    if (!s.connected) out.push("no driver connected");
    if (s.silent_s == null) out.push("no message received yet");
    else if (s.silent_s > silentAfter) out.push(`silent for ${s.silent_s.toFixed(1)} s`);
  }
  if ((s.load || {}).overloaded) out.push(`writer behind; shedding ${(s.shedding || []).join(", ") || "nothing yet"}`);
  const lost = Object.entries(s.lost || {}).filter(([, n]) => n);
  if (s.gaps) out.push(`${s.gaps} gap${s.gaps > 1 ? "s" : ""}` + (lost.length ? ` (lost ${lost.map(([why, n]) => `${n} ${why}`).join(", ")})` : ""));
  if (s.rejected) out.push(`${s.rejected} rejected`);
  if (s.restarts) out.push(`writer restarted ${s.restarts}×`);
  if (s.sync && BAD_SYNC.includes(s.sync.state)) out.push(`sync ${s.sync.state}` + (s.sync.reason ? `: ${s.sync.reason}` : ""));
  return out;
}

// The live sync lock's states (acqd/service/synclock.py): the ones that alarm, and each one's look.
const BAD_SYNC = ["no edges", "not pairing", "drift out of range"];
const SVG = "http://www.w3.org/2000/svg";

/** The lock indicator's text and class for a stream's ``sync`` (null: no sync line of its own, or not recording). */
export function syncLook(sync) {
  if (!sync) return ["sync –", "off"];
  const drift = sync.drift_ppm == null ? "" : ` ${sync.drift_ppm >= 0 ? "+" : ""}${sync.drift_ppm.toFixed(1)} ppm`;
  if (sync.state === "locked") return [`sync locked${drift}`, "ok"];
  if (sync.state === "searching") return ["sync searching…", "wait"];
  return [`sync ${sync.state}`, "bad"];
}

/** A tiny inline SVG line of the drift values (ppm), scaled to their own range; empty with fewer than 2. */
function drawSparkline(svg, values) {
  const w = 120, h = 18;
  const line = svg.firstChild;
  if (!values || values.length < 2) { line.setAttribute("points", ""); return; }
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  line.setAttribute("points", values.map((v, i) =>
    `${(i * w / (values.length - 1)).toFixed(1)},${(h - 1 - (v - lo) * (h - 2) / span).toFixed(1)}`).join(" "));
  svg.querySelector("title").textContent = `drift ${lo.toFixed(2)} … ${hi.toFixed(2)} ppm over the last ${values.length} s`;
}

function sparkline() {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "drift");
  svg.setAttribute("viewBox", "0 0 120 18");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.append(document.createElementNS(SVG, "polyline"), document.createElementNS(SVG, "title"));
  return svg;
}

export function createOverview({ bus, info, onError }) {
  const modeEl = document.getElementById("mode");
  const buttonsEl = document.getElementById("mode-buttons");
  const sessionEl = document.getElementById("session-info");
  const diskEl = document.getElementById("disk-info");
  const verdictEl = document.getElementById("verdict");
  const cardsEl = document.getElementById("streams");
  const silentAfter = info.silent_after_s ?? 2;
  const cards = new Map();
  let sessionStart = null;
  let shownMode = null;
  let busy = false;

  for (const s of info.streams) {
    const fields = {};
    const row = (label, key) => el("div", { class: "kv" }, el("span", {}, label), fields[key] = el("b", { class: key }));
    const card = el("article", { class: "card stream", "data-stream": s.name },
      el("header", {}, el("h3", {}, s.name), el("span", { class: "kind" }, s.kind)),
      fields.driver = el("div", { class: "driver" }, "…"),
      row("msg/s", "msgs"), row("MB/s", "mbs"), row("last message", "age"),
      row("gaps", "gaps"), row("rejected", "rejected"), row("restarts", "restarts"), row("state", "state"),
      row("load", "load"),
      el("div", { class: "sync" }, fields.lock = el("span", { class: "lock off" }, "sync –"),
        fields.drift = sparkline()),
      fields.problems = el("ul", { class: "problems" }));
    cards.set(s.name, fields);
    cardsEl.append(card);
  }

  function drawButtons(mode) {
    if (mode === shownMode) return;
    shownMode = mode;
    buttonsEl.replaceChildren(...(BUTTONS[mode] || []).map(([label, name, body]) =>
      el("button", { type: "button", "data-command": name, onclick: async (ev) => {
        if (busy) return;
        busy = true;
        ev.target.disabled = true;
        try { bus.emit("status", await command(name, body)); } catch (err) { onError(err); }
        finally { busy = false; ev.target.disabled = false; }
      } }, label)));
    if (mode !== "RECORD") {
      buttonsEl.append(el("button", { type: "button", onclick: () => document.getElementById("f-session").focus() },
        "Record…"));
    }
  }

  function drawCard(fields, s, mode) {
    const problems = streamProblems(s, silentAfter, mode);
    fields.driver.textContent = s.connected ? "driver connected" : "no driver";
    fields.driver.className = `driver ${s.connected ? "ok" : mode === "IDLE" ? "off" : "bad"}`;
    fields.msgs.textContent = (s.messages_per_s ?? 0).toFixed(0);
    fields.mbs.textContent = (s.mb_per_s ?? 0).toFixed(2);
    fields.age.textContent = s.silent_s == null ? "never" : `${s.silent_s.toFixed(1)} s ago`;
    fields.gaps.textContent = s.gaps ?? 0;
    fields.rejected.textContent = s.rejected ?? 0;
    fields.restarts.textContent = s.restarts ?? 0;
    fields.state.textContent = s.state;
    fields.load.textContent = loadText(s);
    fields.load.classList.toggle("bad", !!(s.load || {}).overloaded);
    const [lockText, lockClass] = syncLook(s.sync);
    fields.lock.textContent = lockText;
    fields.lock.className = `lock ${lockClass}`;
    fields.lock.title = s.sync ? [s.sync.reason, `${s.sync.paired}/${s.sync.edges} edges paired`,
      s.sync.offset_s == null ? "" : `offset ${s.sync.offset_s.toFixed(6)} s`].filter(Boolean).join(" · ") : "";
    drawSparkline(fields.drift, s.sync && s.sync.drift_history);
    fields.problems.replaceChildren(...problems.map((p) => el("li", {}, p)));
    fields.driver.closest(".card").classList.toggle("has-problems", problems.length > 0);
    return problems;
  }

  function drawSession(status) {
    const s = status.session;
    const started = s && (s.started || s.created);
    sessionStart = s ? (started ? Date.parse(started) : Date.now() - 1000 * (s.elapsed_s || 0)) : null;
    sessionEl.replaceChildren(...(s ? [el("span", {}, "session "), el("b", { id: "session-id" }, s.session_id),
      el("span", { id: "elapsed" }, "")] : status.last_session ? [el("span", {}, `last session ${status.last_session.session_id}`)] : []));
    tick();
  }

  function tick() {
    const e = document.getElementById("elapsed");
    if (e && sessionStart) e.textContent = ` recording ${fmtDuration((Date.now() - sessionStart) / 1000)}`;
  }
  setInterval(tick, 1000);

  function drawDisk(status) {
    const free = status.disk_free_bytes;
    const rate = Object.values(status.streams || {}).reduce((a, s) => a + (s.mb_per_s || 0), 0) * 1e6;
    const left = status.disk_time_left_s ?? (rate > 0 ? free / rate : null);
    if (free == null) { diskEl.textContent = "data root unreadable"; diskEl.classList.add("bad"); return; }
    diskEl.textContent = `disk free ${fmtBytes(free)}` + (left != null && status.mode !== "IDLE" ? ` · ${fmtDuration(left)} left at ${fmtBytes(rate)}/s` : "");
    diskEl.classList.toggle("bad", left != null && left < 3600 && status.mode !== "IDLE");
  }

  bus.on("status", (status) => {
    if (!status || !status.mode) return;
    modeEl.textContent = status.mode;
    modeEl.dataset.mode = status.mode;
    drawButtons(status.mode);
    drawSession(status);
    drawDisk(status);
    const problems = [];
    for (const [name, s] of Object.entries(status.streams || {})) {
      const fields = cards.get(name);
      if (fields) problems.push(...drawCard(fields, s, status.mode).map((p) => `${name}: ${p}`));
    }
    // The daemon's own verdict (the first problem named) when it sends one; else the cards' problems.
    const v = status.verdict;
    const bad = v ? !v.ok : problems.length > 0;
    verdictEl.textContent = status.mode === "IDLE" && !bad ? "" : v ? (v.ok ? "all streams OK" : v.line)
      : problems.length ? `PROBLEM: ${problems[0]}` + (problems.length > 1 ? ` (+${problems.length - 1} more)` : "")
      : "all streams OK";
    verdictEl.className = `verdict ${bad ? "bad" : "ok"}`;
    verdictEl.title = v && v.problems ? v.problems.join("\n") : problems.join("\n");
  });
}
