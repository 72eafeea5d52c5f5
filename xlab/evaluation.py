"""Scoring a model on fixed windows of a split: what training's periodic evaluation and `xlab.evaluate` share.

Besides per-token loss, accuracy and perplexity, the score is given in bits per byte: the targets' summed NLL / ln 2
/ the UTF-8 bytes they decode to (a per-token-id table, XLabTokenizer.byte_lengths). Per-token loss depends on the
tokenizer; bits per byte does not, so runs with different tokenizers or vocab sizes compare.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch

from xlab.errors import XLabError


@torch.no_grad()
def evaluate(
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
