"""Every model preset, optimizer and schedule trains; compiled runs give plain checkpoints."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from xlab.cli import CONFIG_DIR, register_schema
from xlab.models import XLabModel
from xlab.models.config import ModelConfig
from xlab.training.config import MuonLrScale, OptimizerConfig, SchedulerConfig, TrainConfig
from xlab.training.optimizers import OPTIMIZERS
from xlab.training.schedulers import SCHEDULERS, build_scheduler

register_schema("train", TrainConfig)
PRESETS = sorted(p.stem for p in Path(CONFIG_DIR, "model").glob("*.yaml"))


def group_option(group: str, name: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="train", overrides=[f"{group}={name}"])[group])


def losses_on_repeated_batch(model: XLabModel, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    x = torch.randint(0, model.hparams["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("preset", PRESETS)
def test_model_preset_learns_a_repeated_batch(preset):
    """Each preset's block design at its width, one layer deep (a full gpt2_medium costs a minute here; the
    presets' sizes are checked apart)."""
    torch.manual_seed(0)
    model = XLabModel(128, **{**group_option("model", preset), "n_layer": 1})
    optimizer = OPTIMIZERS.get("adamw")(model, OptimizerConfig(lr=1e-3))
    losses = losses_on_repeated_batch(model, optimizer, 4)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses


def test_gpt2_small_preset_matches_gpt2_parameter_count():
    model = XLabModel(50257, **group_option("model", "gpt2_small"))
    assert model.num_params() == 124_439_808


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_optimizer_learns_a_repeated_batch(name):
    torch.manual_seed(0)
    model = XLabModel(128, **group_option("model", "gpt2_tiny"))
    cfg = OptimizerConfig(**group_option("optimizer", name))
    losses = losses_on_repeated_batch(model, OPTIMIZERS.get(name)(model, cfg), 8)
    assert losses[-1] < losses[0] - 0.1, losses


def test_muon_splits_hidden_matrices_from_the_rest():
    model = XLabModel(128, **{**group_option("model", "gpt2_tiny"), "tie_embeddings": False})
    opt = OPTIMIZERS.get("muon")(model, OptimizerConfig(name="muon", lr=0.02, adam_lr=3e-3))
    muon, adam = opt.optimizers
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    assert id(model.tok_emb.weight) not in muon_ids and id(model.lm_head.weight) not in muon_ids
    assert id(model.blocks[0].attn.qkv.weight) in muon_ids
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 3e-3, 3e-3, 9e-3])  # embeddings at 3 x lr
    n_params = sum(1 for g in opt.param_groups for _ in g["params"])
    assert n_params == len(list(model.parameters()))
    sched = build_scheduler(opt, SchedulerConfig(warmup_steps=10), 100)  # the schedule scales both parts
    assert [g["lr"] for g in muon.param_groups + adam.param_groups] == pytest.approx([0.002, 3e-4, 3e-4, 9e-4])
    assert sched.get_last_lr() == pytest.approx([0.002, 3e-4, 3e-4, 9e-4])


def test_muon_with_adamw_matched_updates_moves_a_matrix_as_far_as_adamw_would():
    """optimizer.muon_lr_scale=match_rms_adamw: an update of RMS 0.2 x lr (AdamW's typical size), so lr and weight
    decay mean what they mean for AdamW; `original` moves a square matrix by lr / sqrt(n) per element."""
    moved = {}
    for scale in MuonLrScale:
        torch.manual_seed(0)
        layer = torch.nn.Linear(64, 256, bias=False)
        model = torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([layer])})
        opt = OPTIMIZERS.get("muon")(model, OptimizerConfig(name="muon", lr=1e-3, weight_decay=0.0,
                                                             muon_lr_scale=scale))
        before = layer.weight.detach().clone()
        layer.weight.grad = torch.randn_like(layer.weight)
        opt.step()
        moved[scale] = (layer.weight.detach() - before).pow(2).mean().sqrt().item()
    # the orthogonalised update of a 256 x 64 matrix has RMS ~ 1/sqrt(256); match_rms_adamw scales it by 0.2 x 16
    assert moved[MuonLrScale.match_rms_adamw] == pytest.approx(0.2e-3, rel=0.3)
    assert moved[MuonLrScale.original] == pytest.approx(2 * 1e-3 / 16, rel=0.3)  # sqrt(256 / 64) = 2


def test_adamw_has_no_decay_on_norms_biases_embeddings():
    model = XLabModel(128, **group_option("model", "gpt2_tiny"))
    # the embeddings (here tied to the head) in a group of their own: optimizer.embed_lr_scale, 3 by default
    decay, no_decay, embed = OPTIMIZERS.get("adamw")(model, OptimizerConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and embed["weight_decay"] == 0.0
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}  # tokens and positions
    assert all(p.dim() == 2 for p in decay["params"]) and {id(p) for p in embed["params"]} == lookups
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert {id(model.blocks[0].norm1.weight), id(model.blocks[0].attn.qkv.bias)} <= no_decay_ids



