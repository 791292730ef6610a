-- ReturnFeed schema, version 1.
-- Users and roles; productions with per-production membership; streams with
-- their SRT passphrase; auth tokens; tally state and audit; QC markers;
-- captions; audit log; server-wide secrets.

CREATE TABLE users (
    id            bigserial PRIMARY KEY,
    username      text NOT NULL,
    password_hash text NOT NULL,
    role          text NOT NULL CHECK (role IN ('admin', 'director', 'camera', 'viewer')),
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
-- User names compare case-insensitively ("Alice" and "alice" are one user).
CREATE UNIQUE INDEX users_username_key ON users (lower(username));

CREATE TABLE productions (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL,
    description text NOT NULL DEFAULT '',
    settings    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_by  bigint REFERENCES users (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX productions_name_key ON productions (name);

CREATE TABLE production_members (
    production_id bigint NOT NULL REFERENCES productions (id) ON DELETE CASCADE,
    user_id       bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role          text NOT NULL CHECK (role IN ('director', 'camera', 'viewer')),
    -- For camera operators: the stream (camera) they are assigned to.
    camera_stream text,
    added_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (production_id, user_id)
);
CREATE INDEX production_members_user_idx ON production_members (user_id);

CREATE TABLE streams (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL,
    production_id bigint NOT NULL REFERENCES productions (id) ON DELETE CASCADE,
    passphrase    text NOT NULL CHECK (length(passphrase) BETWEEN 10 AND 79),
    pbkeylen      integer NOT NULL DEFAULT 16 CHECK (pbkeylen IN (16, 24, 32)),
    label         text NOT NULL DEFAULT '',
    settings      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
-- Stream names are global: they appear in /whep/{stream} and SRT stream IDs.
CREATE UNIQUE INDEX streams_name_key ON streams (name);
CREATE INDEX streams_production_idx ON streams (production_id);

CREATE TABLE refresh_tokens (
    id          bigserial PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash  bytea NOT NULL UNIQUE,       -- sha256 of the token; the token itself is never stored
    family      uuid NOT NULL,               -- one login = one family; reuse of a rotated token revokes it
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz,
    replaced_by bigint REFERENCES refresh_tokens (id) ON DELETE SET NULL,
    user_agent  text,
    ip          text
);
CREATE INDEX refresh_tokens_user_idx ON refresh_tokens (user_id);
CREATE INDEX refresh_tokens_family_idx ON refresh_tokens (family);

-- Signed stream links are stateless JWTs; revoking one records its jti.
CREATE TABLE revoked_links (
    jti        text PRIMARY KEY,
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz NOT NULL DEFAULT now(),
    revoked_by bigint REFERENCES users (id) ON DELETE SET NULL
);

CREATE TABLE tally_state (
    production_id bigint PRIMARY KEY REFERENCES productions (id) ON DELETE CASCADE,
    seq           bigint NOT NULL DEFAULT 0,
    state         jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tally_events (
    id            bigserial PRIMARY KEY,
    production_id bigint NOT NULL REFERENCES productions (id) ON DELETE CASCADE,
    seq           bigint NOT NULL,
    changes       jsonb NOT NULL,
    actor_user_id bigint REFERENCES users (id) ON DELETE SET NULL,
    actor         text NOT NULL DEFAULT '',  -- user name or adapter name
    origin        text NOT NULL,             -- 'director', 'api', 'tsl', 'vmix', 'obs', ...
    at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tally_events_production_seq_idx ON tally_events (production_id, seq);

CREATE TABLE markers (
    id           bigserial PRIMARY KEY,
    stream_id    bigint NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
    type         text NOT NULL,              -- 'video', 'audio', 'transport', 'loudness', ...
    subtype      text NOT NULL,              -- 'black', 'freeze', 'silence', 'cc_error', ...
    severity     text NOT NULL CHECK (severity IN ('info', 'warning', 'error', 'critical')),
    confidence   real NOT NULL DEFAULT 1.0 CHECK (confidence BETWEEN 0 AND 1),
    media_start  double precision,           -- seconds of media time (PTS)
    media_end    double precision,
    wall_start   timestamptz NOT NULL,
    wall_end     timestamptz,
    metadata     jsonb NOT NULL DEFAULT '{}'::jsonb,
    verified_by  bigint REFERENCES users (id) ON DELETE SET NULL,
    verified_at  timestamptz,
    false_positive boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX markers_stream_time_idx ON markers (stream_id, wall_start DESC);
CREATE INDEX markers_open_idx ON markers (stream_id) WHERE wall_end IS NULL;

CREATE TABLE captions (
    id          bigserial PRIMARY KEY,
    stream_id   bigint NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
    media_start double precision NOT NULL,
    media_end   double precision NOT NULL,
    wall_start  timestamptz NOT NULL DEFAULT now(),
    text        text NOT NULL,
    language    text NOT NULL DEFAULT 'en',
    final       boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX captions_stream_time_idx ON captions (stream_id, media_start);

CREATE TABLE audit_log (
    id            bigserial PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    actor_user_id bigint REFERENCES users (id) ON DELETE SET NULL,
    actor         text NOT NULL DEFAULT '',
    action        text NOT NULL,
    target        text NOT NULL DEFAULT '',
    detail        jsonb NOT NULL DEFAULT '{}'::jsonb,
    ip            text
);
CREATE INDEX audit_log_at_idx ON audit_log (at DESC);
CREATE INDEX audit_log_actor_idx ON audit_log (actor_user_id, at DESC);

CREATE TABLE server_secrets (
    name       text PRIMARY KEY,
    value      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
