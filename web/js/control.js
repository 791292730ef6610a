/**
 * Director's control room (/control).
 *
 * - Logs in (api.js Session: refresh token in sessionStorage, access token
 *   refreshed before it expires), picks a production (remembered in
 *   localStorage — an id, not a secret).
 * - Polls GET /api/v1/streams?production=<id> every 2 s; one tile per
 *   stream with badges (live/offline, codec/resolution/fps, bitrate,
 *   viewers, source protocol, SRT RTT and loss, simulcast layers).
 * - A tile starts its WHEP player (whep.js, `?layer=low` when the stream has
 *   a "low" layer, and `?sync=0`: the tiles are muted, so waiting for the
 *   sound would only delay the picture) the first time its stream is live
 *   and keeps it: the client reconnects by itself with backoff and honours
 *   Retry-After while the feed is away.
 * - Tally over /ws/tally (tally.js): tiles and the PREVIEW / PROGRAM buses
 *   show the server's state, in colour and text (PGM ● red / PVW ▲ green /
 *   ? amber when tally is lost). Click a tile or press 1–9 → preview;
 *   Shift+1–9 → cut that source straight to air; Space / CUT → cut the
 *   preview source to program; Enter / TAKE → auto transition (optional
 *   duration).
 * - Creates streams (SRT URL, passphrase, WHIP URL with copy buttons),
 *   shows every stream's encoder settings, and creates signed links with QR
 *   codes for camera operators (publish link → /camera/…, plus a read link
 *   for the return feed when that is another stream) and viewers (read
 *   link → /watch/…); links can be revoked.
 *
 * - Live QC over /ws/events (qc.js): per tile an audio meter (momentary
 *   loudness, per-channel peak bars) for the streams on screen and a fault
 *   badge while a marker is open (type + since when); the "QC markers" panel
 *   lists one stream's markers (GET /api/v1/streams/{name}/markers) and
 *   updates live; "False positive" (PATCH /api/v1/markers/{id}) and "Note"
 *   (POST /api/v1/streams/{name}/notes) are buttons, so Tab reaches them.
 * - Per tile QC and captions toggles and a settings dialog (qcsettings.js,
 *   PATCH /api/v1/streams/{name}/settings).
 *
 * Test hooks: window.__control.lastCommand = {type, source, at (epoch ms)}.
 */
import { api, ApiError, Session, sameOriginPath } from "./api.js";
import { loginForm } from "./login.js";
import { drawQR, encodeQR } from "./qr.js";
import { EventsSocket } from "./events.js";
import { QcClient, meterFraction } from "./qc.js";
import { CaptionClient, CaptionView } from "./captions.js";
import { TileSettings } from "./qcsettings.js";
import { renderTimeline } from "./qctimeline.js";
import { TallyClient } from "./tally.js";
import { copyField, formatBitrate, h, nowMs } from "./ui.js";
import { WhepClient } from "./whep.js";

const POLL_MS = 2000;
const PROD_KEY = "returnfeed.production";

const $ = (id) => document.getElementById(id);

const state = {
  session: null,
  productions: [],
  production: null, // id
  streams: new Map(), // name → API object
  order: [], // stream names in tile order
  tiles: new Map(), // name → Tile
  tally: null,
  events: null, // the /ws/events socket (events.js), feeding qc and captions
  qc: null,
  captions: null,
  qcStream: "", // the stream the QC markers panel shows
  qcMarkers: new Map(), // key (id or "live:<live_id>") → marker, for qcStream
  pollTimer: null,
  settingsSig: "",
  linkStreamsSig: "",
};

window.__control = { lastCommand: null, commands: [] };

// ------------------------------------------------------------ messages

let messageTimer = null;
function message(text, kind = "info") {
  const el = $("message");
  el.textContent = text;
  el.dataset.kind = kind;
  clearTimeout(messageTimer);
  if (text) messageTimer = setTimeout(() => { el.textContent = ""; }, kind === "error" ? 8000 : 4000);
}

function describeError(err) {
  if (err instanceof ApiError) return `${err.message} (${err.status})`;
  return err && err.message ? err.message : String(err);
}

// ------------------------------------------------------------ tiles

