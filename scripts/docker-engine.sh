#!/usr/bin/env bash
# Docker engine for the container test and `make container` on machines without a running one.
#
#   scripts/docker-engine.sh install   apt-get install docker.io + debootstrap when missing (root)
#   scripts/docker-engine.sh start     start dockerd when no engine answers; records the PID it started
#   scripts/docker-engine.sh stop      stop the dockerd this script started (by its recorded PID), nothing else
#   scripts/docker-engine.sh status    say whether an engine answers
#
# All idempotent. The engine started here has no bridge network and no iptables rules
# (`--bridge=none --iptables=false --ip6tables=false`): containers run with `--network host`
# and the service binds 127.0.0.1. State (PID file, log) lives in $SYNTHGEN_DOCKER_STATE
# (default /tmp/synthgen-docker).
set -euo pipefail

STATE="${SYNTHGEN_DOCKER_STATE:-/tmp/synthgen-docker}"
PIDFILE="$STATE/dockerd.pid"
LOG="$STATE/dockerd.log"
START_TIMEOUT="${SYNTHGEN_DOCKER_START_TIMEOUT:-90}"

say() { echo "docker-engine: $*" >&2; }

engine_answers() { command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

cmd_install() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    if [ "${#missing[@]}" -eq 0 ]; then say "docker.io and debootstrap present"; return 0; fi
    say "installing ${missing[*]} with apt-get"
    as_root apt-get update -q >/dev/null || { say "apt-get update failed (need root and the Debian mirror)"; return 1; }
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || { say "apt-get install ${missing[*]} failed"; return 1; }
}

cmd_start() {
    if engine_answers; then say "an engine already answers; not starting one"; return 0; fi
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        say "dockerd $(cat "$PIDFILE") (ours) is running but not answering yet; waiting"
    else
        command -v dockerd >/dev/null 2>&1 || { say "no dockerd on PATH: run '$0 install' (apt-get install docker.io)"; return 1; }
        [ "$(id -u)" = 0 ] || { say "starting dockerd needs root"; return 1; }
        mkdir -p "$STATE"
        # setsid: the engine outlives this shell and is not hit by its job-control signals.
        setsid dockerd --bridge=none --iptables=false --ip6tables=false \
            --host=unix:///var/run/docker.sock >"$LOG" 2>&1 < /dev/null &
        echo $! >"$PIDFILE"
        say "started dockerd pid $(cat "$PIDFILE") (log $LOG)"
    fi
    local waited=0
    until engine_answers; do
        if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
            say "dockerd exited; last log lines:"; tail -n 20 "$LOG" >&2 || true
            rm -f "$PIDFILE"; return 1
        fi
        if [ "$waited" -ge "$START_TIMEOUT" ]; then
            say "dockerd did not answer in ${START_TIMEOUT}s; last log lines:"; tail -n 20 "$LOG" >&2 || true
            return 1
        fi
        sleep 1; waited=$((waited + 1))
    done
    say "engine answers"
}

cmd_stop() {
    if [ ! -f "$PIDFILE" ]; then say "no dockerd started by this script; nothing to stop"; return 0; fi
    local pid; pid="$(cat "$PIDFILE")"
    if kill -0 "$pid" 2>/dev/null && grep -q dockerd "/proc/$pid/cmdline" 2>/dev/null; then
        say "stopping dockerd pid $pid"
        kill -TERM "$pid"
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        if kill -0 "$pid" 2>/dev/null; then say "dockerd $pid still alive after 60s; sending KILL"; kill -KILL "$pid" || true; fi
    else
        say "recorded dockerd pid $pid is not running"
    fi
    rm -f "$PIDFILE"
}

cmd_status() {
    if engine_answers; then say "engine answers ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"; else say "no engine answers"; return 1; fi
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
