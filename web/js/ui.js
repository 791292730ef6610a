/** Small DOM helpers shared by the pages (no framework). */

/** Create an element: h("div", {class: "x", onclick: fn}, child, "text", …). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Copy text to the clipboard; falls back to a selection copy on plain http. */
export async function copyText(text, input) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return true;
    }
  } catch {
    // fall back below
  }
  const field = input || h("textarea", { readonly: true, class: "visually-hidden" }, text);
  if (!input) document.body.append(field);
  field.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch {
    ok = false;
  }
  if (!input) field.remove();
  return ok;
}

/** A read-only value with a Copy button. */
export function copyField(label, value, { secret = false } = {}) {
  const input = h("input", { type: "text", readonly: true, value, spellcheck: false, "aria-label": label });
  const btn = h("button", { type: "button" }, "Copy");
  btn.addEventListener("click", async () => {
    const ok = await copyText(value, input);
    btn.textContent = ok ? "Copied ✓" : "Select + Ctrl-C";
    setTimeout(() => { btn.textContent = "Copy"; }, 1500);
  });
  const row = h("div", { class: "row" }, input, btn);
  if (secret) {
    input.type = "password";
    const show = h("button", { type: "button", "aria-pressed": "false" }, "Show");
    show.addEventListener("click", () => {
      const hidden = input.type === "password";
      input.type = hidden ? "text" : "password";
      show.textContent = hidden ? "Hide" : "Show";
      show.setAttribute("aria-pressed", String(hidden));
    });
    row.insertBefore(show, btn);
  }
  return h("label", { class: "copy-field" }, h("span", {}, label), row);
}

export function formatBitrate(bps) {
  if (!bps && bps !== 0) return "";
  if (bps >= 1e6) return `${(bps / 1e6).toFixed(bps >= 1e7 ? 0 : 1)} Mb/s`;
  if (bps >= 1e3) return `${Math.round(bps / 1e3)} kb/s`;
  return `${Math.round(bps)} b/s`;
}

export function nowMs() {
  return performance.timeOrigin + performance.now();
}

/** Stream name from a page path like /camera/{stream}. */
export function streamFromPath() {
  const parts = location.pathname.split("/").filter(Boolean);
  return parts.length >= 2 ? decodeURIComponent(parts[1]) : "";
}