class Tile {
  constructor(name) {
    this.name = name;
    this.whep = null;
    this.video = h("video", { muted: true, playsInline: true, autoplay: true, disablePictureInPicture: true });
    this.video.muted = true;
    this.signal = h("div", { class: "tile-signal" }, "OFFLINE");
    this.key = h("span", { class: "tile-key", "aria-hidden": "true" });
    this.title = h("span", { class: "tile-name" });
    this.tallyTag = h("span", { class: "tile-tally" });
    this.badges = h("div", { class: "tile-badges" });
    this.faults = h("div", { class: "tile-faults", role: "status", "aria-live": "polite" });
    this.loud = h("div", { class: "meter-loud" });
    this.loudText = h("span", { class: "meter-text" }, "— LUFS");
    this.peaks = h("div", { class: "meter-peaks" });
    this.meter = h("div", { class: "tile-meter", role: "img", "aria-label": "audio meter: no reading", hidden: true },
      h("div", { class: "meter-bar" }, this.loud), this.peaks, this.loudText);
    this.feed = h("span", { class: "tile-feed" });
    this.settings = new TileSettings(name, { session: () => state.session, message });
    this.el = h("article", { class: "tile", tabindex: "0", role: "button", dataset: { name, tally: "unknown" } },
      h("div", { class: "tile-video" }, this.video, this.signal,
        h("div", { class: "tile-head" }, this.key, this.title, this.tallyTag)),
      h("div", { class: "tile-foot" }, this.faults, this.meter, this.badges, this.feed, this.settings.el));
    // Keep keyboard focus where it is when clicking (Space/Enter stay CUT/TAKE).
    this.el.addEventListener("mousedown", (ev) => ev.preventDefault());
    this.el.addEventListener("click", (ev) => {
      if (ev.shiftKey) command("cut", this.name);
      else command("preview", this.name);
    });
    this.el.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") {
        ev.preventDefault();
        ev.stopPropagation();
        command("preview", this.name);
      }
    });
  }

  update(stream, index) {
    this.stream = stream;
    const label = stream.label && stream.label !== stream.name ? `${stream.label}` : stream.name;
    this.key.textContent = index < 9 ? String(index + 1) : "";
    this.title.textContent = label;
    this.title.title = stream.name;
    this.el.dataset.live = stream.live ? "1" : "0";
    this.signal.hidden = !!stream.live && this.feedState === "live";
    this.signal.textContent = stream.live ? feedText(this.feedState, this.feedInfo) : (stream.state || "offline").toUpperCase();
    this.badges.replaceChildren(...streamBadges(stream));
    this.settings.update(stream);
    this.label();
    if (stream.live && !this.whep) this.startPlayer();
  }

  startPlayer() {
    const s = this.stream;
    const layers = Array.isArray(s.layers) ? s.layers.map((l) => (typeof l === "string" ? l : l.name || l.rid)) : [];
    this.whep = new WhepClient({
      url: sameOriginPath(s.whep_url, `/whep/${encodeURIComponent(s.name)}`),
      auth: state.session,
      video: this.video,
      layer: layers.includes("low") ? "low" : null,
      sync: false,
      onState: (st, info) => {
        this.feedState = st;
        this.feedInfo = info;
        this.el.dataset.feed = st;
        this.feed.textContent = st === "live" ? "" : feedText(st, info);
        if (this.stream) this.update(this.stream, state.order.indexOf(this.name));
        if (st === "error") message(`${this.name}: ${info.detail || "player error"}`, "error");
      },
    });
    this.whep.start();
  }

  setTally(tallyState) {
    this.el.dataset.tally = tallyState;
    this.tallyTag.textContent = { program: "● PGM", preview: "▲ PVW", off: "", unknown: "? TALLY" }[tallyState] || "";
    this.label();
  }

  /** Momentary loudness (LUFS) and per-channel sample peaks (dBFS). */
  setMeters(m) {
    this.meter.hidden = false;
    const lufs = typeof m.momentary === "number" ? m.momentary : null;
    this.loud.style.width = `${Math.round(meterFraction(lufs) * 100)}%`;
    this.loud.dataset.level = lufs === null ? "none" : lufs > -18 ? "hot" : lufs < -33 ? "low" : "ok";
    this.loudText.textContent = lufs === null ? "— LUFS" : `${lufs.toFixed(1)} LUFS`;
    const peaks = Array.isArray(m.peaks_dbfs) ? m.peaks_dbfs : [];
    while (this.peaks.children.length > peaks.length) this.peaks.lastChild.remove();
    while (this.peaks.children.length < peaks.length) this.peaks.append(h("div", { class: "peak" }, h("i")));
    peaks.forEach((p, i) => {
      const bar = this.peaks.children[i].firstChild;
      bar.style.width = `${Math.round(meterFraction(p) * 100)}%`;
      bar.dataset.clip = typeof p === "number" && p > -1 ? "1" : "0";
    });
    this.meter.setAttribute("aria-label", `audio meter: momentary ${this.loudText.textContent}, peaks `
      + (peaks.map((p) => (typeof p === "number" ? `${p.toFixed(0)} dBFS` : "silent")).join(", ") || "none"));
  }

  /** One badge per open marker: its type and since when (wall clock). */
  setFaults(markers) {
    this.faults.replaceChildren(...markers.map((m) => h("span", {
      class: `badge b-fault sev-${m.severity}`,
      title: `${m.kind}/${m.subtype} · ${m.severity} · since ${clock(m.wall_start)}`,
    }, `${m.kind.toUpperCase()} since ${clock(m.wall_start)}`)));
    this.el.dataset.fault = markers.length ? "1" : "0";
  }

  label() {
    const t = this.el.dataset.tally;
    const words = { program: "on program", preview: "on preview", off: "", unknown: "tally unknown" }[t] || "";
    const idx = state.order.indexOf(this.name);
    this.el.setAttribute("aria-label",
      `${idx >= 0 && idx < 9 ? `${idx + 1}: ` : ""}${this.title.textContent}${words ? `, ${words}` : ""}`
      + `${this.stream && this.stream.live ? ", live" : ", offline"}. Press to preview.`);
  }

  destroy() {
    if (this.whep) this.whep.stop();
    this.el.remove();
  }
}

function feedText(st, info = {}) {
  switch (st) {
    case "connecting": return "CONNECTING…";
    case "waiting": return `NOT LIVE · retry in ${Math.round(info.retryAfter ?? 0)} s`;
    case "reconnecting": return "RECONNECTING…";
    case "error": return `ERROR ${info.status || ""}`.trim();
    case "live": return "";
    default: return "…";
  }
}

