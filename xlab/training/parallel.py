"""How the model is spread over the ranks: `trainer.strategy=ddp` (Accelerate wraps it in DDP) or `fsdp` (FSDP2).

FSDP is applied here with `fully_shard`, the way torchtitan's `parallelize` does, not through Accelerate's plugin:
Accelerate enables its FSDP plugin on GPUs only (on CPU ranks it silently runs DDP), and one code path for CPU
ranks (gloo) and GPUs (NCCL) is what lets CI prove sharded training. Each transformer Block is one FSDP unit (its
parameters are all-gathered for its forward and backward only), the root module holds the embeddings and head.
The Trainer keeps Accelerate for everything else (process group, autocast, gradient accumulation, trackers,
scheduler and RNG checkpoints); the model and the optimizer, whose state is sharded too, are saved here, through
torch.distributed.checkpoint (DCP), which can load them into another number of ranks.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn

from xlab.checkpoint.layout import SHARDED_DIR
from xlab.checkpoint.write import save_state_dict
from xlab.device import pick_device, resolve_precision
from xlab.errors import XLabError
from xlab.models.transformer import Block
from xlab.schema import Precision

if TYPE_CHECKING:
    from accelerate import Accelerator

    from xlab.training.config import TrainConfig

log = logging.getLogger(__name__)


def check_strategy_config(cfg: TrainConfig) -> None:
    """What XLab's FSDP does not run (yet), and Accelerate's FSDP plugin, refused before any work, each with what
    would run."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise XLabError("ACCELERATE_USE_FSDP=true (an Accelerate launch config with distributed_type: FSDP): XLab "
                        "shards the model itself; launch with a MULTI_GPU config (configs/accelerate/multi_gpu.yaml) "
                        "or torchrun, and pass trainer.strategy=fsdp")
    if cfg.trainer.strategy != "fsdp":
        return
    if cfg.optimizer.name == "muon":
        raise XLabError("optimizer.name=muon does not run under trainer.strategy=fsdp (its Newton-Schulz step needs "
                        "whole matrices, FSDP gives each rank shards); use optimizer=adamw or trainer.strategy=ddp")
    if cfg.trainer.ema_decay is not None:
        raise XLabError(f"trainer.ema_decay={cfg.trainer.ema_decay} does not run under trainer.strategy=fsdp yet (the "
                        "average would need sharding too); use trainer.ema_decay=null or trainer.strategy=ddp")
    if cfg.trainer.compile == "on":  # auto runs FSDP uncompiled
        raise XLabError("trainer.compile=on is not supported with trainer.strategy=fsdp yet; use "
                        "trainer.compile=auto (off under FSDP) or trainer.strategy=ddp")
    if resolve_precision(cfg.trainer.precision, pick_device("auto")) is Precision.fp16:  # auto: a GPU without bf16
        raise XLabError(f"trainer.precision={cfg.trainer.precision} is not supported with trainer.strategy=fsdp"
                        f"{' (auto is fp16 on this GPU)' if cfg.trainer.precision == 'auto' else ''}: no gradient "
                        "scaler on sharded gradients; use trainer.precision=fp32 (or bf16 where the device has it)")


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even on one rank; a single-process run has none (Accelerate makes one only for
    several processes), so make a one-rank group over an in-memory store."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard_model(model: nn.Module, device: torch.device, precision: Precision, reshard_after_forward: bool) -> nn.Module:
    """FSDP2 over all ranks: each Block its own unit, then the root. With bf16, parameters are all-gathered in bf16
    and gradients reduced in fp32 (autocast still decides each op's dtype, as under DDP)."""
    from torch.distributed.device_mesh import init_device_mesh  # FSDP's 0.45 s of start-up: FSDP runs only
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision is Precision.bf16 else MixedPrecisionPolicy()
    model.to(device)
    for block in model.modules():
        if isinstance(block, Block):
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (its shard of a DTensor; a plain tensor is all local). Duck-typed: importing
    DTensor costs DDP runs 0.4 s of start-up."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor result (a collective), e.g. FSDP's gradient norm; plain tensors pass."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_weight_sum(model: nn.Module) -> torch.Tensor:
    """Sum of the weights this rank holds (fp64): all of them under DDP, its shards under FSDP."""
    return sum((local(p.detach()).double().sum() for p in model.parameters()), torch.zeros((), dtype=torch.float64))


