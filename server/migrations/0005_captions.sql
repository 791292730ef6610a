-- Issue 13: live captions. A row is one committed (final) caption of a
-- stream: its media-timeline span (media_start/media_end, the tap's clock),
-- its wall-clock span (wall_start/wall_end: what time-range queries and the
-- WebVTT/SRT exports use), the words with their own times and emphasis
-- ([{text, start, end, probability, emphasis}], media seconds), and the
-- speaker label (the stream's label when it was spoken). Partials are never
-- stored.
ALTER TABLE captions
    ADD COLUMN wall_end   timestamptz,
    ADD COLUMN words      jsonb NOT NULL DEFAULT '[]'::jsonb,
    ADD COLUMN label      text NOT NULL DEFAULT '',
    ADD COLUMN translated boolean NOT NULL DEFAULT false;
UPDATE captions SET wall_end = wall_start + make_interval(secs => greatest(media_end - media_start, 0));
ALTER TABLE captions ALTER COLUMN wall_end SET NOT NULL;
-- NOT VALID: enforced on every new row; rows from before (none were ever
-- written by a released version) are not re-checked.
ALTER TABLE captions ADD CONSTRAINT captions_span_check
    CHECK (wall_end >= wall_start AND media_end >= media_start) NOT VALID;
-- Exports read a stream's captions overlapping a wall-clock range, in order.
CREATE INDEX captions_stream_wall_idx ON captions (stream_id, wall_start, id);