function streamBadges(s) {
  const out = [];
  out.push(h("span", { class: `badge ${s.live ? "b-live" : "b-off"}` }, s.live ? "● LIVE" : `○ ${(s.state || "offline").toUpperCase()}`));
  const tracks = Array.isArray(s.tracks) ? s.tracks : [];
  const videos = tracks.filter((t) => t.kind === "video");
  const v = videos.sort((a, b) => (b.height || 0) - (a.height || 0))[0];
  if (v) {
    let text = (v.codec || "video").toUpperCase();
    if (v.width && v.height) text += ` ${v.width}×${v.height}`;
    if (v.fps) text += ` ${Math.round(v.fps)}p`;
    out.push(h("span", { class: "badge" }, text));
  }
  const a = tracks.find((t) => t.kind === "audio");
  if (a && a.codec) out.push(h("span", { class: "badge" }, a.codec.toUpperCase()));
  const bps = tracks.reduce((n, t) => n + (Number(t.bitrate_bps) || 0), 0);
  if (bps) out.push(h("span", { class: "badge", title: "bitrate in" }, formatBitrate(bps)));
  if (typeof s.viewers === "number") {
    // Viewers per layer ("viewers 12 · high 9 · low 3") and how many struggle
    // (frozen, failing sends, or losing more than the down-switch threshold).
    const byLayer = s.viewers_by_layer && typeof s.viewers_by_layer === "object" ? s.viewers_by_layer : {};
    const parts = [`viewers ${s.viewers}`];
    const names = Object.keys(byLayer);
    if (names.length > 1 || (names.length === 1 && s.viewers > 0 && Array.isArray(s.layers) && s.layers.length > 1)) {
      for (const name of names.sort()) parts.push(`${name} ${byLayer[name]}`);
    }
    out.push(h("span", { class: "badge", title: "WHEP viewers by layer", "data-badge": "viewers" }, parts.join(" · ")));
    const struggling = Number(s.viewers_struggling) || 0;
    if (struggling > 0) {
      out.push(h("span", { class: "badge b-warn", title: "viewers frozen, losing packets or failing to receive",
                           "data-badge": "struggling" }, `⚠ ${struggling} struggling`));
    }
  }
  const src = s.source;
  if (src) {
    const parts = [(src.protocol || "").toUpperCase()].filter(Boolean);
    const st = sourceStats(src);
    if (st.rttMs !== null) parts.push(`RTT ${st.rttMs < 10 ? st.rttMs.toFixed(1) : Math.round(st.rttMs)} ms`);
    if (st.loss !== null) parts.push(`loss ${st.loss}`);
    if (parts.length) out.push(h("span", { class: `badge ${st.lossy ? "b-warn" : ""}` }, parts.join(" · ")));
  }
  const layers = Array.isArray(s.layers) ? s.layers.map((l) => (typeof l === "string" ? l : l.name || l.rid)).filter(Boolean) : [];
  if (layers.length > 1) out.push(h("span", { class: "badge", title: "simulcast layers" }, layers.join("/")));
  const failures = Array.isArray(s.connection_failures) ? s.connection_failures : [];
  const recent = failures.filter((f) => Date.now() - Date.parse(f.at) < 10 * 60 * 1000);
  if (recent.length) {
    // Why an encoder could not connect (wrong passphrase, key too short,
    // busy, bad token …): the newest reason on the tile, the rest on hover.
    const lines = recent.map((f) => `${new Date(f.at).toLocaleTimeString()} ${f.peer} — ${f.reason}`);
    out.push(h("span", { class: "badge b-warn", title: lines.join("\n"), "data-badge": "refused" },
      `⚠ refused: ${recent[0].reason.split(":")[0]}`));
  }
  if (Array.isArray(s.warnings) && s.warnings.length) {
    out.push(h("span", { class: "badge b-warn", title: s.warnings.join("\n") }, `⚠ ${s.warnings.length}`));
  }
  return out;
}

/** RTT and loss from whatever the source reports (stats or SRT publisher stats). */
function sourceStats(src) {
  let rtt = null;
  let loss = null;
  let lossy = false;
  const stats = src.stats || (Array.isArray(src.publishers) && src.publishers[0] && src.publishers[0].srt) || null;
  if (stats) {
    rtt = stats.rtt_ms ?? stats.msRTT ?? null;
    if (stats.loss_pct !== undefined) {
      loss = `${Number(stats.loss_pct).toFixed(2)}%`;
      lossy = stats.loss_pct > 0;
    } else if (stats.loss !== undefined) {
      loss = String(stats.loss);
      lossy = Number(stats.loss) > 0;
    } else if (stats.pktRcvLoss !== undefined) {
      const total = (stats.pktRecv || 0) + stats.pktRcvLoss;
      const pct = total ? (100 * stats.pktRcvLoss) / total : 0;
      loss = `${stats.pktRcvLoss} pkts (${pct.toFixed(2)}%)`;
      lossy = stats.pktRcvLoss > 0;
    }
  }
  return { rttMs: typeof rtt === "number" ? rtt : null, loss, lossy };
}

// ------------------------------------------------------------ tally

function command(type, source) {
  const tally = state.tally;
  if (!tally) return;
  let src = source;
  if (type === "cut" && !src) {
    const pvw = busNames("preview");
    src = pvw[0];
    if (!src) {
      message("Nothing on preview: click a tile or press 1–9 first.", "error");
      return;
    }
  }
  const at = nowMs();
  const id = type === "take" ? tally.take($("take-duration").value) : tally[type](src);
  if (id === null) return;
  const entry = { type, source: src || null, at, id };
  window.__control.lastCommand = entry;
  window.__control.commands.push(entry);
  if (window.__control.commands.length > 50) window.__control.commands.shift();
}

