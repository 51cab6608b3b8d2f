#!/usr/bin/env bash
# Build the container image and run its documented commands inside it, as the image's own user (issue 43):
#   1. base    the Dockerfile's BASE (python:3.11-slim), or where no registry serves it a stand-in built
#              with debootstrap (scripts/standin_base.sh)
#   2. build   buildah bud (chroot isolation, vfs storage: works without a daemon, inside a VM or a container)
#   3. run     structlora run configs/smoke.yaml, runs/ on a host folder owned by the image's uid
#   4. eval    structlora eval of that run (captions, VQAv2, GQA)
#   5. demo    structlora demo of the merged model, port published, one caption asked through gradio_client
#              from the host
#   6. volume  runs/ on a host folder owned by another uid: as the image's user, a one-line error that says
#              what to do; with --user UID:GID (the folder's owner), the run works
# and prints the image size and the time of every step (also written to WORK/summary.md).
#
#   scripts/container_check.sh          (or: make container-check)
#
# Needs root, buildah and podman (Debian: apt-get install -y buildah podman; debootstrap for a stand-in base),
# a host Python with gradio_client (HOST_PYTHON, default .venv/bin/python) and a few GB of disk under WORK
# and /var/lib/containers. Minutes to tens of minutes: not part of `make test`.
# Settings (environment): IMAGE, BASE, STANDIN (auto | always | never), WORK, PORT, TORCH, HOST_PYTHON,
# STORAGE_DRIVER (vfs), BUILD_VOLUMES (extra "-v SRC:DST:ro" for the build), PODMAN_OPTS / PODMAN_RUN_OPTS
# (skip the probe of what `podman run` needs on this host). The build uses the host's pip index settings
# (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, else `pip config get`): passed as build args, local
# folders among them mounted read-only into the build, nothing of them kept in the image.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/structlora-vlm:check}
BASE=${BASE:-python:3.11-slim}
STANDIN=${STANDIN:-auto}
STANDIN_IMAGE=${STANDIN_IMAGE:-localhost/structlora-standin/python:3.11-slim}
WORK=${WORK:-/var/tmp/structlora-container-check}
PORT=${PORT:-7860}
TORCH=${TORCH:-torch==2.14.1 torchvision==0.29.1}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
if [ -z "${HOST_PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then HOST_PYTHON=.venv/bin/python; else HOST_PYTHON=python3; fi
fi
OTHER_UID=${OTHER_UID:-4321}
DEMO=structlora-check-demo-$$
PODMAN_GLOBAL=()
RUN_OPTS=()

say() { printf '\n[container-check] %s\n' "$*"; }
die() { printf '\n[container-check] FAILED: %s\n' "$*" >&2; exit 1; }
for tool in buildah podman; do
  command -v "$tool" >/dev/null || die "'$tool' not found (Debian: apt-get install -y buildah podman)"
done
[ "$(id -u)" = 0 ] || die "run as root (rootful buildah/podman; chown of the test folders)"
"$HOST_PYTHON" -c "import gradio_client" 2>/dev/null \
  || die "$HOST_PYTHON has no gradio_client (make setup, or HOST_PYTHON=a python with gradio_client)"
mkdir -p "$WORK"
PODMAN=(podman --storage-driver "$STORAGE_DRIVER")
BUILDAH=(buildah --storage-driver "$STORAGE_DRIVER")

STEPS=()
STAGE_TIMES=
START=$SECONDS
timed() {  # timed NAME COMMAND...: run, record the wall time
  local name=$1 t0
  shift
  t0=$(date +%s)
  "$@"
  STEPS+=("$name|$(( $(date +%s) - t0 ))")
}

cleanup() { "${PODMAN[@]}" "${PODMAN_GLOBAL[@]}" rm -f "$DEMO" >/dev/null 2>&1 || true; }
trap cleanup EXIT

# --- 1. base -------------------------------------------------------------------------------------------------
qualify() {  # docker's short names, spelled out (podman would otherwise match python:3.11-slim to any local
             # image whose name ends so, the stand-in included): python:3.11-slim -> docker.io/library/python:3.11-slim
  local first=${1%%/*}
  if [[ "$1" != */* ]]; then echo "docker.io/library/$1"
  elif [[ "$first" == *.* || "$first" == *:* || "$first" == localhost ]]; then echo "$1"
  else echo "docker.io/$1"; fi
}
BASE=$(qualify "$BASE")
base_image() {
  if "${PODMAN[@]}" image exists "$BASE"; then
    say "base: $BASE (already here)"
  elif [ "$STANDIN" != always ] && timeout 180 "${PODMAN[@]}" pull -q "$BASE" >/dev/null 2>&1; then
    say "base: $BASE (pulled)"
  elif [ "$STANDIN" = never ]; then
    die "cannot pull $BASE (STANDIN=never)"
  else
    if "${PODMAN[@]}" image exists "$STANDIN_IMAGE" && [ "${REBUILD_STANDIN:-0}" != 1 ]; then
      say "base: no registry serves $BASE here; reusing the stand-in $STANDIN_IMAGE (REBUILD_STANDIN=1 rebuilds it)"
    else
      say "base: no registry serves $BASE here; building a stand-in with debootstrap: $STANDIN_IMAGE"
      scripts/standin_base.sh "$STANDIN_IMAGE" "$WORK"
    fi
    BASE=$STANDIN_IMAGE
  fi
}
timed base base_image

