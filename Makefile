# Shortcuts for the two README commands (they do not need make themselves).
.PHONY: run test setup bench-srt bench-tally

run:
	bash config/bootstrap.sh run

test:
	bash config/bootstrap.sh test

setup:
	bash config/bootstrap.sh setup

bench-srt: setup
	.venv/bin/python loadtests/srt_ingest.py

bench-tally: setup
	.venv/bin/python loadtests/tally_swarm.py
