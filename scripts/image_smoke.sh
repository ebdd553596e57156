#!/usr/bin/env bash
# Prove an image serves: run it, wait for /health, ask the README's question, run `tandem
# status` inside, stop it (SIGTERM: drain and stop) and check it exited 0.
#   bash scripts/image_smoke.sh [IMAGE]        # default tandem:latest; PORT=8000
# With podman it uses runc when installed and modest ulimits (see image.sh).
set -euo pipefail
IMAGE=${1:-tandem:latest}
PORT=${PORT:-8000}
NAME=tandem-smoke-$$
ENGINE=${CONTAINER_ENGINE:-$( (docker info >/dev/null 2>&1 && echo docker) || echo podman)}
run_args=(run -d --name "$NAME" --shm-size 2g -p "127.0.0.1:$PORT:8000")
if [ "$(basename "$ENGINE")" = podman ]; then
  runtime=${CONTAINER_RUNTIME:-$(command -v runc >/dev/null && echo runc || true)}
  [ -n "$runtime" ] && run_args+=(--runtime "$runtime")
  # Limits the runtime may set on VMs that refuse podman's defaults (override with
  # CONTAINER_ULIMITS, e.g. "--ulimit nofile=65536:65536").
  read -r -a limits <<<"${CONTAINER_ULIMITS:---ulimit nofile=1024:1024 --ulimit nproc=4096:4096}"
  run_args+=("${limits[@]}")
fi
trap '"$ENGINE" rm -f "$NAME" >/dev/null 2>&1 || true' EXIT
started=$(date +%s)
"$ENGINE" "${run_args[@]}" "$IMAGE" up --host 0.0.0.0 --block --allow-unauthenticated >/dev/null
url="http://127.0.0.1:$PORT"
until curl -sf --noproxy '*' "$url/health" >/dev/null; do
  if [ "$(( $(date +%s) - started ))" -gt 600 ]; then "$ENGINE" logs "$NAME" | tail -30; exit 1; fi
  sleep 2
done
echo "healthy after $(( $(date +%s) - started )) s"
answer=$(curl -s --noproxy '*' "$url/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "What is the capital of France?"}]}')
echo "$answer"
grep -q Paris <<<"$answer"
"$ENGINE" exec "$NAME" tandem status
"$ENGINE" stop -t 120 "$NAME" >/dev/null
code=$("$ENGINE" inspect "$NAME" --format '{{.State.ExitCode}}')
echo "stopped, exit code $code"
[ "$code" = 0 ]
