"""The benchmark scripts run end to end at toy sizes and print their tables (no timing is asserted: the figures
live in BENCHMARKS.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert re.search(r"^# .*, ISA (AMX|AVX512-BF16|AVX512|AVX2|other), ", out, re.M), out  # the tables are per ISA
    for peer in ("ReferenceGPT", "GPT2LMHeadModel", "LlamaForCausalLM"):
        rows = re.findall(rf"\| \w+ \| {NUMBER}M \| (fp32|bf16) \| eager \| {NUMBER} \| {peer} \| {NUMBER} \| "
                          rf"\*\*{NUMBER}\*\* \|", out)
        assert rows == ["fp32", "bf16"], out
    ours, theirs = re.search(rf"loss at init XLab ({NUMBER}), ReferenceGPT ({NUMBER})", out).groups()
    assert ours == theirs, out  # the same weights: the race is between two ways of computing one model
    assert out.count(" | - / - |\n") == 6, out  # MFU: no known peak for a CPU (xlab/training/mfu.py), so none claimed
    # XLab and its peers (gpt2: the plain GPT and transformers; llama: transformers) at 2 precisions
    assert out.count("#### top ops") == 10 and "aten::mm" in out


def test_reference_gpt_computes_xlab_gpt_loss_and_gradients():
    import importlib.util

    import torch

    from xlab.models import XLabModel

    spec = importlib.util.spec_from_file_location("reference_gpt", ROOT / "benchmarks" / "reference_gpt.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    x = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    for bias in (True, False):
        model = XLabModel(50, n_layer=2, n_head=2, d_model=16, max_len=8, pos_emb="learned", norm="layernorm",
                          mlp="gelu", bias=bias, tie_embeddings=True)
        ref = reference.ReferenceGPT.like(model)
        ours = model(x[:, :-1], targets=x[:, 1:]).objective / x[:, 1:].numel()
        theirs = ref(x[:, :-1], x[:, 1:])
        torch.testing.assert_close(ours, theirs)
        ours.backward(), theirs.backward()
        torch.testing.assert_close(model.blocks[0].attn.qkv.weight.grad, ref.blocks[0].attn.qkv.weight.grad)
        torch.testing.assert_close(model.tok_emb.weight.grad, ref.tok_emb.weight.grad)
    with pytest.raises(ValueError, match="GPT-2 block only"):  # the default, Llama-style block
        reference.ReferenceGPT.like(XLabModel(50, n_layer=1, d_model=16, n_head=2, max_len=8))


def test_attention_benchmark_prints_both_impls():
    out = run("attention.py", "--shapes", "2x2x16", "--head-dim", "8", "--dtype", "fp32", "--steps", "1")
    assert re.search(rf"\| 2x2x16 \| fp32 \| {NUMBER} \| {NUMBER} \| {NUMBER} \|", out), out


def test_dropout_benchmark_prints_every_variant():
    out = run("dropout.py", "--shapes", "4x8", "--steps", "1", "--dtype", "fp32")
    assert re.search(rf"\| 4x8 \| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER}x \|", out), out


def test_train_loop_benchmark_compares_the_trainer_with_the_old_loop():
    out = run("train_throughput.py", "--loop", "--set", "n_layer=1", "d_model=32", "n_head=2", "--vocab", "300",
              "--seq", "16", "--batch", "2", "--steps", "2", "--warmup", "1", "--precision", "fp32", "bf16")
    rows = re.findall(rf"\| (fp32|bf16) \| {NUMBER} \| {NUMBER} \| \*\*{NUMBER}\*\* \|", out)
    assert rows == ["fp32", "bf16"], out


def test_recipe_baseline_is_still_the_default_of_commit_435677f():
    """benchmarks/recipes.py's gpt2_900 rows are "the previous default": as today's defaults move, its overrides
    must still compose to that commit's optimizer, schedule and block (its config, saved in tests/fixtures)."""
    import importlib.util

    import yaml
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from xlab.cli import CONFIG_DIR, register_schema
    from xlab.training.config import TrainConfig

    spec = importlib.util.spec_from_file_location("recipes", ROOT / "benchmarks" / "recipes.py")
    recipes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipes)
    overrides, steps = recipes.RECIPES["gpt2_900"]
    assert steps == recipes.BASELINE_STEPS == 900
    register_schema("train", TrainConfig)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="train", overrides=overrides))
    old = yaml.safe_load((ROOT / "tests/fixtures/ckpt_435677f/step_000003/config.yaml").read_text())
    assert cfg["optimizer"]["name"] == "adamw"  # keys added since (muon_lr_scale) do not touch AdamW, or are at 1
    assert (cfg["optimizer"]["embed_lr_scale"], cfg["optimizer"]["head_lr_scale"]) == (1, 1)
    assert {k: v for k, v in cfg["optimizer"].items() if k in old["optimizer"]} == old["optimizer"]
    assert {k: v for k, v in cfg["scheduler"].items() if k != "warmup_steps"} == \
        {k: v for k, v in old["scheduler"].items() if k != "warmup_steps"}
    sizes = {"n_layer", "n_head", "d_model", "max_len"}  # the fixture is a tiny model of that commit's block
    assert {k: v for k, v in cfg["model"].items() if k in old["model"] and k not in sizes} == \
        {k: v for k, v in old["model"].items() if k not in sizes}
    assert cfg["trainer"]["small_data_regularization"] is False


