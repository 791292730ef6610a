/**
 * Live captions (issue 13) for the viewer, camera and control-room pages.
 *
 * CaptionClient: the caption messages of a page's /ws/events socket
 * (events.js EventsSocket, `?token=` the page's own credentials: a signed
 * link sees only its stream's captions, a director the production's; the
 * control room shares its socket with QC), protocol as in server/qc_events.py:
 *
 *   server → {"type":"caption", seq, stream, label, final, start, end, text,
 *             language, words:[{text,start,end,probability,emphasis}],
 *             wall_start, wall_end}
 *            partials (final=false) at most 4 a second per stream, each
 *            replacing the previous one; finals are committed text, never
 *            retracted. Also {"type":"caption.state", stream, state, detail},
 *            {"type":"ping"} (answered with a pong), markers etc. (ignored).
 *
 * CaptionView: the overlay. At most 2 lines of at most 42 characters
 * (broadcast subtitle practice, readable on a phone), words never broken;
 * committed words in white, the partial tail in grey (colour only: the
 * same font metrics, so a commit never reflows the line). The box keeps
 * its height while it shows anything and each word keeps its element while
 * it stays on screen, so a new partial or a commit never makes it jump or
 * flicker; it clears itself a few seconds after the last caption.
 *
 * Test hooks: the view's element carries data-final / data-partial (its
 * committed and partial text on screen); window.__captions (when a page
 * sets it) the latest messages.
 */
import { EventsSocket } from "./events.js";
import { h } from "./ui.js";

export const MAX_LINES = 2;
export const MAX_CHARS = 42;
const CLEAR_AFTER_MS = 6000;

export class CaptionClient {
  /**
   * @param {object} o
   * @param {(msg: object) => void} o.onCaption  every caption message
   * @param {(msg: object) => void} [o.onState]  caption.state messages
   */
  constructor({ onCaption, onState }) {
    this.onCaption = onCaption;
    this.onState = onState || (() => {});
  }

  /** One /ws/events message (events.js EventsSocket's onMessage). */
  handle(msg) {
    if (msg.type === "caption") this.onCaption(msg);
    else if (msg.type === "caption.state") this.onState(msg);
  }
}

/** Words → lines of at most maxChars characters (a longer word stands alone). */
export function wrap(words, maxChars = MAX_CHARS) {
  const lines = [];
  let line = [];
  let length = 0;
  for (const w of words) {
    const n = w.text.length;
    if (line.length && length + 1 + n > maxChars) {
      lines.push(line);
      line = [];
      length = 0;
    }
    length = line.length ? length + 1 + n : n;
    line.push(w);
  }
  if (line.length) lines.push(line);
  return lines;
}

function wordsOf(msg) {
  const words = Array.isArray(msg.words) && msg.words.length
    ? msg.words.map((w) => ({ text: String(w.text || "").trim(), emphasis: !!w.emphasis }))
    : String(msg.text || "").split(/\s+/).map((text) => ({ text, emphasis: false }));
  return words.filter((w) => w.text);
}

export class CaptionView {
  /**
   * @param {object} [o]
   * @param {number} [o.lines]  lines shown (2)
   * @param {number} [o.chars]  characters a line (42)
   * @param {string} [o.className]  extra class ("cc-tile" in the control room)
   */
  constructor({ lines = MAX_LINES, chars = MAX_CHARS, className = "" } = {}) {
    this.lines = lines;
    this.chars = chars;
    this.committed = []; // recent final words still on screen
    this.partial = [];
    this.enabled = true;
    this._next = 0; // ids of words: a word keeps its element while on screen
    this._spans = new Map();
    this._clear = null;
    this.el = h("div", { class: `cc ${className}`.trim(), role: "log", "aria-live": "polite", "aria-label": "captions",
      hidden: true, dataset: { final: "", partial: "" } });
  }

  mount(parent) {
    parent.append(this.el);
    return this;
  }

  setEnabled(on) {
    this.enabled = on;
    this.render();
  }

