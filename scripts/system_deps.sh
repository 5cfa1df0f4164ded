#!/usr/bin/env bash
# System tools the tests use beyond Python: iptables (a namespace that refuses inbound
# connections), Chromium (the swarm page in a headless browser), a Docker engine with
# debootstrap and docker-compose (the container tests). `make test` runs this first.
# It installs only as root with apt-get, is quick when everything is there, and never fails
# the build: without root or apt the tests that need a tool skip and say why.
set -u
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system_deps: not root or no apt-get: tests needing iptables, chromium or docker will skip" >&2
    exit 0
fi
want=()
command -v iptables >/dev/null 2>&1 || want+=(iptables)
command -v chromium >/dev/null 2>&1 || want+=(chromium)
command -v dockerd >/dev/null 2>&1 || want+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || want+=(debootstrap)
command -v docker-compose >/dev/null 2>&1 || want+=(docker-compose)
if [ ${#want[@]} -gt 0 ]; then
    echo "system_deps: installing ${want[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${want[@]}"; } >/tmp/system_deps.apt.log 2>&1 \
        || echo "system_deps: apt-get install ${want[*]} failed (see /tmp/system_deps.apt.log)" >&2
fi
# A Docker engine without iptables or a bridge (containers use --network host).
if command -v dockerd >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
    echo "system_deps: starting dockerd (log /var/log/dockerd.log)" >&2
    setsid nohup dockerd --iptables=false --bridge=none >/var/log/dockerd.log 2>&1 < /dev/null &
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || echo "system_deps: dockerd did not start (see /var/log/dockerd.log)" >&2
fi
exit 0
