// Probe view: every ephys stream as a compact tile (map + rate by depth), and one probe in full: its sites at their
// positions (shanks side by side, to scale, zoomable along the shank) coloured by a measure, dead and noisy sites
// outlined and listed, a raster of the last ~10 s of threshold crossings by depth with the rate-by-depth profile,
// and up to 64 channels of traces (chosen by clicking or dragging on the map) in one band with a µV scale bar.
// The writers compute the features (acqd.record.probeview) while the preview stream is open; this module takes them
// and the trace block from the preview messages the console already reads (no polling: parsing them in the daemon
// for a page would cost the data path), and the sites from /api/console/probes once. Every time is on the session
// timebase (seconds since RECORD's start, or since ACQUIRE's before), like the annotations.

import uPlot from "../vendor/uplot/uPlot.esm.js";
import { el, request } from "./api.js";

const SVG = "http://www.w3.org/2000/svg";
const DRAW_MS = 1000;
const STALE_S = 2;  // four preview periods without a message (as the preview cards)
const TRACE_WINDOW_S = 2;
const MEASURES = { ap: "AP RMS", lfp: "LFP RMS", rate: "spike rate" };
const GAINS = [0.25, 0.5, 1, 2, 4, 8];
const SCALE_UV = 100;  // the scale bar's height in µV
const UNIT_MIN_HZ = 8;  // a depth is listed as a unit when it fires this much above the background (or more)

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function heat(x) { // 0..1 -> dark blue .. yellow (the preview's RMS strip uses the same ramp)
  const h = 240 - 180 * x, l = 25 + 45 * x;
  return `hsl(${h}, 80%, ${l}%)`;
}

/** Sites grouped by shank, each shank offset so that shanks sit side by side (µm). */
function placeSites(probe) {
  const shanks = probe.shanks;
  const xs = probe.sites.map((s) => s.x);
  const width = Math.max(...xs) - Math.min(...xs);
  const perShank = new Map(shanks.map((k) => [k, probe.sites.filter((s) => s.shank === k)]));
  const offsets = new Map();
  let x = 0;
  for (const k of shanks) {
    const sx = perShank.get(k).map((s) => s.x);
    offsets.set(k, x - Math.min(...sx));
    x += Math.max(...sx) - Math.min(...sx) + Math.max(40, width * 0.1);
  }
  const ys = probe.sites.map((s) => s.y);
  const pitch = probe.pitch_um;
  return {
    sites: probe.sites.map((s) => ({ ...s, px: s.x + offsets.get(s.shank) })),
    width: x, yMin: Math.min(...ys) - pitch, yMax: Math.max(...ys) + pitch, size: Math.min(12, pitch * 0.8),
  };
}

/** Dead and noisy sites: AP RMS below ``deadBelow`` x / above ``noisyAbove`` x the probe's median (null: no site);
 * the same rule as acqd.service.http.probes.classify, which the API answers with. */
export function classify(ap, deadBelow, noisyAbove) {
  const vals = (ap || []).map((v, c) => [v, c]).filter(([v]) => v != null);
  if (!vals.length) return { dead: [], noisy: [], median: null };
  const sorted = vals.map(([v]) => v).sort((a, b) => a - b);
  const n = sorted.length;
  const median = n % 2 ? sorted[n >> 1] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
  return { dead: vals.filter(([v]) => v < deadBelow * median).map(([, c]) => c),
    noisy: vals.filter(([v]) => v > noisyAbove * median).map(([, c]) => c), median };
}

/** What the views draw, from a preview message's ``probe`` part: times on the session timebase. */
function fromMessage(probe, msg, deadBelow, noisyAbove) {
  const f = msg.probe, off = msg.t_offset ?? 0, rate = msg.nominal_rate;
  const { dead, noisy, median } = classify(f.ap_rms, deadBelow, noisyAbove);
  return {
    stream: probe.stream, uv_per_unit: probe.uv_per_unit, settings: probe.settings,
    timebase: msg.t_offset != null ? "session" : "device", origin_s: msg.origin ?? null, now_s: f.end / rate + off,
    features: { ap_rms: f.ap_rms, lfp_rms: f.lfp_rms, rates: f.rates, threshold: f.threshold, analysed_s: f.analysed_s,
      median_ap_rms: median, dead, noisy, crossings: { t: f.crossings.samples.map((s) => s / rate + off),
        channels: f.crossings.channels, dropped: f.crossings.dropped } },
  };
}

