/**
 * Live QC client (`/ws/events?token=…`), protocol as in server/qc_events.py:
 *
 *   server → {"type":"snapshot","seq":1,"markers":[MARKER…],"taps":{STREAM:{state,detail}}}
 *            first message on every connection: the markers open now;
 *            {"type":"marker.open"|"marker.update"|"marker.close", seq, ...MARKER}
 *            {"type":"marker.stored", seq, stream, live_id, id}  (the row id, once stored)
 *            {"type":"marker.flag", seq, ...MARKER with false_positive, verified_by}
 *            {"type":"note", seq, id, stream, marker_id, at, text, author}
 *            {"type":"meters", seq, stream, momentary, short_term, peaks_dbfs}  (subscribed streams)
 *            {"type":"tap", seq, stream, state, detail}; {"type":"ping"}; {"type":"error", code, detail}
 *   client → {"type":"subscribe","streams":[…]}; {"type":"pong"} for each ping.
 *   MARKER = {id, live_id, stream, kind, subtype, severity, confidence, start, end,
 *             wall_start, wall_end, metadata}
 *
 * The server pings every second: nothing heard for 5 s → the socket is
 * dropped and a new one opened (backoff 0.25 … 5 s); its snapshot replaces
 * the open markers.
 */

const BACKOFF_MS = [250, 500, 1000, 2000, 5000];
const SILENCE_MS = 5000;

export class QcClient {
  /**
   * @param {object} o
   * @param {{token: () => Promise<string>}} o.auth  credentials (api.js)
   * @param {(msg: object) => void} o.onEvent  every marker/note/flag/tap message
   * @param {(stream: string, meters: object) => void} o.onMeters
   * @param {(status: string) => void} [o.onStatus]  "connecting" | "live" | "lost"
   */
  constructor({ auth, onEvent, onMeters, onStatus }) {
    this.auth = auth;
    this.onEvent = onEvent;
    this.onMeters = onMeters;
    this.onStatus = onStatus || (() => {});
    this.streams = [];
    this.open = new Map(); // "stream/kind/subtype" → marker
    this.ws = null;
    this.attempt = 0;
    this.stopped = true;
    this._reconnectTimer = null;
    this._watchdog = null;
    this.lastHeard = 0;
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this._connect();
    this._watchdog = setInterval(() => this._checkSilence(), 1000);
  }

  _checkSilence() {
    const ws = this.ws;
    if (!ws || performance.now() - this.lastHeard < SILENCE_MS) return;
    this.ws = null;
    ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null;
    try {
      ws.close(4001, "silent");
    } catch {
      // already closing
    }
    this.onStatus("lost");
    this._scheduleReconnect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this._reconnectTimer);
    clearInterval(this._watchdog);
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

  /** Meters for these streams (the tiles on screen). */
  subscribe(streams) {
    const sorted = [...streams].sort();
    if (sorted.join("\n") === this.streams.join("\n")) return;
    this.streams = sorted;
    this._send({ type: "subscribe", streams: sorted });
  }

  /** Open markers of one stream. */
  openOf(stream) {
    return [...this.open.values()].filter((m) => m.stream === stream);
  }

  _send(msg) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(msg));
  }

  async _connect() {
    if (this.stopped) return;
    let token;
    try {
      token = await this.auth.token();
    } catch {
      this._scheduleReconnect();
      return;
    }
    if (this.stopped) return;
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${proto}//${location.host}/ws/events?${new URLSearchParams({ token })}`);
    this.ws = ws;
    this.lastHeard = performance.now();
    this.onStatus("connecting");
    ws.onopen = () => {
      if (this.streams.length) ws.send(JSON.stringify({ type: "subscribe", streams: this.streams }));
    };
    ws.onmessage = (ev) => this._message(ws, ev.data);
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.onStatus("lost");
      this._scheduleReconnect();
    };
  }

  _scheduleReconnect() {
    if (this.stopped) return;
    const delay = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    this.attempt += 1;
    this._reconnectTimer = setTimeout(() => this._connect(), delay);
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
    const key = (m) => `${m.stream}/${m.kind}/${m.subtype}`;
    switch (msg.type) {
      case "snapshot":
        this.attempt = 0;
        this.open = new Map((msg.markers || []).map((m) => [key(m), m]));
        this.onStatus("live");
        this.onEvent(msg);
        break;
      case "marker.open":
      case "marker.update":
        this.open.set(key(msg), msg);
        this.onEvent(msg);
        break;
      case "marker.close":
        this.open.delete(key(msg));
        this.onEvent(msg);
        break;
      case "marker.stored":
        for (const m of this.open.values()) if (m.live_id === msg.live_id) m.id = msg.id;
        this.onEvent(msg);
        break;
      case "meters":
        this.onMeters(msg.stream, msg);
        break;
      case "ping":
        this._send({ type: "pong" });
        break;
      case "marker.flag":
      case "note":
      case "tap":
        this.onEvent(msg);
        break;
      default:
        break;
    }
  }
}

/** dBFS / LUFS → 0..1 along a meter's scale (−60 … 0). */
export function meterFraction(db) {
  if (typeof db !== "number") return 0;
  return Math.max(0, Math.min(1, (db + 60) / 60));
}