# --- 2. build ------------------------------------------------------------------------------------------------
BUILD_ARGS=(--build-arg "BASE=$BASE" --build-arg "TORCH=$TORCH")
VOLUMES=()
mount_local() {  # a file:// URL or a local path of a pip setting -> read-only mount at the same path
  local item=$1 path
  case "$item" in
    file://*) path=${item#file://} ;;
    /*) path=$item ;;
    *) return 0 ;;
  esac
  # a PEP 503 index "X/simple" links its files relative to X
  [ "$(basename "$path")" = simple ] && path=$(dirname "$path")
  [ -e "$path" ] && VOLUMES+=(-v "$path:$path:ro")
  return 0
}
for pair in PIP_INDEX_URL:index-url PIP_EXTRA_INDEX_URL:extra-index-url PIP_FIND_LINKS:find-links; do
  var=${pair%%:*} key=${pair#*:}
  value=${!var:-}
  [ -n "$value" ] || value=$(python3 -m pip config get "global.$key" 2>/dev/null || true)
  [ -n "$value" ] || continue
  BUILD_ARGS+=(--build-arg "$var=$value")
  for item in $value; do mount_local "$item"; done
done
# shellcheck disable=SC2206
[ -n "${BUILD_VOLUMES:-}" ] && VOLUMES+=($BUILD_VOLUMES)
build_image() {
  local previous
  previous=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
  say "build: $IMAGE from $BASE (${BUILD_ARGS[*]}${VOLUMES:+; mounts: ${VOLUMES[*]}})"
  "${BUILDAH[@]}" bud --isolation "${BUILDAH_ISOLATION:-chroot}" "${BUILD_ARGS[@]}" "${VOLUMES[@]}" \
    -f Dockerfile -t "$IMAGE" . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; die "image build (log: $WORK/build.log)"; }
  grep -E '^STEP [0-9]+/' "$WORK/build.log" | sed 's/^/  /'
  # the image this check built last time, now untagged: several GB with vfs storage
  if [ -n "$previous" ] && [ "$previous" != "$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$IMAGE")" ]; then
    "${PODMAN[@]}" rmi "$previous" >/dev/null 2>&1 || true
  fi
}
timed build build_image
SIZE_BYTES=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
SIZE=$(awk "BEGIN { printf \"%.2f\", $SIZE_BYTES / 1e9 }")
say "image: $IMAGE, $SIZE GB ($SIZE_BYTES bytes)"

# What `podman run` needs on this host: nothing on most; here (a VM without CAP_SYS_RESOURCE, cgroups v1+v2
# hybrid) runc with cgroupfs and explicit ulimits that do not exceed the host's hard limits.
if [ -n "${PODMAN_OPTS+x}${PODMAN_RUN_OPTS+x}" ]; then
  read -r -a PODMAN_GLOBAL <<<"${PODMAN_OPTS:-}"
  read -r -a RUN_OPTS <<<"${PODMAN_RUN_OPTS:-}"
else
  nofile=$(ulimit -Hn)
  CANDIDATES=("|" "|--ulimit host"
              "--runtime runc --cgroup-manager cgroupfs|--ulimit nofile=$nofile:$nofile --ulimit nproc=32768:32768")
  found=
  for candidate in "${CANDIDATES[@]}"; do
    read -r -a PODMAN_GLOBAL <<<"${candidate%%|*}"
    read -r -a RUN_OPTS <<<"${candidate#*|}"
    # on the base image: a container of the built one is a full copy of it with vfs storage (minutes)
    if "${PODMAN[@]}" "${PODMAN_GLOBAL[@]}" run --rm "${RUN_OPTS[@]}" "$BASE" /bin/true >/dev/null 2>&1; then
      found=1
      break
    fi
  done
  [ -n "$found" ] || die "podman run fails here with every option set tried (set PODMAN_OPTS / PODMAN_RUN_OPTS)"
fi
say "podman run options here: ${PODMAN_GLOBAL[*]:-(none)} | ${RUN_OPTS[*]:-(none)}"
ctr() { "${PODMAN[@]}" "${PODMAN_GLOBAL[@]}" run --rm "${RUN_OPTS[@]}" "$@"; }

read -r IMAGE_UID IMAGE_USER < <(ctr --entrypoint sh "$IMAGE" -c 'echo "$(id -u) $(id -un)"')
[ "$IMAGE_UID" != 0 ] || die "the image runs as root: its USER should be a non-root user"
RUNS=$WORK/runs
rm -rf "$RUNS" && mkdir -p "$RUNS" && chown "$IMAGE_UID:$IMAGE_UID" "$RUNS"

# --- 3. run --------------------------------------------------------------------------------------------------
run_smoke() {
  say "run: structlora run configs/smoke.yaml (as $IMAGE_USER, uid $IMAGE_UID; runs/ = $RUNS)"
  ctr -v "$RUNS:/work/runs" "$IMAGE" run configs/smoke.yaml >"$WORK/run.log" 2>&1 \
    || { tail -30 "$WORK/run.log"; die "structlora run (log: $WORK/run.log)"; }
  grep -E '^\[[a-z]+\]' "$WORK/run.log" | sed 's/^/  /' | head -20 || true
  [ -f "$RUNS/smoke/merge/model/config.json" ] || die "no merged model in $RUNS/smoke/merge/model"
  [ "$(stat -c %u "$RUNS/smoke/manifest.json")" = "$IMAGE_UID" ] || die "run files not owned by uid $IMAGE_UID"
  STAGE_TIMES=$("$HOST_PYTHON" - "$RUNS/smoke/manifest.json" <<'EOF'
import json, sys
from datetime import datetime
stages = json.load(open(sys.argv[1]))["stages"]
order = ["prepare", "base", "train", "eval", "merge", "publish"]
def seconds(s):
    return (datetime.fromisoformat(s["finished"]) - datetime.fromisoformat(s["started"])).total_seconds()
print(", ".join(f"{name} {seconds(stages[name]):.0f} s" for name in order if name in stages))
EOF
)
  echo "  stages (manifest.json): $STAGE_TIMES"
}
timed run run_smoke

# --- 4. eval -------------------------------------------------------------------------------------------------
eval_smoke() {
  say "eval: structlora eval runs/smoke --data runs/smoke --out runs/smoke-eval"
  ctr -v "$RUNS:/work/runs" "$IMAGE" eval runs/smoke --data runs/smoke --out runs/smoke-eval >"$WORK/eval.log" 2>&1 \
    || { tail -30 "$WORK/eval.log"; die "structlora eval (log: $WORK/eval.log)"; }
  "$HOST_PYTHON" - "$RUNS/smoke-eval/metrics.json" <<'EOF' || die "eval metrics"
import json, sys
metrics = json.load(open(sys.argv[1]))
text = json.dumps(metrics)
assert "CIDEr" in text and "METEOR" in text, "no caption metrics in metrics.json"
print("  metrics.json:", ", ".join(sorted(metrics))[:200])
EOF
}
timed eval eval_smoke

# --- 5. demo -------------------------------------------------------------------------------------------------
demo_smoke() {
  say "demo: structlora demo /work/runs/smoke/merge/model --host 0.0.0.0, port $PORT, runs/ mounted read-only"
  "${PODMAN[@]}" "${PODMAN_GLOBAL[@]}" run -d --name "$DEMO" "${RUN_OPTS[@]}" -p "$PORT:7860" \
    -v "$RUNS:/work/runs:ro" "$IMAGE" demo /work/runs/smoke/merge/model --host 0.0.0.0 >/dev/null
  local image
  image=$(find "$RUNS/smoke/prepare/world/images/test" -name '*.png' | sort | head -1)
  "$HOST_PYTHON" - "http://127.0.0.1:$PORT/" "$image" <<'EOF' || { "${PODMAN[@]}" logs "$DEMO" 2>&1 | tail -30; die "demo"; }
import sys, time, urllib.request
url, image = sys.argv[1], sys.argv[2]
start = time.time()
while True:
    try:
        urllib.request.urlopen(url, timeout=5)
        break
    except OSError:
        if time.time() - start > 300:
            raise SystemExit("the demo did not answer within 300 s")
        time.sleep(2)
print(f"  demo up after {time.time() - start:.0f} s")
from gradio_client import Client, handle_file
t = time.time()
caption = Client(url, verbose=False).predict(handle_file(image), 12, "greedy", api_name="/caption")
assert isinstance(caption, str) and caption.strip(), repr(caption)
print(f"  /caption of {image.rsplit('/', 1)[-1]}: {caption!r} ({time.time() - t:.1f} s)")
EOF
  # docker stop / podman stop send SIGTERM, then SIGKILL after the timeout: the demo must stop on the SIGTERM
  local t0=$SECONDS
  "${PODMAN[@]}" "${PODMAN_GLOBAL[@]}" stop -t 30 "$DEMO" >/dev/null 2>&1
  [ $((SECONDS - t0)) -lt 30 ] || die "the demo ignored SIGTERM (podman stop waited 30 s and killed it)"
  echo "  stopped by SIGTERM in $((SECONDS - t0)) s"
  "${PODMAN[@]}" "${PODMAN_GLOBAL[@]}" rm -f "$DEMO" >/dev/null
}
timed demo demo_smoke

# --- 6. runs/ owned by another uid ---------------------------------------------------------------------------
volume_check() {
  local other=$WORK/runs-other out code
  rm -rf "$other" && mkdir -p "$other" && chown "$OTHER_UID:$OTHER_UID" "$other" && chmod 755 "$other"
  say "volume: runs/ owned by uid $OTHER_UID; as $IMAGE_USER (uid $IMAGE_UID) it must fail with a clear message"
  code=0
  out=$(ctr -v "$other:/work/runs" "$IMAGE" run configs/smoke.yaml --stages prepare 2>&1) || code=$?
  printf '%s\n' "$out" | tail -2 | sed 's/^/  /'
  [ "$code" = 2 ] || die "expected exit code 2, got $code"
  printf '%s\n' "$out" | grep -q -- '--user $(id -u):$(id -g)' || die "the error does not advise --user"
  say "volume: the same with --user $OTHER_UID:$OTHER_UID (the folder's owner) must work"
  ctr --user "$OTHER_UID:$OTHER_UID" -v "$other:/work/runs" "$IMAGE" run configs/smoke.yaml --stages prepare \
    >"$WORK/volume.log" 2>&1 || { tail -20 "$WORK/volume.log"; die "run with --user $OTHER_UID:$OTHER_UID"; }
  [ "$(stat -c %u "$other/smoke/manifest.json")" = "$OTHER_UID" ] || die "files not owned by uid $OTHER_UID"
  echo "  ok: $other/smoke written as uid $OTHER_UID"
}
timed volume volume_check

# --- summary -------------------------------------------------------------------------------------------------
{
  echo "container check, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPU cores, git $(git describe --always --dirty 2>/dev/null || echo "?")"
  echo "image $IMAGE from $BASE: $SIZE GB"
  echo
  echo "| step | seconds |"
  echo "| --- | ---: |"
  for s in "${STEPS[@]}"; do echo "| ${s%%|*} | ${s#*|} |"; done
  echo "| total (with podman's run-option probe) | $((SECONDS - START)) |"
  echo
  echo "structlora run configs/smoke.yaml inside, per stage: $STAGE_TIMES"
} | tee "$WORK/summary.md"
say "passed (summary: $WORK/summary.md)"
