#!/usr/bin/env bash
# Debian packages the test suite needs: promtool/prometheus (alert rules and the live
# Prometheus test), prometheus-alertmanager (the alert delivery test) and redis-server (the
# Celery broker of the cross-process test). Installs the missing ones with apt-get (as root,
# or with sudo).
set -euo pipefail
# command -> Debian package
declare -A NEEDED=(
  [promtool]=prometheus
  [prometheus]=prometheus
  [prometheus-alertmanager]=prometheus-alertmanager
  [redis-server]=redis-server
)
missing=()
for cmd in "${!NEEDED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEEDED[$cmd]}")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1; then
  SUDO="sudo"
else
  echo "missing and this user cannot run apt-get; install Debian's packages: ${packages[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
# the packages start services where an init system runs; the tests start their own
for service in prometheus prometheus-alertmanager redis-server; do
  $SUDO systemctl stop "$service" >/dev/null 2>&1 || true
done
for cmd in "${!NEEDED[@]}"; do
  command -v "$cmd" >/dev/null
done
