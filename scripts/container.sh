#!/usr/bin/env bash
# Build and run the synthgen container image.
#
#   scripts/container.sh build      bentoml build + bentoml containerize -> synthgen-service:<pyproject version>,
#                                   also tagged :latest and :<version>-<bento version> (unique per build: deploy that one)
#   scripts/container.sh run        run that image on 127.0.0.1:$PORT (host network), print the URL, stay in front
#   scripts/container.sh tag        print the image tag the build makes
#   scripts/container.sh size       image size and what dominates it (docker history, du inside the image)
#
# Settings (environment):
#   SYNTHGEN_IMAGE          image tag (default synthgen-service:<version from pyproject.toml>)
#   SYNTHGEN_BASE           base image: auto (default) | default | local | <image ref>
#                             default: BentoML's own base (python:3.11-slim from Docker Hub), bentofile.yaml as is;
#                             local:   a Debian bookworm base built here by scripts/base-image.sh (no Docker Hub needed);
#                             auto:    default when Docker Hub answers (or the image is present), else local;
#                             <ref>:   any image with Python 3.11 (bentofile.yaml's docker.base_image is set to it).
#                           A base other than the default is set in a temporary copy of bentofile.yaml;
#                           the committed bentofile.yaml is never changed.
#   SYNTHGEN_PROJECT_DIR    the project tree to build (default: this repository)
#   SYNTHGEN_CONTAINERIZE_ARGS  extra `bentoml containerize` options, e.g. "--opt no-cache"
#   PORT                    run: port on 127.0.0.1 (default 3000)
#   SYNTHGEN_*              run: the service's settings (API key, limits, models...) are passed to the container,
#                           except host paths (SYNTHGEN_EXPORTED_DIR, _DATA_DIR, _CACHE_DIR) and this script's own.
set -euo pipefail

HERE="$(cd "$(dirname "$0")/.." && pwd)"
PROJECT="$(cd "${SYNTHGEN_PROJECT_DIR:-$HERE}" && pwd)"
PY="${PY:-$HERE/.venv/bin/python}"
case "$PY" in /*) ;; */*) PY="$PWD/$PY" ;; *) PY="$(command -v "$PY")" ;; esac
BENTOML="${BENTOML:-$(dirname "$PY")/bentoml}"
DEFAULT_BASE="python:3.11-slim"   # BentoML 1.4's base for distro debian, Python 3.11
LOCAL_BASE="${SYNTHGEN_BASE_IMAGE:-synthgen-base:bookworm}"
export BENTOML_DO_NOT_TRACK=true

say() { echo "container: $*" >&2; }

# The project version, read without Python so that run/size/tag work on a host that only runs the image.
version() {
    local v; v="$(sed -n "s/^version *= *[\"']\([^\"']*\)[\"'].*/\1/p" "$PROJECT/pyproject.toml" | head -n 1)"
    [ -n "$v" ] || { say "no version = \"...\" in $PROJECT/pyproject.toml"; exit 1; }
    echo "$v"
}
image_tag() {
    if [ -n "${SYNTHGEN_IMAGE:-}" ]; then echo "$SYNTHGEN_IMAGE"; return; fi
    local v; v="$(version)"  # its own statement, so that a failed version() stops the script
    echo "synthgen-service:$v"
}

need_engine() {
    timeout 20 docker info >/dev/null 2>&1 && return 0
    say "no Docker engine answers. Start one: scripts/docker-engine.sh install && scripts/docker-engine.sh start"
    exit 1
}

choose_base() {
    local base="${SYNTHGEN_BASE:-auto}"
    case "$base" in
        default) echo default ;;
        local) echo local ;;
        auto)
            if docker image inspect "$DEFAULT_BASE" >/dev/null 2>&1 || timeout 120 docker pull -q "$DEFAULT_BASE" >/dev/null 2>&1; then
                echo default
            else
                say "cannot pull $DEFAULT_BASE (no Docker Hub?): using the local Debian base $LOCAL_BASE"
                echo local
            fi ;;
        *) echo "$base" ;;
    esac
}

