// Live preview: scrolling traces of a few channels (uPlot) and a per-channel RMS strip for ephys/analog
// streams, a thumbnail with the measured frame rate and dropped frames for cameras, the last values of
// sensors. The writers decimate their own data, and only while this stream is open: the page closes it
// when the tab is hidden, so an unwatched console costs the data path nothing.

import uPlot from "../vendor/uplot/uPlot.esm.js";
import { el, follow, request } from "./api.js";

const WINDOW_S = 5;
const STALE_S = 2;  // four preview periods without a message: the picture shown is no longer live
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

/** "1-4, 9" -> [1, 2, 3, 4, 9] (at most 8). */
export function parseChannels(text) {
  const out = [];
  for (const part of text.split(/[\s,]+/).filter(Boolean)) {
    const m = part.match(/^(\d+)(?:-(\d+))?$/);
    if (!m) return null;
    const a = Number(m[1]), b = m[2] === undefined ? a : Number(m[2]);
    for (let c = a; c <= b && out.length < 8; c++) out.push(c);
  }
  return out.length ? out : null;
}

function siValue(v, units) {
  if (units === "volts" || units === "V") {
    const a = Math.abs(v);
    return a >= 1 ? `${v.toFixed(2)} V` : a >= 1e-3 ? `${(v * 1e3).toFixed(2)} mV` : `${(v * 1e6).toFixed(1)} µV`;
  }
  return `${Number(v.toPrecision(4))} ${units}`;
}

function heat(x) { // 0..1 -> a perceptually ordered colour (dark blue -> yellow)
  const h = 240 - 180 * x, l = 25 + 45 * x;
  return `hsl(${h}, 80%, ${l}%)`;
}

class TraceView {
  constructor(stream, body) {
    this.stream = stream;
    this.t = [];
    this.y = [];
    this.channels = [];
    this.status = el("span", { class: "trace-status" }, "waiting for data");
    this.input = el("input", { class: "channels", size: 10, title: "channels to draw, e.g. 1-4 or 0, 5, 9" });
    const error = el("span", { class: "error" });
    const apply = async () => {
      const chans = parseChannels(this.input.value);
      error.textContent = chans ? "" : "use numbers and ranges, e.g. 1-4, 9";
      if (!chans) return;
      try { await request("PUT", `/api/console/preview/${stream.name}`, { channels: chans }); }
      catch (err) { error.textContent = err.message; }
    };
    this.input.addEventListener("change", apply);
    this.plotBox = el("div", { class: "plot" });
    new ResizeObserver(() => {
      if (this.plot && this.plotBox.clientWidth) this.plot.setSize({ width: this.plotBox.clientWidth, height: 120 });
    }).observe(this.plotBox);
    body.append(el("div", { class: "trace-head" }, el("label", {}, "channels ", this.input), error, this.status),
      this.plotBox);
    if (stream.kind === "ephys" || stream.kind === "analog") {
      this.rmsCanvas = el("canvas", { class: "rms", height: 14 });
      this.rmsText = el("span", { class: "rms-text" });
      body.append(el("div", { class: "rms-row" }, el("span", {}, "RMS per channel "), this.rmsCanvas, this.rmsText));
    }
  }

  makePlot(names) {
    if (this.plot) this.plot.destroy();
    const width = Math.max(300, this.plotBox.clientWidth || 560);
    this.plot = new uPlot({
      width, height: 120, legend: { show: false }, cursor: { show: false },
      scales: { x: { time: false } },
      axes: [{ size: 24, values: (u, ticks) => ticks.map((v) => `${v.toFixed(1)}s`) }, { show: false }],  // session s
      series: [{}, ...names.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length], width: 1 }))],
    }, [[], ...names.map(() => [])], this.plotBox);
  }

  update(msg) {
    const tr = msg.traces;
    if (tr) {
      // Device sample index -> session seconds (t_offset: acqd.record.preview.HostClock), raw -> the stream's units.
      const t = tr.samples.map((s) => s / msg.nominal_rate + (msg.t_offset ?? 0));
      const y = tr.y.map((vals) => vals.map((v) => (v === null ? null : v * msg.scale + msg.offset)));
      const key = tr.channels.join(",");
      if (key !== this.channels.join(",") || (this.t.length && t[0] < this.t[this.t.length - 1])) {
        this.channels = tr.channels;  // another selection, or the device counter restarted: start afresh
        this.t = [];
        this.y = tr.channels.map(() => []);
        this.makePlot(tr.names);
        if (document.activeElement !== this.input) this.input.value = tr.channels.join(", ");
      }
      const prev = this.t[this.t.length - 1];
      if (prev !== undefined && t[0] - prev > 0.1) {  // samples missing (a gap, a writer restart): break the line
        this.t.push(prev + 1e-6);
        this.y.forEach((a) => a.push(null));
      }
      this.t.push(...t);
      y.forEach((vals, i) => this.y[i].push(...vals));
      const last = this.t[this.t.length - 1];
      let cut = 0;
      while (cut < this.t.length && this.t[cut] < last - WINDOW_S) cut++;
      if (cut) { this.t.splice(0, cut); this.y.forEach((a) => a.splice(0, cut)); }
      this.draw(msg.units);
      this.status.textContent = `t = ${last.toFixed(2)} s · ${tr.channels.length} ch · ${msg.rate.toFixed(0)} samples/s`;
    }
    if (msg.rms && this.rmsCanvas) this.drawRms(msg.rms.map((v) => (v === null ? null : v * msg.rms_scale)), msg.units);
  }

  draw(units) {
    // Each channel about its own mean, stacked with one spacing (like a multi-channel scope).
    const centred = this.y.map((a) => {
      const vals = a.filter((v) => v !== null);
      const m = vals.reduce((s, v) => s + v, 0) / (vals.length || 1);
      return a.map((v) => (v === null ? null : v - m));
    });
    const spread = Math.max(1e-12, ...centred.map((a) => a.reduce((s, v) => Math.max(s, Math.abs(v ?? 0)), 0)));
    const n = centred.length;
    const data = [this.t, ...centred.map((a, i) => a.map((v) => (v === null ? null : v + (n - 1 - i) * 2.2 * spread)))];
    this.plot.setData(data);
    this.plotBox.dataset.t0 = this.t[0].toFixed(3);  // the window shown, in session seconds
    this.plotBox.dataset.t1 = this.t[this.t.length - 1].toFixed(3);
    this.plotBox.title = `each channel about its mean, spacing ${siValue(2.2 * spread, units)}`;
  }

  drawRms(rms, units) {
    const c = this.rmsCanvas;
    const w = c.width = Math.max(100, c.parentElement.clientWidth - 260);
    const ctx = c.getContext("2d");
    const signal = rms.filter((v) => v != null);  // null: the sync word, not a signal
    const max = Math.max(...signal) || 1;
    const cw = w / rms.length;
    rms.forEach((v, i) => {
      ctx.fillStyle = v == null ? "#bbb" : heat(v / max);
      ctx.fillRect(Math.floor(i * cw), 0, Math.ceil(cw), c.height);
    });
    const sorted = [...signal].sort((a, b) => a - b);
    const flat = signal.filter((v) => v === 0).length;
    this.rmsText.textContent = `median ${siValue(sorted[sorted.length >> 1], units)}, max ${siValue(max, units)}` +
      (flat ? ` · ${flat} flat channel${flat > 1 ? "s" : ""}` : "");
    this.rmsText.classList.toggle("bad", flat > 0);
  }
}

