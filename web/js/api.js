/**
 * REST API client and the two kinds of credentials a page can hold.
 *
 * Session (director / admin, logged in with a password)
 *   POST /api/v1/auth/login → {access_token, expires_in, refresh_token, user}.
 *   The refresh token lives in sessionStorage (this tab only, gone when the
 *   tab closes; never localStorage, never a URL). The 15-minute access token
 *   is kept in memory and in sessionStorage with its expiry, so a reload does
 *   not need a refresh. It is refreshed 60 s before it expires (and at once
 *   after a 401); the refresh rotates the refresh token. Tabs of one login
 *   (a duplicated tab copies sessionStorage) serialise refreshes with a Web
 *   Lock and hand each other the rotated tokens over a BroadcastChannel, so a
 *   rotated token is never replayed (which would revoke the whole login).
 *
 * LinkAuth (camera operator / viewer, opened a signed link `?token=<jwt>`)
 *   The token is the bearer for fetch and the `?token=` of WebSocket URLs.
 *   linkTokenFromUrl() moves it out of the address bar (history.replaceState)
 *   into sessionStorage for this path, so it is not left on screen or in the
 *   history list, and a reload still works.
 */

const RT_KEY = "returnfeed.refresh_token";
const AT_KEY = "returnfeed.access_token";
const USER_KEY = "returnfeed.user";
const REFRESH_MARGIN_MS = 60_000;

export class ApiError extends Error {
  constructor(status, body, headers) {
    const detail = (body && (body.detail || body.error)) || `HTTP ${status}`;
    super(detail);
    this.name = "ApiError";
    this.status = status;
    this.code = body && body.error;
    this.body = body;
    this.headers = headers;
  }
}

function readJson(key) {
  try {
    return JSON.parse(sessionStorage.getItem(key) || "null");
  } catch {
    return null;
  }
}

let channel = null;
function authChannel() {
  if (!channel && typeof BroadcastChannel !== "undefined") channel = new BroadcastChannel("returnfeed-auth");
  return channel;
}

export class Session {
  constructor({ accessToken, accessExpiresAt, refreshToken, user, lifetimeMs }) {
    this.kind = "session";
    this.accessToken = accessToken;
    this.accessExpiresAt = accessExpiresAt; // ms, local clock
    // Refresh 60 s before expiry, or at 3/4 of a shorter lifetime.
    this.marginMs = Math.min(REFRESH_MARGIN_MS, (lifetimeMs || 900_000) / 4);
    this.refreshToken = refreshToken;
    this.user = user;
    this.onEnded = null; // called when the login ends (refresh refused, logout)
    this._refreshing = null;
    this._timer = null;
    this._ended = false;
    const ch = authChannel();
    if (ch) {
      this._onMessage = (ev) => {
        const m = ev.data;
        // Only tabs holding the token that was just rotated adopt the result.
        if (m && m.type === "rotated" && m.from === this.refreshToken) this._adopt(m.tokens, false);
        if (m && m.type === "ended" && m.from === this.refreshToken) this._end(false);
      };
      ch.addEventListener("message", this._onMessage);
    }
    this._persist();
    this._schedule();
  }

  /** The session stored in this tab, or null. */
  static load() {
    const refreshToken = sessionStorage.getItem(RT_KEY);
    if (!refreshToken) return null;
    const at = readJson(AT_KEY) || {};
    return new Session({
      accessToken: at.token || null,
      accessExpiresAt: at.expiresAt || 0,
      lifetimeMs: at.marginMs ? at.marginMs * 4 : undefined,
      refreshToken,
      user: readJson(USER_KEY),
    });
  }

  static async login(username, password) {
    const body = await request("POST", "/api/v1/auth/login", { body: { username, password } });
    return new Session(Session._fromBody(body));
  }

  static _fromBody(body) {
    return {
      accessToken: body.access_token,
      accessExpiresAt: Date.now() + (body.expires_in || 900) * 1000,
      lifetimeMs: (body.expires_in || 900) * 1000,
      refreshToken: body.refresh_token,
      user: body.user || null,
    };
  }

  get ended() {
    return this._ended;
  }

  /** A valid access token (refreshing first when it is about to expire). */
  async token() {
    if (this._ended) throw new ApiError(401, { error: "unauthorized", detail: "logged out" });
    if (!this.accessToken || Date.now() > this.accessExpiresAt - this.marginMs) await this.refresh();
    return this.accessToken;
  }

  /** The access token held now, without waiting (for unload-time requests). */
  currentToken() {
    return this._ended ? null : this.accessToken;
  }

  /** Rotate now (single flight within the tab, Web Lock across tabs). */
  refresh() {
    if (!this._refreshing) {
      this._refreshing = this._refreshLocked().finally(() => {
        this._refreshing = null;
      });
    }
    return this._refreshing;
  }