function measureOf(f, m) {
  if (!f) return null;
  return m === "ap" ? f.ap_rms : m === "lfp" ? f.lfp_rms : f.rates;
}

/** Rate by depth: the mean rate of the sites at each depth (µm), and the units it shows: runs of depths clearly
 * above the probe's background (the median: at least UNIT_MIN_HZ, 3x the background, and 5 crossings' worth of the
 * analysed seconds, so that a few coincident background crossings are no unit), each at the centre of the run's
 * depths above half its peak. */
export function rateProfile(sites, rates, analysedS = 1) {
  const byDepth = new Map();
  for (const s of sites) {
    const r = rates[s.channel];
    if (r == null) continue;
    const row = byDepth.get(s.y) || [];
    row.push(r);
    byDepth.set(s.y, row);
  }
  const depths = [...byDepth.keys()].sort((a, b) => a - b);
  const mean = depths.map((d) => byDepth.get(d).reduce((a, b) => a + b, 0) / byDepth.get(d).length);
  const sorted = [...mean].sort((a, b) => a - b);
  const background = sorted[sorted.length >> 1] || 0;
  const units = [];
  const floor = background + Math.max(UNIT_MIN_HZ, 3 * background, 5 / Math.max(analysedS, 1e-3));
  let i = 0;
  while (i < depths.length) {
    if (mean[i] <= floor) { i++; continue; }
    let j = i;
    while (j + 1 < depths.length && mean[j + 1] > floor) j++;
    const peak = Math.max(...mean.slice(i, j + 1));
    const idx = [];
    for (let k = i; k <= j; k++) if (mean[k] >= peak / 2) idx.push(k);
    const w = idx.map((k) => mean[k]);
    const depth = idx.reduce((a, k, n) => a + depths[k] * w[n], 0) / w.reduce((a, b) => a + b, 0);
    units.push({ depth, rate: peak - background });
    i = j + 1;
  }
  return { depths, mean, background, units };
}

class ProbeMap {
  /** The sites to scale in an SVG whose viewBox is in µm; y grows towards the tip at the bottom. */
  constructor(probe, { onSelect, compact = false }) {
    this.probe = probe;
    this.layout = placeSites(probe);
    this.view = [this.layout.yMin, this.layout.yMax];  // the depth range shown (µm)
    const pad = 10;
    this.node = svg("svg", { class: `probe-map${compact ? " compact" : ""}`, preserveAspectRatio: "xMidYMin meet",
      "data-stream": probe.stream });
    this.node.append(svg("rect", { class: "shank-bg", x: -pad, y: 0, width: this.layout.width + 2 * pad, height: 1 }));
    this.rects = new Map();
    for (const s of this.layout.sites) {
      const r = svg("rect", { class: "site", width: this.layout.size, height: this.layout.size,
        x: s.px - this.layout.size / 2, y: this.toY(s.y) - this.layout.size / 2, "data-channel": s.channel,
        "data-x": s.x, "data-y": s.y });
      const title = svg("title");
      r.append(title);
      this.rects.set(s.channel, { r, title, site: s });
      this.node.append(r);
    }
    this.selBox = svg("rect", { class: "drag", x: -pad, width: this.layout.width + 2 * pad, height: 0, y: 0 });
    this.node.append(this.selBox);
    this.setView(this.view);
    if (onSelect) this.interact(onSelect);
  }

  toY(y) { return this.layout.yMax - y; }  // SVG y (µm from the top of the probe's highest site)

  setView([lo, hi]) {
    const full = [this.layout.yMin, this.layout.yMax];
    const span = Math.min(full[1] - full[0], Math.max(4 * this.probe.pitch_um, hi - lo));
    lo = Math.max(full[0], Math.min(lo, full[1] - span));
    this.view = [lo, lo + span];
    this.node.setAttribute("viewBox", `${-10} ${this.toY(this.view[1])} ${this.layout.width + 20} ${span}`);
    this.node.querySelector(".shank-bg").setAttribute("y", this.toY(full[1]));
    this.node.querySelector(".shank-bg").setAttribute("height", full[1] - full[0]);
  }

