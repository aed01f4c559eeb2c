#!/usr/bin/env bash
# Prints the path of a working CPython X.Y interpreter (argument: X.Y), or fails saying where it
# looked. Looks on PATH (python3.X), among pyenv's versions (the machine image has 3.10, 3.12 and
# 3.13 there, without activating them) and among uv's installed interpreters; it downloads none.
set -euo pipefail
version="${1:?usage: find-python.sh X.Y}"
works() { [ -x "$1" ] && "$1" -c 'import sys, venv; sys.exit(0)' >/dev/null 2>&1; }
candidates=()
if command -v "python$version" >/dev/null 2>&1; then
  candidates+=("$(command -v "python$version")")
fi
pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
if command -v pyenv >/dev/null 2>&1; then
  pyenv_root="$(pyenv root)"
fi
for dir in "$pyenv_root"/versions/"$version".*; do
  candidates+=("$dir/bin/python$version")
done
if command -v uv >/dev/null 2>&1; then
  candidates+=("$(uv python find --no-python-downloads "$version" 2>/dev/null || true)")
fi
for candidate in "${candidates[@]}"; do
  if [ -n "$candidate" ] && works "$candidate" \
    && [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$version" ]; then
    echo "$candidate"
    exit 0
  fi
done
echo "no working Python $version (looked on PATH, in $pyenv_root/versions and uv's" \
  "interpreters): install it, or leave it out with OTHER_PYTHONS=..." >&2
exit 1
