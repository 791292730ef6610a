/**
 * WHEP player and WHIP publisher (RFC 9725 WHIP; draft-ietf-wish-whep),
 * shared by every page.
 *
 *   const player = new WhepClient({ url: "/whep/cam1", auth, video, layer: "low",
 *                                   sync: false, onState: (state, info) => … });
 *   player.start();  …  player.stop();
 *
 * One connection attempt:
 *   1. RTCPeerConnection (max-bundle), recvonly video + audio transceivers
 *      (H.264 preferred: the server forwards passthrough, RFC 9725 §4.2);
 *   2. createOffer / setLocalDescription, then wait for ICE gathering to
 *      complete, at most `iceTimeoutMs` (1 s): no trickle needed (§4.3.1);
 *   3. POST the offer (Content-Type: application/sdp, Authorization: Bearer)
 *      to the endpoint (+ `?layer=high|low` to pin a simulcast layer,
 *      + `?sync=0` when `sync: false`: video first, audio not lip-synced —
 *      the lowest picture latency, for return feeds);
 *      201 → the answer body and the session URL in `Location` (§4.2);
 *      `Link: <…>; rel="ice-server"` headers are used on later attempts (§4.6);
 *      before the first attempt (and when the list is older than
 *      ICE_REFRESH_MS: TURN credentials expire) an OPTIONS request with the
 *      same credentials asks for them (§4.6), so a phone behind a strict NAT
 *      has its TURN relay from the start;
 *   4. play; the session ends on ICE/DTLS failure, "disconnected" for more
 *      than 3 s, no media for `stallMs` while connected, or stop();
 *   5. DELETE the session URL (§4.2) — also on page unload (keepalive fetch).
 *
 * Retries: 409 (stream not live) and 503 wait exactly `Retry-After` seconds
 * (state "waiting"); network errors, 404/5xx and dropped sessions back off
 * 0.5, 1, 2, 4 … 10 s with jitter (state "reconnecting"); the backoff resets
 * after a session stayed up 10 s. 401 with a password session refreshes the
 * token once and retries; 401/403 with a link, and 400/415/422, stop with
 * state "error" (no amount of retrying fixes them).
 *
 * States: idle → connecting → live; waiting / reconnecting; error; stopped.
 */

const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 10000];
/** ICE servers (and their time-limited TURN credentials) are asked again after this long. */
const ICE_REFRESH_MS = 10 * 60 * 1000;
const live = new Set();
const suspended = new Set();

// Leaving the page: end every session (DELETE with a keepalive fetch); if
// the page comes back from the back/forward cache, start them again.
addEventListener("pagehide", () => {
  for (const c of [...live]) {
    suspended.add(c);
    c.stop({ unloading: true });
  }
});
addEventListener("pageshow", (ev) => {
  if (!ev.persisted) return;
  for (const c of suspended) c.start();
  suspended.clear();
});

class RetryLater extends Error {
  constructor(seconds, status, detail) {
    super(detail || `retry in ${seconds} s`);
    this.seconds = seconds;
    this.status = status;
  }
}

class Fatal extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(t);
      resolve();
    }, { once: true });
  });
}

function parseRetryAfter(value) {
  if (!value) return null;
  const n = Number(value);
  if (Number.isFinite(n)) return Math.max(0, n);
  const date = Date.parse(value);
  return Number.isFinite(date) ? Math.max(0, (date - Date.now()) / 1000) : null;
}

/** ICE servers from `Link: <stun:…>; rel="ice-server"` headers (RFC 9725 §4.6). */
export function parseIceLinks(header) {
  if (!header) return [];
  const out = [];
  for (const part of header.split(/,(?=\s*<)/)) {
    const m = part.match(/<([^>]+)>(.*)/);
    if (!m || !/rel="?ice-server"?/i.test(m[2])) continue;
    const server = { urls: m[1] };
    const user = m[2].match(/username="([^"]*)"/i);
    const cred = m[2].match(/credential="([^"]*)"/i);
    if (user) server.username = user[1];
    if (cred) server.credential = cred[1];
    out.push(server);
  }
  return out;
}

function waitIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => {
      if (pc.iceGatheringState === "complete") done();
    };
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