def _bytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def memory_per_rank(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state, counted from the real tensors (call
    after backward and step, before zero_grad, when all three exist)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the torch one
    params = list(model.parameters())
    states = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"parameters": _bytes(params), "gradients": _bytes(p.grad for p in params if p.grad is not None),
            "optimizer_state": _bytes(states)}


def memory_line(memory: dict[str, int], strategy: str, world: int) -> str:
    mb = {k: f"{v / 2**20:.3f} MB" for k, v in memory.items()}
    return (f"memory per rank ({strategy}, {world} rank(s)): parameters {mb['parameters']}, gradients "
            f"{mb['gradients']}, optimizer state {mb['optimizer_state']}")


# How a collective reports a rank that died (gloo: its TCP pair closes) or stopped answering (the timeout).
PEER_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Socket Timeout",
                 "gloo", "NCCL")


@contextmanager
def lost_rank_is_an_error(rank: int, world: int, ckpt_root: Path, run_dir: Path) -> Iterator[None]:
    """A collective that fails because another rank died or hung (trainer.collective_timeout_s) ends this rank with
    one line: which rank it lost, where the last complete checkpoint is and how to continue (saves are atomic, so
    a save cut short is never `last`)."""
    try:
        yield
    except RuntimeError as exc:
        message = str(exc)
        if world < 2 or not (isinstance(exc, dist.DistError) or any(m in message for m in PEER_FAILURES)):
            raise
        lost = f"rank {1 - rank}" if world == 2 else "another rank"  # a collective's error names addresses only
        last = ckpt_root / "last"
        kept = f"checkpoints/last is {last.resolve().name}" if last.exists() else "no checkpoint was completed"
        reason = re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\]\s*", "", " ".join(message.split()))  # gloo's source line
        reason = reason.split(". ")[0][:200]
        raise XLabError(f"rank {rank} of {world} lost {lost} ({reason}); {kept}; once every rank can run again, "
                        f"continue with resume=auto hydra.run.dir={run_dir}") from None


def distributed_checkpoint() -> tuple[Any, Any]:
    """torch.distributed.checkpoint and its state_dict helpers, imported when an FSDP run saves or loads (0.5 s of
    start-up that other runs need not pay)."""
    import torch.distributed.checkpoint as dcp  # 0.5 s of start-up: FSDP runs only
    from torch.distributed.checkpoint import state_dict

    return dcp, state_dict


class ShardedState:
    """Model and optimizer state of an FSDP run in a checkpoint: sharded through DCP (each rank writes its shards;
    a later run on any number of ranks reads what it needs), plus the consolidated model.safetensors that evaluate,
    generate and export read, laid out as a DDP run's."""

    def __init__(self, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer

    def save(self, directory: Path, weights_file: Path) -> None:
        """Collective: every rank calls it."""
        dcp, sd = distributed_checkpoint()
        model_state, optim_state = sd.get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory / SHARDED_DIR))
        whole = sd.get_model_state_dict(self.model, options=sd.StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.accelerator.is_main_process:  # cpu_offload gathers onto rank 0 only
            save_state_dict(self.model, whole, weights_file)

    def load(self, ckpt: Path) -> None:
        """Collective. The DCP directory was checked as plain data before (safeload.check_dcp_dir), and that it
        exists (xlab.training.resume.check_strategy)."""
        dcp, sd = distributed_checkpoint()
        model_state, optim_state = sd.get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(ckpt / SHARDED_DIR))
        sd.set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                          optim_state_dict=state["optimizer"])
