#!/usr/bin/env bash
# Local Debian base image for `bentoml containerize`, for machines that cannot pull from Docker Hub.
#
#   scripts/base-image.sh [IMAGE]      (default: $SYNTHGEN_BASE_IMAGE or synthgen-base:bookworm)
#
# Reuses IMAGE when the engine already has it (set SYNTHGEN_BASE_REBUILD=1 to force). Otherwise:
#   1. debootstrap --variant=minbase bookworm with python3, python3-venv, python3-pip from this
#      machine's configured Debian mirror (read from its apt sources; override: SYNTHGEN_DEBIAN_MIRROR);
#   2. `docker import` of that root filesystem;
#   3. a small Dockerfile on top that copies this machine's CA bundle in, points pip/uv at it
#      (SSL_CERT_FILE, PIP_CERT, UV_NATIVE_TLS=1) and pre-installs uv (BentoML's installer).
#   bookworm-updates and bookworm-security are applied to the root filesystem before the import.
# The image has Python 3.11 (Debian bookworm's), which is what BentoML's `base.j2` template needs
# for a custom `docker.base_image`: it does not install Python itself.
set -euo pipefail

IMAGE="${1:-${SYNTHGEN_BASE_IMAGE:-synthgen-base:bookworm}}"
CA_BUNDLE="${SYNTHGEN_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
say() { echo "base-image: $*" >&2; }

# The image is reused only when it was made by this very recipe (label = hash of this script).
RECIPE="$(sha256sum "$0" | cut -c1-16)"
if [ -z "${SYNTHGEN_BASE_REBUILD:-}" ] \
   && [ "$(docker image inspect -f '{{index .Config.Labels "synthgen.base.recipe"}}' "$IMAGE" 2>/dev/null)" = "$RECIPE" ]; then
    say "$IMAGE present (recipe $RECIPE); reusing it"
    exit 0
fi

# The first URI of a deb822 stanza (bookworm's default sources format) whose Suites line matches the regex $1.
deb822_uri() {
    local f url
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        url="$(awk -v suite="$1" 'BEGIN{RS=""; FS="\n"} {u=""; s=0; for(i=1;i<=NF;i++){ if($i ~ /^URIs:/){sub(/^URIs:[ \t]*/,"",$i); split($i,a," "); u=a[1]} if($i ~ /^Suites:/ && $i ~ suite) s=1 } if(s && u!=""){print u; exit}}' "$f")"
        if [ -n "$url" ]; then echo "$url"; return 0; fi
    done
    return 1
}

debian_mirror() {
    if [ -n "${SYNTHGEN_DEBIAN_MIRROR:-}" ]; then echo "$SYNTHGEN_DEBIAN_MIRROR"; return; fi
    deb822_uri '[ \t]bookworm([ \t]|$)' && return
    local f url
    # one-line sources: "deb [opts] URL bookworm main"
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        url="$(awk '$1=="deb"{ for(i=2;i<=NF;i++) if($i !~ /^\[/ && $i !~ /\]$/){ if($(i+1)=="bookworm"){print $i; exit} else break } }' "$f")"
        if [ -n "$url" ]; then echo "$url"; return; fi
    done
    echo "http://deb.debian.org/debian"
}

security_mirror() {
    if [ -n "${SYNTHGEN_DEBIAN_SECURITY_MIRROR:-}" ]; then echo "$SYNTHGEN_DEBIAN_SECURITY_MIRROR"; return; fi
    deb822_uri 'bookworm-security' && return
    echo "http://deb.debian.org/debian-security"
}

command -v debootstrap >/dev/null || { say "debootstrap missing: scripts/docker-engine.sh install (apt-get install debootstrap)"; exit 1; }
[ -f "$CA_BUNDLE" ] || { say "CA bundle $CA_BUNDLE not found (set SYNTHGEN_CA_BUNDLE)"; exit 1; }

MIRROR="$(debian_mirror)"
SECURITY_MIRROR="$(security_mirror)"
UV_VERSION="${SYNTHGEN_UV_VERSION:-$( (uv --version 2>/dev/null || "$(dirname "$0")/../.venv/bin/uv" --version 2>/dev/null) | awk '{print $2}')}"

WORK="$(mktemp -d /tmp/synthgen-base.XXXXXX)"
trap 'umount "$WORK/rootfs/proc" 2>/dev/null || true; rm -rf --one-file-system "$WORK"' EXIT
ROOTFS="$WORK/rootfs"
say "debootstrap bookworm from $MIRROR (1-2 minutes)"
start=$(date +%s)
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log" >&2; say "debootstrap failed"; exit 1; }
# The same suites as this machine: point release, updates and security (upgraded in the build below).
cat >"$ROOTFS/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
SOURCES
# apt as in Docker's official Debian images: no .deb cache kept after installs, gzipped lists,
# no translations (BentoML's generated Dockerfile runs apt-get install build-essential on top).
cat >"$ROOTFS/etc/apt/apt.conf.d/docker-clean" <<'APTCONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APTCONF
echo 'Acquire::GzipIndexes "true"; Acquire::CompressionTypes::Order:: "gz";' >"$ROOTFS/etc/apt/apt.conf.d/docker-gzip-indexes"
echo 'Acquire::Languages "none";' >"$ROOTFS/etc/apt/apt.conf.d/docker-no-languages"
echo 'APT::Install-Recommends "false"; APT::Install-Suggests "false";' >"$ROOTFS/etc/apt/apt.conf.d/docker-no-recommends"
# Security and point updates applied here, in the root filesystem, so the image has no second copy of them.
mount -t proc proc "$ROOTFS/proc"
upgrade_ok=1
chroot "$ROOTFS" env DEBIAN_FRONTEND=noninteractive sh -c 'apt-get update -q && apt-get upgrade -y -q' \
    >>"$WORK/debootstrap.log" 2>&1 || upgrade_ok=0
umount "$ROOTFS/proc"
[ "$upgrade_ok" = 1 ] || { tail -n 30 "$WORK/debootstrap.log" >&2; say "apt-get upgrade in the new root filesystem failed"; exit 1; }
# Leaner image: no apt lists/caches, docs or man pages.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/doc/* \
       "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/var/log/*.log
tar -C "$ROOTFS" -c . | docker import - "$IMAGE-rootfs" >/dev/null
say "debootstrap + import took $(( $(date +%s) - start ))s"

cp "$CA_BUNDLE" "$WORK/ca-certificates.crt"
# The CA bundle goes outside /etc/ssl/certs (update-ca-certificates, run by apt when ca-certificates
# changes, rewrites that folder), and over the default path for tools that use that one.
cat >"$WORK/Dockerfile" <<DOCKERFILE
FROM $IMAGE-rootfs
COPY ca-certificates.crt /etc/ssl/synthgen-ca-bundle.crt
ENV SSL_CERT_FILE=/etc/ssl/synthgen-ca-bundle.crt PIP_CERT=/etc/ssl/synthgen-ca-bundle.crt UV_NATIVE_TLS=1 \\
    LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN cp /etc/ssl/synthgen-ca-bundle.crt /etc/ssl/certs/ca-certificates.crt \\
 && python3 -m pip install --break-system-packages --no-cache-dir "uv${UV_VERSION:+==$UV_VERSION}" && uv --version
LABEL synthgen.base.recipe=$RECIPE
CMD ["/bin/bash"]
DOCKERFILE
DOCKER_BUILDKIT=0 docker build -q --network host -t "$IMAGE" "$WORK" >/dev/null
docker image rm "$IMAGE-rootfs" >/dev/null 2>&1 || true
say "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')) in $(( $(date +%s) - start ))s"