function busNames(bus) {
  const tally = state.tally;
  if (!tally || tally.status !== "live") return [];
  const out = [];
  for (const [name, src] of tally.sources) {
    const buses = Array.isArray(src.buses) ? src.buses : [];
    if (buses.includes(bus) || src.state === bus) out.push(name);
  }
  // Tile order first, then anything else the tally knows.
  return out.sort((a, b) => orderKey(a) - orderKey(b));
}

function orderKey(name) {
  const i = state.order.indexOf(name);
  return i < 0 ? 1e6 : i;
}

function sourceLabel(name) {
  const s = state.streams.get(name);
  const src = state.tally && state.tally.sources.get(name);
  return (s && s.label) || (src && src.label) || name;
}

// ------------------------------------------------------------ live QC

function clock(unix) {
  if (typeof unix !== "number") return "—";
  return new Date(unix * 1000).toLocaleTimeString([], { hour12: false });
}

function isoClock(iso) {
  return iso ? clock(Date.parse(iso) / 1000) : "—";
}

function markerKey(m) {
  return m.id ? String(m.id) : `live:${m.live_id}`;
}

/** QC markers and meters, and live captions (one line under each tile's
 * picture): both from the room's one /ws/events socket. */
function startEvents() {
  if (state.events) state.events.stop();
  state.qc = new QcClient({
    onEvent: (msg) => onQcEvent(msg),
    onMeters: (stream, m) => {
      const tile = state.tiles.get(stream);
      if (tile) tile.setMeters(m);
    },
  });
  state.captions = new CaptionClient({
    onCaption: (msg) => {
      const tile = state.tiles.get(msg.stream);
      if (!tile) return;
      if (!tile.cc) {
        tile.cc = new CaptionView({ lines: 1, chars: 36, className: "cc-tile" })
          .mount(tile.el.querySelector(".tile-video"));
      }
      tile.cc.push(msg);
    },
  });
  state.events = new EventsSocket({
    auth: state.session,
    onMessage: (msg) => {
      state.qc.handle(msg);
      state.captions.handle(msg);
    },
  });
  state.events.start();
  state.events.subscribe(state.order);
}

function renderFaults() {
  for (const [name, tile] of state.tiles) tile.setFaults(state.qc ? state.qc.openOf(name) : []);
}

function onQcEvent(msg) {
  renderFaults();
  if (msg.type === "snapshot") {
    if (state.qcStream) loadMarkers();
    return;
  }
  if (msg.stream !== state.qcStream) return;
  if (msg.type === "marker.stored") {
    const live = state.qcMarkers.get(`live:${msg.live_id}`);
    if (live) {
      state.qcMarkers.delete(`live:${msg.live_id}`);
      live.id = msg.id;
      state.qcMarkers.set(String(msg.id), live);
    }
  } else if (msg.type.startsWith("marker.")) {
    // REST-made messages (marker.flag) carry ISO 8601 times; live ones unix seconds.
    for (const k of ["wall_start", "wall_end"]) if (typeof msg[k] === "string") msg[k] = Date.parse(msg[k]) / 1000;
    const key = msg.type === "marker.flag" ? String(msg.id) : markerKey(msg);
    if (msg.type !== "marker.flag" && msg.id) state.qcMarkers.delete(`live:${msg.live_id}`);
    const before = state.qcMarkers.get(key) || {};
    state.qcMarkers.set(key, { ...before, ...msg });
  } else if (msg.type === "note" && msg.marker_id) {
    const m = state.qcMarkers.get(String(msg.marker_id));
    if (m) m.notes = [...(m.notes || []), msg];
  } else if (msg.type === "note") {
    $("qc-notes").prepend(noteItem(msg));
    return;
  }
  renderMarkers();
}

async function loadMarkers() {
  const name = state.qcStream;
  $("qc-list").replaceChildren();
  $("qc-notes").replaceChildren();
  state.qcMarkers.clear();
  if (!name) return;
  try {
    const q = `/api/v1/streams/${encodeURIComponent(name)}`;
    const [data, notes] = await Promise.all([
      api(state.session, "GET", `${q}/markers?include_false_positive=true&limit=200`),
      api(state.session, "GET", `${q}/notes?limit=200`),
    ]);
    if (name !== state.qcStream) return;
    for (const m of data.markers || []) {
      m.wall_start = Date.parse(m.wall_start) / 1000;
      m.wall_end = m.wall_end ? Date.parse(m.wall_end) / 1000 : null;
      m.notes = [];
      state.qcMarkers.set(String(m.id), m);
    }
    for (const n of notes.notes || []) {
      const m = n.marker_id && state.qcMarkers.get(String(n.marker_id));
      if (m) m.notes.unshift(n);
      else if (!n.marker_id) $("qc-notes").append(noteItem(n));
    }
    renderMarkers();
  } catch (err) {
    message(`QC markers: ${describeError(err)}`, "error");
  }
}

function noteItem(n) {
  return h("li", { class: "qc-note" }, h("time", {}, isoClock(n.at)), " ", h("b", {}, n.author || "?"), `: ${n.text}`);
}

