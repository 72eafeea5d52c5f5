"""`trainer.eval_tasks`: the local tasks scored inside training at every evaluation (OLMo-core's in-loop evaluators).

The items are those that `xlab.evaluate tasks=[...]` scores through lm-eval (the same builders, the first `limit`),
tokenized by lm-eval's rule for causal models (context + continuation encoded whole and split at the context's
length, trailing spaces moved to the continuation, <sos> first, the context cut from the left to fit), so the
accuracy logged at the last step equals lm-eval's on the last checkpoint. Items are dealt to ranks round-robin;
one item is one forward (its choices are the batch), so 1 and N ranks compute the very same batches and the summed
counts are equal. lm-eval is not imported: training does not need the extra.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xlab.evaluation.tasks import CLOZE, CONTINUATION, ContinuationSpec, task_items

# What each task reports (the names lm-eval gives them); the value is the fraction of items right.
METRICS = {CONTINUATION: ("acc", "acc_norm"), CLOZE: ("acc",)}


@dataclass(frozen=True)
class Item:
    """One question: token sequences (one per choice; one for a cloze), how many trailing tokens of each are scored,
    the gold choice and each choice's length in characters (acc_norm divides by it, as lm-eval does)."""

    seqs: list[list[int]]
    scored: list[int]
    gold: int
    chars: list[int]


def continuation_score(logprobs: torch.Tensor, target: torch.Tensor) -> tuple[float, bool]:
    """(summed log-probability of `target` under `logprobs` (n, V), whether greedy decoding gives it): what lm-eval
    asks of a loglikelihood request; XLabLM (xlab/evaluation/harness.py) answers with it too."""
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def encode_pair(tok, context: str, continuation: str, max_len: int) -> tuple[list[int], int]:
    """(<sos> + context ids + continuation ids, cut from the left to max_len + 1: the model reads all but the
    last; the number of continuation tokens)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = [tok.sos_id, *tok.encode(context)]
    cont = tok.encode(context + continuation)[len(ctx) - 1:]  # not always ctx's tokens then these, where BPE merges
    return (ctx + cont)[-(max_len + 1):], len(cont)


def build_items(task: str, docs: list[dict], tok, max_len: int) -> list[Item]:
    items = []
    for doc in docs:
        choices = doc["choices"] if task == CONTINUATION else [doc["target"]]
        pairs = [encode_pair(tok, doc["context"], c, max_len) for c in choices]
        items.append(Item([r for r, _ in pairs], [n for _, n in pairs], doc.get("gold", 0), [len(c) for c in choices]))
    return items


class TaskScorer:
    """The first `limit` items of each local task in `tasks`, built once from the predict split; `score()` runs
    them on the training model."""

    def __init__(self, tasks: list[str], datamodule, max_len: int, limit: int) -> None:
        docs = task_items(datamodule, ContinuationSpec().fitted(max_len))
        self.items = {t: build_items(t, docs[t][:limit], datamodule.tokenizer, max_len) for t in tasks}
        # one input width per task: a compiled training model (trainer.compile) sees one shape, not one per item
        self.width = {t: max(len(s) for item in items for s in item.seqs) - 1 for t, items in self.items.items()}
        self.pad = datamodule.tokenizer.eos_id

    @torch.no_grad()
    def score(self, model: torch.nn.Module, device: torch.device, autocast: Callable[[], AbstractContextManager],
              reduce: Callable[[torch.Tensor], torch.Tensor] | None, rank: int = 0, world: int = 1
              ) -> dict[str, float]:
        """{"tasks/<task>/<metric>": fraction right} over every item, each rank scoring its share. Every rank runs
        the same number of forwards (the short shares repeat an item, uncounted): FSDP's forward is collective."""
        was_training = model.training
        model.eval()
        out = {}
        for task, items in self.items.items():
            counts = torch.zeros(len(METRICS[task]) + 1, dtype=torch.float64, device=device)
            for i in range(rank, math.ceil(len(items) / world) * world, world):
                right = self._judge(task, items[i % len(items)], model, device, autocast)
                counts += torch.tensor([*right, 1.0], dtype=torch.float64, device=device) * (i < len(items))
            if reduce is not None:
                counts = reduce(counts)
            *right, total = counts.tolist()
            out.update({f"tasks/{task}/{m}": r / total for m, r in zip(METRICS[task], right)})
        model.train(was_training)
        return out

    def _judge(self, task: str, item: Item, model, device, autocast) -> list[float]:
        """1.0/0.0 per metric of the task for one item."""
        ids = torch.full((len(item.seqs), self.width[task]), self.pad, dtype=torch.long)
        for j, seq in enumerate(item.seqs):
            ids[j, : len(seq) - 1] = torch.tensor(seq[:-1])  # right padding leaves the real positions' logits alone
        with autocast():
            logits = model(ids.to(device))
        scores, greedy = [], []
        for j, (seq, n) in enumerate(zip(item.seqs, item.scored)):
            end = len(seq) - 1  # position end-1 predicts the last token
            logprobs = F.log_softmax(logits[j, end - n: end].float(), dim=-1)
            score, is_greedy = continuation_score(logprobs, torch.tensor(seq[-n:], device=logprobs.device))
            scores.append(score)
            greedy.append(is_greedy)
        if task == CLOZE:
            return [float(greedy[0])]
        best = max(range(len(scores)), key=scores.__getitem__)  # the first of equal scores, as numpy's argmax
        norm = max(range(len(scores)), key=lambda k: scores[k] / item.chars[k])
        return [float(best == item.gold), float(norm == item.gold)]
