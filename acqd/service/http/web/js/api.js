// The control API seen from the page: requests with the token, the live event stream, a login on 401.
//
// EventSource cannot send an Authorization header, so the event streams are read with fetch and parsed here
// (the text/event-stream format: "event:" and "data:" lines, a blank line ends an event).

const TOKEN_KEY = "acqd-token";
let token = sessionStorage.getItem(TOKEN_KEY);
let loginWaiters = [];

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

function headers(extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

/** Resolve once the user has entered a token (the login form calls setToken). */
function needLogin() {
  document.getElementById("login").hidden = false;
  document.getElementById("login-token").focus();
  return new Promise((resolve) => loginWaiters.push(resolve));
}

export function setToken(value) {
  token = value;
  sessionStorage.setItem(TOKEN_KEY, value);
  document.getElementById("login").hidden = true;
  const waiting = loginWaiters;
  loginWaiters = [];
  waiting.forEach((resolve) => resolve());
}

/** The error text of a reply: {"error": "..."} (acqd), or FastAPI's {"detail": ...}. */
function errorText(body, status) {
  if (body && typeof body.error === "string") return body.error;
  if (body && body.detail) {
    return Array.isArray(body.detail) ? body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ")
      : String(body.detail);
  }
  return `HTTP ${status}`;
}

export async function request(method, path, body) {
  for (;;) {
    const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
    if (body !== undefined) init.body = JSON.stringify(body);
    const resp = await fetch(path, init);
    if (resp.status === 401) {
      document.getElementById("login-error").textContent = token ? "wrong token" : "";
      await needLogin();
      continue;
    }
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = { error: text }; }
    if (!resp.ok) throw new ApiError(resp.status, errorText(data, resp.status), data);
    return data;
  }
}

export const command = (name, body = {}) => request("POST", `/api/commands/${name}`, body);

/** An image (or any file) behind the token, as an object URL an <img> can show. */
export async function fetchBlobUrl(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw new ApiError(resp.status, `HTTP ${resp.status}`);
  return URL.createObjectURL(await resp.blob());
}

/**
 * Follow a server-sent event stream, reconnecting after a pause; onEvent(type, data) per event,
 * onState("live" | "reconnecting" | ...) when the connection changes. Returns a function that stops it.
 */
export function follow(path, onEvent, onState = () => {}) {
  let stopped = false;
  let controller = null;
  (async () => {
    let pause = 500;
    while (!stopped) {
      controller = new AbortController();
      try {
        const resp = await fetch(path, { headers: headers({ Accept: "text/event-stream" }),
                                         signal: controller.signal, cache: "no-store" });
        if (resp.status === 401) { await needLogin(); continue; }
        if (!resp.ok || !resp.body) throw new Error(`HTTP ${resp.status}`);
        onState("live");
        pause = 500;
        await readEvents(resp.body, onEvent);
      } catch (err) {
        if (stopped) return;
      }
      onState("reconnecting");
      await new Promise((r) => setTimeout(r, pause));
      pause = Math.min(pause * 2, 5000);
    }
  })();
  return () => { stopped = true; if (controller) controller.abort(); };
}

async function readEvents(stream, onEvent) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let type = "message";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl).replace(/\r$/, "");
      buffer = buffer.slice(nl + 1);
      if (line === "") {
        if (data.length) dispatch(onEvent, type, data.join("\n"));
        type = "message";
        data = [];
      } else if (line.startsWith("event:")) {
        type = line.slice(6).trim();
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      }
    }
  }
}

function dispatch(onEvent, type, text) {
  let data;
  try { data = JSON.parse(text); } catch { data = text; }
  try { onEvent(type, data); } catch (err) { console.error(`handling ${type} event`, err); }
}

/** A tiny pub/sub so that each panel subscribes to the event types it draws. */
export class Bus {
  constructor() { this.handlers = new Map(); }
  on(type, fn) {
    if (!this.handlers.has(type)) this.handlers.set(type, []);
    this.handlers.get(type).push(fn);
  }
  emit(type, data) { (this.handlers.get(type) || []).forEach((fn) => fn(data)); }
}

// -- formatting shared by the panels --------------------------------------------------------------------
export function fmtBytes(n) {
  if (n == null) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function fmtDuration(s) {
  if (s == null || !isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}:${String(m).padStart(2, "0")}:${String(sec).padStart(2, "0")}` : `${m}:${String(sec).padStart(2, "0")}`;
}

export function fmtTime(t) {
  if (t == null || t === "") return "";
  const d = typeof t === "number" ? new Date(t * 1000) : new Date(t);  // epoch seconds or ISO 8601
  return isNaN(d) ? String(t) : d.toLocaleTimeString([], { hour12: false });
}

/** Create an element: el("td", {class: "x"}, "text", child...). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c != null));
  return node;
}