function renderMarkers() {
  const list = [...state.qcMarkers.values()].sort((a, b) => (b.wall_start || 0) - (a.wall_start || 0));
  $("qc-list").replaceChildren(...list.map((m) => {
    const fp = h("button", { type: "button", class: "qc-fp", disabled: !m.id, "aria-pressed": m.false_positive ? "true" : "false" },
      m.false_positive ? "Not a false positive" : "False positive");
    fp.addEventListener("click", () => flagMarker(m, !m.false_positive));
    const note = h("button", { type: "button", class: "qc-note-btn", disabled: !m.id }, "Note");
    note.addEventListener("click", () => noteForm(item, m));
    const item = h("li", { class: `qc-marker sev-${m.severity}`, tabindex: "-1", dataset: { key: markerKey(m), fp: m.false_positive ? "1" : "0", open: m.wall_end ? "0" : "1" } },
      h("span", { class: "qc-when" }, `${clock(m.wall_start)} – ${m.wall_end ? clock(m.wall_end) : "open"}`),
      h("span", { class: "qc-type" }, `${m.kind}${m.subtype && m.subtype !== m.kind ? `/${m.subtype}` : ""}`),
      h("span", { class: "qc-sev" }, m.severity),
      m.verified_by ? h("span", { class: "qc-by muted" }, `checked by ${m.verified_by}`) : "",
      h("span", { class: "qc-actions" }, fp, note),
      h("ul", { class: "qc-marker-notes" }, ...(m.notes || []).map(noteItem)));
    return item;
  }));
  $("qc-empty").hidden = list.length > 0;
  renderQcTimeline();
}

/** The strip above the list; redrawn every second so open markers grow. */
function renderQcTimeline() {
  renderTimeline($("qc-timeline"), [...state.qcMarkers.values()], nowMs() / 1000, (m) => {
    const item = $("qc-list").querySelector(`[data-key="${CSS.escape(markerKey(m))}"]`);
    if (item) {
      item.scrollIntoView({ block: "nearest" });
      item.focus();
    }
  });
}

async function flagMarker(m, falsePositive) {
  try {
    await api(state.session, "PATCH", `/api/v1/markers/${m.id}`, { false_positive: falsePositive });
  } catch (err) {
    message(`Marker: ${describeError(err)}`, "error");
  }
}

function noteForm(item, m) {
  if (item.querySelector("form")) return;
  const input = h("input", { maxlength: "4000", required: true, "aria-label": "Note", placeholder: "Note" });
  const form = h("form", { class: "inline-form" }, input, h("button", { type: "submit", class: "primary" }, "Add"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await api(state.session, "POST", `/api/v1/streams/${encodeURIComponent(state.qcStream)}/notes`,
        { text: input.value, marker_id: m.id });
      form.remove();
    } catch (err) {
      message(`Note: ${describeError(err)}`, "error");
    }
  });
  item.append(form);
  input.focus();
}

async function addMomentNote(ev) {
  ev.preventDefault();
  const input = $("qc-note-text");
  if (!state.qcStream || !input.value.trim()) return;
  try {
    await api(state.session, "POST", `/api/v1/streams/${encodeURIComponent(state.qcStream)}/notes`, { text: input.value });
    input.value = "";
  } catch (err) {
    message(`Note: ${describeError(err)}`, "error");
  }
}

function renderQcStreams() {
  const sel = $("qc-stream");
  const sig = state.order.join("\n");
  if (sel.dataset.sig === sig) return;
  sel.dataset.sig = sig;
  sel.replaceChildren(...state.order.map((n) => h("option", { value: n }, n)));
  if (!state.order.includes(state.qcStream)) state.qcStream = state.order[0] || "";
  sel.value = state.qcStream;
  loadMarkers();
}

function renderTally() {
  const tally = state.tally;
  for (const [name, tile] of state.tiles) tile.setTally(tally ? tally.stateOf(name) : "unknown");
  const lost = !tally || tally.status !== "live";
  const pgm = busNames("program");
  const pvw = busNames("preview");
  $("pgm-name").textContent = lost ? "TALLY LOST" : pgm.map(sourceLabel).join(" + ") || "—";
  $("pvw-name").textContent = lost ? "TALLY LOST" : pvw.map(sourceLabel).join(" + ") || "—";
  document.querySelector(".switcher").dataset.lost = lost ? "1" : "0";
}

function startTally() {
  if (state.tally) state.tally.stop();
  const conn = $("tally-conn");
  const tally = new TallyClient({
    production: state.production,
    auth: state.session,
    onChange: () => renderTally(),
    onStatus: (status, info) => {
      conn.dataset.status = status;
      conn.textContent = { connecting: "Tally: connecting…", live: "Tally: ● connected", lost: "Tally: LOST — reconnecting" }[status] || status;
      if (info && info.reason) conn.title = info.reason;
      renderTally();
    },
    onError: (err) => message(`Tally: ${err.detail || err.code}`, "error"),
  });
  state.tally = tally;
  conn.dataset.status = "connecting";
  conn.textContent = "Tally: connecting…";
  tally.start();
  renderTally();
}

// ------------------------------------------------------------ streams

async function pollStreams() {
  clearTimeout(state.pollTimer);
  const production = state.production;
  try {
    const data = await api(state.session, "GET", `/api/v1/streams?production=${encodeURIComponent(production)}`);
    if (production !== state.production) return;
    applyStreams(data.streams || []);
    $("room").dataset.api = "ok";
  } catch (err) {
    if (state.session.ended) return;
    message(`Streams: ${describeError(err)}`, "error");
    $("room").dataset.api = "error";
  } finally {
    if (production === state.production && !state.session.ended) state.pollTimer = setTimeout(pollStreams, POLL_MS);
  }
}