function preferH264(transceiver, kind) {
  if (!transceiver.setCodecPreferences || !RTCRtpReceiver.getCapabilities) return;
  const caps = RTCRtpReceiver.getCapabilities(kind);
  if (!caps) return;
  const first = kind === "video" ? "video/h264" : "audio/opus";
  const rank = (c) => {
    const t = c.mimeType.toLowerCase();
    if (t !== first) return 2;
    // packetization-mode=1 first: what the server packetizes (RFC 6184 §6.3).
    return /packetization-mode=1/.test(c.sdpFmtpLine || "") || kind === "audio" ? 0 : 1;
  };
  const codecs = [...caps.codecs].sort((a, b) => rank(a) - rank(b));
  try {
    transceiver.setCodecPreferences(codecs);
  } catch {
    // Some browsers refuse reordering; the default order is still valid.
  }
}

class WebRtcSession {
  constructor(opts) {
    this.url = opts.url;
    this.auth = opts.auth || null; // {kind, token(), refresh()} from api.js
    this.iceTimeoutMs = opts.iceTimeoutMs ?? 1000;
    this.stallMs = opts.stallMs ?? 6000;
    this.connectTimeoutMs = opts.connectTimeoutMs ?? 10000;
    this.onState = opts.onState || (() => {});
    this.iceServers = opts.iceServers || [];
    this.state = "idle";
    this.info = {};
    this.pc = null;
    this.location = null;
    this.attempt = 0;
    this._abort = null;
    this._sessionToken = null;
  }

  _set(state, info = {}) {
    this.state = state;
    this.info = info;
    this.onState(state, info);
  }

  start() {
    if (this._abort) return;
    this._abort = new AbortController();
    live.add(this);
    this._loop(this._abort.signal);
  }

  stop({ unloading = false } = {}) {
    if (!this._abort) return;
    this._abort.abort();
    this._abort = null;
    live.delete(this);
    this._teardown({ unloading });
    this._set("stopped");
  }

  /** Stop and start again now (e.g. another layer or URL). */
  restart() {
    this.stop();
    this.attempt = 0;
    this.start();
  }

  endpoint() {
    return new URL(this.url, location.href);
  }

  async _loop(signal) {
    let refreshed = false;
    while (!signal.aborted) {
      let waitMs;
      const started = performance.now();
      try {
        this._set(this.attempt ? "reconnecting" : "connecting", { attempt: this.attempt });
        await this._connectOnce(signal);
        refreshed = false;
        if (signal.aborted) return;
        // The session ran and ended: reconnect, promptly if it was up a while.
        if (performance.now() - started > 10000) this.attempt = 0;
        waitMs = this._backoff();
        this._set("reconnecting", { attempt: this.attempt, inMs: waitMs, reason: this._endReason });
      } catch (err) {
        if (signal.aborted) return; // stop() has torn down; a restart may own the state now
        this._teardown();
        if (err instanceof RetryLater) {
          waitMs = err.seconds * 1000;
          this._set("waiting", { retryAfter: err.seconds, status: err.status, detail: err.message });
        } else if (err instanceof Fatal) {
          if (err.status === 401 && !refreshed && this.auth && this.auth.kind === "session") {
            refreshed = true;
            try {
              await this.auth.refresh();
              continue;
            } catch {
              // fall through to the error state
            }
          }
          this._set("error", { status: err.status, detail: err.message });
          live.delete(this);
          return;
        } else {
          waitMs = this._backoff();
          this._set("reconnecting", { attempt: this.attempt, inMs: waitMs, detail: String(err && err.message || err) });
        }
      }
      await sleep(waitMs, signal);
    }
  }

  _backoff() {
    const base = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    this.attempt++;
    return Math.round(base * (0.8 + Math.random() * 0.4));
  }

  /**
   * RFC 9725 §4.6: the ICE servers an OPTIONS request returns as `Link`
   * headers (TURN credentials only with valid credentials of our own).
   * null when the server could not be asked (the attempt goes on without).
   */
  async _askIceServers(signal) {
    try {
      const token = this.auth ? await this.auth.token() : null;
      if (signal.aborted) return null;
      const headers = token ? { Authorization: `Bearer ${token}` } : {};
      const res = await fetch(this.endpoint(), {
        method: "OPTIONS", headers, signal, cache: "no-store", credentials: "omit",
      });
      return res.ok ? parseIceLinks(res.headers.get("Link")) : null;
    } catch {
      return null;
    }
  }