class CameraView {
  constructor(stream, body) {
    // Hidden until the first frame: an <img> without a picture draws a broken-image icon.
    this.img = el("img", { class: "thumbnail", alt: `${stream.name} thumbnail`, hidden: true });
    this.text = el("span", { class: "camera-status" }, "waiting for frames");
    body.append(this.img, this.text);
  }

  update(msg) {
    if (msg.thumbnail) {
      this.img.src = msg.thumbnail.src;
      this.img.dataset.frame = msg.thumbnail.frame;
      this.img.hidden = false;
      if (msg.t_offset != null) this.at = msg.thumbnail.frame / msg.nominal_rate + msg.t_offset;  // session seconds
    }
    this.text.textContent = `${msg.rate.toFixed(1)} fps (nominal ${msg.nominal_rate}) · ${msg.dropped} dropped` +
      (this.at != null ? ` · frame at ${this.at.toFixed(2)} s` : "");
    this.text.dataset.t = this.at ?? "";
    this.text.classList.toggle("bad", msg.dropped > 0);
  }
}

class ValuesView {
  constructor(stream, body) {
    this.box = el("div", { class: "values" });
    body.append(this.box);
  }

  update(msg) {
    if (!msg.last) return;
    const { names, values, digital } = msg.last;
    this.box.replaceChildren(...names.map((n, i) => el("span", { class: "value" }, el("span", {}, n),
      el("b", {}, i === digital ? `${values[i]} (digital)` : siValue(values[i], msg.units)))));
  }
}

export function createPreview({ info, bus }) {
  const box = document.getElementById("previews");
  const state = document.getElementById("preview-state");
  const views = new Map();
  const cards = new Map();  // stream -> { article, mark, at: when its last preview arrived (ms) }
  for (const s of info.streams) {
    const body = el("div", { class: "preview-body" });
    const views_ = [];
    if (s.shape.length >= 2 || s.kind === "video") views_.push(new CameraView(s, body));
    else {
      if (s.kind !== "events") views_.push(new TraceView(s, body));
      if (s.shape[0] <= 16) views_.push(new ValuesView(s, body));
    }
    views.set(s.name, views_);
    const mark = el("span", { class: "stale-mark", hidden: true });
    const article = el("article", { class: "card preview", "data-stream": s.name },
      el("header", {}, el("h3", {}, s.name), mark, el("span", { class: "kind" }, s.kind)), body);
    cards.set(s.name, { article, mark, at: null });
    box.append(article);
  }

  // A stream whose previews stopped keeps its last picture, greyed and marked with its age, never passed off
  // as live (a dead driver, a stopped writer, or this page's connection down).
  setInterval(() => {
    const now = Date.now();
    for (const c of cards.values()) {
      const age = c.at === null ? 0 : (now - c.at) / 1000;
      const stale = age > STALE_S;
      c.article.classList.toggle("stale", stale);
      c.mark.hidden = !stale;
      if (stale) c.mark.textContent = `stale: no data for ${age < 90 ? `${age.toFixed(0)} s` : `${(age / 60).toFixed(0)} min`}`;
    }
  }, 1000);

  let stop = null;
  const open = () => {
    if (stop) return;
    stop = follow("/api/console/preview", (type, msg) => {
      if (type !== "preview") return;
      bus.emit("preview", msg);  // the probe view takes its trace block from here (probe.js)
      for (const v of views.get(msg.stream) || []) v.update(msg);
      const card = cards.get(msg.stream);
      if (card) card.at = Date.now();
    }, (s) => { state.textContent = s === "live" ? "" : `(${s})`; });
  };
  const close = () => { if (stop) { stop(); stop = null; state.textContent = "(paused while the tab is hidden)"; } };
  document.addEventListener("visibilitychange", () => (document.hidden ? close() : open()));
  if (!document.hidden) open();
}