function applyStreams(list) {
  const sorted = [...list].sort((a, b) => (a.id ?? 0) - (b.id ?? 0) || a.name.localeCompare(b.name));
  state.streams = new Map(sorted.map((s) => [s.name, s]));
  state.order = sorted.map((s) => s.name);
  const grid = $("multiview");
  for (const [name, tile] of state.tiles) {
    if (!state.streams.has(name)) {
      tile.destroy();
      state.tiles.delete(name);
    }
  }
  sorted.forEach((s, i) => {
    let tile = state.tiles.get(s.name);
    if (!tile) {
      tile = new Tile(s.name);
      state.tiles.set(s.name, tile);
    }
    if (grid.children[i] !== tile.el) grid.insertBefore(tile.el, grid.children[i] || null);
    tile.update(s, i);
  });
  grid.dataset.count = String(sorted.length);
  $("empty").hidden = sorted.length > 0;
  renderTally();
  renderLinkStreams();
  renderSettings();
  renderQcStreams();
  renderFaults();
  if (state.events) state.events.subscribe(state.order);
}

function renderSettings() {
  const list = [...state.streams.values()];
  const sig = JSON.stringify(list.map((s) => [s.name, s.label, s.srt_url, s.passphrase, s.whip_url, s.whep_url,
    s.latency_ms, s.latency_default]));
  if (sig === state.settingsSig) return;
  state.settingsSig = sig;
  const box = $("stream-settings");
  if (!list.length) {
    box.replaceChildren(h("p", { class: "muted" }, "No streams yet."));
    return;
  }
  box.replaceChildren(...list.map((s) => streamCard(s)));
}

function streamCard(s) {
  const fields = [];
  if (s.srt_url) fields.push(copyField("SRT URL for FFmpeg / OBS (latency in µs)", s.srt_url));
  if (s.passphrase) fields.push(copyField("SRT passphrase", s.passphrase, { secret: true }));
  if (s.whip_url) fields.push(copyField("WHIP URL (bearer: a camera link token)", s.whip_url));
  if (s.whep_url) fields.push(copyField("WHEP URL", s.whep_url));
  if (s.srt_url_ms) fields.push(copyField("SRT URL for srt-live-transmit / GStreamer (latency in ms)", s.srt_url_ms));
  if (s.srt_read_url) fields.push(copyField("SRT read URL", s.srt_read_url));
  // Directors (who see the passphrase) may change the latency.
  if (s.passphrase) fields.push(latencyForm(s));
  else fields.push(h("p", { class: "muted" }, `SRT latency ${s.latency_ms} ms.`),
    h("p", { class: "muted" }, "Only directors of this production see the passphrase."));
  return h("section", { class: "stream-card card" },
    h("h3", {}, s.label && s.label !== s.name ? `${s.label} ` : "", h("code", {}, s.name)),
    fields);
}

/** The stream's SRT latency: an encoder asking for less still gets this
 * (SRT uses the larger of both sides'); a new value applies to the next
 * connection, so the encoder reconnects to get it. */
function latencyForm(s) {
  const input = h("input", { type: "number", min: "20", max: "8000", step: "1", required: "",
    value: String(s.latency_ms), "aria-label": `SRT latency of ${s.name} in milliseconds` });
  const reset = h("button", { type: "button", disabled: s.latency_default ? "" : null }, "Server default");
  const err = h("p", { class: "error", role: "alert" });
  const save = async (latency) => {
    err.textContent = "";
    releaseFocus();
    try {
      await api(state.session, "PATCH", `/api/v1/streams/${encodeURIComponent(s.name)}`, { latency_ms: latency });
      await pollStreams();
    } catch (e) {
      err.textContent = describeError(e);
    }
  };
  const form = h("form", { class: "inline-form" },
    h("label", {}, "SRT latency, ms ", input),
    h("button", { type: "submit" }, "Set"), reset);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    save(Number(input.value));
  });
  reset.addEventListener("click", () => save(null));
  return h("div", {}, form, err);
}

/** After using a form, give the keyboard back to the switcher shortcuts. */
function releaseFocus() {
  const el = document.activeElement;
  if (el && el !== document.body && typeof el.blur === "function") el.blur();
}

async function createStream(ev) {
  ev.preventDefault();
  releaseFocus();
  const err = $("create-error");
  err.textContent = "";
  const name = $("stream-name").value.trim();
  const label = $("stream-label").value.trim();
  const latency = $("stream-latency").value.trim();
  const body = { name, production: state.production };
  if (label) body.label = label;
  if (latency) body.latency_ms = Number(latency);
  try {
    const s = await api(state.session, "POST", "/api/v1/streams", body);
    $("stream-name").value = "";
    $("stream-label").value = "";
    $("stream-latency").value = "";
    const cameraBtn = h("button", { type: "button" }, "Make a camera link…");
    cameraBtn.addEventListener("click", () => {
      renderLinkStreams(true);
      $("link-stream").value = s.name;
      document.querySelector('input[name="link-kind"][value="camera"]').checked = true;
      updateLinkForm();
      $("panel-links").open = true;
      $("link-form").scrollIntoView({ behavior: "smooth", block: "nearest" });
    });
    $("create-result").replaceChildren(h("div", { class: "card result" },
      h("h3", {}, "Created ", h("code", {}, s.name)),
      s.srt_url ? copyField(`SRT URL for FFmpeg / OBS (latency ${s.latency_ms} ms, in µs)`, s.srt_url) : null,
      s.passphrase ? copyField("SRT passphrase", s.passphrase, { secret: true }) : null,
      s.whip_url ? copyField("WHIP URL", s.whip_url) : null,
      s.srt_url_ms ? copyField("SRT URL for srt-live-transmit / GStreamer (latency in ms)", s.srt_url_ms) : null,
      cameraBtn));
    await pollStreams();
  } catch (e) {
    err.textContent = describeError(e);
  }
}

// ------------------------------------------------------------ links