  zoom(factor) {
    const mid = (this.view[0] + this.view[1]) / 2, half = (this.view[1] - this.view[0]) / 2 / factor;
    this.setView([mid - half, mid + half]);
  }

  /** y (µm) of a pointer event on the map. */
  depthAt(ev) {
    const box = this.node.getBoundingClientRect();
    const vb = this.node.viewBox.baseVal;
    const scale = Math.min(box.width / vb.width, box.height / vb.height);  // "meet": the smaller scale applies
    return this.layout.yMax - (vb.y + (ev.clientY - box.top) / scale);
  }

  interact(onSelect) {
    let start = null;
    this.node.addEventListener("mousedown", (ev) => { start = this.depthAt(ev); ev.preventDefault(); });
    this.node.addEventListener("mousemove", (ev) => {
      if (start === null) return;
      const y = this.depthAt(ev);
      this.selBox.setAttribute("y", this.toY(Math.max(start, y)));
      this.selBox.setAttribute("height", Math.abs(y - start));
    });
    window.addEventListener("mouseup", (ev) => {
      if (start === null) return;
      const y = this.depthAt(ev);
      const [lo, hi] = [Math.min(start, y), Math.max(start, y)];
      start = null;
      this.selBox.setAttribute("height", 0);
      const sites = [...this.layout.sites].sort((a, b) => a.y - b.y || a.x - b.x);
      let picked = hi - lo < this.probe.pitch_um / 2
        ? sites.slice(0).sort((a, b) => Math.abs(a.y - lo) - Math.abs(b.y - lo)).slice(0, 64)  // a click: 64 nearest
        : sites.filter((s) => s.y >= lo && s.y <= hi);
      if (picked.length > 64) picked = picked.slice(0, 64);
      if (picked.length) onSelect(picked.map((s) => s.channel).sort((a, b) => a - b));
    });
    this.node.addEventListener("wheel", (ev) => {
      ev.preventDefault();
      const span = this.view[1] - this.view[0];
      if (ev.ctrlKey) this.zoom(ev.deltaY < 0 ? 1.25 : 0.8);
      else this.setView([this.view[0] - Math.sign(ev.deltaY) * span * 0.1, this.view[1]]);
    }, { passive: false });
  }

  paint(values, reply, selected) {
    const f = reply.features;
    const finite = (values || []).filter((v) => v != null);
    const max = Math.max(...finite, 1e-9);
    const dead = new Set(f ? f.dead : []), noisy = new Set(f ? f.noisy : []);
    const uv = reply.uv_per_unit;
    for (const [c, { r, title, site }] of this.rects) {
      const v = values ? values[c] : null;
      r.style.fill = v == null ? "#ccc" : heat(Math.min(1, v / max));
      r.classList.toggle("dead", dead.has(c));
      r.classList.toggle("noisy", noisy.has(c));
      r.classList.toggle("selected", selected.has(c));
      if (f) {
        const ap = f.ap_rms && f.ap_rms[c], lfp = f.lfp_rms && f.lfp_rms[c], rate = f.rates && f.rates[c];
        title.textContent = `channel ${c} · site ${site.contact} · x ${site.x} µm, y ${site.y} µm · shank ${site.shank}` +
          ` · ${site.area || "area unknown"}\nAP RMS ${ap == null ? "–" : uv ? `${(ap * uv).toFixed(1)} µV` : ap}` +
          ` · LFP RMS ${lfp == null ? "–" : uv ? `${(lfp * uv).toFixed(1)} µV` : lfp}` +
          ` · rate ${rate == null ? "–" : `${rate.toFixed(1)} Hz`}${dead.has(c) ? " · DEAD" : ""}${noisy.has(c) ? " · NOISY" : ""}`;
      }
    }
  }
}

/** Rate by depth (a line, x = Hz) beside the map, over the same depths. */
function drawProfile(node, map, profile) {
  node.replaceChildren();
  const [lo, hi] = map.view;
  const maxRate = Math.max(10, ...profile.mean);
  node.setAttribute("viewBox", `0 ${map.toY(hi)} 100 ${hi - lo}`);
  const pts = profile.depths.map((d, i) => `${(100 * profile.mean[i]) / maxRate},${map.toY(d)}`).join(" ");
  node.append(svg("polyline", { points: pts, class: "rate-line" }));
  node.dataset.maxRate = maxRate.toFixed(1);
}