  push(msg) {
    const words = wordsOf(msg).map((w) => ({ ...w, id: this._next++ }));
    if (msg.final) {
      // The partial becomes committed text: its words keep their elements
      // where the text agrees, so nothing on screen moves.
      const reuse = this.partial;
      let same = 0;
      for (let i = 0; i < words.length && i < reuse.length; i += 1) {
        if (reuse[i].text !== words[i].text) break;
        words[i].id = reuse[i].id;
        same += 1;
      }
      this.committed.push(...words);
      // A commit of the partial's first words: the rest of the partial
      // stays up as it was until the next partial replaces it.
      this.partial = same === words.length ? reuse.slice(same) : [];
    } else {
      const old = this.partial;
      for (let i = 0; i < words.length && i < old.length; i += 1) {
        if (old[i].text === words[i].text) words[i].id = old[i].id;
      }
      this.partial = words;
    }
    clearTimeout(this._clear);
    this._clear = setTimeout(() => this.clear(), CLEAR_AFTER_MS);
    this.render();
  }

  clear() {
    this.committed = [];
    this.partial = [];
    this.render();
  }

  render() {
    const all = [...this.committed.map((w) => ({ ...w, final: true })), ...this.partial.map((w) => ({ ...w, final: false }))];
    let lines = wrap(all, this.chars);
    if (lines.length > this.lines) {
      lines = lines.slice(-this.lines);
      // Committed words scrolled off are forgotten.
      const first = lines[0][0].id;
      const at = this.committed.findIndex((w) => w.id === first);
      if (at > 0) this.committed = this.committed.slice(at);
    }
    const show = this.enabled && lines.length > 0;
    this.el.hidden = !show;
    const keep = new Map();
    const rows = lines.map((line) => {
      const row = h("div", { class: "cc-line" });
      line.forEach((w, i) => {
        let span = this._spans.get(w.id);
        if (!span) span = h("span");
        span.className = `cc-word ${w.final ? "cc-final" : "cc-partial"}${w.emphasis ? " cc-em" : ""}`;
        if (span.textContent !== w.text) span.textContent = w.text;
        keep.set(w.id, span);
        if (i) row.append(" ");
        row.append(span);
      });
      return row;
    });
    this._spans = keep;
    this.el.replaceChildren(...rows);
    // A font too large for this screen would clip a 42-character line:
    // fewer characters a line instead (never fewer than 16), re-wrapped.
    if (show && this.chars > 16 && rows.some((row) => row.scrollWidth > row.clientWidth + 1)) {
      this.chars -= 2;
      this.render();
      return;
    }
    this.el.dataset.final = all.filter((w) => w.final).map((w) => w.text).join(" ");
    this.el.dataset.partial = all.filter((w) => !w.final).map((w) => w.text).join(" ");
  }
}

const PREF_KEY = "returnfeed.captions";

/** The viewer's caption choice, kept across visits (on unless turned off). */
export function captionsWanted() {
  return localStorage.getItem(PREF_KEY) !== "0";
}

export function setCaptionsWanted(on) {
  localStorage.setItem(PREF_KEY, on ? "1" : "0");
}

/**
 * One page's overlay for one stream: the socket, the view and a toggle
 * button (aria-pressed); `avoid`: an element at the bottom (the viewer's
 * control bar) the overlay stays above while it is shown. Returns {client, view}.
 */
export function attachCaptions({ auth, stream, parent, button, avoid }) {
  const view = new CaptionView().mount(parent);
  if (avoid && window.ResizeObserver) {
    // Stay above the page's control bar while it shows (captions.css).
    const fit = () => view.el.style.setProperty("--cc-avoid", `${Math.ceil(avoid.getBoundingClientRect().height)}px`);
    new ResizeObserver(fit).observe(avoid);
    fit();
  }
  const apply = (on) => {
    view.setEnabled(on);
    if (button) {
      button.setAttribute("aria-pressed", String(on));
      button.textContent = on ? "CC on" : "CC off";
    }
  };
  apply(captionsWanted());
  if (button) {
    button.addEventListener("click", () => {
      const on = !view.enabled;
      setCaptionsWanted(on);
      apply(on);
    });
  }
  window.__captions = [];
  const client = new CaptionClient({
    onCaption: (msg) => {
      if (msg.stream !== stream()) return;
      window.__captions.push(msg);
      if (window.__captions.length > 50) window.__captions.shift();
      if (button) button.hidden = false;
      view.push(msg);
    },
  });
  const socket = new EventsSocket({ auth, onMessage: (msg) => client.handle(msg) }).start();
  return { client, socket, view };
}