function renderLinkStreams(force = false) {
  const names = state.order;
  const sig = names.join("\n");
  if (sig === state.linkStreamsSig && !force) return;
  state.linkStreamsSig = sig;
  const sel = $("link-stream");
  const ret = $("link-return");
  const prevSel = sel.value;
  const prevRet = ret.value;
  sel.replaceChildren(...names.map((n) => h("option", { value: n }, sourceLabel(n) === n ? n : `${sourceLabel(n)} (${n})`)));
  ret.replaceChildren(h("option", { value: "" }, "Its own feed"),
    ...names.map((n) => h("option", { value: n }, n)));
  if (names.includes(prevSel)) sel.value = prevSel;
  if (prevRet && names.includes(prevRet)) ret.value = prevRet;
  else if (!prevRet && names.includes("program")) ret.value = "program";
  updateLinkForm();
}

function linkKind() {
  return document.querySelector('input[name="link-kind"]:checked').value;
}

function updateLinkForm() {
  $("return-row").hidden = linkKind() !== "camera";
}

async function createLink(ev) {
  ev.preventDefault();
  releaseFocus();
  const err = $("link-error");
  err.textContent = "";
  const name = $("link-stream").value;
  if (!name) {
    err.textContent = "Create a stream first.";
    return;
  }
  const ttl = Number($("link-ttl").value);
  const kind = linkKind();
  const enc = encodeURIComponent(name);
  try {
    let url;
    const tokens = [];
    let expiresAt;
    if (kind === "camera") {
      const link = await api(state.session, "POST", `/api/v1/streams/${enc}/links`, { action: "publish", ttl_s: ttl });
      tokens.push(link.token);
      expiresAt = link.expires_at;
      const u = new URL(link.camera_url || `/camera/${enc}?token=${encodeURIComponent(link.token)}`, location.href);
      // The phone plays the return feed over WHEP with its own read link: a
      // publish link is scoped to publishing the camera's stream.
      const ret = $("link-return").value || name;
      const read = await api(state.session, "POST", `/api/v1/streams/${encodeURIComponent(ret)}/links`, { action: "read", ttl_s: ttl });
      tokens.push(read.token);
      u.searchParams.set("program", ret);
      u.searchParams.set("program_token", read.token);
      url = u.href;
    } else {
      const link = await api(state.session, "POST", `/api/v1/streams/${enc}/links`, { action: "read", ttl_s: ttl });
      tokens.push(link.token);
      expiresAt = link.expires_at;
      url = new URL(link.watch_url || `/watch/${enc}?token=${encodeURIComponent(link.token)}`, location.href).href;
    }
    showLink({ kind, name, url, tokens, expiresAt });
  } catch (e) {
    err.textContent = describeError(e);
  }
}

/** The QR code as large as the screen allows, for scanning across a room. */
function showLargeQR(qr, kind, name) {
  const size = Math.min(window.innerWidth, window.innerHeight) * 0.8;
  const canvas = h("canvas", { class: "qr qr-large", role: "img", "aria-label": `QR code of the ${kind} link for ${name}` });
  drawQR(canvas, qr, { scale: Math.max(2, Math.floor(size / (qr.size + 8))), margin: 4 });
  const close = h("button", { type: "button", class: "primary" }, "Close");
  const dialog = h("dialog", { class: "qr-dialog", "aria-label": "QR code" },
    h("p", {}, kind === "camera" ? "Camera operator · " : "Viewer · ", h("code", {}, name)), canvas, close);
  close.addEventListener("click", () => dialog.close());
  dialog.addEventListener("click", (ev) => { if (ev.target === dialog) dialog.close(); });
  dialog.addEventListener("close", () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
}

function showLink({ kind, name, url, tokens, expiresAt }) {
  const canvas = h("canvas", { class: "qr", role: "img", "aria-label": `QR code of the ${kind} link for ${name}` });
  let qrInfo = "";
  try {
    const qr = encodeQR(url, { ecc: "M" });
    drawQR(canvas, qr, { scale: Math.max(2, Math.floor(330 / (qr.size + 8))), margin: 4 });
    qrInfo = `QR version ${qr.version}-M`;
    canvas.title = "Click for a large QR code";
    canvas.tabIndex = 0;
    const big = () => showLargeQR(qr, kind, name);
    canvas.addEventListener("click", big);
    canvas.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); big(); } });
  } catch (e) {
    qrInfo = `No QR code: ${e.message}`;
  }
  const expires = expiresAt ? new Date(expiresAt * 1000) : null;
  const revoke = h("button", { type: "button" }, "Revoke");
  const status = h("p", { class: "muted" },
    expires ? `Valid until ${expires.toLocaleString()}` : "", qrInfo ? ` · ${qrInfo}` : "");
  revoke.addEventListener("click", async () => {
    revoke.disabled = true;
    try {
      for (const token of tokens) await api(state.session, "POST", "/api/v1/links/revoke", { token });
      status.textContent = "Revoked: this link no longer works.";
      status.className = "error";
      card.classList.add("revoked");
    } catch (e) {
      revoke.disabled = false;
      status.textContent = `Revoke failed: ${describeError(e)}`;
    }
  });
  const open = h("a", { href: url, target: "_blank", rel: "noopener noreferrer", class: "button-link" }, "Open");
  const card = h("div", { class: "card result link-card", dataset: { kind } },
    h("h3", {}, kind === "camera" ? "Camera operator · " : "Viewer · ", h("code", {}, name)),
    h("div", { class: "qr-box" }, canvas),
    copyField(kind === "camera" ? "Camera link (phone)" : "Watch link", url),
    h("div", { class: "row-buttons" }, open, revoke),
    status);
  $("link-result").replaceChildren(card);
}

