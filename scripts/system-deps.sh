#!/usr/bin/env bash
# Debian packages the test suite needs: promtool/prometheus (alert rules and the live
# Prometheus test). Installs them with apt-get when they are missing (as root, or with sudo).
set -euo pipefail
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1; then
  SUDO="sudo"
else
  echo "promtool/prometheus are missing and this user cannot run apt-get; install Debian's 'prometheus' package" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# the package starts a service where an init system runs; the tests start their own
$SUDO systemctl stop prometheus >/dev/null 2>&1 || true
command -v promtool >/dev/null