  async _refreshLocked() {
    const before = this.refreshToken;
    const run = async () => {
      if (this.refreshToken !== before || this._ended) return; // another tab rotated it for us
      let body;
      try {
        body = await request("POST", "/api/v1/auth/refresh", { body: { refresh_token: before } });
      } catch (err) {
        if (err instanceof ApiError && err.status === 401) {
          this._end(true);
        }
        throw err;
      }
      this._adopt(Session._fromBody(body), true, before);
    };
    if (navigator.locks) await navigator.locks.request("returnfeed-refresh", run);
    else await run();
  }

  _adopt(tokens, broadcast, from) {
    this.accessToken = tokens.accessToken;
    this.accessExpiresAt = tokens.accessExpiresAt;
    if (tokens.lifetimeMs) this.marginMs = Math.min(REFRESH_MARGIN_MS, tokens.lifetimeMs / 4);
    this.refreshToken = tokens.refreshToken;
    if (tokens.user) this.user = tokens.user;
    this._persist();
    this._schedule();
    const ch = authChannel();
    if (broadcast && ch) ch.postMessage({ type: "rotated", from, tokens });
  }

  _persist() {
    if (this._ended) return;
    sessionStorage.setItem(RT_KEY, this.refreshToken);
    sessionStorage.setItem(AT_KEY, JSON.stringify({
      token: this.accessToken, expiresAt: this.accessExpiresAt, marginMs: this.marginMs,
    }));
    if (this.user) sessionStorage.setItem(USER_KEY, JSON.stringify(this.user));
  }

  _schedule() {
    clearTimeout(this._timer);
    if (this._ended) return;
    const wait = Math.max(1000, this.accessExpiresAt - this.marginMs - Date.now());
    this._timer = setTimeout(() => {
      this.refresh().catch(() => {
        // A network error: try again shortly; a refused refresh ended the session.
        if (!this._ended) this._timer = setTimeout(() => this._schedule(), 5000);
      });
    }, wait);
  }

  _end(broadcast) {
    if (this._ended) return;
    const ch = authChannel();
    if (broadcast && ch) ch.postMessage({ type: "ended", from: this.refreshToken });
    this._ended = true;
    clearTimeout(this._timer);
    if (ch && this._onMessage) ch.removeEventListener("message", this._onMessage);
    sessionStorage.removeItem(RT_KEY);
    sessionStorage.removeItem(AT_KEY);
    sessionStorage.removeItem(USER_KEY);
    if (this.onEnded) this.onEnded();
  }

  async logout() {
    const token = this.refreshToken;
    this._end(true);
    try {
      await request("POST", "/api/v1/auth/logout", { body: { refresh_token: token } });
    } catch {
      // The local session is gone either way.
    }
  }
}

export class LinkAuth {
  constructor(token) {
    this.kind = "link";
    this._token = token;
  }

  async token() {
    return this._token;
  }

  currentToken() {
    return this._token;
  }

  refresh() {
    return Promise.reject(new ApiError(401, { error: "unauthorized", detail: "this link has expired or was revoked" }));
  }
}

/**
 * The signed link token this page was opened with (`?token=`), moved from
 * the address bar into sessionStorage; or the one stored for this path.
 */
export function linkTokenFromUrl() {
  const url = new URL(location.href);
  const key = `returnfeed.link:${url.pathname}`;
  const fromUrl = url.searchParams.get("token");
  if (fromUrl) {
    sessionStorage.setItem(key, fromUrl);
    url.searchParams.delete("token");
    history.replaceState(history.state, "", url.pathname + (url.search || "") + url.hash);
    return fromUrl;
  }
  return sessionStorage.getItem(key);
}

/** Credentials for a camera/watch page: the signed link, else a logged-in session. */
export function pageAuth() {
  const token = linkTokenFromUrl();
  if (token) return new LinkAuth(token);
  return Session.load();
}

/** One HTTP request to the API; JSON in and out; throws ApiError. */
export async function request(method, path, { body, token, signal } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  const res = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
    credentials: "omit",
  });
  let data = null;
  const text = await res.text();
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { error: "bad_response", detail: text.slice(0, 200) };
    }
  }
  if (!res.ok) throw new ApiError(res.status, data, res.headers);
  return data;
}

/** Authenticated API call; a 401 with a session triggers one refresh and a retry. */
export async function api(auth, method, path, body, opts = {}) {
  const token = auth ? await auth.token() : null;
  try {
    return await request(method, path, { body, token, ...opts });
  } catch (err) {
    if (err instanceof ApiError && err.status === 401 && auth && auth.kind === "session" && !auth.ended) {
      await auth.refresh();
      return request(method, path, { body, token: await auth.token(), ...opts });
    }
    throw err;
  }
}

/** Same-origin URL for a server-made absolute URL (API base URLs may name another host). */
export function sameOriginPath(url, fallback) {
  if (!url) return fallback;
  try {
    const u = new URL(url, location.href);
    return u.pathname + u.search;
  } catch {
    return fallback;
  }
}