  /**
   * One session. After every await it checks `signal`: once stop() has run
   * (and torn down what it saw), this attempt must not touch `this.pc` or
   * `this.location` any more — a restart may already own them.
   */
  async _connectOnce(signal) {
    if (this._iceAt === undefined || performance.now() - this._iceAt > ICE_REFRESH_MS) {
      const ice = await this._askIceServers(signal);
      if (signal.aborted) return undefined;
      if (ice !== null) {
        this._iceAt = performance.now();
        if (ice.length) this.iceServers = ice;
      }
    }
    const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle", iceServers: this.iceServers });
    this.pc = pc;
    const abandon = () => {
      try {
        pc.close();
      } catch {
        // already closed
      }
    };
    this.prepare(pc);
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    await waitIceGathering(pc, this.iceTimeoutMs);
    if (signal.aborted) return abandon();

    const token = this.auth ? await this.auth.token() : null;
    if (signal.aborted) return abandon();
    this._sessionToken = token;
    const headers = { "Content-Type": "application/sdp" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const res = await fetch(this.endpoint(), {
      method: "POST", headers, body: pc.localDescription.sdp, signal, cache: "no-store", credentials: "omit",
    });
    if (res.status !== 201 && res.status !== 200) {
      const detail = await errorDetail(res);
      const retry = parseRetryAfter(res.headers.get("Retry-After"));
      if ((res.status === 409 || res.status === 503 || res.status === 429) && retry !== null) {
        throw new RetryLater(retry, res.status, detail);
      }
      if ([400, 401, 403, 405, 415, 422].includes(res.status)) throw new Fatal(res.status, detail);
      throw new Error(`${res.status}: ${detail}`);
    }
    const loc = res.headers.get("Location");
    const sessionUrl = loc ? new URL(loc, this.endpoint()).href : null;
    if (signal.aborted) {
      // Stopped while the server was creating the session: end it too.
      if (sessionUrl) {
        const h = token ? { Authorization: `Bearer ${token}` } : {};
        fetch(sessionUrl, { method: "DELETE", headers: h, keepalive: true, credentials: "omit" }).catch(() => {});
      }
      return abandon();
    }
    this.location = sessionUrl;
    const ice = parseIceLinks(res.headers.get("Link"));
    if (ice.length) {
      this.iceServers = ice;
      this._iceAt = performance.now();
    }
    const answer = await res.text();
    if (signal.aborted) return undefined; // stop() deleted the session and closed pc
    await pc.setRemoteDescription({ type: "answer", sdp: answer });
    if (signal.aborted) return undefined;
    await this._watch(pc, signal);
    if (!signal.aborted) this._teardown();
    return undefined;
  }

  /** Resolves when the session should end (failure, disconnect, stall, stop). */
  _watch(pc, signal) {
    return new Promise((resolve) => {
      let disconnectedTimer = null;
      let connectTimer = null;
      let stallTimer = null;
      let lastBytes = -1;
      let lastChange = performance.now();
      const finish = (reason) => {
        clearTimeout(disconnectedTimer);
        clearTimeout(connectTimer);
        clearInterval(stallTimer);
        pc.removeEventListener("connectionstatechange", onChange);
        this._endReason = reason;
        resolve();
      };
      const onChange = () => {
        const s = pc.connectionState;
        if (s === "connected") {
          clearTimeout(connectTimer);
          clearTimeout(disconnectedTimer);
          disconnectedTimer = null;
          lastChange = performance.now();
          this._set("live", { location: this.location });
        } else if (s === "failed" || s === "closed") {
          finish(`connection ${s}`);
        } else if (s === "disconnected" && !disconnectedTimer) {
          disconnectedTimer = setTimeout(() => finish("disconnected"), 3000);
        }
      };
      pc.addEventListener("connectionstatechange", onChange);
      signal.addEventListener("abort", () => finish("stopped"), { once: true });
      connectTimer = setTimeout(() => {
        if (pc.connectionState !== "connected") finish("connect timeout");
      }, this.connectTimeoutMs);
      if (this.stallMs > 0) {
        stallTimer = setInterval(async () => {
          if (pc.connectionState !== "connected") return;
          const bytes = await this.mediaBytes(pc);
          if (bytes !== lastBytes) {
            lastBytes = bytes;
            lastChange = performance.now();
          } else if (performance.now() - lastChange > this.stallMs) {
            finish("no media");
          }
        }, 1000);
      }
      onChange();
    });
  }

  async mediaBytes(pc) {
    let total = 0;
    const stats = await pc.getStats();
    stats.forEach((s) => {
      if (s.type === "inbound-rtp") total += s.bytesReceived || 0;
      if (s.type === "outbound-rtp") total += s.bytesSent || 0;
    });
    return total;
  }

  /** Bearer for requests on the session: the freshest token held right now. */
  _bearer() {
    const now = this.auth && this.auth.currentToken ? this.auth.currentToken() : null;
    return now || this._sessionToken;
  }

  /**
   * DELETE the session resource, then close the peer connection. The close
   * waits for the DELETE's answer (at most 1 s): closing first would end
   * the session through DTLS and make the DELETE a 404. When the page is
   * being unloaded the DELETE goes out as a keepalive request and the
   * browser closes the connection itself.
   */
  _teardown({ unloading = false } = {}) {
    const pc = this.pc;
    this.pc = null;
    const loc = this.location;
    this.location = null;
    let deleted = Promise.resolve();
    if (loc) {
      const headers = {};
      const bearer = this._bearer();
      if (bearer) headers.Authorization = `Bearer ${bearer}`;
      deleted = fetch(loc, { method: "DELETE", headers, keepalive: true, credentials: "omit" }).catch(() => {});
    }
    if (pc && !unloading) {
      const close = () => {
        try {
          pc.close();
        } catch {
          // already closed
        }
      };
      if (loc) Promise.race([deleted, new Promise((r) => setTimeout(r, 1000))]).then(close);
      else close();
    }
    this.cleanupMedia();
  }

  prepare() {}

  cleanupMedia() {}
}

async function errorDetail(res) {
  try {
    const text = await res.text();
    try {
      const j = JSON.parse(text);
      return j.detail || j.error || text;
    } catch {
      return text.slice(0, 200) || res.statusText;
    }
  } catch {
    return res.statusText;
  }
}

/** WHEP player: receives the feed into a <video> element. */
export class WhepClient extends WebRtcSession {
  constructor(opts) {
    super(opts);
    this.video = opts.video || null;
    this.layer = opts.layer || null; // null = automatic
    // false: the server gives audio and video different stream ids, so the
    // browser plays video as early as it can instead of waiting for audio.
    this.sync = opts.sync !== false;
    this.onTrack = opts.onTrack || null;
    this.stream = null;
  }

