#!/usr/bin/env bash
# GPU checks and benchmarks in ONE call on a lent GPU machine (budget: < 8 minutes). Prints everything; files go
# to $OUT (the device tool returns them). Assumes torch with CUDA and XLab's Python dependencies are importable
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

train() {  # name, extra overrides...: a short gpt2_small run; prints the last train line (tok/s per device, MFU)
  local name=$1; shift
  log "train $name: $*"
  timeout 240 "$@" model=gpt2_small tokenizer.vocab_size=8192 trainer.precision=bf16 \
    trainer.max_steps=40 trainer.log_every=10 trainer.eval_every=1000 trainer.eval_batches=4 trainer.ckpt_every=1000 \
    logger=none overwrite=true hydra.run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "exit $?"; grep -E "model:|process\(es\)|final val" "$OUT/$name.log" | tail -3
  tail -n 2 "$OUT/$name/metrics.jsonl" 2>/dev/null | head -1
}

# the training step against transformers on the GPU: gpt2_small shape, context 1024, bf16, eager and compiled
log "train step: XLab vs transformers"
timeout 200 python benchmarks/train_throughput.py --device cuda --presets gpt2_small --set --seq 1024 --batch 16 \
  --vocab 8192 --precision bf16 --steps 10 --warmup 3 || true
# 1 GPU, compiled, SDPA (flash) attention, the largest of these batches that fits: tok/s and MFU from the trainer
train b32_compiled python -m xlab.train trainer.batch_size=32 trainer.compile=true
train b64_compiled python -m xlab.train trainer.batch_size=64 trainer.compile=true
# torchrun with FSDP2 (1 process: a smoke test of the launch and the sharded checkpoint path)
train fsdp_torchrun torchrun --nproc_per_node 1 -m xlab.train trainer.batch_size=16 trainer.strategy=fsdp
log "fsdp checkpoint evaluates"
timeout 60 python -m xlab.evaluate ckpt="$OUT/fsdp_torchrun/checkpoints/last" max_batches=4 || true

log "decode: XLab vs transformers on the GPU"
timeout 120 python benchmarks/generate.py --device cuda --repeats 2 || true
log "done"
