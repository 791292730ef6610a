/**
 * Camera operator's phone page: /camera/{stream}?token=<signed publish link>.
 *
 * Which feed the phone plays (decision, kept simple):
 *   1. the stream named by `?program=<name>` if present — with
 *      `?program_token=<read link>` as its WHEP bearer when given (the
 *      control room always adds one: WHEP accepts only a read link for the
 *      stream played, and the camera's own link is a publish link);
 *   2. else a stream called "program" if GET /api/v1/streams lists one;
 *   3. else the camera's own stream.
 *   It is played over WHEP (whep.js) with automatic layer selection and
 *   `sync: false` (video first: the operator needs the picture as early as
 *   possible; waiting for the slower audio path would delay it),
 *   and reconnects by itself.
 *
 * Tally: GET /api/v1/auth/me tells the link's production (`production_id`)
 * and stream; /ws/tally for that production gives this stream's source
 * state. The whole screen shows it, in colour AND words AND a shape:
 *   program  → red,   "● ON AIR"
 *   preview  → green, "▲ PREVIEW"
 *   off      → dark,  "○ OFF"
 *   unknown  → flashing amber/black stripes, "⚠ TALLY LOST" (no message for
 *              3 s, socket down, or the source's own state is unknown);
 *              "NO TALLY" when the production has no tally source of this name.
 * Changes vibrate (navigator.vibrate, once the operator has touched the
 * page) and, if switched on, beep (WebAudio). A screen wake lock keeps the
 * phone awake and is taken again when the page becomes visible.
 *
 * "Send my camera" publishes the phone's camera + microphone to this
 * stream over WHIP with the same link (simulcast high/low).
 *
 * Test hooks: document.body.dataset.tally = program|preview|off|unknown,
 * #tally-text, window.__tally = {state, text, changedAt (epoch ms), history}.
 */
import { api, ApiError, LinkAuth, pageAuth } from "./api.js";
import { TallyClient } from "./tally.js";
import { attachCaptions } from "./captions.js";
import { nowMs, streamFromPath } from "./ui.js";
import { WhepClient, WhipClient } from "./whep.js";

const $ = (id) => document.getElementById(id);
const TONE_KEY = "returnfeed.camera.tone";

const LOOK = {
  program: { text: "ON AIR", shape: "●" },
  preview: { text: "PREVIEW", shape: "▲" },
  off: { text: "OFF", shape: "○" },
  unknown: { text: "TALLY LOST", shape: "⚠" },
};

const page = {
  name: streamFromPath(),
  auth: null,
  tally: null,
  player: null,
  publisher: null,
  wakeLock: null,
  audio: null,
  toneOn: localStorage.getItem(TONE_KEY) === "1",
  status: { tally: "connecting", feed: "", wake: "" },
};

window.__tally = { state: "unknown", text: "CONNECTING", changedAt: nowMs(), history: [] };

// ------------------------------------------------------------ tally display

function showTally(stateName, text) {
  const prev = document.body.dataset.tally;
  document.body.dataset.tally = stateName;
  $("tally-text").textContent = text;
  document.querySelector(".tally-shape").textContent = LOOK[stateName].shape;
  document.title = `${text} · ${page.label || page.name}`;
  if (prev !== stateName || window.__tally.text !== text) {
    const at = nowMs();
    window.__tally.state = stateName;
    window.__tally.text = text;
    window.__tally.changedAt = at;
    window.__tally.history.push({ state: stateName, text, at });
    if (window.__tally.history.length > 100) window.__tally.history.shift();
  }
  if (prev !== stateName) alertChange(stateName);
}

function renderTally() {
  const t = page.tally;
  if (!t || t.status === "connecting") {
    showTally("unknown", "CONNECTING");
    return;
  }
  if (t.status !== "live") {
    showTally("unknown", LOOK.unknown.text);
    return;
  }
  const src = t.sources.get(page.name);
  if (!src) {
    showTally("unknown", "NO TALLY");
    return;
  }
  const st = LOOK[src.state] ? src.state : "unknown";
  showTally(st, LOOK[st].text);
}

function alertChange(st) {
  // Vibration needs a user gesture first in browsers (otherwise it is blocked).
  const active = !navigator.userActivation || navigator.userActivation.hasBeenActive;
  if ("vibrate" in navigator && active) {
    const pattern = { program: [400], preview: [120, 80, 120], off: [60], unknown: [60, 60, 60, 60, 60] }[st];
    try {
      navigator.vibrate(pattern);
    } catch {
      // not allowed here
    }
  }
  if (page.toneOn) tone(st);
}

