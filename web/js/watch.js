/**
 * Viewer: /watch/{stream}?token=<signed read link> (or a logged-in session).
 *
 * A WHEP player (whep.js) with automatic quality: the server picks the
 * simulcast layer from the viewer's RTCP (loss, REMB); the Quality menu pins
 * `?layer=high|low` instead (a new WHEP session). The layer indicator shows
 * the received resolution and, when the stream's tracks say which layer has
 * that size (GET /api/v1/streams/{name}), the layer's name.
 *
 * Stats overlay (key S or the Stats button), from getStats() inbound-rtp
 * video once a second: resolution, framesPerSecond, bitrate (bytesReceived
 * delta), framesDecoded, framesDropped, packetsLost (and % of packets),
 * jitter-buffer delay (jitterBufferDelay / jitterBufferEmittedCount), RTT of
 * the selected candidate pair, codec. window.__stats holds the latest numbers.
 */
import { api, pageAuth } from "./api.js";
import { attachCaptions } from "./captions.js";
import { streamFromPath } from "./ui.js";
import { videoStats, WhepClient } from "./whep.js";

const $ = (id) => document.getElementById(id);
const page = { name: streamFromPath(), auth: null, player: null, info: null, prev: null };

window.__stats = null;

function setState(text) {
  $("state").textContent = text;
  $("state").hidden = !text;
}

function onPlayerState(st, info = {}) {
  document.body.dataset.player = st;
  switch (st) {
    case "connecting": setState("Connecting…"); break;
    case "waiting": setState(`Not live yet — retrying in ${Math.max(1, Math.round(info.retryAfter || 1))} s`); break;
    case "reconnecting": setState("Reconnecting…"); break;
    case "error":
      setState(info.status === 401
        ? "This link has expired or was revoked."
        : `Cannot play: ${info.detail || "error"} (${info.status || ""})`);
      break;
    case "live": setState(""); break;
    default: break;
  }
  $("st-session").textContent = st;
}

function layerOf(height) {
  const s = page.info;
  if (!s || !height) return null;
  const tracks = (s.tracks || []).filter((t) => t.kind === "video" && t.height);
  const match = tracks.find((t) => t.height === height);
  if (match && match.layer) return match.layer;
  const layers = (s.layers || []).map((l) => (typeof l === "string" ? l : l.name || l.rid)).filter(Boolean);
  if (layers.length === 1) return layers[0];
  return null;
}

function fmt(n, digits = 0) {
  return Number.isFinite(n) ? n.toFixed(digits) : "—";
}

async function sample() {
  const player = page.player;
  if (!player) return;
  const report = await player.stats();
  if (!report) return;
  const s = videoStats(report, page.prev);
  page.prev = s;
  // The server's view of the session (its layer choice), every 3 s.
  if (!page.infoAt || performance.now() - page.infoAt > 3000) {
    page.infoAt = performance.now();
    page.server = await player.sessionInfo();
  }
  const layer = (page.server && page.server.layer) || layerOf(s.height);
  const stats = { ...s, layer, pinned: player.layer, state: player.state };
  window.__stats = stats;

  const res = s.width && s.height ? `${s.width}×${s.height}` : "—";
  $("layer").textContent = `${player.layer ? "PINNED" : "AUTO"} · ${layer ? `${layer.toUpperCase()} · ` : ""}${res}`;
  $("layer").dataset.layer = layer || "";
  if ($("stats").hidden) return;
  $("st-res").textContent = res;
  $("st-fps").textContent = `${fmt(s.fps)} fps`;
  $("st-bitrate").textContent = s.bitrateKbps >= 1000 ? `${fmt(s.bitrateKbps / 1000, 2)} Mb/s` : `${fmt(s.bitrateKbps)} kb/s`;
  $("st-decoded").textContent = String(s.framesDecoded);
  $("st-dropped").textContent = String(s.framesDropped);
  $("st-loss").textContent = `${s.packetsLost} (${fmt(s.lossPct, 2)} %)`;
  $("st-jb").textContent = `${fmt(s.jitterBufferMs)} ms`;
  $("st-rtt").textContent = s.rttMs === null ? "—" : `${fmt(s.rttMs)} ms`;
  $("st-codec").textContent = s.codec || "—";
  $("st-layer").textContent = `${layer || "?"}${player.layer ? " (pinned)" : " (auto)"}`;
}

