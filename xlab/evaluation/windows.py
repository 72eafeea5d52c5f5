"""Scoring a model on fixed windows of a split: what training's periodic evaluation and `xlab.evaluate` share.

Besides per-token loss, accuracy and perplexity, the score is given in bits per byte: the targets' summed NLL / ln 2
/ the UTF-8 bytes they decode to (a per-token-id table, XLabTokenizer.byte_lengths). Per-token loss depends on the
tokenizer; bits per byte does not, so runs with different tokenizers or vocab sizes compare.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from xlab.checkpoint.read import Checkpoint
from xlab.data.config import Split
from xlab.data.datamodule import XLabDataModule
from xlab.device import autocast_for, pick_device, resolve_precision
from xlab.errors import XLabError
from xlab.fsio import write_file
from xlab.models.transformer import XLabModel
from xlab.schema import AT_LEAST_1, Precision, _check_number, _choose


@torch.no_grad()
def score_windows(
    model: torch.nn.Module,
    windows: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    byte_lengths: torch.Tensor | None = None,
) -> dict[str, float]:
    """Token-level loss, accuracy (%), perplexity and token count over the given windows, and with `byte_lengths`
    (bytes per token id) bits per byte and bytes. With several processes, each passes its share of the windows and
    `reduce` sums the totals across them."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, correct, tokens, bytes
    for x, y in windows:
        x, y = x.to(device), y.to(device)
        with autocast():
            _, batch_loss, batch_correct = model(x, targets=y)
        nbytes = byte_lengths[y].sum() if byte_lengths is not None else totals.new_zeros(())
        totals += torch.stack([batch_loss.double(), batch_correct.double(), totals.new_tensor(y.numel()),
                               nbytes.double()])
    model.train(was_training)
    if reduce is not None:
        totals = reduce(totals)
    loss_sum, correct, count, nbytes = totals.tolist()
    if count == 0:
        raise XLabError("nothing to evaluate: the split has no complete window")
    mean = loss_sum / count
    result = {"loss": mean, "accuracy": 100.0 * correct / count, "perplexity": math.exp(min(mean, 50.0)),
              "tokens": int(count)}
    if byte_lengths is not None:
        result.update(bits_per_byte=bits_per_byte(loss_sum, nbytes), bytes=int(nbytes))
    return result


def bits_per_byte(loss_sum: float, nbytes: float) -> float:
    """Summed NLL in nats → bits per byte of the text it scored (NaN when the targets decode to no byte)."""
    return loss_sum / math.log(2) / nbytes if nbytes > 0 else float("nan")


def score_checkpoint(ckpt: str | Path | Checkpoint, split: str, batch_size: int = 8, max_batches: int | None = None,
                     precision: str = "auto", device: str = "auto", cache_dir: str | None = None) -> dict:
    """Evaluate a checkpoint on a split (every window, or max_batches batches) and write eval_<split>.json beside
    its weights; the result dict."""
    # the numbers and choices, checked as the command line's are
    split = str(_choose(Split, split, "split"))
    _choose(Precision, precision, "precision")
    _check_number("batch_size", batch_size, AT_LEAST_1)
    _check_number("max_batches", max_batches, AT_LEAST_1)
    ckpt = Checkpoint.of(ckpt)
    dev = pick_device(device)
    model = XLabModel.load_from_checkpoint(ckpt, map_location=dev)
    datamodule = XLabDataModule.load_from_checkpoint(ckpt, cache_dir=cache_dir)
    windows = datamodule.eval_windows(split, model.max_len, batch_size, max_batches)
    byte_lengths = torch.as_tensor(datamodule.tokenizer.byte_lengths(), device=dev)
    resolved = resolve_precision(precision, dev)
    result = score_windows(model, windows, dev, autocast_for(dev, resolved), byte_lengths=byte_lengths)
    result["precision"] = str(resolved)
    out = ckpt / f"eval_{split}.json"
    try:
        write_file(out, json.dumps(result, indent=2))  # replaces a symlink there instead of writing through it
    except OSError as exc:
        raise XLabError(f"cannot write {out}: {exc}") from None
    return result

