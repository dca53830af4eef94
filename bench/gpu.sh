#!/usr/bin/env bash
# The GPU figures in one go (under 8 minutes on one H100-class GPU):
#   1. model only, img/s at batch 1, 8 and 16 (bench/model_speed.py --device cuda), ResNet-101
#      and MobileNetV3, with torch's peak allocated memory per batch size;
#   2. end to end on ResNet-101 (bench/throughput.py): max batch 1 vs 8, (c)/(a), (c)/(b), PNG
#      and JPEG outputs, through a real worker, Redis, PostgreSQL and moto's S3 server;
#   3. GPU utilisation and memory while each runs (nvidia-smi sampled every 200 ms).
# Needs only the repo's venv (`make install`, dev extra for moto), PostgreSQL and Redis; it
# starts the last two as .ci/run does when they are not up. Exits 1 when no GPU is present.
#
#   bench/gpu.sh              # on the GPU machine
#   bench/gpu.sh --dry-run    # a small CPU run of the same steps, to check the plumbing
#   GPU_BENCH_PHOTOS=96 bench/gpu.sh   # more photos per end-to-end run (default 48)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: bench/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac
PHOTOS="${GPU_BENCH_PHOTOS:-48}"
SAMPLES="$(mktemp -d)"
trap 'rm -rf "$SAMPLES"' EXIT

fail() { echo "bench/gpu.sh: $*" >&2; exit 1; }

[ -x "$PY" ] || fail "no $PY: run \`make install\` first"
"$PY" -c "import moto.server" 2>/dev/null || fail "moto is not installed in the venv (make install)"

if (( ! DRY_RUN )); then
  command -v nvidia-smi >/dev/null || fail "no nvidia-smi: no NVIDIA GPU here (--dry-run runs on the CPU)"
  nvidia-smi -L >/dev/null 2>&1 || fail "nvidia-smi finds no GPU (driver not loaded?)"
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || fail "torch sees no CUDA GPU (a CPU-only torch wheel in the venv?)"
fi

start_postgres() {
  if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then return; fi
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  for _ in $(seq 60); do pg_isready -h 127.0.0.1 -p 5432 -q && return; sleep 1; done
  fail "PostgreSQL did not come up on 127.0.0.1:5432"
}

start_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then return; fi
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/bench.log
  for _ in $(seq 60); do redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG && return; sleep 1; done
  fail "Redis did not come up on 127.0.0.1:6379"
}

# Runs "$@" with nvidia-smi sampling in the background, then prints the GPU's utilisation
# (mean over all samples and over busy ones, since model loading idles the GPU) and memory.
sampled() {
  local label="$1"; shift
  if (( DRY_RUN )); then "$@"; return; fi
  local csv="$SAMPLES/$label.csv"
  nvidia-smi --query-gpu=utilization.gpu,memory.used,memory.total \
    --format=csv,noheader,nounits -lms 200 >"$csv" &
  local sampler=$!
  local status=0
  "$@" || status=$?
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  awk -F', *' -v label="$label" '
    { n++; util += $1; if ($1 > 0) { busy++; busy_util += $1 } if ($2 > mem) mem = $2; total = $3 }
    END {
      printf "GPU during %s: %d samples, utilisation mean %.0f%%, mean while busy %.0f%% (%d samples), memory used peak %d of %d MiB\n",
        label, n, n ? util / n : 0, busy ? busy_util / busy : 0, busy, mem, total
    }' "$csv"
  return "$status"
}

start_postgres
start_redis
started=$SECONDS

if (( DRY_RUN )); then
  echo "== dry run on the CPU: tiny sizes, no GPU figures =="
  sampled model-only timeout 300 "$PY" bench/model_speed.py \
    --models deeplabv3_mobilenet_v3_large --batch-sizes 1,2 --repeats 1 --device cpu
  sampled end-to-end timeout 600 "$PY" bench/throughput.py \
    --photos 4 --max-batch 2 --rounds 1 --formats png --masks noise
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "== (a) model only, batch 1/8/16 =="
  sampled model-only timeout 150 "$PY" bench/model_speed.py \
    --models deeplabv3_resnet101,deeplabv3_mobilenet_v3_large --batch-sizes 1,8,16 \
    --repeats 5 --device cuda
  echo "== end to end, ResNet-101, max batch 1 vs 8, $PHOTOS photos =="
  # Noise masks (the worst case for edge work): training subject weights for ResNet-101 would
  # take minutes of the time this script is given.
  sampled end-to-end timeout 330 "$PY" bench/throughput.py \
    --model deeplabv3_resnet101 --photos "$PHOTOS" --max-batch 8 --rounds 1 --formats png,jpeg \
    --masks noise
fi
echo "bench/gpu.sh: done in $((SECONDS - started)) s"
