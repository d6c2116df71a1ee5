#!/usr/bin/env bash
# System tools the deployment tests need: promtool (Debian's prometheus package, 2.42) checks
# deploy/prometheus/prometheus.yml and runs the integration test's Prometheus; docker-compose
# (Debian's 1.29.2, which reads the Compose Specification incl. profiles) validates compose.yaml.
# Idempotent: does nothing when both are already installed, so CI can call it every run.
set -euo pipefail

PACKAGES=(prometheus docker-compose)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install_system_deps: ${PACKAGES[*]} already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

echo "install_system_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# policy-rc.d 101 keeps the package's postinst from starting a system prometheus daemon
# (no init here, and a stray daemon would hold port 9090).
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