// ------------------------------------------------------------ productions

async function loadProductions(selectId) {
  const data = await api(state.session, "GET", "/api/v1/productions");
  state.productions = data.productions || [];
  const sel = $("production");
  sel.replaceChildren(...state.productions.map((p) =>
    h("option", { value: String(p.id) }, ["camera", "viewer"].includes(p.my_role) ? `${p.name} (${p.my_role})` : p.name)));
  $("prod-bar").hidden = false;
  const remembered = selectId ?? localStorage.getItem(PROD_KEY);
  const pick = state.productions.find((p) => String(p.id) === String(remembered)) || state.productions[0];
  if (!pick) {
    openNewProduction();
    $("room").hidden = false;
    $("empty").hidden = false;
    $("empty").textContent = "No production yet: create one with New… at the top.";
    return;
  }
  sel.value = String(pick.id);
  selectProduction(pick.id);
}

function selectProduction(id) {
  state.production = Number(id);
  localStorage.setItem(PROD_KEY, String(id));
  for (const tile of state.tiles.values()) tile.destroy();
  state.tiles.clear();
  state.streams.clear();
  state.order = [];
  state.settingsSig = "";
  state.linkStreamsSig = "";
  $("link-result").replaceChildren();
  $("create-result").replaceChildren();
  $("empty").textContent = "No streams in this production yet: create one under New stream.";
  $("room").hidden = false;
  state.qcStream = "";
  $("qc-stream").dataset.sig = "";
  startTally();
  startEvents();
  pollStreams();
}

function openNewProduction() {
  $("new-production").hidden = false;
  $("new-production-btn").hidden = true;
  $("new-production-name").focus();
}

async function createProduction(ev) {
  ev.preventDefault();
  const name = $("new-production-name").value.trim();
  if (!name) return;
  try {
    const p = await api(state.session, "POST", "/api/v1/productions", { name });
    $("new-production-name").value = "";
    $("new-production").hidden = true;
    $("new-production-btn").hidden = false;
    await loadProductions(p.id);
  } catch (e) {
    message(`Production: ${describeError(e)}`, "error");
  }
}

// ------------------------------------------------------------ keyboard

function onKey(ev) {
  if (ev.defaultPrevented || ev.altKey || ev.ctrlKey || ev.metaKey) return;
  if (ev.key === "Escape") {
    releaseFocus(); // Esc: leave a form field or button, shortcuts work again
    return;
  }
  const t = ev.target;
  const tag = t && t.tagName;
  if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || (t && t.isContentEditable)) return;
  if ((tag === "BUTTON" || tag === "A" || tag === "SUMMARY") && (ev.key === "Enter" || ev.key === " ")) return;
  if ($("room").hidden) return;
  const m = /^(?:Digit|Numpad)([1-9])$/.exec(ev.code);
  if (m) {
    const name = state.order[Number(m[1]) - 1];
    if (name) {
      ev.preventDefault();
      command(ev.shiftKey ? "cut" : "preview", name);
    }
    return;
  }
  if (ev.key === " " || ev.code === "Space") {
    ev.preventDefault();
    command("cut");
  } else if (ev.key === "Enter") {
    ev.preventDefault();
    command("take");
  }
}

// ------------------------------------------------------------ start

function bindRoom() {
  for (const id of ["cut", "take"]) $(id).addEventListener("mousedown", (ev) => ev.preventDefault());
  $("cut").addEventListener("click", () => command("cut"));
  $("take").addEventListener("click", () => command("take"));
  $("production").addEventListener("change", (ev) => selectProduction(ev.target.value));
  $("new-production-btn").addEventListener("click", openNewProduction);
  $("new-production-cancel").addEventListener("click", () => {
    $("new-production").hidden = true;
    $("new-production-btn").hidden = false;
  });
  $("new-production").addEventListener("submit", createProduction);
  $("create-stream").addEventListener("submit", createStream);
  $("link-form").addEventListener("submit", createLink);
  $("qc-stream").addEventListener("change", (ev) => {
    state.qcStream = ev.target.value;
    loadMarkers();
  });
  $("qc-note-form").addEventListener("submit", addMomentNote);
  setInterval(renderQcTimeline, 1000);
  for (const r of document.querySelectorAll('input[name="link-kind"]')) r.addEventListener("change", updateLinkForm);
  $("logout").addEventListener("click", async () => {
    await state.session.logout();
  });
  document.addEventListener("keydown", onKey);
}

function stopAll() {
  clearTimeout(state.pollTimer);
  if (state.tally) state.tally.stop();
  state.tally = null;
  if (state.events) state.events.stop();
  state.events = null;
  state.qc = null;
  state.captions = null;
  for (const tile of state.tiles.values()) tile.destroy();
  state.tiles.clear();
}

async function main() {
  bindRoom();
  for (;;) {
    let session = Session.load();
    if (!session) {
      $("room").hidden = true;
      $("prod-bar").hidden = true;
      $("user-bar").hidden = true;
      $("login").hidden = false;
      session = await loginForm($("login"), { title: "Control room", intro: "Log in as a director." });
    }
    $("login").hidden = true;
    $("login").replaceChildren();
    state.session = session;
    const ended = new Promise((resolve) => { session.onEnded = resolve; });
    $("user-name").textContent = (session.user && session.user.username) || "";
    $("user-bar").hidden = false;
    try {
      await loadProductions();
    } catch (e) {
      if (!session.ended) message(`Productions: ${describeError(e)}`, "error");
    }
    await ended;
    stopAll();
  }
}

main();
