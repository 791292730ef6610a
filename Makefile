# Shortcuts for the two README commands (they do not need make themselves),
# and for the benchmarks (figures, not tests; see loadtests/README.md).
.PHONY: run test setup bench-srt bench-rtp bench-tally bench-whip bench-captions

run:
	bash config/bootstrap.sh run

test:
	bash config/bootstrap.sh test

setup:
	bash config/bootstrap.sh setup

# 16 SRT callers x 6 Mbit/s through the server's whole ingest path.
bench-srt: setup
	.venv/bin/python loadtests/srt_ingest.py --pipeline

# Per-packet cost of packetize / rewrite / protect / send.
bench-rtp: setup
	.venv/bin/python loadtests/rtp_microbench.py

# Tally delivery to 200 and 1000 WebSocket clients (in-process hub server).
bench-tally: setup
	.venv/bin/python loadtests/tally_swarm.py --clients 200
	.venv/bin/python loadtests/tally_swarm.py --clients 1000

# WHIP connect time by DTLS role: ffmpeg 9 (both modes) and Chromium.
bench-whip: setup
	.venv/bin/python loadtests/whip_connect.py --rounds 10

# Live captions (issue 13): 10 min of read speech (the neural Piper voice)
# and 10 min of non-speech through the live tap's streamer, tiny.en, 2 threads.
bench-captions: setup
	.venv/bin/python -m pip install -q -e ".[test,bench]"
	.venv/bin/python loadtests/captions_bench.py --model tiny.en --minutes 10 --nonspeech-minutes 10 --voice piper