@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_embeddings_and_head_train_at_their_own_lr_scale(name):
    """optimizer.embed_lr_scale / head_lr_scale: the token embeddings and the untied head get groups of their own at
    lr x scale (muon: its AdamW part's lr), which the schedule scales like the rest; at 1 the groups are as before."""
    model = XLabModel(128, **{**group_option("model", "xlab"), "n_layer": 1, "d_model": 32, "n_head": 2})
    plain = OPTIMIZERS.get(name)(model, OptimizerConfig(name=name, lr=0.01, adam_lr=0.002, embed_lr_scale=1))
    cfg = OptimizerConfig(name=name, lr=0.01, adam_lr=0.002, weight_decay=0.5, embed_lr_scale=3, head_lr_scale=0.5)
    opt = OPTIMIZERS.get(name)(model, cfg)
    assert len(opt.param_groups) == len(plain.param_groups) + 2
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    emb, head = group_of[id(model.tok_emb.weight)], group_of[id(model.lm_head.weight)]
    assert emb["params"] == [model.tok_emb.weight] and head["params"] == [model.lm_head.weight]
    base = 0.002 if name == "muon" else 0.01  # the lr of the AdamW part
    assert (emb["lr"], emb["weight_decay"]) == (pytest.approx(3 * base), 0.0)  # embeddings are never decayed
    assert (head["lr"], head["weight_decay"]) == (pytest.approx(0.5 * base), 0.5)
    assert group_of[id(model.blocks[0].mlp.fc.weight)]["lr"] == pytest.approx(0.01)
    build_scheduler(opt, SchedulerConfig(warmup_steps=10), 100)
    assert (emb["lr"], head["lr"]) == (pytest.approx(0.3 * base), pytest.approx(0.05 * base))


WARMUP, MAX = 10, 110


def lr_curve(name: str, **kw) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = SchedulerConfig(name=name, warmup_steps=WARMUP, min_lr_ratio=0.1, **kw)
    sched = build_scheduler(opt, cfg, max_steps=MAX)
    lrs = []
    for _ in range(MAX + 1):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_schedule_equals_its_formula(name):
    lrs = lr_curve(name, decay_fraction=0.5)
    assert lrs[0] == pytest.approx(1 / WARMUP) and lrs[WARMUP - 1] == pytest.approx(1.0)  # warmup start, end
    mid = (WARMUP + MAX) // 2  # step 60: half way through the post-warmup phase
    expected_mid, expected_end = {
        "cosine": (0.1 + 0.9 * 0.5, 0.1),
        "linear": (1 - 0.9 * 0.5, 0.1),
        "constant": (1.0, 1.0),
        "wsd": (1 - 0.9 * 5 / 55, 0.1),  # stable until step 55 (110 * (1 - 0.5)), then linear to the floor at 110
    }[name]
    assert lrs[mid] == pytest.approx(expected_mid)
    if name == "wsd":
        assert lrs[55] == pytest.approx(1.0) and lrs[30] == pytest.approx(1.0)
    assert lrs[MAX] == pytest.approx(expected_end)


@pytest.mark.parametrize("name", [n for n in SCHEDULERS.names() if n != "cosine"] + ["muon", "sgd"])
def test_schedules_and_optimizers_run_in_the_trainer(name, tmp_path):
    from test_training import tiny_config

    from xlab.training.trainer import train

    cfg = tiny_config(max_steps=6, log_every=2)
    if name in OPTIMIZERS:
        cfg.optimizer = OmegaConf.merge(OmegaConf.structured(OptimizerConfig), group_option("optimizer", name))
    else:
        cfg.scheduler = OmegaConf.merge(OmegaConf.structured(SchedulerConfig), group_option("scheduler", name))
    cfg.scheduler.warmup_steps = 2
    val = train(cfg, tmp_path)
    assert torch.isfinite(torch.tensor(val["loss"]))
    assert (tmp_path / "checkpoints" / "last" / "optimizer.bin").is_file()


def test_compiled_run_checkpoint_loads_into_an_uncompiled_model(tmp_path):
    from safetensors import safe_open

    # aot_eager: the same compiled module (and `_orig_mod.` names) as inductor, without a minute of code generation
    out = run_cli("train", *TINY, "trainer.compile=on", "trainer.compile_backend=aot_eager", "trainer.max_steps=2",
                  "trainer.eval_batches=1", f"hydra.run.dir={tmp_path}").stdout
    assert "torch.compile on\n" in out.replace("\r", "")
    assert re.search(r"first step: \d+\.\d\d s \(torch.compile included\)", out), out
    ckpt = tmp_path / "checkpoints" / "last"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("_orig_mod" in k or k.startswith("module.") for k in keys)
    model = XLabModel.load_from_checkpoint(ckpt)
    assert not hasattr(model, "_orig_mod")
    cfg = ModelConfig(**{k: v for k, v in asdict(model.cfg).items()})
    assert cfg.n_layer == 2
    run_cli("evaluate", f"ckpt={ckpt}", "max_batches=1")


def test_compile_auto_is_on_for_cuda_only_and_never_under_fsdp(monkeypatch):
    from xlab.schema import Switch
    from xlab.training.config import Strategy, TrainerConfig
    from xlab.training.trainer import compile_enabled

    for cuda, strategy, switch, expected in [
        (False, Strategy.ddp, Switch.auto, False), (True, Strategy.ddp, Switch.auto, True),
        (True, Strategy.fsdp, Switch.auto, False), (False, Strategy.ddp, Switch.on, True),
        (True, Strategy.ddp, Switch.off, False),
    ]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert compile_enabled(TrainerConfig(compile=switch, strategy=strategy)) is expected, (cuda, strategy, switch)
    assert TrainerConfig(compile="on").compile is Switch.on  # a string from Python becomes the Choice