function tone(st) {
  const ctx = page.audio;
  if (!ctx) return;
  const beeps = {
    program: [[880, 0, 0.35]],
    preview: [[660, 0, 0.12], [660, 0.2, 0.12]],
    off: [[440, 0, 0.08]],
    unknown: [[330, 0, 0.1], [330, 0.15, 0.1], [330, 0.3, 0.1]],
  }[st];
  const t0 = ctx.currentTime + 0.01;
  for (const [freq, at, dur] of beeps) {
    const osc = ctx.createOscillator();
    const gain = ctx.createGain();
    osc.frequency.value = freq;
    gain.gain.setValueAtTime(0.0001, t0 + at);
    gain.gain.exponentialRampToValueAtTime(0.4, t0 + at + 0.01);
    gain.gain.exponentialRampToValueAtTime(0.0001, t0 + at + dur);
    osc.connect(gain).connect(ctx.destination);
    osc.start(t0 + at);
    osc.stop(t0 + at + dur + 0.02);
  }
}

// ------------------------------------------------------------ status line

function renderStatus() {
  const s = page.status;
  const parts = [
    `Tally: ${{ live: "connected", lost: "LOST, reconnecting", connecting: "connecting" }[s.tally] || s.tally}`,
  ];
  if (s.feed) parts.push(`Return: ${s.feed}`);
  if (s.wake) parts.push(s.wake);
  if (s.send) parts.push(`Sending: ${s.send}`);
  $("status-line").textContent = parts.join(" · ");
}

function feedStatus(st, info = {}) {
  const el = $("feed-status");
  let text = "";
  switch (st) {
    case "connecting": text = "Connecting to the return feed…"; break;
    case "waiting": text = `Return feed not live — retrying in ${Math.max(1, Math.round(info.retryAfter || 1))} s`; break;
    case "reconnecting": text = "Return feed lost — reconnecting…"; break;
    case "error": text = `Return feed refused: ${info.detail || ""} (${info.status || "error"})`; break;
    case "stopped": text = "Return feed stopped"; break;
    default: text = "";
  }
  el.textContent = text;
  el.hidden = st === "live";
  page.status.feed = st === "live" ? "live" : st;
  document.body.dataset.feed = st;
  renderStatus();
}

// ------------------------------------------------------------ wake lock

async function keepAwake() {
  if (!("wakeLock" in navigator)) {
    page.status.wake = "Screen: may sleep (no wake lock)";
    renderStatus();
    return;
  }
  if (document.visibilityState !== "visible" || (page.wakeLock && !page.wakeLock.released)) return;
  try {
    page.wakeLock = await navigator.wakeLock.request("screen");
    page.status.wake = "Screen: stays on";
    page.wakeLock.addEventListener("release", () => {
      page.status.wake = "Screen: may sleep";
      renderStatus();
    });
  } catch {
    page.status.wake = "Screen: may sleep (tap to keep on)";
  }
  renderStatus();
}

// ------------------------------------------------------------ controls

function bindControls() {
  const toneBtn = $("btn-tone");
  const setTone = (on) => {
    page.toneOn = on;
    localStorage.setItem(TONE_KEY, on ? "1" : "0");
    toneBtn.textContent = on ? "Tone: on" : "Tone: off";
    toneBtn.setAttribute("aria-pressed", String(on));
  };
  setTone(page.toneOn);
  toneBtn.addEventListener("click", () => {
    if (!page.audio) page.audio = new AudioContext();
    page.audio.resume();
    setTone(!page.toneOn);
    if (page.toneOn) tone(document.body.dataset.tally);
  });

  const listen = $("btn-listen");
  listen.addEventListener("click", () => {
    const v = $("program");
    v.muted = !v.muted;
    if (!v.muted) v.play().catch(() => {});
    listen.textContent = v.muted ? "Sound: off" : "Sound: on";
    listen.setAttribute("aria-pressed", String(!v.muted));
  });

  const full = $("btn-full");
  if (!document.documentElement.requestFullscreen) full.hidden = true;
  full.addEventListener("click", async () => {
    try {
      if (document.fullscreenElement) await document.exitFullscreen();
      else await document.documentElement.requestFullscreen({ navigationUI: "hide" });
    } catch {
      // not allowed (iOS Safari): the page is already full-bleed
    }
  });

  $("btn-send").addEventListener("click", toggleSend);
  // Any touch is a chance to (re)take the wake lock and unlock vibration.
  document.addEventListener("pointerdown", () => keepAwake(), { passive: true });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") keepAwake();
  });
}

