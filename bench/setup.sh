#!/usr/bin/env bash
# Installs the benchmark's peers and load tools from Debian's packages:
# haproxy, nginx (+ stream module), iperf3, wrk, apache2-utils (ab).
# Nothing is started as a system service: bench/run.mjs runs each one as a
# foreground process of its own. Idempotent; not needed by the project's tests.
set -euo pipefail

pkgs=(haproxy nginx libnginx-mod-stream iperf3 wrk apache2-utils)

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then exec sudo -E bash "$0" "$@"; fi
  echo "setup.sh: run as root (apt-get install)" >&2
  exit 1
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup.sh: all present (${pkgs[*]})"
else
  echo "setup.sh: installing ${missing[*]}"
  # Keep the packages' maintainer scripts from starting nginx/haproxy/iperf3
  # as services; remove the guard whatever happens.
  policy=/usr/sbin/policy-rc.d
  had_policy=0
  if [ -e "$policy" ]; then had_policy=1; cp -p "$policy" "$policy.bench-saved"; fi
  restore_policy() {
    if [ "$had_policy" -eq 1 ]; then mv -f "$policy.bench-saved" "$policy"; else rm -f "$policy"; fi
  }
  trap restore_policy EXIT
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  # iperf3 asks (debconf) whether to start a daemon: answer no.
  echo 'iperf3 iperf3/start_daemon boolean false' | debconf-set-selections || true
  apt-get install -y --no-install-recommends "${missing[@]}"
  restore_policy
  trap - EXIT
fi

# If a service got started anyway (no policy-rc.d honoured), stop it, by pid file.
for svc in nginx haproxy iperf3; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done
for pidfile in /run/nginx.pid /run/haproxy.pid; do
  if [ -s "$pidfile" ]; then
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      echo "setup.sh: stopping service started by the install ($pidfile, pid $pid)"
      kill "$pid" || true
    fi
  fi
done

for t in haproxy nginx iperf3 wrk ab; do
  command -v "$t" >/dev/null 2>&1 || { echo "setup.sh: $t not found after install" >&2; exit 1; }
done
ls /usr/lib/nginx/modules/ngx_stream_module.so >/dev/null
echo "setup.sh: ok — $(haproxy -v 2>&1 | head -1); $(nginx -v 2>&1); $(iperf3 --version | head -1)"
