#!/usr/bin/env bash
# Makes sure the VLFeat C library (headers + libvl) is present for cyvlfeat.
# Idempotent: does nothing when it is already installed.
set -euo pipefail
prefix="${VLFEAT_PREFIX:-/usr}"
if [ -f "$prefix/include/vl/fisher.h" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "installing libvlfeat-dev (VLFeat C library for cyvlfeat)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libvlfeat-dev >/dev/null
  exit 0
fi
echo "error: the VLFeat C library is missing: run 'sudo apt-get install libvlfeat-dev' (or 'conda install -c conda-forge vlfeat' and set VLFEAT_PREFIX), then 'make setup' again" >&2
exit 1