def test_generate_benchmark_compares_every_mode_with_transformers():
    out = run("generate.py", "--shape", "custom", "--layers", "1", "--d-model", "32", "--heads", "2", "--vocab", "64",
              "--new-tokens", "4", "--prompt-tokens", "4", "--repeats", "1", "--batches", "1", "--copy-mb", "16",
              "--modes", "dynamic", "static", "--dtypes", "fp32", "int8")
    assert re.search(rf"copy bandwidth {NUMBER} GB/s", out), out
    for decoding in ("greedy", "beam-4"):
        rows = re.findall(rf"\| {decoding} \| 1 \| (XLab|transformers) \| (fp32|int8) \| (dynamic|static) \| eager \| "
                          rf"{NUMBER} \| {NUMBER} \| {NUMBER}% \| - \| - \|", out)
        assert rows == [("XLab", d, c) for d in ("fp32", "int8") for c in ("dynamic", "static")] + \
            [("transformers", "fp32", "dynamic")], out
    assert "tokens: XLab fp32 == transformers fp32 (greedy batch 1: dynamic eager, static eager)" in out, out
    assert re.search(rf"fraction of tokens equal to fp32's: XLab int8 dynamic eager {NUMBER}; "
                     rf"XLab int8 static eager {NUMBER}", out), out
    assert "failed" not in out, out



def test_prefill_benchmark_prints_both_heads():
    out = run("prefill.py", "--shape", "small", "--prompt-tokens", "16", "--repeats", "1")
    assert re.search(rf"\| small \| 16 \| {NUMBER} \| {NUMBER} \| {NUMBER}x \|", out), out


def test_recipes_at_equal_time_against_the_nanogpt_recipe(tmp_path: Path):
    """--budget: the nanoGPT README CPU recipe (reference_gpt.py, its own loop) and XLab's default, each for the same
    seconds of training steps (xlab.training.budget), scored on the test split in bits per byte."""
    import json

    out = run("recipes.py", "--budget", "2", "--corpora", "pydocs", "--recipes", "nanogpt", "default", "--out",
              str(tmp_path))
    rows = {r["recipe"]: r for r in map(json.loads, (tmp_path / "budget.jsonl").read_text().splitlines())}
    assert set(rows) == {"nanogpt", "default"}
    for row in rows.values():
        assert row["budget_s"] == 2 and row["steps"] >= 11 and 0 < row["test_bpb_best"] < 20
    # how many steps fit the budget depends on the machine's load: tests/test_budget.py checks the plan itself
    row = rf"\| pydocs \| {{}} \| 1 \| {NUMBER} \| {NUMBER} ± 0.0000 \| {NUMBER} \| {{}} \|"
    assert re.search(row.format("nanogpt", r"\+0.0%"), out), out
    assert re.search(row.format("default", rf"[+-]{NUMBER}%"), out), out
