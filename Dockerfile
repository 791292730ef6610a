# ReturnFeed server image: Debian slim, the system libsrt and ffmpeg, the app
# in a virtual environment, run as an unprivileged user.
#
#   docker build -t returnfeed .
#   docker run -p 8080:8080 -p 8890:8890/udp -p 8189:8189/udp -p 8189:8189/tcp \
#              -v returnfeed-data:/data returnfeed
#
# Alone it starts an embedded PostgreSQL in /data/pg (PostgreSQL refuses to
# run as root, one more reason for the user below); with DATABASE_URL set it
# uses that server instead (docker-compose.yml, config/k8s/).
# Building needs the Debian and PyPI registries only.

FROM debian:bookworm-slim AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Debian packages are not pinned (DL3008): a stable release only gets
# security fixes, and a pinned version disappears from the mirrors with them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# Dependencies first: a change to the code does not reinstall them.
COPY pyproject.toml setup.py ./
RUN python3 -m venv /opt/returnfeed \
 && /opt/returnfeed/bin/python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(d))" \
 && /opt/returnfeed/bin/pip install -r /tmp/requirements.txt
COPY server ./server
COPY media ./media
COPY tally ./tally
COPY live_qc ./live_qc
COPY web ./web
COPY config ./config
# Editable: the server finds web/ and config/ beside its package directory.
# It also builds media/webrtc/_fastsend.c in place (the compiler stays in
# this stage; the runtime image gets the built module with /app).
RUN /opt/returnfeed/bin/pip install --no-deps -e . \
 && /opt/returnfeed/bin/python -m compileall -q server media tally live_qc

FROM debian:bookworm-slim
ENV DEBIAN_FRONTEND=noninteractive
# libsrt1.5-gnutls: SRT through ctypes (media/srt/binding.py); ffmpeg: live
# QC and captions decoding; tini: signals and child reaping as PID 1.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ffmpeg libsrt1.5-gnutls ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 returnfeed \
 && useradd --system --uid 10001 --gid returnfeed --home-dir /data --shell /usr/sbin/nologin returnfeed \
 && mkdir -p /data \
 && chown returnfeed:returnfeed /data
COPY --from=build /opt/returnfeed /opt/returnfeed
COPY --from=build /app /app
WORKDIR /app
ENV PATH=/opt/returnfeed/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RETURNFEED_DATA_DIR=/data \
    RETURNFEED_HTTP__HOST=0.0.0.0 \
    RETURNFEED_HTTP__PORT=8080
# Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
VOLUME ["/data"]
# HTTP or HTTPS (one port; `returnfeed cert` or http.tls_cert turns on TLS),
# SRT (UDP), WebRTC ICE (UDP, and TCP for networks that block UDP).
EXPOSE 8080/tcp 8890/udp 8189/udp 8189/tcp
# No curl in the image: Python asks /healthz, over HTTPS when the port speaks
# TLS (a local CA is not in the system store, hence no verification: this is
# the server asking itself), else over plain HTTP. 503 (degraded) is unhealthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import os, ssl, urllib.error, urllib.request as u\nurl = '://127.0.0.1:%s/healthz' % os.environ.get('RETURNFEED_HTTP__PORT', '8080')\ntry:\n    u.urlopen('https' + url, context=ssl._create_unverified_context(), timeout=4)\nexcept urllib.error.URLError as exc:\n    if not isinstance(exc.reason, ssl.SSLError):\n        raise\n    u.urlopen('http' + url, timeout=4)\n"]
ENTRYPOINT ["tini", "--", "returnfeed"]
CMD ["serve"]