/** The raster: crossings of the window at (time, depth of their site), on a canvas over the map's depths. */
function drawRaster(canvas, map, reply, annotations) {
  const f = reply.features;
  const w = canvas.width = canvas.clientWidth || 300, h = canvas.height = canvas.clientHeight || 300;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  if (!f) return;
  const t1 = reply.now_s ?? Math.max(...f.crossings.t, 0), t0 = t1 - reply.settings.window_s;
  const [lo, hi] = map.view;
  const depth = new Map(map.layout.sites.map((s) => [s.channel, s.y]));
  ctx.fillStyle = "#1b1f24";
  let drawn = 0;
  f.crossings.t.forEach((t, i) => {
    const y = depth.get(f.crossings.channels[i]);
    if (y === undefined || y < lo || y > hi) return;
    ctx.fillRect(((t - t0) / (t1 - t0)) * w, ((hi - y) / (hi - lo)) * h, 1.5, 2);
    drawn++;
  });
  ctx.strokeStyle = "#c62828";
  for (const a of annotations) {
    if (a.t < t0 || a.t > t1) continue;
    const x = ((a.t - t0) / (t1 - t0)) * w;
    ctx.beginPath(); ctx.moveTo(x, 0); ctx.lineTo(x, h); ctx.stroke();
  }
  canvas.dataset.count = drawn;
  canvas.dataset.t0 = t0.toFixed(2);
  canvas.dataset.t1 = t1.toFixed(2);
}

class Traces {
  /** The trace block: stacked channels, one band, gain in µV per division, crossings and annotations marked. */
  constructor(box, probe) {
    this.box = box;
    this.probe = probe;
    this.t = [];
    this.y = [];
    this.key = "";
    this.gain = 1;
    this.crossings = { t: [], channels: [] };
    this.annotations = [];
    this.scale = el("span", { class: "uv-scale" });
    this.axisNote = el("span", { class: "trace-status trace-note" });
  }

  take(msg) {
    const b = msg.probe && msg.probe.block;
    if (!b) return;
    const key = `${b.band}:${b.channels.join(",")}`;
    if (key !== this.key) { this.key = key; this.channels = b.channels; this.band = b.band; this.t = []; this.y = b.channels.map(() => []); this.plot?.destroy(); this.plot = null; }
    const off = msg.t_offset ?? 0;
    b.starts.forEach((s, k) => {
      const rows = b.y[k];
      const n = rows[0] ? rows[0].length : 0;
      const gap = this.t.length && (s / msg.nominal_rate + off) - this.t[this.t.length - 1] > 0.05;
      if (gap) { this.t.push(this.t[this.t.length - 1] + 1e-6); this.y.forEach((a) => a.push(null)); }
      for (let i = 0; i < n; i++) this.t.push((s + i * b.steps[k]) / msg.nominal_rate + off);
      rows.forEach((vals, c) => this.y[c].push(...vals));
    });
    const last = this.t[this.t.length - 1];
    let cut = 0;
    while (cut < this.t.length && this.t[cut] < last - TRACE_WINDOW_S) cut++;
    if (cut) { this.t.splice(0, cut); this.y.forEach((a) => a.splice(0, cut)); }
    this.units = msg.scale;
  }

  draw(reply) {
    if (!this.t.length || !this.channels) return;
    const uvPerUnit = reply.uv_per_unit || 1;
    const n = this.channels.length;
    const spacing = 100 / this.gain;  // µV between channels: the gain sets how many µV one channel spacing is
    const data = [this.t, ...this.y.map((a, i) => a.map((v) => (v == null ? null : (v * uvPerUnit) + (n - 1 - i) * spacing)))];
    if (!this.plot) {
      const width = Math.max(300, this.box.clientWidth || 600);
      this.plot = new uPlot({
        width, height: 420, legend: { show: false }, cursor: { show: false },
        scales: { x: { time: false }, y: { auto: false, range: () => [-spacing, n * spacing] } },
        axes: [{ size: 28, label: "session time (s)", labelSize: 14, values: (u, ticks) => ticks.map((v) => v.toFixed(2)) },
          { show: false }],
        series: [{}, ...this.channels.map((c) => ({ label: `ch${c}`, stroke: "#1f3b57", width: 0.7 }))],
        hooks: { draw: [(u) => this.marks(u)] },
      }, data, this.box);
    } else {
      this.plot.setScale("y", { min: -spacing, max: n * spacing });
      this.plot.setData(data);
    }
    this.spacing = spacing;
    this.box.dataset.t0 = this.t[0].toFixed(3);  // the shown window (session s): for tests and screen readers
    this.box.dataset.t1 = this.t[this.t.length - 1].toFixed(3);
    this.scale.textContent = `${SCALE_UV} µV`;
    this.scale.dataset.uv = SCALE_UV;
    this.axisNote.textContent = `${n} channels · ${this.band} band · channel spacing ${spacing.toFixed(0)} µV`;
  }