  endpoint() {
    const u = super.endpoint();
    if (this.layer) u.searchParams.set("layer", this.layer);
    if (!this.sync) u.searchParams.set("sync", "0");
    return u;
  }

  /**
   * Pin a layer ("high" | "low" | null = automatic). A live session is
   * re-pinned in place (POST {session}/layer, a ReturnFeed extension); if
   * that is refused, or no session is up, the next POST carries ?layer=.
   */
  async setLayer(layer) {
    const want = layer || null;
    if (want === this.layer) return;
    this.layer = want;
    if (this.location && this.state === "live") {
      try {
        const headers = { "Content-Type": "application/json" };
        if (this._bearer()) headers.Authorization = `Bearer ${this._bearer()}`;
        const res = await fetch(`${this.location}/layer`, {
          method: "POST", headers, body: JSON.stringify({ layer: want || "auto" }), credentials: "omit",
        });
        if (res.ok) return;
      } catch {
        // fall back to a new session
      }
    }
    if (this._abort) this.restart();
  }

  /** The server's view of the session (GET on the session URL), or null. */
  async sessionInfo() {
    if (!this.location) return null;
    try {
      const headers = {};
      if (this._bearer()) headers.Authorization = `Bearer ${this._bearer()}`;
      const res = await fetch(this.location, { headers, cache: "no-store", credentials: "omit" });
      return res.ok ? await res.json() : null;
    } catch {
      return null;
    }
  }

  prepare(pc) {
    const stream = new MediaStream();
    this.stream = stream;
    preferH264(pc.addTransceiver("video", { direction: "recvonly" }), "video");
    preferH264(pc.addTransceiver("audio", { direction: "recvonly" }), "audio");
    pc.addEventListener("track", (ev) => {
      stream.addTrack(ev.track);
      if (this.video && this.video.srcObject !== stream) {
        this.video.srcObject = stream;
        const p = this.video.play();
        if (p && p.catch) p.catch(() => {});
      }
      if (this.onTrack) this.onTrack(ev.track, stream);
    });
  }

