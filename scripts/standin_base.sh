#!/usr/bin/env bash
# A stand-in for the Dockerfile's base image `python:3.11-slim`, built with debootstrap, for machines that no
# container registry serves (scripts/container_check.sh calls it when the base image cannot be pulled).
#
#   scripts/standin_base.sh IMAGE_NAME [WORK_DIR]
#
# What python:3.11-slim gives the Dockerfile, from Debian bookworm's own packages: Python 3.11 with pip that
# installs system-wide (no PEP 668 "externally managed" marker), `python` on PATH, apt, LANG=C.UTF-8, CMD python3.
# One thing only the stand-in has: it trusts the certificate authorities of the host that builds it
# (/usr/local/share/ca-certificates/*.crt, and pip pointed at the system bundle), because on such machines the
# package registries are reached through the host's TLS-inspecting proxy. That belongs here, never in the
# project's Dockerfile. Needs root (debootstrap), debootstrap, podman (import) and Debian's package mirror.
set -euo pipefail

IMAGE=${1:?usage: scripts/standin_base.sh IMAGE_NAME [WORK_DIR]}
WORK=${2:-/var/tmp/structlora-container-check}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
STORAGE=(--storage-driver "${STORAGE_DRIVER:-vfs}")

[ "$(id -u)" = 0 ] || { echo "standin_base.sh: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "standin_base.sh: install debootstrap (apt-get install -y debootstrap)" >&2; exit 1; }
command -v podman >/dev/null || { echo "standin_base.sh: install podman (apt-get install -y podman)" >&2; exit 1; }

ROOTFS="$WORK/standin-rootfs"
rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"
echo "[standin] debootstrap $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --include=python3,python3-pip,python-is-python3,ca-certificates \
  "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
  || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }

cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF

# The host's certificate authorities (stand-in only: see above).
shopt -s nullglob
host_cas=(/usr/local/share/ca-certificates/*.crt)
if [ ${#host_cas[@]} -gt 0 ]; then
  cp "${host_cas[@]}" "$ROOTFS/usr/local/share/ca-certificates/"
fi
chroot "$ROOTFS" update-ca-certificates >/dev/null 2>&1
# pip verifies TLS with its own bundled certifi, not the system store: point it at the system bundle.
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$ROOTFS/etc/pip.conf"

# python:3.11-slim's pip installs system-wide; Debian marks its Python "externally managed" (PEP 668).
rm -f "$ROOTFS"/usr/lib/python3*/EXTERNALLY-MANAGED
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin

echo "[standin] importing as $IMAGE"
previous=$(podman "${STORAGE[@]}" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
tar -C "$ROOTFS" --numeric-owner -cf - . \
  | podman "${STORAGE[@]}" import -q --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
rm -rf "$ROOTFS"
# the stand-in this replaces, unless an image still builds on it
[ -z "$previous" ] || podman "${STORAGE[@]}" rmi "$previous" >/dev/null 2>&1 || true
echo "[standin] $IMAGE: $(podman "${STORAGE[@]}" image inspect --format '{{.Size}}' "$IMAGE") bytes"