async function toggleSend() {
  const btn = $("btn-send");
  const self = $("self-view");
  if (page.publisher) {
    page.publisher.stop();
    for (const t of page.publisher.media.getTracks()) t.stop();
    page.publisher = null;
    self.srcObject = null;
    self.hidden = true;
    btn.textContent = "Send my camera";
    btn.setAttribute("aria-pressed", "false");
    page.status.send = "";
    renderStatus();
    return;
  }
  let media;
  try {
    media = await navigator.mediaDevices.getUserMedia({
      video: { facingMode: "environment", width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } },
      audio: true,
    });
  } catch (err) {
    page.status.send = `camera refused (${err.name})`;
    renderStatus();
    return;
  }
  self.srcObject = media;
  self.hidden = false;
  btn.textContent = "Stop sending";
  btn.setAttribute("aria-pressed", "true");
  page.publisher = new WhipClient({
    url: `/whip/${encodeURIComponent(page.name)}`,
    auth: page.auth,
    media,
    onState: (st, info) => {
      page.status.send = st === "error" ? `refused: ${info.detail || info.status}` : st;
      renderStatus();
    },
  });
  page.publisher.start();
}

// ------------------------------------------------------------ start

function fatal(text) {
  $("feed-status").textContent = text;
  $("feed-status").hidden = false;
  showTally("unknown", "NO LINK");
}

function takeProgramParams() {
  const url = new URL(location.href);
  const key = `returnfeed.link:${url.pathname}:program`;
  const program = url.searchParams.get("program");
  const token = url.searchParams.get("program_token");
  if (token) {
    sessionStorage.setItem(key, JSON.stringify({ program, token }));
    url.searchParams.delete("program_token");
    history.replaceState(history.state, "", url.pathname + url.search + url.hash);
    return { program, token };
  }
  const stored = JSON.parse(sessionStorage.getItem(key) || "null");
  if (stored && (!program || stored.program === program)) return stored;
  return { program, token: null };
}

async function pickProgram(params) {
  if (params.program) return params.program;
  try {
    const data = await api(page.auth, "GET", "/api/v1/streams");
    if ((data.streams || []).some((s) => s.name === "program")) return "program";
  } catch {
    // fall back to the camera's own stream
  }
  return page.name;
}

async function main() {
  bindControls();
  renderTally();
  $("cam-name").textContent = page.name || "?";
  const params = takeProgramParams();
  page.auth = pageAuth();
  if (!page.auth || !page.name) {
    fatal("This page needs the camera link from the director (scan the QR code again).");
    return;
  }
  keepAwake();

  let me;
  try {
    me = await api(page.auth, "GET", "/api/v1/auth/me");
  } catch (err) {
    const why = err instanceof ApiError && err.status === 401
      ? "This link has expired or was revoked: ask the director for a new one."
      : `Cannot reach the server (${err.message}).`;
    fatal(why);
    return;
  }
  if (me.kind === "link" && me.action !== "publish") $("btn-send").hidden = true;

  let production = me.kind === "link" ? me.production_id : null;
  try {
    const s = await api(page.auth, "GET", `/api/v1/streams/${encodeURIComponent(page.name)}`);
    page.label = s.label || s.name;
    if (production === null && s.production) production = s.production.id;
  } catch {
    page.label = page.name;
  }
  $("cam-name").textContent = page.label;
  if (me.kind === "link" && me.stream && me.stream !== page.name) {
    $("status-line").textContent = `This link is for "${me.stream}", not "${page.name}".`;
  }

  if (production !== null && production !== undefined) {
    page.tally = new TallyClient({
      production,
      auth: page.auth,
      onChange: renderTally,
      onStatus: (status) => {
        page.status.tally = status;
        renderTally();
        renderStatus();
      },
    });
    page.tally.start();
  } else {
    showTally("unknown", "NO TALLY");
  }

  const program = await pickProgram(params);
  $("return-label").textContent = program === page.name ? `RETURN · ${page.label}` : `PROGRAM · ${program}`;
  const feedAuth = params.token && program === params.program ? new LinkAuth(params.token) : page.auth;
  page.player = new WhepClient({
    url: `/whep/${encodeURIComponent(program)}`,
    auth: feedAuth,
    video: $("program"),
    sync: false,
    onState: feedStatus,
  });
  page.player.start();
  // Captions of the feed on screen, with the credentials that play it (a
  // link sees its own stream's captions only).
  page.captions = attachCaptions({ auth: feedAuth, stream: () => program,
    parent: document.querySelector(".video-wrap"), button: $("btn-cc") });
  renderStatus();
}

main().catch((err) => fatal(`Error: ${err.message}`));
