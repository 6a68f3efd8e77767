#!/usr/bin/env bash
# What the CPU test suite cannot check, on one CUDA GPU, in under 10 minutes; prints one table.
#
#   resume-bf16 / resume-fp16  train.amp = bf16 / fp16 (+ GradScaler): two uninterrupted runs and one
#                              run stopped mid-epoch (after an epoch end) and resumed; PASS when the
#                              resumed run's final weights equal the uninterrupted run's bit for bit.
#   precision                  ftsgd demo --compare (sgd, sgd-freeze-embed, adamw; LR grid; 3 seeds) in fp32
#                              and in bf16 autocast on the GPU, on one backbone (benchmarks/precision_parity.py);
#                              INFO row with the verdict (parity, or which recipe moved beyond its seed spread
#                              or how the ranking changed), the table in $OUT/gpu_check_logs/precision.md. It
#                              decides CUDA's train.amp = "auto" (fp32 until parity is measured; docs/precision.md).
#   memory-<model>             torch.cuda.max_memory_allocated of adamw, sgd-freeze-embed and
#                              sgd-freeze-embed-lowmem, ViT-B/16 and ViT-L/16, batch 32, random init
#                              (benchmarks/memory.py: one process per recipe, 3 steps + eval + export).
#   throughput                 images/s of ftsgd vs timm's train.py on ViT-B/16 (benchmarks/throughput.py,
#                              case "gpu", 8 workers, bf16 on both sides); without TIMM_SRC only ftsgd.
#   compile                    train.compile = true on CUDA: that it trains, and its steady-state
#                              images/s (second epoch) against eager.
#
# Usage (from anywhere; the repository is this script's parent folder, no install needed):
#
#   bash benchmarks/gpu_check.sh
#   TIMM_SRC=~/src/pytorch-image-models OUT=/tmp/out bash benchmarks/gpu_check.sh
#   CPU_SMOKE=1 bash benchmarks/gpu_check.sh     # the same steps, tiny, on the CPU (tests the script)
#
# Environment: PYTHON (default python3; needs torch, timm and ftsgd's dependencies), TIMM_SRC (a
# pytorch-image-models checkout for the timm column), OUT (also write the table to $OUT/gpu_check.md,
# raw JSON and logs next to it), BUDGET_S (total seconds, default 540: checks that would start with
# less time left than they need are reported as SKIP, a running check is stopped at the budget and
# reported as TIMEOUT; 1200 with CPU_SMOKE=1), KEEP=1 keeps the work folder. TIMM_SRC only needs
# train.py (it is copied and run against the installed timm), so a folder with just that file works.
#
# Stopping mid-run: uses `ftsgd train --max-steps N` (stop after N optimizer steps with a checkpoint,
# continue with --resume) when the CLI has it; until then a small Python driver calls
# ftsgd.train.train(..., stop_after_steps=N), the same code path.
#
# Every check runs in its own process group with a timeout; a failing check is a FAIL row with the
# end of its log, and the other checks still run. Exit status: 0 if no check failed, 1 otherwise.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
export REPO
export PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export CPU_SMOKE=${CPU_SMOKE:-0}
BUDGET_S=${BUDGET_S:-$([[ "$CPU_SMOKE" == 1 ]] && echo 1200 || echo 540)}
export TIMM_SRC=${TIMM_SRC:-}
OUT=${OUT:-}
KEEP=${KEEP:-0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ftsgd-gpu-check.XXXXXX")
export WORK
export FTSGD_CACHE_DIR="$WORK/cache"  # a fresh scan cache, never the user's
mkdir -p "$WORK/results" "$WORK/logs"
START=$SECONDS

cleanup() {
  if [[ "$KEEP" == 1 ]]; then echo "work folder kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

if [[ "$CPU_SMOKE" == 1 ]]; then
  export DEVICE=cpu SMALL_MODEL=test_vit SIZE=32 MEM_MODELS="test_vit" MEM_BATCH=2 WORKERS=2
  export THR_MODEL=test_vit THR_CASE=small THR_PAIRS=1 COMPILE_MODEL=test_vit
  export SMALL_SETS="--set model.kwargs={img_size=32} --set data.img_size=32"
else
  export DEVICE=cuda SMALL_MODEL=vit_tiny_patch16_224 SIZE=224 MEM_BATCH=32 WORKERS=8
  export MEM_MODELS="vit_base_patch16_224 vit_large_patch16_224"
  export THR_MODEL=vit_base_patch16_224 THR_CASE=gpu THR_PAIRS=2 COMPILE_MODEL=vit_base_patch16_224
  export SMALL_SETS=""
fi

# --------------------------------------------------------------------------- helpers (run inside checks)

# result STATUS DETAIL: the row of the check being run (the last call wins).
result() { printf '%s|%s\n' "$1" "$2" >"$WORK/results/$CHECK"; }
export -f result

# train_run OUT [ARGS...]: a whole `ftsgd train` run on the small dataset; prints its JSON summary.
train_run() {
  local out=$1 small
  shift
  read -ra small <<<"$SMALL_SETS"
  "$PY" -m ftsgd train --data "$WORK/data" --out "$out" --model "$SMALL_MODEL" "${small[@]}" \
    --set train.device="\"$DEVICE\"" --set data.num_workers=2 --quiet --json "$@"
}
export -f train_run

# train_stop OUT STEPS [ARGS...]: the same run, stopped after STEPS optimizer steps with a checkpoint.
train_stop() {
  local out=$1 steps=$2
  shift 2
  if "$PY" -m ftsgd train --help 2>/dev/null | grep -q -- '--max-steps'; then
    echo "--max-steps" >"$WORK/stop-method"
    train_run "$out" --max-steps "$steps" "$@"
    return
  fi
  echo "ftsgd.train.train(stop_after_steps)" >"$WORK/stop-method"
  # No --max-steps yet: the same sets through ftsgd.train.train(stop_after_steps=...).
  local small sets
  read -ra small <<<"$SMALL_SETS"
  sets=(--set "model.name=\"$SMALL_MODEL\"" "${small[@]}" --set train.device="\"$DEVICE\"" --set data.num_workers=2 "$@")
  "$PY" - "$WORK/data" "$out" "$steps" "${sets[@]}" <<'EOF'
import json, sys
from pathlib import Path
from ftsgd.recipe.load import load_recipe
from ftsgd.recipe.schema import DEFAULT_RECIPE
from ftsgd.train import train
data, out, steps, rest = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
sets = [rest[i + 1] for i in range(0, len(rest), 2) if rest[i] == "--set"]
recipe = load_recipe(DEFAULT_RECIPE, [*sets, f"data.root={json.dumps(data)}"])
print(json.dumps(train(recipe, out, quiet=True, stop_after_steps=steps, argv=["gpu_check"])))
EOF
}
export -f train_stop

# same_weights A B: "equal" or "differ (max |diff| X in N of M tensors)" for two checkpoint.pt files.
same_weights() {
  "$PY" - "$1" "$2" <<'EOF'
import sys, torch
a, b = (torch.load(p, map_location="cpu", weights_only=False)["model"] for p in sys.argv[1:3])
assert a.keys() == b.keys(), "different tensor names"
bad = [k for k in a if not torch.equal(a[k], b[k])]
if not bad:
    print("equal")
else:
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in bad)
    print(f"differ (max |diff| {worst:.3g} in {len(bad)} of {len(a)} tensors)")
EOF
}
export -f same_weights

make_data() {
  [[ -f "$WORK/data/.complete" ]] && return
  "$PY" -c "
import sys
from ftsgd.data.synthetic import make_image_folder
make_image_folder(sys.argv[1], classes=3, per_class={'train': 32, 'val': 8}, size=int(sys.argv[2]), fmt='jpg')
" "$WORK/data" "$SIZE"
  touch "$WORK/data/.complete"
}
export -f make_data

# --------------------------------------------------------------------------- checks

check_resume() {  # AMP: bf16 | fp16
  local amp=$1 d="$WORK/resume-$1"
  [[ "$DEVICE" == cpu && "$amp" == fp16 ]] && amp=none # fp16 autocast is CUDA-only; bf16 runs on a CPU too
  local sets=(--set train.amp="\"$amp\"" --set train.epochs=2 --set train.batch_size=16)
  make_data
  train_run "$d/a" "${sets[@]}" >"$d-a.json"
  train_run "$d/b" "${sets[@]}" >"$d-b.json"
  train_stop "$d/r" 8 "${sets[@]}" >"$d-r1.json"  # 6 steps per epoch: stops mid-epoch 2
  "$PY" -m ftsgd train --data "$WORK/data" --out "$d/r" --resume --quiet --json >"$d-r2.json"
  local twice resumed
  twice=$(same_weights "$d/a/checkpoint.pt" "$d/b/checkpoint.pt")
  resumed=$(same_weights "$d/a/checkpoint.pt" "$d/r/checkpoint.pt")
  local detail
  detail="amp $amp, 12 steps, stopped at step 8 (via $(cat "$WORK/stop-method")) and resumed: resumed vs uninterrupted $resumed; two uninterrupted runs $twice"
  if [[ "$resumed" == equal ]]; then result PASS "$detail"; else result FAIL "$detail"; fi
}
export -f check_resume

check_memory() {  # MODEL
  local model=$1 json="$WORK/memory-$1.json" extra=()
  [[ "$CPU_SMOKE" == 1 ]] && extra=(--img-size 32)
  "$PY" "$REPO/benchmarks/memory.py" --model "$model" --batch-size "$MEM_BATCH" --steps 3 \
    --recipes adamw sgd-freeze-embed sgd-freeze-embed-lowmem --device "$DEVICE" --no-estimate --poll 0 \
    "${extra[@]}" --json-out "$json" --workdir "$WORK/memory"
  local detail
  detail=$("$PY" - "$json" <<'EOF'
import json, sys
res = json.load(open(sys.argv[1]))[0]
rows = {r["recipe"]: (r["cuda_max"] if r["cuda_max"] is not None else r["peak"]) for r in res["rows"]}
what = "cuda max allocated" if res["device"] == "cuda" else "peak RSS (CPU)"
base = rows["adamw"]
print(f"batch {res['batch_size']}, {what}: " + ", ".join(
    f"{k} {v / 2**30:.2f} GiB ({v / base:.2f}x)" for k, v in rows.items()))
EOF
)
  result INFO "$detail"
}
export -f check_memory

check_throughput() {
  local args=(--device "$DEVICE" --cases "$THR_CASE" --models "$THR_MODEL" --pairs "$THR_PAIRS" --workers "$WORKERS")
  [[ -n "$TIMM_SRC" ]] && args+=(--timm-src "$TIMM_SRC")
  "$PY" "$REPO/benchmarks/throughput.py" "${args[@]}" --workdir "$WORK/throughput" --json-out "$WORK/throughput.json"
  local detail
  detail=$("$PY" - "$WORK/throughput.json" <<'EOF'
import json, statistics, sys
res = json.load(open(sys.argv[1]))[0]
med = lambda xs: statistics.median(xs) if xs else None
f = med([p["ftsgd"]["images_per_s"] for p in res["pairs"]])
fw = med([p["ftsgd"]["wall_s"] for p in res["pairs"]])
pairs = [p for p in res["pairs"] if p["timm"]]
text = f"{res['model']}, {res['train_images']} images x {res['epochs']} epochs: ftsgd {f:.0f} img/s, {fw:.1f} s"
if pairs:
    t = med([p["timm"]["images_per_s"] for p in pairs])
    tw = med([p["timm"]["wall_s"] for p in pairs])
    r = med([p["ftsgd"]["images_per_s"] / p["timm"]["images_per_s"] for p in pairs])
    rw = med([p["timm"]["wall_s"] / p["ftsgd"]["wall_s"] for p in pairs])
    text += f"; timm {t:.0f} img/s, {tw:.1f} s; median ratios img/s {r:.2f}x, wall {rw:.2f}x ({len(pairs)} pairs)"
else:
    text += "; timm skipped (set TIMM_SRC to a pytorch-image-models checkout)"
print(text)
EOF
)
  result INFO "$detail"
}
export -f check_throughput

check_compile() {
  local d="$WORK/compile" small sets
  read -ra small <<<"$SMALL_SETS"
  sets=(--model "$COMPILE_MODEL" "${small[@]}" --set train.device="\"$DEVICE\"" --set train.epochs=2 --set train.batch_size=16)
  make_data
  "$PY" -m ftsgd train --data "$WORK/data" --out "$d/eager" "${sets[@]}" --quiet --json >"$d-eager.json"
  "$PY" -m ftsgd train --data "$WORK/data" --out "$d/compiled" "${sets[@]}" --set train.compile=true \
    --quiet --json >"$d-compiled.json"
  local detail
  detail=$("$PY" - "$d" <<'EOF'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
def epochs(run):
    return [json.loads(line) for line in (d / run / "metrics.jsonl").read_text().splitlines() if line.strip()]
e, c = epochs("eager"), epochs("compiled")
acc = lambda h: h[-1]["splits"]["val"]["accuracy"]
print(
    f"epoch 2 img/s: compiled {c[-1]['images_per_s']:.0f} vs eager {e[-1]['images_per_s']:.0f} "
    f"({c[-1]['images_per_s'] / e[-1]['images_per_s']:.2f}x); epoch 1 (compiling) {c[0]['epoch_time_s']:.1f} s "
    f"vs {e[0]['epoch_time_s']:.1f} s; final val accuracy {acc(c):.3f} vs {acc(e):.3f}"
)
EOF
)
  result PASS "$detail"
}
export -f check_compile

check_precision() {
  local args=(--measure --device "$DEVICE" --out "$WORK/precision" --markdown-out "$WORK/precision.md") rc=0
  [[ "$CPU_SMOKE" == 1 ]] && args+=(--quick)
  "$PY" "$REPO/benchmarks/precision_parity.py" "${args[@]}" || rc=$?
  ((rc == 0 || rc == 3)) || return "$rc" # 3: bf16 moved the comparison, a finding, not a failure
  local verdict
  verdict=$(grep -m 1 -E '^\*\*' "$WORK/precision.md" | tr '|' ' ' | cut -c1-400)
  result INFO "fp32 vs bf16, demo --compare on $DEVICE: $verdict"
}
export -f check_precision

# --------------------------------------------------------------------------- runner

declare -a ROWS=()
FAILED=0

# run_check NAME SECONDS_NEEDED COMMAND...: run one check within what is left of the budget.
run_check() {
  local name=$1 need=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START) - 15)) t0=$SECONDS rc=0
  if ((left < need)); then
    ROWS+=("$name|SKIP|not started: ${left}s of the budget left, it needs ~${need}s|0")
    return
  fi
  echo "== $name (up to ${left}s)" >&2
  CHECK=$name timeout -k 10 "$left" bash -c 'set -euo pipefail; "$@"' _ "$@" >"$WORK/logs/$name.log" 2>&1 || rc=$?
  local secs=$((SECONDS - t0)) status detail
  if [[ -f "$WORK/results/$name" ]] && ((rc == 0)); then
    IFS='|' read -r status detail <"$WORK/results/$name"
  elif ((rc == 124 || rc == 137)); then
    status=TIMEOUT detail="stopped at the budget after ${secs}s: $(tail -n 2 "$WORK/logs/$name.log" | tr '\n|' '  ' | cut -c1-300)"
  else
    status=FAIL detail="exit $rc: $(tail -n 3 "$WORK/logs/$name.log" | tr '\n|' '  ' | cut -c1-400)"
  fi
  [[ "$status" == FAIL || "$status" == TIMEOUT ]] && FAILED=1
  ROWS+=("$name|$status|$detail|$secs")
  echo "   $status ($secs s): $detail" >&2
}

