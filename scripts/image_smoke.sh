#!/usr/bin/env bash
# Prove an image serves: run it, wait for /health, ask the README's question, run `tandem
# status` inside, stop it (SIGTERM: drain and stop) and check it exited 0.
#   bash scripts/image_smoke.sh [IMAGE]        # default tandem:latest; PORT=8000
# With podman it uses runc and the host's ulimits when runc is installed (see image.sh).
set -euo pipefail
IMAGE=${1:-tandem:latest}
PORT=${PORT:-8000}
NAME=tandem-smoke-$$
ENGINE=${CONTAINER_ENGINE:-$( (docker info >/dev/null 2>&1 && echo docker) || echo podman)}
run_args=(run -d --name "$NAME" --shm-size 2g -p "127.0.0.1:$PORT:8000")
if [ "$(basename "$ENGINE")" = podman ]; then
  runtime=${CONTAINER_RUNTIME:-$(command -v runc >/dev/null && echo runc || true)}
  [ -n "$runtime" ] && run_args+=(--runtime "$runtime")
  lim() { local v; v=$(ulimit "$1"); [ "$v" = unlimited ] && echo -1 || echo "$v"; }
  run_args+=(--ulimit "nofile=$(lim -Sn):$(lim -Hn)" --ulimit "nproc=$(lim -Su):$(lim -Hu)")
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