  /** Crossings of the shown channels (red ticks), annotations (dashed lines) and the µV scale bar, on the plot. */
  marks(u) {
    const ctx = u.ctx, n = this.channels.length;
    const [x0, x1] = [u.scales.x.min, u.scales.x.max];
    const row = new Map(this.channels.map((c, i) => [c, i]));
    ctx.save();
    ctx.fillStyle = "#c62828";
    this.crossings.t.forEach((t, i) => {
      const k = row.get(this.crossings.channels[i]);
      if (k === undefined || t < x0 || t > x1) return;
      ctx.fillRect(u.valToPos(t, "x", true) - 1, u.valToPos((n - 1 - k) * this.spacing, "y", true) - 6, 2, 12);
    });
    ctx.strokeStyle = "#0b5cad";
    ctx.setLineDash([4, 3]);
    for (const a of this.annotations) {
      if (a.t < x0 || a.t > x1) continue;
      const x = u.valToPos(a.t, "x", true);
      ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
    }
    ctx.setLineDash([]);
    const px = Math.abs(u.valToPos(0, "y", true) - u.valToPos(SCALE_UV, "y", true));  // the µV scale bar
    const xb = u.bbox.left + u.bbox.width - 8, yb = u.bbox.top + u.bbox.height - 8;
    ctx.strokeStyle = "#000";
    ctx.lineWidth = 2;
    ctx.beginPath(); ctx.moveTo(xb, yb); ctx.lineTo(xb, yb - px); ctx.stroke();
    ctx.fillStyle = "#000";
    ctx.textAlign = "right";
    ctx.fillText(`${SCALE_UV} µV`, xb - 4, yb - px / 2);
    ctx.restore();
    this.scale.dataset.px = px.toFixed(1);
  }
}

function settingsText(s) {
  return `AP: Butterworth order ${s.ap_order} high-pass ${s.ap_hz} Hz on ${(s.ap_segment_s * 1000).toFixed(0)} ms of every ` +
    `${s.ap_period_s.toFixed(1)} s (${((100 * s.ap_segment_s) / s.ap_period_s).toFixed(0)} % of the data) · ` +
    `LFP: ${s.lfp_hz[0]}–${s.lfp_hz[1]} Hz at ${s.lfp_rate_hz.toFixed(0)} Hz on ${s.lfp_segment_s.toFixed(1)} s of every ` +
    `${s.lfp_period_s.toFixed(1)} s · crossings below −${s.threshold_mad} × MAD ` +
    `(refreshed every ${s.threshold_refresh_s} s, ${s.refractory_s * 1000} ms dead time): raster of the last ${s.window_s} s, ` +
    `rates over the last ${s.rate_window_s} s · ` +
    `traces at ${s.trace_rate_hz.toFixed(0)} Hz (AP: each bin's largest excursion), AP and LFP: the last analysed segment`;
}

function ageText(age) { return age == null ? "no data yet" : age < 90 ? `${age.toFixed(0)} s` : `${(age / 60).toFixed(0)} min`; }