async function refreshInfo() {
  try {
    page.info = await api(page.auth, "GET", `/api/v1/streams/${encodeURIComponent(page.name)}`);
    const s = page.info;
    $("title").textContent = s.label || s.name;
    document.title = `${s.label || s.name} · ReturnFeed`;
    const layers = (s.layers || []).map((l) => (typeof l === "string" ? l : l.name || l.rid)).filter(Boolean);
    const quality = $("quality");
    for (const opt of quality.options) {
      if (opt.value) opt.disabled = layers.length > 0 && !layers.includes(opt.value);
    }
    quality.disabled = layers.length === 1;
    quality.title = layers.length === 1 ? "This stream has a single layer" : `Layers: ${layers.join(", ") || "unknown"}`;
    const live = $("live");
    live.dataset.live = s.live ? "1" : "0";
    live.textContent = s.live ? "● LIVE" : "○ OFFLINE";
  } catch {
    // The player works without it; the title stays the stream name.
  }
}

function toggleStats(force) {
  const box = $("stats");
  box.hidden = force === undefined ? !box.hidden : !force;
  $("btn-stats").setAttribute("aria-pressed", String(!box.hidden));
  sample();
}

function bind() {
  $("btn-stats").addEventListener("click", () => toggleStats());
  document.addEventListener("keydown", (ev) => {
    const tag = ev.target && ev.target.tagName;
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.key === "s" || ev.key === "S") toggleStats();
    else if (ev.key === "f" || ev.key === "F") fullscreen();
    else if (ev.key === "m" || ev.key === "M") sound();
  });
  $("quality").addEventListener("change", (ev) => {
    page.prev = null;
    page.infoAt = 0;
    page.player.setLayer(ev.target.value || null);
  });
  $("btn-sound").addEventListener("click", sound);
  $("unmute").addEventListener("click", sound);
  $("btn-full").addEventListener("click", fullscreen);
  if (!document.documentElement.requestFullscreen) $("btn-full").hidden = true;
  // Show the controls while the pointer moves; hide them after a while.
  let idle = null;
  const wake = () => {
    document.body.dataset.idle = "0";
    clearTimeout(idle);
    idle = setTimeout(() => { document.body.dataset.idle = "1"; }, 4000);
  };
  for (const ev of ["pointermove", "pointerdown", "keydown"]) document.addEventListener(ev, wake, { passive: true });
  wake();
}

function sound() {
  const v = $("video");
  v.muted = !v.muted;
  if (!v.muted) v.play().catch(() => {});
  $("btn-sound").textContent = v.muted ? "Sound" : "Mute";
  $("btn-sound").setAttribute("aria-pressed", String(!v.muted));
  $("unmute").hidden = !v.muted || document.body.dataset.player !== "live";
}

async function fullscreen() {
  try {
    if (document.fullscreenElement) await document.exitFullscreen();
    else await $("player").requestFullscreen();
  } catch {
    // not allowed here
  }
}

async function main() {
  bind();
  $("title").textContent = page.name || "?";
  page.auth = pageAuth();
  if (!page.auth || !page.name) {
    setState("This page needs a watch link (…/watch/NAME?token=…).");
    return;
  }
  page.player = new WhepClient({
    url: `/whep/${encodeURIComponent(page.name)}`,
    auth: page.auth,
    video: $("video"),
    onState: (st, info) => {
      onPlayerState(st, info);
      $("unmute").hidden = !($("video").muted && st === "live");
    },
  });
  page.player.start();
  // Live captions of this stream over /ws/events with the page's own token;
  // the CC button shows once a caption has arrived.
  page.captions = attachCaptions({ auth: page.auth, stream: () => page.name, parent: $("player"), button: $("btn-cc"),
    avoid: $("bar") });
  await refreshInfo();
  setInterval(refreshInfo, 5000);
  setInterval(sample, 1000);
}

main();
