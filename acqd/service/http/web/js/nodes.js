// A rig of several PCs (a leader's status has ``nodes``): the streams panel grouped by node. This PC's own cards
// (overview.js) go under its node's heading; each other node gets a heading with its reachability, clock offset
// and disk, and a compact card per stream. Drawn from the pushed status snapshots; nothing shows on a single PC.

import { el, fmtBytes } from "./api.js";
import { streamProblems } from "./overview.js";

/** A node's heading line: "video · reachable · clock +0.003 s · disk 1.2 TB free · RECORD". */
export function nodeLine(name, n, own) {
  const parts = [own ? `${name} (this PC)` : name,
    n.reachable === false ? "unreachable" : n.reachable ? "reachable" : "asking…"];
  if (n.clock_offset_s != null && !own) parts.push(`clock ${n.clock_offset_s >= 0 ? "+" : ""}${n.clock_offset_s.toFixed(3)} s`);
  if (n.disk && n.disk.free_bytes != null) parts.push(`disk ${fmtBytes(n.disk.free_bytes)} free`);
  if (n.mode) parts.push(n.mode);
  return parts.join(" · ");
}

export function createNodes({ bus, info }) {
  const panel = document.getElementById("streams-panel");
  const ownCards = document.getElementById("streams");
  const silentAfter = info.silent_after_s ?? 2;
  let ownHeading = null;
  const groups = new Map();

  function group(name) {
    if (!groups.has(name)) {
      const heading = el("h3", { class: "node", "data-node": name });
      const cards = el("div", { class: "cards", "data-node": name });
      panel.append(heading, cards);
      groups.set(name, { heading, cards, shown: new Map() });
    }
    return groups.get(name);
  }

  function drawCard(g, node, name, s, mode) {
    if (!g.shown.has(name)) {
      const f = {};
      const card = el("article", { class: "card stream", "data-stream": name, "data-node": node },
        el("header", {}, el("h3", {}, name), f.state = el("span", { class: "kind" })),
        el("div", { class: "kv" }, el("span", {}, "msg/s"), f.msgs = el("b")),
        el("div", { class: "kv" }, el("span", {}, "gaps"), f.gaps = el("b")),
        f.problems = el("ul", { class: "problems" }));
      g.cards.append(card);
      g.shown.set(name, f);
    }
    const f = g.shown.get(name);
    const problems = streamProblems(s, silentAfter, mode);
    f.state.textContent = s.state;
    f.msgs.textContent = (s.messages_per_s ?? 0).toFixed(0);
    f.gaps.textContent = s.gaps ?? 0;
    f.problems.replaceChildren(...problems.map((p) => el("li", {}, p)));
    f.problems.closest(".card").classList.toggle("has-problems", problems.length > 0);
  }

  bus.on("status", (status) => {
    if (!status || !status.nodes) return;
    for (const [name, n] of Object.entries(status.nodes)) {
      const own = name === status.node;
      if (own) {
        ownHeading = ownHeading || el("h3", { class: "node", "data-node": name });
        if (!ownHeading.isConnected) ownCards.before(ownHeading);
        ownHeading.textContent = nodeLine(name, n, true);
        continue;
      }
      const g = group(name);
      g.heading.textContent = nodeLine(name, n, false);
      g.heading.classList.toggle("bad", n.reachable === false);
      g.cards.classList.toggle("stale", n.reachable === false);
      for (const [stream, s] of Object.entries(n.streams || {})) drawCard(g, name, stream, s, n.mode || "IDLE");
    }
  });
}
