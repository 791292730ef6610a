/**
 * The QC panel's marker timeline: one row per marker type for the selected
 * stream over the last SPAN_S seconds of wall clock, each marker a block from
 * its start to its end (an open one runs to "now"). Blocks are buttons: Enter
 * or a click brings the marker's entry in the list below into view.
 * Plain DOM, no canvas, so it is readable by screen readers and testable.
 */

import { h } from "./ui.js";

/** The window the strip shows, seconds. */
export const SPAN_S = 600;

/**
 * Lay markers out on [now - span, now]: rows by kind in first-seen order,
 * left/width as fractions of the span. Markers wholly before the window are
 * left out; false positives are kept (drawn faded) so a director sees them.
 * @param {Array<object>} markers  {kind, subtype, severity, wall_start, wall_end, false_positive}
 * @param {number} now  unix seconds
 * @param {number} [span]
 */
export function layout(markers, now, span = SPAN_S) {
  const from = now - span;
  const rows = new Map();
  for (const m of [...markers].sort((a, b) => (a.wall_start || 0) - (b.wall_start || 0))) {
    if (typeof m.wall_start !== "number") continue;
    const end = typeof m.wall_end === "number" ? m.wall_end : now;
    if (end < from || m.wall_start > now) continue;
    const left = Math.max(0, (m.wall_start - from) / span);
    const right = Math.min(1, (end - from) / span);
    if (!rows.has(m.kind)) rows.set(m.kind, []);
    // At least 0.4 % wide, so a short marker is still something to click.
    rows.get(m.kind).push({ marker: m, left, width: Math.max(0.004, right - left), open: m.wall_end == null });
  }
  return [...rows.entries()].map(([kind, blocks]) => ({ kind, blocks }));
}

/**
 * Render the strip into `el`.
 * @param {HTMLElement} el
 * @param {Array<object>} markers
 * @param {number} now  unix seconds
 * @param {(marker: object) => void} onPick
 */
export function renderTimeline(el, markers, now, onPick) {
  const rows = layout(markers, now);
  el.hidden = rows.length === 0;
  el.replaceChildren(
    ...rows.map(({ kind, blocks }) => h("div", { class: "qct-row", dataset: { kind } },
      h("span", { class: "qct-kind" }, kind),
      h("div", { class: "qct-track" }, ...blocks.map((b) => {
        const m = b.marker;
        const label = `${m.kind}/${m.subtype} ${m.severity}${b.open ? ", open" : ""}${m.false_positive ? ", false positive" : ""}`;
        const block = h("button", {
          type: "button",
          class: `qct-block sev-${m.severity}`,
          title: label,
          "aria-label": label,
          dataset: { open: b.open ? "1" : "0", fp: m.false_positive ? "1" : "0" },
        });
        // CSSOM, not a style attribute: the pages' CSP (style-src 'self') blocks those.
        block.style.left = `${(b.left * 100).toFixed(2)}%`;
        block.style.width = `${(b.width * 100).toFixed(2)}%`;
        block.addEventListener("click", () => onPick(m));
        return block;
      })))),
    h("div", { class: "qct-axis muted" }, h("span", {}, `−${Math.round(SPAN_S / 60)} min`), h("span", {}, "now")));
}
