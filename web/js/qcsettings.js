/**
 * Per-stream QC and caption settings in the control room
 * (GET/PATCH /api/v1/streams/{name}/settings, server/stream_settings.py).
 *
 * - On each tile: "QC" and "CC" toggle buttons (aria-pressed: what is in
 *   force, from the stream's `effective_settings`) and a "Settings…" button
 *   opening a dialog with the thresholds engineers touch on air (black,
 *   freeze and silence durations, loudness target and tolerance) and the
 *   caption options. Buttons, so Tab and Enter/Space reach them; their keys
 *   never reach the tile (which would put the source on preview).
 * - A PATCH sends only what changed (a JSON merge patch: null = back to the
 *   server's default); its answer updates the tile at once, the 2 s poll
 *   keeps every other director's room in step.
 */
import { api } from "./api.js";
import { h } from "./ui.js";

/** Thresholds in the dialog: [name, label, unit, step]. */
const FIELDS = [
  ["black_d", "Black after", "s", "0.1"],
  ["freeze_d", "Freeze after", "s", "0.1"],
  ["silence_d", "Silence after", "s", "0.1"],
  ["target_lufs", "Loudness target", "LUFS", "0.5"],
  ["tolerance_lu", "Loudness tolerance ±", "LU", "0.1"],
];

const LANGUAGE_NAMES = { en: "English", es: "Spanish", ko: "Korean", fr: "French", de: "German", ja: "Japanese",
  zh: "Chinese", pt: "Portuguese", it: "Italian", nl: "Dutch" };

/** A poll answer may have left before a PATCH landed: for this long after
 * one, the PATCH's own answer is what the tile shows. */
const STALE_POLL_MS = 2500;

const settingsPath = (name) => `/api/v1/streams/${encodeURIComponent(name)}/settings`;

/** Keep a control's clicks and keys to itself: the tile is a button too. */
function isolate(el) {
  el.addEventListener("click", (ev) => ev.stopPropagation());
  el.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") ev.stopPropagation();
  });
  return el;
}

export class TileSettings {
  /**
   * @param {string} name  the stream
   * @param {object} o
   * @param {() => object} o.session  the api.js Session
   * @param {(text: string, kind?: string) => void} o.message
   * @param {(effective: object) => void} [o.onChange]  after a successful PATCH
   */
  constructor(name, { session, message, onChange }) {
    this.name = name;
    this.session = session;
    this.message = message;
    this.onChange = onChange || (() => {});
    this.effective = null;
    this.busy = false;
    this.patchedAt = -Infinity;
    this.qc = isolate(h("button", { type: "button", class: "tile-toggle tile-qc", "aria-pressed": "false" }, "QC"));
    this.cc = isolate(h("button", { type: "button", class: "tile-toggle tile-cc", "aria-pressed": "false" }, "CC"));
    this.more = isolate(h("button", { type: "button", class: "tile-toggle tile-settings",
      "aria-label": `QC and caption settings of ${name}`, "aria-haspopup": "dialog" }, "Settings…"));
    this.qc.addEventListener("click", () => this.toggle("qc"));
    this.cc.addEventListener("click", () => this.toggle("captions"));
    this.more.addEventListener("click", () => openSettingsDialog(this));
    this.el = h("div", { class: "tile-controls" }, this.qc, this.cc, this.more);
    this.render();
  }

  /** The stream as the poll returned it. */
  update(stream) {
    if (stream && stream.effective_settings && !this.busy && performance.now() - this.patchedAt > STALE_POLL_MS) {
      this.effective = stream.effective_settings;
      this.render();
    }
  }

  render() {
    const e = this.effective;
    const qcOn = !!(e && e.qc && e.qc.enabled);
    const ccOn = !!(e && e.captions && e.captions.enabled);
    this.qc.setAttribute("aria-pressed", String(qcOn));
    this.qc.textContent = qcOn ? "QC on" : "QC off";
    this.qc.setAttribute("aria-label", `Live QC of ${this.name}: ${qcOn ? "on" : "off"}. Press to switch ${qcOn ? "off" : "on"}.`);
    this.cc.setAttribute("aria-pressed", String(ccOn));
    this.cc.textContent = ccOn ? "CC on" : "CC off";
    this.cc.setAttribute("aria-label", `Captions of ${this.name}: ${ccOn ? "on" : "off"}. Press to switch ${ccOn ? "off" : "on"}.`);
    this.qc.disabled = this.cc.disabled = this.busy || !e;
  }

  async toggle(section) {
    if (!this.effective || this.busy) return;
    const on = !!this.effective[section].enabled;
    await this.patch({ [section]: { enabled: !on } });
  }

  /** PATCH the settings; true when the server took it. */
  async patch(body) {
    this.busy = true;
    this.render();
    try {
      const out = await api(this.session(), "PATCH", settingsPath(this.name), body);
      this.effective = out.effective;
      this.patchedAt = performance.now();
      this.onChange(out.effective);
      return out;
    } catch (err) {
      this.message(`${this.name} settings: ${err.message}${err.status ? ` (${err.status})` : ""}`, "error");
      throw err;
    } finally {
      this.busy = false;
      this.render();
    }
  }
}

