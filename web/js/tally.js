/**
 * Tally WebSocket client (`/ws/tally?token=…&production=<id>`), protocol as
 * in tally/protocol.py:
 *
 *   server → {"type":"snapshot","seq":N,"production":…,"sources":{NAME: SOURCE}}
 *            first message on every connection: replaces everything known;
 *            {"type":"tally","seq":M,"sources":{…changed…}}  deltas, M > N;
 *            a delta whose seq is not above the last applied one is ignored;
 *            {"type":"ping"} every second (answered with pong);
 *            {"type":"pong"} answers; {"type":"error","code","detail","id"?}.
 *   client → {"type":"ping"} every second; cut / preview / take commands.
 *   SOURCE = {state: "program"|"preview"|"off"|"unknown", buses, aux, label, authority[, removed]}.
 *
 * Liveness: anything received counts as a sign of life. Nothing for 3 s →
 * status "lost" (every source must be shown as unknown, never its last
 * colour), the socket is dropped and a new one opened (backoff 0.25 … 5 s);
 * the new snapshot replaces everything. Close codes 4000 (too slow), 4001
 * (heartbeat timeout) and 1001 (server going away) all just reconnect.
 *
 * status: "connecting" (no snapshot yet) → "live" → "lost" → "live" …
 */

const SILENCE_MS = 3000;
const PING_MS = 1000;
const BACKOFF_MS = [250, 500, 1000, 2000, 5000];

export class TallyClient {
  /**
   * @param {object} o
   * @param {number|string} o.production  production id
   * @param {{token: () => Promise<string>}} o.auth  credentials (api.js)
   * @param {(sources: Map<string, object>, changed: string[], msg: object) => void} [o.onChange]
   * @param {(status: string, info: object) => void} [o.onStatus]
   * @param {(err: {code: string, detail: string, id?: any}) => void} [o.onError]
   */
  constructor({ production, auth, onChange, onStatus, onError, path = "/ws/tally" }) {
    this.production = production;
    this.auth = auth;
    this.path = path;
    this.onChange = onChange || (() => {});
    this.onStatus = onStatus || (() => {});
    this.onError = onError || (() => {});
    this.sources = new Map();
    this.seq = -Infinity;
    this.status = "connecting";
    this.ws = null;
    this.lastHeard = 0;
    this.attempt = 0;
    this.nextId = 1;
    this.stopped = true;
    this._timer = null;
    this._reconnectTimer = null;
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this._startedAt = performance.now();
    this._connect();
    this._timer = setInterval(() => this._tick(), PING_MS / 4);
  }

  stop() {
    this.stopped = true;
    clearInterval(this._timer);
    clearTimeout(this._reconnectTimer);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null;
      try {
        ws.close(1000, "bye");
      } catch {
        // already closing
      }
    }
  }

  /** State of one source as a tally light should show it. */
  stateOf(name) {
    if (this.status !== "live") return "unknown";
    const s = this.sources.get(name);
    return s ? s.state : "unknown";
  }

  cut(source) {
    return this.send({ type: "cut", source });
  }

  preview(source) {
    return this.send({ type: "preview", source });
  }

  take(duration) {
    const msg = { type: "take" };
    if (duration !== undefined && duration !== null && duration !== "") msg.duration = Number(duration);
    return this.send(msg);
  }

  /** Send a command; returns its id (echoed in an error), or null when not connected. */
  send(msg) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
      this.onError({ code: "not_connected", detail: "tally is not connected" });
      return null;
    }
    const id = this.nextId++;
    this.ws.send(JSON.stringify({ ...msg, id }));
    return id;
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
    const q = new URLSearchParams({ token, production: String(this.production) });
    const ws = new WebSocket(`${proto}//${location.host}${this.path}?${q}`);
    this.ws = ws;
    this.lastHeard = performance.now();
    this.connectedAt = null;
    ws.onopen = () => {
      this.lastHeard = performance.now();
      this.connectedAt = this.lastHeard;
      this._ping();
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
    switch (msg.type) {
      case "snapshot": {
        this.sources = new Map(Object.entries(msg.sources || {}));
        this.seq = typeof msg.seq === "number" ? msg.seq : this.seq;
        this.productionName = msg.production;
        this.attempt = 0;
        this._setStatus("live");
        this.onChange(this.sources, [...this.sources.keys()], msg);
        break;
      }
      case "tally": {
        if (this.status !== "live") return; // no snapshot on this socket yet
        if (typeof msg.seq === "number" && msg.seq <= this.seq) return;
        if (typeof msg.seq === "number") this.seq = msg.seq;
        const changed = [];
        for (const [name, src] of Object.entries(msg.sources || {})) {
          // A source taken out of the production's config comes one last
          // time as unknown with removed: true, then never again.
          if (src && src.removed) this.sources.delete(name);
          else this.sources.set(name, src);
          changed.push(name);
        }
        this.onChange(this.sources, changed, msg);
        break;
      }
      case "ping":
        ws.send('{"type":"pong"}');
        break;
      case "pong":
        break;
      case "error":
        this.onError({ code: msg.code, detail: msg.detail, id: msg.id });
        break;
      default:
        break;
    }
  }

  _ping() {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send('{"type":"ping"}');
  }

  _tick() {
    if (this.stopped) return;
    const now = performance.now();
    if (this.status === "connecting" && now - this._startedAt > SILENCE_MS) {
      this._setStatus("lost", { reason: this.lastReason || "cannot connect" });
    }
    if (this.ws && this.ws.readyState === WebSocket.OPEN && now - (this._lastPing || 0) >= PING_MS) {
      this._lastPing = now;
      this._ping();
    }
    if (this.ws && now - this.lastHeard > SILENCE_MS) {
      // Three seconds of silence: the tally can no longer be trusted.
      const ws = this.ws;
      this.ws = null;
      ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null;
      try {
        ws.close(4001, "heartbeat timeout");
      } catch {
        // closing anyway
      }
      this._lost("no message for 3 s");
      this._scheduleReconnect();
    }
  }

  _lost(reason) {
    this.lastReason = reason;
    if (this.status === "live") {
      this._setStatus("lost", { reason });
      this.onChange(this.sources, [...this.sources.keys()], { type: "lost" });
    }
  }

  _scheduleReconnect() {
    if (this.stopped) return;
    clearTimeout(this._reconnectTimer);
    const base = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    this.attempt++;
    this._reconnectTimer = setTimeout(() => this._connect(), Math.round(base * (0.8 + Math.random() * 0.4)));
  }

  _setStatus(status, info = {}) {
    const was = this.status;
    this.status = status;
    if (was !== status) this.onStatus(status, info);
  }
}
