"""The benchmark scripts run end to end at toy sizes and print their tables (no timing is asserted: the figures
live in BENCHMARKS.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"[\d,.]+"


def run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_train_throughput_against_transformers_prints_ratios():
    out = run("train_throughput.py", "--presets", "gpt2_tiny", "llama_tiny", "--set", "n_layer=1", "d_model=32",
              "n_head=2", "n_kv_head=null", "--vocab", "64", "--seq", "16", "--batch", "2", "--steps", "1",
              "--warmup", "1", "--modes", "eager", "--precision", "fp32", "bf16", "--profile", "5")
    for peer in ("GPT2LMHeadModel", "LlamaForCausalLM"):
        rows = re.findall(rf"\| \w+ \| {NUMBER}M \| (fp32|bf16) \| eager \| {NUMBER} \| {peer} \| {NUMBER} \| "
                          rf"\*\*{NUMBER}\*\* \|", out)
        assert rows == ["fp32", "bf16"], out
    assert out.count("#### top ops") == 8 and "aten::mm" in out  # XLab and the peer, 2 models x 2 precisions


def test_attention_benchmark_prints_both_impls():
    out = run("attention.py", "--shapes", "2x2x16", "--head-dim", "8", "--dtype", "fp32", "--steps", "1")
    assert re.search(rf"\| 2x2x16 \| fp32 \| {NUMBER} \| {NUMBER} \| {NUMBER} \|", out), out


def test_train_loop_benchmark_compares_the_trainer_with_the_old_loop():
    out = run("train_throughput.py", "--loop", "--set", "n_layer=1", "d_model=32", "n_head=2", "--vocab", "300",
              "--seq", "16", "--batch", "2", "--steps", "2", "--warmup", "1", "--precision", "fp32", "bf16")
    rows = re.findall(rf"\| (fp32|bf16) \| {NUMBER} \| {NUMBER} \| \*\*{NUMBER}\*\* \|", out)
    assert rows == ["fp32", "bf16"], out