  cleanupMedia() {
    // Keep the last frame on screen while reconnecting; just drop the tracks.
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    this.stream = null;
  }

  /** Latest inbound-rtp video/audio stats (see videoStats()). */
  async stats() {
    return this.pc ? this.pc.getStats() : null;
  }
}

/** WHIP publisher: sends a local MediaStream (camera + microphone). */
export class WhipClient extends WebRtcSession {
  constructor(opts) {
    super(opts);
    this.media = opts.media; // MediaStream
    this.simulcast = opts.simulcast ?? true;
  }

  prepare(pc) {
    for (const track of this.media.getTracks()) {
      if (track.kind === "video") {
        const init = { direction: "sendonly", streams: [this.media] };
        if (this.simulcast) {
          init.sendEncodings = [
            { rid: "high", maxBitrate: 2_500_000 },
            { rid: "low", scaleResolutionDownBy: 2, maxBitrate: 400_000 },
          ];
        }
        const t = pc.addTransceiver(track, init);
        preferSendH264(t);
      } else {
        pc.addTransceiver(track, { direction: "sendonly", streams: [this.media] });
      }
    }
  }
}

function preferSendH264(transceiver) {
  if (!transceiver.setCodecPreferences || !RTCRtpSender.getCapabilities) return;
  const caps = RTCRtpSender.getCapabilities("video");
  if (!caps) return;
  const rank = (c) => {
    const t = c.mimeType.toLowerCase();
    if (t !== "video/h264") return 3;
    const f = c.sdpFmtpLine || "";
    // Constrained baseline, packetization-mode=1: decodable everywhere.
    if (/profile-level-id=42e0/i.test(f) && /packetization-mode=1/.test(f)) return 0;
    return /packetization-mode=1/.test(f) ? 1 : 2;
  };
  try {
    transceiver.setCodecPreferences([...caps.codecs].sort((a, b) => rank(a) - rank(b)));
  } catch {
    // keep the browser's order
  }
}

/**
 * Numbers for a stats overlay from an RTCStatsReport: the inbound video
 * stream (resolution, fps, frames decoded, bytes, loss, jitter-buffer delay)
 * plus the selected candidate pair's RTT. `prev` (the last result) turns
 * byte counters into a bitrate.
 */
export function videoStats(report, prev) {
  const out = {
    at: performance.now(), width: 0, height: 0, fps: 0, framesDecoded: 0, framesDropped: 0,
    bytesReceived: 0, bitrateKbps: 0, packetsReceived: 0, packetsLost: 0, lossPct: 0,
    jitterBufferMs: 0, codec: "", rttMs: null, audioBytes: 0,
  };
  if (!report) return out;
  let codecId = null;
  let pairId = null;
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") {
      out.width = s.frameWidth || 0;
      out.height = s.frameHeight || 0;
      out.fps = s.framesPerSecond || 0;
      out.framesDecoded = s.framesDecoded || 0;
      out.framesDropped = s.framesDropped || 0;
      out.bytesReceived = s.bytesReceived || 0;
      out.packetsReceived = s.packetsReceived || 0;
      out.packetsLost = s.packetsLost || 0;
      out.jitterBufferMs = s.jitterBufferEmittedCount
        ? (1000 * s.jitterBufferDelay) / s.jitterBufferEmittedCount : 0;
      codecId = s.codecId;
    } else if (s.type === "inbound-rtp" && s.kind === "audio") {
      out.audioBytes = s.bytesReceived || 0;
    } else if (s.type === "transport" && s.selectedCandidatePairId) {
      pairId = s.selectedCandidatePairId;
    }
  });
  if (codecId && report.get(codecId)) out.codec = report.get(codecId).mimeType.replace(/^video\//, "");
  const pair = pairId && report.get(pairId);
  if (pair && pair.currentRoundTripTime !== undefined) out.rttMs = pair.currentRoundTripTime * 1000;
  const total = out.packetsReceived + out.packetsLost;
  out.lossPct = total ? (100 * out.packetsLost) / total : 0;
  if (prev && prev.bytesReceived <= out.bytesReceived && out.at > prev.at) {
    out.bitrateKbps = (8 * (out.bytesReceived - prev.bytesReceived)) / (out.at - prev.at);
  }
  return out;
}