export function createProbes({ bus, info }) {
  const panel = document.getElementById("probe-panel");
  const tilesBox = document.getElementById("probe-tiles");
  const full = document.getElementById("probe-full");
  let probes = [];
  let current = null;  // the full view's state
  const annotations = [];  // {t (session s), text}
  let origin = null;
  const replies = new Map();

  bus.on("annotation", (a) => {
    if (a && a.monotonic_ns != null) annotations.push({ mono: a.monotonic_ns / 1e9, text: a.text });
  });
  const sessionAnnotations = () => (origin == null ? [] : annotations.map((a) => ({ t: a.mono - origin, text: a.text })));

  function tile(probe) {
    const map = new ProbeMap(probe, { compact: true });
    const prof = svg("svg", { class: "rate-profile compact", preserveAspectRatio: "none" });
    const age = el("span", { class: "stale-mark", hidden: true });
    const card = el("article", { class: "card probe-tile", "data-stream": probe.stream, title: "open this probe's full view",
      onclick: () => open(probe.stream) }, el("header", {}, el("h3", {}, probe.stream), age, el("span", { class: "kind" }, "ephys")),
      el("div", { class: "tile-body" }, map.node, prof));
    tilesBox.append(card);
    return { map, prof, card, age };
  }

  function open(name) {
    const probe = probes.find((p) => p.stream === name);
    if (!probe) return;
    for (const t of tiles.values()) t.card.classList.toggle("open", t.card.dataset.stream === name);
    const measure = el("select", { class: "measure" }, ...Object.entries(MEASURES).map(([k, v]) => el("option", { value: k }, v)));
    const band = el("select", { class: "band" }, el("option", { value: "ap" }, "AP band"), el("option", { value: "lfp" }, "LFP band"),
      el("option", { value: "raw" }, "raw"));
    const gain = el("select", { class: "gain" }, ...GAINS.map((g) => el("option", { value: g, selected: g === 1 }, `×${g}`)));
    const dead = el("input", { class: "dead-below", type: "number", step: "0.05", min: "0", max: "1", value: "0.2", size: 4,
      title: "a site below this fraction of the median AP RMS is dead" });
    const noisy = el("input", { class: "noisy-above", type: "number", step: "0.5", min: "1", value: "3", size: 4,
      title: "a site above this multiple of the median AP RMS is noisy" });
    const zoomIn = el("button", { type: "button", class: "zoom-in", title: "zoom in along the shank" }, "+");
    const zoomOut = el("button", { type: "button", class: "zoom-out", title: "zoom out" }, "−");
    const state = el("span", { class: "trace-status probe-state" });
    const bad = el("div", { class: "bad-sites" });
    const unitsBox = el("ol", { class: "units" });
    const selText = el("span", { class: "selection" });
    const traceBox = el("div", { class: "probe-traces" });
    const traces = new Traces(traceBox, probe);
    const select = async (channels) => {
      try {
        await request("PUT", `/api/console/probes/${name}/block`, { channels, band: band.value });
        current.selected = new Set(channels);
        selText.textContent = `traces: ${channels.length} channels, ${channels[0]}–${channels[channels.length - 1]}`;
        selText.dataset.count = channels.length;
      } catch (err) { selText.textContent = err.message; }
    };
    const map = new ProbeMap(probe, { onSelect: select });
    const prof = svg("svg", { class: "rate-profile", preserveAspectRatio: "none" });
    const raster = el("canvas", { class: "raster" });
    zoomIn.onclick = () => { map.zoom(2); redraw(); };
    zoomOut.onclick = () => { map.zoom(0.5); redraw(); };
    band.onchange = () => select([...current.selected].sort((a, b) => a - b));
    gain.onchange = () => { traces.gain = Number(gain.value); redraw(); };
    measure.onchange = () => redraw();
    full.replaceChildren(
      el("div", { class: "probe-head" }, el("h3", {}, name), el("label", {}, "colour ", measure), el("label", {}, "band ", band),
        el("label", {}, "gain ", gain), el("label", {}, "dead < ", dead, "× median"), el("label", {}, "noisy > ", noisy, "× median"),
        zoomOut, zoomIn, state),
      el("div", { class: "probe-body" },
        el("div", { class: "probe-col" }, el("div", { class: "col-title" }, "map"), map.node),
        el("div", { class: "probe-col" }, el("div", { class: "col-title" }, "rate by depth"), prof),
        el("div", { class: "probe-col wide" }, el("div", { class: "col-title raster-title" }, "crossings by depth, last 10 s"), raster),
        el("div", { class: "probe-side" }, bad, el("div", { class: "col-title" }, `units (> ${UNIT_MIN_HZ} Hz above background)`), unitsBox)),
      el("div", { class: "trace-head" }, selText, traces.axisNote, traces.scale), traceBox,
      el("p", { class: "settings" }));
    current = { name, probe, map, prof, raster, traces, measure, dead, noisy, state, bad, unitsBox, selected: new Set(), full };
    const redraw = () => draw(current);
    current.redraw = redraw;
    select(probe.sites.slice(0, 64).map((s) => s.channel));
    panel.scrollIntoView({ block: "nearest" });
  }

  function draw(v) {
    const reply = replies.get(v.name);
    if (!reply) { v.state.textContent = "waiting for data"; return; }
    const f = reply.features;
    v.full.classList.toggle("stale", reply.stale);
    v.state.textContent = reply.stale ? `stale: no data for ${ageText(reply.age_s)}` : `live · ${reply.timebase === "session" ? "session time" : "device time"}`;
    v.state.classList.toggle("bad", reply.stale);
    v.map.paint(measureOf(f, v.measure.value), reply, v.selected);
    if (f) {
      const profile = rateProfile(v.map.layout.sites, f.rates || [], f.analysed_s);
      drawProfile(v.prof, v.map, profile);
      const st = reply.settings, full = (st.rate_window_s * st.ap_segment_s) / st.ap_period_s;
      v.unitsBox.dataset.analysed = f.analysed_s;
      if (f.analysed_s < 0.8 * full) {  // too few analysed seconds yet: a few background crossings would pass for units
        v.unitsBox.replaceChildren(el("li", { class: "gathering" }, `gathering: ${f.analysed_s.toFixed(2)} of ${full.toFixed(2)} s analysed`));
      } else v.unitsBox.replaceChildren(...profile.units.map((u) => el("li", { class: "unit", "data-depth": u.depth.toFixed(1),
        "data-rate": u.rate.toFixed(2) }, `${u.depth.toFixed(0)} µm: ${u.rate.toFixed(1)} Hz`)));
      const siteOf = new Map(v.map.layout.sites.map((s) => [s.channel, s]));
      const list = (cls, chans, what) => el("div", { class: cls }, `${what} (${chans.length}): `,
        ...chans.map((c) => el("span", { class: "site-ref", "data-channel": c, "data-y": siteOf.get(c)?.y },
          `ch${c} @ ${siteOf.get(c)?.y ?? "?"} µm `)));
      v.bad.replaceChildren(list("dead-list", f.dead, "dead"), list("noisy-list", f.noisy, "noisy"));
      v.traces.crossings = f.crossings;
    }
    v.traces.annotations = sessionAnnotations();
    drawRaster(v.raster, v.map, reply, sessionAnnotations());
    v.traces.draw(reply);
    v.full.querySelector(".settings").textContent = settingsText(reply.settings);
  }

  const tiles = new Map();
  const last = new Map();  // stream -> { msg, at (ms) } of its latest preview with probe features
  function refresh() {
    for (const p of probes) {
      const got = last.get(p.stream);
      const t = tiles.get(p.stream);
      const age = got ? (Date.now() - got.at) / 1000 : null;
      const stale = age === null || age > STALE_S;
      if (got) {
        const open = current && current.name === p.stream;
        const reply = fromMessage(p, got.msg, open ? Number(current.dead.value) : 0.2, open ? Number(current.noisy.value) : 3);
        reply.stale = stale;
        reply.age_s = age;
        replies.set(p.stream, reply);
        if (reply.origin_s != null) origin = reply.origin_s;
        t.map.paint(reply.features.rates, reply, new Set());
        drawProfile(t.prof, t.map, rateProfile(t.map.layout.sites, reply.features.rates || [], reply.features.analysed_s));
      }
      t.card.classList.toggle("stale", stale);
      t.age.hidden = !stale;
      t.age.textContent = `stale: ${ageText(age)}`;
    }
    if (current) draw(current);
  }

  bus.on("preview", (msg) => {
    if (msg.probe && tiles.has(msg.stream)) last.set(msg.stream, { msg, at: Date.now() });
  });
  bus.on("preview", (msg) => { if (current && msg.stream === current.name) current.traces.take(msg); });

  (async () => {
    probes = (await request("GET", "/api/console/probes")).probes;
    panel.hidden = !probes.length;
    for (const p of probes) tiles.set(p.stream, tile(p));
    if (probes.length) open(probes[0].stream);
    setInterval(refresh, DRAW_MS);
  })();
}
