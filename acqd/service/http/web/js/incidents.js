// Incidents: the session's gaps, reject bursts, disconnects, writer restarts and disk warnings, newest first.

import { el, fmtTime, request } from "./api.js";

const SHOWN = 200;

export function createIncidents({ bus, onError }) {
  const list = document.getElementById("incidents");
  const count = document.getElementById("incident-count");
  let total = 0;

  function add(inc, atTop = true) {
    const item = el("li", { class: `incident kind-${inc.kind}` },
      el("time", {}, fmtTime(inc.time)), " ",
      el("b", { class: "kind" }, inc.kind.replaceAll("_", " ")), " ",
      inc.stream ? el("span", { class: "stream" }, inc.stream) : null, " ",
      el("span", { class: "detail" }, inc.detail || ""));
    if (atTop) list.prepend(item); else list.append(item);
    while (list.children.length > SHOWN) list.lastChild.remove();
    total += 1;
    count.textContent = `(${total})`;
  }

  async function load() {
    try {
      const { session, incidents } = await request("GET", "/api/console/incidents");
      list.replaceChildren();
      total = 0;
      [...incidents].reverse().forEach((inc) => add(inc, false));
      count.textContent = session ? `(${total}, session ${session})` : `(${total})`;
    } catch (err) { onError(err); }
  }

  bus.on("incident", (inc) => add(inc));
  bus.on("session-started", load);
  load();
}