function numberField(name, label, unit, step, value, limit) {
  const input = h("input", { type: "number", name, step, inputmode: "decimal", required: true,
    min: limit ? String(limit.min) : undefined, max: limit ? String(limit.max) : undefined });
  input.value = value === undefined || value === null ? "" : String(value);
  return h("label", {}, `${label} (${unit})`, input);
}

/** The settings dialog of one tile: read what is in force, send what changed. */
export async function openSettingsDialog(tile) {
  let data;
  try {
    data = await api(tile.session(), "GET", settingsPath(tile.name));
  } catch (err) {
    tile.message(`${tile.name} settings: ${err.message}`, "error");
    return;
  }
  const eff = data.effective;
  const limits = (data.limits && data.limits["qc.thresholds"]) || {};
  const qcOn = h("input", { type: "checkbox", name: "qc_enabled", checked: !!eff.qc.enabled });
  const inputs = FIELDS.map(([n, label, unit, step]) => numberField(n, label, unit, step, eff.qc.thresholds[n], limits[n]));
  const ccOn = h("input", { type: "checkbox", name: "captions_enabled", checked: !!eff.captions.enabled });
  const langs = (data.limits && data.limits["captions.language"]) || Object.keys(LANGUAGE_NAMES);
  const language = h("select", { name: "language" }, h("option", { value: "" }, "Detect automatically"),
    ...langs.map((code) => h("option", { value: code }, LANGUAGE_NAMES[code] ? `${LANGUAGE_NAMES[code]} (${code})` : code)));
  language.value = eff.captions.language || "";
  const translate = h("input", { type: "checkbox", name: "translate", checked: !!eff.captions.translate });
  const model = h("select", { name: "model" }, h("option", { value: "" }, "Server default"),
    ...((data.limits && data.limits["captions.model"]) || ["tiny.en", "base"]).map((m) => h("option", { value: m }, m)));
  model.value = (data.stored.captions && data.stored.captions.model) || "";
  const error = h("p", { class: "error", role: "alert" });
  const save = h("button", { type: "submit", class: "primary" }, "Save");
  const reset = h("button", { type: "button" }, "Thresholds to defaults");
  const cancel = h("button", { type: "button" }, "Cancel");
  // novalidate: the ranges are checked below, with a message in the dialog.
  const form = h("form", { class: "stack", method: "dialog", novalidate: true },
    h("fieldset", { class: "qcs-group" }, h("legend", {}, "Live QC"),
      h("label", { class: "qcs-check" }, qcOn, "Analyse this stream"), ...inputs),
    h("fieldset", { class: "qcs-group" }, h("legend", {}, "Captions"),
      h("label", { class: "qcs-check" }, ccOn, "Caption this stream"),
      h("label", {}, "Language", language),
      h("label", { class: "qcs-check" }, translate, "Translate to English"),
      h("label", {}, "Model", model)),
    error, h("div", { class: "row-buttons" }, save, reset, cancel));
  const dialog = h("dialog", { class: "qcs-dialog", id: "qc-settings-dialog", "aria-label": `Settings of ${tile.name}` },
    h("h3", {}, `Settings · ${tile.name}`), form);
  const close = () => dialog.close();
  cancel.addEventListener("click", close);
  dialog.addEventListener("close", () => {
    dialog.remove();
    tile.more.focus();
  });
  // The room's shortcuts (Space = CUT …) must not fire from inside the dialog.
  dialog.addEventListener("keydown", (ev) => { if (ev.key !== "Escape") ev.stopPropagation(); });
  const send = async (body) => {
    error.textContent = "";
    try {
      await tile.patch(body);
      close();
    } catch (err) {
      error.textContent = err.message;
    }
  };
  reset.addEventListener("click", () => send({ qc: { thresholds: null } }));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const qc = {};
    const thresholds = {};
    for (const label of inputs) {
      const input = label.querySelector("input");
      const value = Number(input.value);
      const limit = limits[input.name];
      const name = label.firstChild.textContent;
      if (input.value.trim() === "" || !Number.isFinite(value)) {
        error.textContent = `${name}: a number, please`;
        input.focus();
        return;
      }
      if (limit && (value < limit.min || value > limit.max)) {
        error.textContent = `${name}: between ${limit.min} and ${limit.max}`;
        input.focus();
        return;
      }
      if (value !== eff.qc.thresholds[input.name]) thresholds[input.name] = value;
    }
    if (Object.keys(thresholds).length) qc.thresholds = thresholds;
    if (qcOn.checked !== !!eff.qc.enabled) qc.enabled = qcOn.checked;
    const captions = {};
    if (ccOn.checked !== !!eff.captions.enabled) captions.enabled = ccOn.checked;
    if ((language.value || null) !== (eff.captions.language || null)) captions.language = language.value || null;
    if (translate.checked !== !!eff.captions.translate) captions.translate = translate.checked;
    const storedModel = (data.stored.captions && data.stored.captions.model) || null;
    if ((model.value || null) !== storedModel) captions.model = model.value || null;
    const body = {};
    if (Object.keys(qc).length) body.qc = qc;
    if (Object.keys(captions).length) body.captions = captions;
    if (!Object.keys(body).length) {
      close();
      return;
    }
    send(body);
  });
  document.body.append(dialog);
  dialog.showModal();
  qcOn.focus();
}
