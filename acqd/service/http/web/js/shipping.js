// Shipping: the ship queue (docs/shipping.md): one row per job with a progress bar from rclone's stats, the
// verified copies, and failures with their reason and a Retry button. Hidden when the rig ships nowhere.

import { command, el, fmtBytes, fmtDuration, fmtTime } from "./api.js";

export function createShipping({ bus, onError }) {
  const panel = document.getElementById("shipping-panel");
  const body = document.querySelector("#ship-jobs tbody");
  const summary = document.getElementById("ship-summary");
  const rows = new Map();  // job id -> its row's cells

  function row(job) {
    const bar = el("progress", { max: job.bytes_total || 1, value: job.bytes_done });
    const rate = el("span", { class: "rate" });
    const retry = job.state === "failed"
      ? el("button", { class: "retry", onclick: () => command("ship_retry", { id: job.id }).then(load, onError) },
        "Retry") : null;
    const tr = el("tr", { "data-job": job.id, class: `ship-${job.state}` },
      el("td", {}, String(job.id)), el("td", {}, job.session), el("td", {}, job.dest),
      el("td", { class: "state" }, job.state === "verified" ? `verified ${fmtTime(job.finished)}` : job.state),
      el("td", { class: "progress" }, bar, " ", rate),
      el("td", {}, String(job.attempts)),
      el("td", { class: "error" }, job.error || ""), el("td", {}, retry));
    rows.set(job.id, { bar, rate });
    return tr;
  }

  async function load() {
    let st;
    try {
      st = await command("ship_status");
    } catch (err) {
      if (err.status === 409) { panel.hidden = true; return; }  // no ship: destinations in the rig config
      onError(err);
      return;
    }
    panel.hidden = false;
    rows.clear();
    body.replaceChildren(...[...st.jobs].reverse().map(row));
    const paused = st.destinations.filter((d) => d.paused).map((d) => d.name);
    summary.textContent = `(${st.verified} verified, ${st.failed} failed, ${fmtBytes(st.queued_bytes)} to ship`
      + (paused.length ? `; paused while recording: ${paused.join(", ")})` : ")");
  }

  bus.on("ship_progress", (p) => {
    const cells = rows.get(p.id);
    if (!cells) return;
    cells.bar.max = p.total || 1;
    cells.bar.value = p.bytes;
    cells.rate.textContent = `${fmtBytes(p.bytes)} / ${fmtBytes(p.total)}`
      + (p.speed_bytes_s ? ` · ${fmtBytes(p.speed_bytes_s)}/s` : "") + (p.eta_s ? ` · ETA ${fmtDuration(p.eta_s)}` : "");
  });
  for (const type of ["ship_queued", "shipped", "ship_failed", "ship_refused", "ship_deleted", "mode"]) {
    bus.on(type, load);
  }
  load();
}
