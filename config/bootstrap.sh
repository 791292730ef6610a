#!/usr/bin/env bash
# ReturnFeed bootstrap: install what is missing, then run the server or the tests.
#
#   bash config/bootstrap.sh run  [returnfeed serve flags...]
#   bash config/bootstrap.sh test [pytest args...]
#   bash config/bootstrap.sh setup            # install only
#
# Idempotent: system packages are installed only when missing, the virtual
# environment is rebuilt only when pyproject.toml changed. Works as root or as
# a user with sudo. On systems without apt it says exactly what to install.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
STAMP="$VENV/.returnfeed-deps"
MODE="${1:-setup}"
[ $# -gt 0 ] && shift

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Debian/Ubuntu packages: runtime (python, ffmpeg, libsrt) and test peers
# (srt-live-transmit, GStreamer srtsink, chromium, espeak-ng/sox for caption tests, iproute2).
# libsrt-gnutls-dev: test-only, a test compiles against srt.h to check the ctypes layout.
# gstreamer1.0-tools, -plugins-bad: test-only SRT caller (srtsink).
# obs-studio, xvfb: test-only tally peer (real OBS with obs-websocket 5 under a
# virtual display). Node.js/npm for the npm peers below are installed only
# when `npm` is missing (NodeSource's nodejs carries its own npm and
# conflicts with Debian's npm package).
APT_PACKAGES=(python3 python3-venv python3-dev gcc ffmpeg srt-tools libsrt-gnutls-dev chromium espeak-ng sox iproute2
              ca-certificates gstreamer1.0-tools gstreamer1.0-plugins-bad obs-studio xvfb)
SRT_LIBS=(libsrt1.5-gnutls libsrt1.5-openssl)
# nftables: test-only, the network-namespace viewer tests shape a veth with
# nft (policer, random loss) beside iproute2's tc tbf (a queue).
# tests/e2e/test_nat.py uses both for its NAT namespaces (nft masquerade and
# DNAT of the published ports; ip netns, veth pairs).
APT_PACKAGES+=(nftables)
# nginx, caddy: test-only, the README's reverse-proxy configurations run in
# front of a real server (tests/integration/test_reverse_proxy.py).
APT_PACKAGES+=(nginx caddy)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root for: $* (install sudo or run as root)"; fi
}

missing_apt() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

install_system() {
  if ! command -v apt-get >/dev/null 2>&1; then
    local need=()
    command -v python3 >/dev/null 2>&1 || need+=("Python >= 3.11 with venv")
    command -v ffmpeg >/dev/null 2>&1 || need+=("ffmpeg (built with libsrt)")
    command -v srt-live-transmit >/dev/null 2>&1 || need+=("srt tools and libsrt 1.5 (Homebrew: brew install srt)")
    command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need+=("chromium (tests only)")
    command -v espeak-ng >/dev/null 2>&1 || need+=("espeak-ng and sox (tests only)")
    command -v npm >/dev/null 2>&1 || need+=("Node.js >= 18 and npm (tests only)")
    command -v obs >/dev/null 2>&1 || need+=("OBS Studio 29+ and Xvfb (tests only)")
    if [ ${#need[@]} -gt 0 ]; then
      printf 'This system has no apt-get. Install these, then run this command again:\n' >&2
      printf '  - %s\n' "${need[@]}" >&2
      exit 2
    fi
    return
  fi
  local want=("${APT_PACKAGES[@]}") missing srt_ok=0 lib
  for lib in "${SRT_LIBS[@]}"; do
    [ -z "$(missing_apt "$lib")" ] && srt_ok=1
  done
  missing=$(missing_apt "${want[@]}")
  if [ -n "$missing" ] || [ $srt_ok -eq 0 ]; then
    say "installing system packages: $missing $([ $srt_ok -eq 0 ] && echo libsrt)"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    if [ $srt_ok -eq 0 ]; then
      # Debian/Ubuntu ship libsrt built against GnuTLS or OpenSSL; either works.
      if apt-cache show libsrt1.5-gnutls >/dev/null 2>&1; then missing="$missing libsrt1.5-gnutls"
      else missing="$missing libsrt1.5-openssl"; fi
    fi
    # shellcheck disable=SC2086
    as_root apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
}

pick_python() {
  local c
  for c in python3.13 python3.12 python3.11 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$c"; return
    fi
  done
  die "Python >= 3.11 is required (Debian 12 / Ubuntu 24.04 ship it as python3)"
}

install_python() {
  local want
  # setup.py and the C source too: a changed extension is rebuilt.
  want=$(cat pyproject.toml setup.py media/webrtc/_fastsend.c | sha256sum | cut -c1-16)
  if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    return
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    local py
    py=$(pick_python)
    say "creating virtual environment with $py"
    "$py" -m venv "$VENV"
  fi
  say "installing Python packages"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  echo "$want" > "$STAMP"
}

# Third-party peers: WHIP/WHEP peers the tests run in Chromium
# (@eyevinn/webrtc-player, @eyevinn/whip-web-client, medooze whip-whep), wscat
# (a standard WebSocket client), tsl-umd (TSL 3.1 listener) and tsl-umd-v5
# (TSL 5.0 UDP/TCP sender/listener): pinned in config/peers/
# (package.json + package-lock.json), installed with `npm ci` into .peers/
# (git-ignored) and bundled once with esbuild into .peers/peers.bundle.js.
# Redone only when the pins or the entry file change; never at test time.
PEERS="$ROOT/.peers"
install_peers() {
  if ! command -v npm >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
      say "installing Node.js and npm (test peers)"
      as_root apt-get update -qq
      DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
    else
      printf 'This system has no npm. Install Node.js >= 18 with npm (tests only), then run this again.\n' >&2
      exit 2
    fi
  fi
  local want
  want=$(cat config/peers/package.json config/peers/package-lock.json tests/e2e/peers/entry.js | sha256sum | cut -c1-16)
  if [ -f "$PEERS/.stamp" ] && [ "$(cat "$PEERS/.stamp")" = "$want" ] && [ -f "$PEERS/peers.bundle.js" ]; then
    return
  fi
  say "installing the third-party test peers (npm ci) into .peers/"
  mkdir -p "$PEERS"
  cp config/peers/package.json config/peers/package-lock.json tests/e2e/peers/entry.js "$PEERS/"
  (cd "$PEERS" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  "$PEERS/node_modules/.bin/esbuild" "$PEERS/entry.js" --bundle --format=iife --platform=browser \
    --target=chrome120 --log-level=warning --outfile="$PEERS/peers.bundle.js"
  echo "$want" > "$PEERS/.stamp"
}

install_system
install_python
install_peers

case "$MODE" in
  setup) say "setup complete" ;;
  run)
    exec "$VENV/bin/returnfeed" serve "$@" ;;
  test)
    export PYTHONUNBUFFERED=1
    exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" ;;
  *) die "unknown mode '$MODE' (use run, test or setup)" ;;
esac
