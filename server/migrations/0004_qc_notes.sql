-- Issue 12: directors' notes on QC markers and on moments of a stream (like
-- the seed's timecoded comments). A note belongs to a stream; marker_id is
-- set when it is attached to a marker, "at" is the wall-clock moment it
-- refers to (the marker's start when attached to one).
CREATE TABLE notes (
    id             bigserial PRIMARY KEY,
    stream_id      bigint NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
    marker_id      bigint REFERENCES markers (id) ON DELETE CASCADE,
    at             timestamptz NOT NULL,
    text           text NOT NULL CHECK (length(text) BETWEEN 1 AND 4000),
    author_user_id bigint REFERENCES users (id) ON DELETE SET NULL,
    author         text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notes_stream_at_idx ON notes (stream_id, at DESC);
CREATE INDEX notes_marker_idx ON notes (marker_id) WHERE marker_id IS NOT NULL;
