/**
 * The pages' reconnecting WebSocket, and the one `/ws/events?token=…`
 * socket (server/qc_events.py) of a page built on it.
 *
 * ReconnectingSocket is the one reconnect logic of the pages: the tally
 * socket (tally.js TallyClient) and the events socket below extend it.
 * Both protocols start every connection with a `snapshot`, send a JSON
 * `ping` every second (answered with `pong`) and may close with 4000 (too
 * slow), 4001 (heartbeat timeout) or 1001 (going away), all of which just
 * reconnect. Anything received counts as a sign of life; nothing for
 * `silenceMs` → the socket is dropped and a new one opened, after a backoff
 * of 0.25 … 5 s (±20 % jitter, so a restarted server is not met by every
 * page at once), reset by the next snapshot.
 *
 * status: "connecting" (no snapshot yet) → "live" → "lost" → "live" …;
 * still "connecting" `silenceMs` after start() → "lost" with the reason.
 */

const BACKOFF_MS = [250, 500, 1000, 2000, 5000];
const JITTER = 0.2;
const TICK_MS = 250;

export class ReconnectingSocket {
  /**
   * @param {object} o
   * @param {string} o.path  e.g. "/ws/tally"
   * @param {{token: () => Promise<string>}} o.auth  credentials (api.js)
   * @param {object} [o.query]  more query parameters than the token
   * @param {number} o.silenceMs  nothing heard this long: the socket is dead
   * @param {number} [o.pingMs]  send a `ping` this often (0: never)
   * @param {(status: string, info: object) => void} [o.onStatus]  on every change of `status`
   * @param {(err: {code: string, detail: string, id?: any}) => void} [o.onError]
   */
  constructor({ path, auth, query = {}, silenceMs, pingMs = 0, onStatus, onError }) {
    this.path = path;
    this.auth = auth;
    this.query = query;
    this.silenceMs = silenceMs;
    this.pingMs = pingMs;
    this.onStatus = onStatus || (() => {});
    this.onError = onError || (() => {});
    this.status = "connecting";
    this.ws = null;
    this.lastHeard = 0;
    this.attempt = 0;
    this.stopped = true;
    this._timer = null;
    this._reconnectTimer = null;
  }

  start() {
    if (!this.stopped) return this;
    this.stopped = false;
    this._startedAt = performance.now();
    this._connect();
    this._timer = setInterval(() => this._tick(), TICK_MS);
    return this;
  }

  stop() {
    this.stopped = true;
    clearInterval(this._timer);
    clearTimeout(this._reconnectTimer);
    this._close(1000, "bye");
  }

  // Hooks for the protocol on top.

  /** A new socket is open (subscriptions are sent again here). */
  _opened() {}

  /** A snapshot arrived; called before the status turns "live". */
  _snapshot(msg) {}

  /** Every message but ping and pong, snapshots included. */
  _handle(msg) {}

  /** The status has just turned "lost" from "live". */
  _wentLost() {}

  /** Write one message if the socket is open; whether it was written. */
  _write(msg) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(msg));
    return true;
  }

  _close(code, reason) {
    const ws = this.ws;
    this.ws = null;
    if (!ws) return;
    ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null;
    try {
      ws.close(code, reason);
    } catch {
      // already closing
    }
  }

  async _connect() {
    if (this.stopped) return;
    let token;
    try {
      token = await this.auth.token();
    } catch (err) {
      this.onError({ code: "auth", detail: err.message || String(err) });
      this._scheduleReconnect();
      return;
    }
    if (this.stopped) return;
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const q = new URLSearchParams({ token, ...this.query });
    const ws = new WebSocket(`${proto}//${location.host}${this.path}?${q}`);
    this.ws = ws;
    this.lastHeard = performance.now();
    this.connectedAt = null;
    ws.onopen = () => {
      this.lastHeard = performance.now();
      this.connectedAt = this.lastHeard;
      if (this.pingMs) this._ping();
      this._opened();
    };
    ws.onmessage = (ev) => this._message(ws, ev.data);
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.lastClose = { code: ev.code, reason: ev.reason };
      this._lost(`closed ${ev.code}${ev.reason ? ` ${ev.reason}` : ""}`);
      this._scheduleReconnect();
    };
    ws.onerror = () => {
      // onclose follows with the code; nothing else to learn here.
    };
  }

  _message(ws, data) {
    if (this.ws !== ws) return;
    this.lastHeard = performance.now();
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (!msg || typeof msg !== "object") return;
    if (msg.type === "ping") {
      this._write({ type: "pong" });
      return;
    }
    if (msg.type === "pong") return;
    if (msg.type === "snapshot") {
      this._snapshot(msg);
      this.attempt = 0;
      this._setStatus("live");
    }
    this._handle(msg);
  }

  _ping() {
    this._write({ type: "ping" });
  }

  _tick() {
    if (this.stopped) return;
    const now = performance.now();
    if (this.status === "connecting" && now - this._startedAt > this.silenceMs) {
      this._setStatus("lost", { reason: this.lastReason || "cannot connect" });
    }
    if (this.pingMs && this.ws && this.ws.readyState === WebSocket.OPEN && now - (this._lastPing || 0) >= this.pingMs) {
      this._lastPing = now;
      this._ping();
    }
    if (this.ws && now - this.lastHeard > this.silenceMs) {
      // Silence: what this socket said last can no longer be trusted.
      this._close(4001, "heartbeat timeout");
      this._lost(`no message for ${this.silenceMs / 1000} s`);
      this._scheduleReconnect();
    }
  }

  _lost(reason) {
    this.lastReason = reason;
    if (this.status === "live") {
      this._setStatus("lost", { reason });
      this._wentLost();
    }
  }

  _scheduleReconnect() {
    if (this.stopped) return;
    clearTimeout(this._reconnectTimer);
    const base = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    this.attempt++;
    const delay = Math.round(base * (1 - JITTER + Math.random() * 2 * JITTER));
    this._reconnectTimer = setTimeout(() => this._connect(), delay);
  }

  _setStatus(status, info = {}) {
    const was = this.status;
    this.status = status;
    if (was !== status) this.onStatus(status, info);
  }
}

/**
 * One `/ws/events` socket for a page: QC markers, meters, notes and captions
 * all arrive on it, so the control room opens one socket, not one per
 * feature. What to do with each message is the listeners' business (qc.js
 * QcClient.handle, captions.js CaptionClient.handle).
 *
 * The server pings every second; nothing heard for 5 s → reconnect (the
 * client sends no pings of its own here). `subscribe(streams)` asks for
 * those streams' meters and is sent again on every new socket.
 */
export class EventsSocket extends ReconnectingSocket {
  /**
   * @param {object} o
   * @param {{token: () => Promise<string>}} o.auth  credentials (api.js)
   * @param {(msg: object) => void} o.onMessage  every message but ping
   * @param {(status: string, info: object) => void} [o.onStatus]  "connecting" | "live" | "lost"
   */
  constructor({ auth, onMessage, onStatus }) {
    super({ path: "/ws/events", auth, silenceMs: 5000, onStatus });
    this.onMessage = onMessage;
    this.streams = [];
  }

  /** Meters for these streams (the tiles on screen). */
  subscribe(streams) {
    const sorted = [...streams].sort();
    if (sorted.join("\n") === this.streams.join("\n")) return;
    this.streams = sorted;
    this.send({ type: "subscribe", streams: sorted });
  }

  send(msg) {
    this._write(msg);
  }

  _opened() {
    if (this.streams.length) this._write({ type: "subscribe", streams: this.streams });
  }

  _handle(msg) {
    this.onMessage(msg);
  }
}
