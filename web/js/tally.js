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
 * The socket, its pings, backoff and status are events.js's
 * ReconnectingSocket, the same as the /ws/events socket's.
 *
 * status: "connecting" (no snapshot yet) → "live" → "lost" → "live" …
 */

import { ReconnectingSocket } from "./events.js";

export class TallyClient extends ReconnectingSocket {
  /**
   * @param {object} o
   * @param {number|string} o.production  production id
   * @param {{token: () => Promise<string>}} o.auth  credentials (api.js)
   * @param {(sources: Map<string, object>, changed: string[], msg: object) => void} [o.onChange]
   * @param {(status: string, info: object) => void} [o.onStatus]
   * @param {(err: {code: string, detail: string, id?: any}) => void} [o.onError]
   */
  constructor({ production, auth, onChange, onStatus, onError, path = "/ws/tally" }) {
    super({ path, auth, query: { production: String(production) }, silenceMs: 3000, pingMs: 1000, onStatus, onError });
    this.production = production;
    this.onChange = onChange || (() => {});
    this.sources = new Map();
    this.seq = -Infinity;
    this.nextId = 1;
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
    const id = this.nextId;
    if (!this._write({ ...msg, id })) {
      this.onError({ code: "not_connected", detail: "tally is not connected" });
      return null;
    }
    this.nextId++;
    return id;
  }

  _snapshot(msg) {
    this.sources = new Map(Object.entries(msg.sources || {}));
    this.seq = typeof msg.seq === "number" ? msg.seq : this.seq;
    this.productionName = msg.production;
  }

  _handle(msg) {
    switch (msg.type) {
      case "snapshot":
        this.onChange(this.sources, [...this.sources.keys()], msg);
        break;
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
      case "error":
        this.onError({ code: msg.code, detail: msg.detail, id: msg.id });
        break;
      default:
        break;
    }
  }

  _wentLost() {
    this.onChange(this.sources, [...this.sources.keys()], { type: "lost" });
  }
}
