// Annotate: a text box and the rig's quick buttons send a timestamped note into the session (during ACQUIRE
// or RECORD); the recent notes are listed with their times, as the daemon reports them.

import { el, fmtTime, request } from "./api.js";

const RECENT = 20;

export function createAnnotate({ bus, info }) {
  const form = document.getElementById("annotate-form");
  const input = document.getElementById("annotation-text");
  const error = document.getElementById("annotate-error");
  const list = document.getElementById("annotations");
  const quick = document.getElementById("quick-annotations");
  const seen = new Set();

  async function send(text) {
    error.textContent = "";
    try {
      const reply = await request("PUT", "/api/message", { text });
      bus.emit("annotation", reply && reply.text ? reply : { text, taken_at: new Date().toISOString() });
      return true;
    } catch (err) {
      error.textContent = err.message;
      return false;
    }
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (text && (await send(text))) input.value = "";
  });
  quick.replaceChildren(...(info.annotation_buttons || []).map((text) =>
    el("button", { type: "button", onclick: () => send(text) }, text)));

  bus.on("annotation", (a) => {
    const time = a.taken_at || a.time || new Date().toISOString();
    const key = `${a.host_time_ns || time}|${a.text}`;
    if (seen.has(key)) return;  // our own reply and the pushed event describe the same note
    seen.add(key);
    list.prepend(el("li", { class: "annotation" }, el("time", {}, fmtTime(time)), " ", el("span", {}, a.text)));
    while (list.children.length > RECENT) list.lastChild.remove();
  });

  async function load() {
    try {
      const { annotations } = await request("GET", "/api/console/annotations");
      annotations.slice(-RECENT).forEach((a) => bus.emit("annotation", a));
    } catch (err) { error.textContent = err.message; }
  }
  bus.on("session-started", () => { list.replaceChildren(); load(); });
  load();

  bus.on("status", (status) => {
    const live = status && (status.mode === "ACQUIRE" || status.mode === "RECORD");
    for (const b of form.querySelectorAll("button, input")) b.disabled = !live;
    for (const b of quick.querySelectorAll("button")) b.disabled = !live;
    input.placeholder = live ? "note, e.g. drug on" : "notes can be added while acquiring or recording";
  });
}