env_detail=$("$PY" - "$DEVICE" <<'EOF' 2>&1
import sys
import torch, timm
dev = sys.argv[1]
if dev == "cuda":
    assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
    name = torch.cuda.get_device_name(0)
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, timm {timm.__version__}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
else:
    print(f"CPU smoke run, torch {torch.__version__}, timm {timm.__version__}")
EOF
) && env_ok=1 || env_ok=0
if ((env_ok)); then
  ROWS+=("environment|INFO|$env_detail|0")
  run_check resume-bf16 60 check_resume bf16
  run_check resume-fp16 60 check_resume fp16
  run_check precision 240 check_precision
  for model in $MEM_MODELS; do
    run_check "memory-$model" 90 check_memory "$model"
  done
  run_check throughput 120 check_throughput
  run_check compile 120 check_compile
else
  ROWS+=("environment|FAIL|$(echo "$env_detail" | tail -n 1 | tr '|' ' ')|0")
  FAILED=1
fi

table="| check | result | detail | seconds |
|---|---|---|---|"
for row in "${ROWS[@]}"; do
  IFS='|' read -r name status detail secs <<<"$row"
  table+=$'\n'"| $name | $status | $detail | $secs |"
done
table+=$'\n\n'"Total $((SECONDS - START)) s of a ${BUDGET_S} s budget; $(date -u +%Y-%m-%dT%H:%MZ); commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)."
echo
echo "$table"
if [[ -n "$OUT" ]]; then
  mkdir -p "$OUT/gpu_check_logs"
  echo "$table" >"$OUT/gpu_check.md"
  cp "$WORK"/logs/*.log "$OUT/gpu_check_logs/" 2>/dev/null || true
  cp "$WORK"/*.json "$WORK"/*.md "$OUT/gpu_check_logs/" 2>/dev/null || true
fi
exit "$FAILED"
