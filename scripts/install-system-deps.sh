#!/usr/bin/env bash
# Installs the Debian packages the node, its demo and its tests use, only when missing.
# Usage: scripts/install-system-deps.sh [--test]   (--test adds the browser, Orthanc's DICOMweb
# plugin and npm for the dashboard and viewer tests, PostgreSQL for the PostgreSQL tests)
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
# initdb and pg_ctl live under /usr/lib/postgresql/<major>/bin on Debian, not on PATH
pg_bindir_ok() { have initdb || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }
have storescu  || need+=(dcmtk)
have dciodvfy  || need+=(dicom3tools)
have Orthanc   || [ -x /usr/sbin/Orthanc ] || need+=(orthanc)
if [ "${1:-}" = "--test" ]; then
  have chromium || need+=(chromium)
  have chromedriver || need+=(chromium-driver)
  # OHIF (npm @ohif/app) over Orthanc's DICOMweb plugin: the viewer tests and `make viewer`
  [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
  have npm || need+=(npm)
  # a throw-away PostgreSQL cluster (initdb/pg_ctl, no service) for the PostgreSQL tests
  pg_bindir_ok || need+=(postgresql)
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "Installing Debian packages: ${need[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if have sudo; then SUDO="sudo"; else
    echo "error: need root or sudo to install ${need[*]}" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The Debian orthanc package starts a system service on 8042/4242; the project runs its own.
if [ -x /usr/sbin/Orthanc ] && have systemctl; then $SUDO systemctl disable --now orthanc >/dev/null 2>&1 || true; fi
if [ -x /etc/init.d/orthanc ]; then $SUDO /etc/init.d/orthanc stop >/dev/null 2>&1 || true; fi
