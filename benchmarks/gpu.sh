#!/usr/bin/env bash
# GPU checks and benchmarks in ONE call on a lent GPU machine (budget: < 9 minutes). Prints everything and ends
# with one summary table (also $OUT/summary.md); files go to $OUT (the device tool returns them). Assumes torch with CUDA and XLab's Python dependencies are importable
# there (the machine has no network); it says what is missing and stops otherwise.
#   bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/xlab_gpu}
mkdir -p "$OUT"
export XLAB_CACHE_DIR="$OUT/cache" WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=$PWD
log() { echo "== $(date +%T) $*"; }

log "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python - <<'PY' || { echo "torch/CUDA or an XLab dependency is missing: stop"; exit 1; }
import torch, hydra, accelerate, tokenizers, datasets, safetensors, einops  # noqa: F401
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(), "bf16",
      torch.cuda.is_bf16_supported())
PY

ROWS=()
summarize() {  # name, exit code: one row of the summary table from $OUT/<name>/metrics.jsonl
  ROWS+=("$(python - "$1" "$2" "$OUT/$1" <<'PY'
import json, sys
from pathlib import Path
name, rc, run = sys.argv[1], sys.argv[2], Path(sys.argv[3])
lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
train = [r for r in lines if "tok_per_s_per_device" in r]
last = train[-1] if train else {}
val = [r["val/loss"] for r in lines if "val/loss" in r]
print(f"| {name} | {rc} | {last.get('step', '-')} | {last.get('tok_per_s_per_device', 0):.0f} | "
      f"{100 * last.get('mfu', 0):.1f}% | {last.get('train/loss', float('nan')):.3f} | "
      f"{val[-1] if val else float('nan'):.3f} |")
PY
)")
}

train() {  # name, command...: a short gpt2_small run; prints the last train line (tok/s per device, MFU)
  local name=$1; shift
  log "train $name: $*"
  timeout 240 "$@" model=gpt2_small tokenizer.vocab_size=8192 trainer.precision=bf16 \
    trainer.max_steps=40 trainer.log_every=10 trainer.eval_every=1000 trainer.eval_batches=4 trainer.ckpt_every=1000 \
    logger=none overwrite=true hydra.run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "exit $rc"; grep -E "model:|process\(es\)|memory per rank|final val" "$OUT/$name.log" | tail -4
  tail -n 2 "$OUT/$name/metrics.jsonl" 2>/dev/null | head -1
  summarize "$name" "$rc"
}

# the training step against transformers on the GPU: gpt2_small shape, context 1024, bf16, eager and compiled
log "train step: XLab vs transformers"
timeout 200 python benchmarks/train_throughput.py --device cuda --presets gpt2_small --set --seq 1024 --batch 16 \
  --vocab 8192 --precision bf16 --steps 10 --warmup 3 || true
# 1 GPU, compiled, SDPA (flash) attention, the largest of these batches that fits: tok/s and MFU from the trainer
train b32_compiled python -m xlab.train trainer.batch_size=32 trainer.compile=on
train b64_compiled python -m xlab.train trainer.batch_size=64 trainer.compile=on
# DDP and FSDP2 (xlab/parallel.py) under torchrun: world size 1, and every GPU when there are several
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
for n in $(printf "1\n%s\n" "$NGPU" | sort -un); do
  [ "$n" -ge 1 ] || continue
  train "ddp_x$n" torchrun --standalone --nproc_per_node "$n" -m xlab.train trainer.batch_size=16
  train "fsdp_x$n" torchrun --standalone --nproc_per_node "$n" -m xlab.train trainer.batch_size=16 trainer.strategy=fsdp
done
log "fsdp checkpoint evaluates"
timeout 60 python -m xlab.evaluate ckpt="$OUT/fsdp_x1/checkpoints/last" max_batches=4 || true
# experiment=wiki_large as it is (GPT-2 small shape, 32k BPE, bf16, grad accumulation) on a synthetic corpus with
# Wikipedia's parquet schema (the hub is unreachable): ~50 steps, smaller accumulation to fit the budget
log "wiki_large on a synthetic Wikipedia-schema corpus"
python -c "from pathlib import Path; from xlab.data.synthetic import write_wikipedia_parquet as w; \
w(Path('$OUT/wiki'), mb=20, shards=4, row_group_size=500)" || true
WIKI=(experiment=wiki_large "data.data_files=$OUT/wiki/*.parquet" trainer.grad_accum_steps=2
      trainer.max_steps=50 scheduler.warmup_steps=10 trainer.eval_every=25 trainer.eval_batches=4)
log "train wiki_large: ${WIKI[*]}"
timeout 300 python -m xlab.train "${WIKI[@]}" logger=none overwrite=true hydra.run.dir="$OUT/wiki_large" \
  > "$OUT/wiki_large.log" 2>&1
rc=$?; summarize wiki_large $rc
echo "exit $rc"; grep -E "model:|process\(es\)|final val|tokenizer bytes" "$OUT/wiki_large.log" | tail -4

log "decode: XLab vs transformers on the GPU"
timeout 240 python benchmarks/generate.py --device cuda --shape gpt2_small --repeats 2 || true
log "summary (gpt2_small shape, bf16: 40-step runs, wiki_large 50; tok/s and MFU of the last log interval)"
{
  echo "| run | exit | step | tok/s per device | MFU | train loss | val loss |"
  echo "|---|---|---|---|---|---|---|"
  printf "%s\n" "${ROWS[@]}"
} | tee "$OUT/summary.md"
log "done"
