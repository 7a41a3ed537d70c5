// Record form: session name and metadata, prefilled from the config and the last session (the subject excepted:
// it starts empty, the last subject one labelled click away), checked by the daemon's own models as you type
// (errors beside each field), preflight problems shown before the button.

import { ApiError, command, el, request } from "./api.js";

const PREFLIGHT_EVERY_MS = 1000; // never more often than once a second

function setPath(obj, path, value) {
  const keys = path.split(".");
  let node = obj;
  for (const k of keys.slice(0, -1)) node = node[k] ??= {};
  node[keys[keys.length - 1]] = value;
}

function getPath(obj, path) {
  return path.split(".").reduce((node, k) => (node == null ? undefined : node[k]), obj);
}

export function createRecordForm({ bus, info, onError }) {
  const form = document.getElementById("record-form");
  const button = document.getElementById("record-button");
  const formError = document.getElementById("record-error");
  const preflightEl = document.getElementById("preflight");
  const inputs = [...form.querySelectorAll("input, select")];
  let mode = null;
  let lastPreflight = 0;
  let checking = null;

  const lastSubjectButton = document.getElementById("last-subject");
  const isSubject = (input) => input.name.startsWith("subject.");

  // Prefill the session's fields from the config's defaults, then what the last session used. The subject is never
  // prefilled: a recording of another animal must not inherit the last one's. The last subject is offered as one
  // labelled click instead.
  const prefill = info.last_metadata || info.metadata_defaults || {};
  for (const input of inputs) {
    if (input.name === "session" || isSubject(input)) continue;
    const v = getPath(prefill, input.name) ?? getPath(info.metadata_defaults || {}, input.name);
    if (v != null) input.value = Array.isArray(v) ? v.join("; ") : v;
  }
  let last = null;
  function offerLast(subject) {
    last = subject && subject.subject_id ? subject : null;
    lastSubjectButton.hidden = !last;
    if (!last) return;
    const details = [last.species, last.sex, last.age].filter(Boolean).join(", ");
    lastSubjectButton.textContent = `Same animal as the last session: ${last.subject_id}` + (details ? ` (${details})` : "");
  }
  lastSubjectButton.addEventListener("click", () => {
    for (const input of inputs.filter(isSubject)) {
      const v = last ? getPath({ subject: last }, input.name) : null;
      input.value = v == null ? "" : v;
    }
    form.dispatchEvent(new Event("input"));
  });
  offerLast((info.last_metadata || {}).subject);

  function body() {
    // An empty field is left out: the config's default for it applies, as it does for the record command (the
    // config has no subject: an empty subject is reported beside its fields).
    const metadata = {};
    for (const input of inputs) {
      const v = input.value.trim();
      if (input.name === "session" || v === "") continue;
      setPath(metadata, input.name, input.name === "experimenter" ? v.split(";").map((x) => x.trim()).filter(Boolean) : v);
    }
    const session = form.elements.session.value.trim();
    return session ? { session, metadata } : { metadata };
  }

  /** A field's error: its first sentence (and the check's name), the rest of a long one behind "more". */
  function showMessage(span, msg) {
    const check = msg.match(/\s*(\(check_\w+\))\s*$/);
    const text = check ? msg.slice(0, check.index) : msg;
    const cut = text.search(/[.;]\s+(?=[A-Z])/);  // a sentence's end ("e.g. 'P2Y'" is not one)
    if (cut < 0) {
      span.textContent = msg;
      return;
    }
    span.replaceChildren(el("span", { class: "short" }, text.slice(0, cut + 1), check ? ` ${check[1]}` : ""),
      el("details", {}, el("summary", {}, "more"), text.slice(cut + 1).trim()));
  }

  function showErrors(errors) {
    for (const span of form.querySelectorAll("[data-error-for]")) {
      const msg = errors[span.dataset.errorFor] || "";
      showMessage(span, msg);
      const input = form.querySelector(`[name="${span.dataset.errorFor}"]`);
      if (input) input.setAttribute("aria-invalid", msg ? "true" : "false");
    }
    return Object.keys(errors).length === 0;
  }

  async function validate() {
    const result = await request("POST", "/api/console/validate", body());
    return showErrors(result.errors || {});
  }

  form.addEventListener("input", () => {
    clearTimeout(checking);
    checking = setTimeout(() => validate().catch(onError), 300);
  });

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearTimeout(checking);  // a check still pending would run after the folder exists
    formError.textContent = "";
    button.disabled = true;
    try {
      if (!(await validate())) return;
      button.textContent = "Starting…";
      const sent = body();
      const status = await command("record", sent);
      form.elements.session.value = "";
      for (const input of inputs.filter(isSubject)) input.value = "";  // the next session names its own animal
      offerLast(sent.metadata.subject);
      showErrors({});
      bus.emit("status", status);
    } catch (err) {
      if (err instanceof ApiError && err.body && err.body.errors) showErrors(err.body.errors);
      formError.textContent = err.message;
    } finally {
      button.disabled = false;
      button.textContent = "Start recording";
    }
  });

  async function preflight() {
    lastPreflight = Date.now();
    try {
      const { problems } = await command("preflight");
      preflightEl.replaceChildren(...problems.map((p) => el("li", {}, p)));
    } catch (err) { onError(err); }
  }

  bus.on("status", (status) => {
    if (!status || !status.mode) return;
    if (status.mode !== mode) {
      mode = status.mode;
      form.classList.toggle("recording", mode === "RECORD");
      button.hidden = mode === "RECORD";
      if (mode === "IDLE") preflightEl.replaceChildren(el("li", { class: "note" },
        "Not acquiring: starting a recording acquires first and waits for every required stream."));
      if (mode === "RECORD") preflightEl.replaceChildren(el("li", { class: "note" }, "Recording."));
    }
    if (mode === "ACQUIRE" && Date.now() - lastPreflight >= PREFLIGHT_EVERY_MS) preflight();
  });
}