cmd_build() {
    # An image without a servable model would build fine and fail at start; refuse it here instead.
    [ -x "$PY" ] || { say "no Python at $PY (set PY=, or create the venv: make venv)"; exit 1; }
    (cd "$PROJECT" && PYTHONPATH="$PROJECT" "$PY" - <<'PYEOF') || { say "exported/ has no model the image could serve"; exit 1; }
import sys
from service.catalog import ManifestError, load_catalog
try:
    catalog = load_catalog("exported", "onnxruntime")
except ManifestError as exc:
    sys.exit(f"container: {exc}")
for entry in catalog.entries.values():
    if not entry.ok:
        print(f"container: {entry.dataset}/{entry.model} will not be served: {entry.error}", file=sys.stderr)
if not catalog.usable():
    sys.exit(1)
PYEOF
    need_engine
    local image base bentofile tag start
    image="$(image_tag)"
    base="$(choose_base)"
    start=$(date +%s)
    work="$(mktemp -d /tmp/synthgen-container.XXXXXX)"   # global: the EXIT trap removes it
    trap 'rm -rf "$work"' EXIT
    bentofile="$PROJECT/bentofile.yaml"
    [ -f "$bentofile" ] || { say "no bentofile.yaml in $PROJECT"; exit 1; }
    if [ "$base" != default ]; then
        if [ "$base" = local ]; then "$HERE/scripts/base-image.sh" "$LOCAL_BASE"; base="$LOCAL_BASE"; fi
        # A temporary bentofile with docker.base_image set; paths in it stay relative to the project tree.
        "$PY" - "$bentofile" "$work/bentofile.yaml" "$base" <<'PYEOF'
import sys, yaml
src, dst, base = sys.argv[1:]
config = yaml.safe_load(open(src)) or {}
config.setdefault("docker", {})
config["docker"] = dict(config["docker"] or {}, base_image=base)
yaml.safe_dump(config, open(dst, "w"), sort_keys=False)
PYEOF
        bentofile="$work/bentofile.yaml"
        say "base image $base (temporary bentofile $bentofile)"
    else
        say "base image: BentoML's default ($DEFAULT_BASE)"
    fi
    local previous; previous="$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)"
    say "bentoml build $PROJECT"
    tag="$(cd "$PROJECT" && "$BENTOML" build -f "$bentofile" -o tag "$PROJECT" | tail -n 1)"
    tag="${tag#__tag__:}"
    [ -n "$tag" ] || { say "bentoml build printed no tag"; exit 1; }
    say "bento $tag built in $(( $(date +%s) - start ))s; containerizing as $image"
    # BuildKit where the docker CLI has buildx, else the classic builder (DOCKER_BUILDKIT=0);
    # host network so pip/uv in the build reach the package registry.
    local buildkit=0
    docker buildx version >/dev/null 2>&1 && buildkit=1
    # shellcheck disable=SC2086  # extra options are words on purpose, e.g. "--opt no-cache"
    DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-$buildkit}" "$BENTOML" containerize "$tag" --opt network=host -t "$image" ${SYNTHGEN_CONTAINERIZE_ARGS:-}
    # The default tag (pyproject version) also becomes :latest and :<version>-<bento version>, a tag no other
    # build shares: a cluster pulls a new image only under a new tag. A tag given in SYNTHGEN_IMAGE stays alone.
    local unique=""
    if [ -z "${SYNTHGEN_IMAGE:-}" ]; then
        unique="$image-${tag#*:}"
        docker tag "$image" "${image%:*}:latest" >/dev/null
        docker tag "$image" "$unique" >/dev/null
    fi
    # The image this tag named before goes, with its own unique tag (a registry keeps what was pushed; its layers
    # shared with the new one stay), unless another tag still names it.
    if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$image")" ]; then
        local old
        for old in $(docker image inspect -f '{{join .RepoTags " "}}' "$previous" 2>/dev/null); do
            case "$old" in "${image%:*}:$(version)-"*) docker image rm "$old" >/dev/null 2>&1 || true ;; esac
        done
        if [ "$(docker image inspect -f '{{len .RepoTags}}' "$previous" 2>/dev/null)" = 0 ]; then
            docker image rm "$previous" >/dev/null 2>&1 || true
        fi
    fi
    say "built $image in $(( $(date +%s) - start ))s; size $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')"
    [ -z "$unique" ] || say "this build is also $unique: deploy that tag (deploy/kustomization.yaml, images: newTag)"
    echo "$image"
}

