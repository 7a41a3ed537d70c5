// The console: loads the rig's description, starts each panel and feeds them the daemon's live events.

import { Bus, el, follow, request, setToken } from "./api.js";
import { createAnnotate } from "./annotate.js";
import { createIncidents } from "./incidents.js";
import { createNodes } from "./nodes.js";
import { createOverview } from "./overview.js";
import { createPreview } from "./preview.js";
import { createProbes } from "./probe.js";
import { createRecordForm } from "./record.js";
import { createSessions } from "./sessions.js";
import { createShipping } from "./shipping.js";

function showError(err) {
  console.error(err);
  const box = document.getElementById("toasts") || document.body.appendChild(el("div", { id: "toasts" }));
  const toast = el("div", { class: "toast", role: "alert" }, String(err.message || err));
  box.append(toast);
  setTimeout(() => toast.remove(), 8000);
}

document.getElementById("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  setToken(document.getElementById("login-token").value);
});

async function main() {
  const info = await request("GET", "/api/console/info");
  const bus = new Bus();
  const ctx = { bus, info, onError: showError };
  createOverview(ctx);
  createNodes(ctx);  // a rig's leader: the streams grouped by node
  createRecordForm(ctx);
  createAnnotate(ctx);
  createIncidents(ctx);
  createSessions(ctx);
  createPreview(ctx);
  createProbes(ctx);
  createShipping(ctx);

  // Session boundaries, from the snapshots, for the panels that list sessions and incidents.
  let session;
  bus.on("status", (status) => {
    if (!status || !status.mode) return;
    const id = status.session ? status.session.session_id : null;
    if (session !== undefined && id !== session) bus.emit(id ? "session-started" : "session-closed", id || session);
    session = id;
  });

  const link = document.getElementById("link");
  follow("/api/events", (type, data) => {
    bus.emit(type, data);
    if (type === "mode" && data && data.status) bus.emit("status", data.status);
  }, (state) => {
    link.textContent = state === "live" ? "live" : state;
    link.className = `link ${state === "live" ? "ok" : "bad"}`;
  });
  bus.emit("status", await request("GET", "/api/status"));
}

main().catch(showError);
