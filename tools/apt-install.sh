#!/usr/bin/env bash
# Installs Debian packages that are missing, waiting for the dpkg/apt locks another apt process holds
# (unattended upgrades, a parallel install) instead of failing at once.
# Usage: tools/apt-install.sh PACKAGE...
set -euo pipefail
missing=()
for package in "$@"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=$( [ "$(id -u)" = 0 ] || echo sudo )
WAIT=(-o DPkg::Lock::Timeout=600)  # apt waits for the locks up to 10 minutes
for attempt in 1 2 3; do  # `apt-get update` holds the lists lock, which older apt does not wait for
  $SUDO apt-get "${WAIT[@]}" update -qq && break
  echo "apt-get update failed (attempt $attempt); retrying in 20 s" >&2
  sleep 20
done
DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${WAIT[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
