-- Per-stream SRT latency in ms; NULL: the server's srt.latency_ms. Each side
-- announces its TSBPD delay in the handshake extension (draft-sharabayko-srt
-- §3.2.1.1) and the larger one is used, so a stream meant to be fast must be
-- served with a low one by the listener too. 20 ms is what works on a LAN;
-- 8 s is far past any live use.
ALTER TABLE streams
    ADD COLUMN latency_ms integer CHECK (latency_ms BETWEEN 20 AND 8000);