runtime_env_args() {
    local name
    for name in $(compgen -e | grep '^SYNTHGEN_' || true); do
        case "$name" in
            SYNTHGEN_EXPORTED_DIR|SYNTHGEN_DATA_DIR|SYNTHGEN_CACHE_DIR|SYNTHGEN_IMAGE|SYNTHGEN_BASE|SYNTHGEN_BASE_*|SYNTHGEN_PROJECT_DIR|SYNTHGEN_DOCKER_*|SYNTHGEN_DEBIAN_MIRROR|SYNTHGEN_CA_BUNDLE|SYNTHGEN_UV_VERSION) ;;
            *) printf -- '-e\0%s\0' "$name" ;;
        esac
    done
}

cmd_run() {
    local image port name
    image="$(image_tag)"
    port="${PORT:-3000}"
    # The image's user is not root: it cannot bind below 1024.
    if ! [[ "$port" =~ ^[0-9]+$ ]] || [ "$port" -lt 1024 ] || [ "$port" -gt 65535 ]; then
        say "PORT=$port: give a port from 1024 to 65535 (the container runs as a non-root user)"; exit 2
    fi
    name="${SYNTHGEN_CONTAINER_NAME:-synthgen-$port}"
    # On the host network a port in use would fail inside the container, after the URL below was printed.
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        say "127.0.0.1:$port is in use by another process: choose another, e.g. PORT=8080 make container-run"; exit 1
    fi
    need_engine
    docker image inspect "$image" >/dev/null 2>&1 || { say "no image $image: run 'make container' first"; exit 1; }
    local env_args=()
    while IFS= read -r -d '' a; do env_args+=("$a"); done < <(runtime_env_args)
    say "serving $image at http://127.0.0.1:$port  (livez /livez, readyz /readyz, metrics /metrics; Ctrl-C stops)"
    # Host network with the server bound to loopback: nothing is published beyond this machine.
    # docker stop waits up to 310 s: the request timeout (300 s) and a margin, so that requests in flight finish.
    exec docker run --rm --name "$name" --network host --stop-timeout 310 \
        -e BENTOML_HOST=127.0.0.1 -e BENTOML_PORT="$port" -e BENTOML_DO_NOT_TRACK=true "${env_args[@]}" "$image"
}

cmd_size() {
    need_engine
    local image; image="$(image_tag)"
    docker image inspect -f 'size {{.Size}} bytes' "$image"
    docker history --format '{{.Size}}\t{{.CreatedBy}}' "$image" | awk -F'\t' '$1 != "0B"' | cut -c1-150
    docker run --rm --network none --entrypoint /bin/sh "$image" -c \
        'du -xsh /app/.venv /usr /var /home/bentoml/bento 2>/dev/null; echo "-- largest packages in /app/.venv:"; du -sh /app/.venv/lib/python3*/site-packages/* 2>/dev/null | sort -h | tail -n 12'
}

case "${1:-}" in
    build) cmd_build ;;
    run) cmd_run ;;
    tag) image_tag ;;
    size) cmd_size ;;
    *) echo "usage: $0 build|run|tag|size" >&2; exit 2 ;;
esac
