"""Local lm-evaluation-harness tasks built from a checkpoint's own data, so downstream evaluation runs offline.

Both are made of disjoint windows of held-out documents (the predict split):
- `xlab_continuation` (4-way multiple choice): the context is a window's first tokens, the choices its own next
  tokens and the next tokens of windows of three other documents; which one is the document's own? A model that
  learned the corpus beats chance (25%) by reading the context.
- `xlab_cloze` (LAMBADA-style cloze): the context is a window up to its last whole word (in the window's second
  half), the target that word; acc = greedy decoding gives the word exactly, perplexity = of the word.
Each task definition is a YAML template beside this file (`_<kind>_template_yaml`); `write_local_tasks` writes the
data as JSONL and a `<task>.yaml` that includes the template and names that file, for
`lm_eval.tasks.TaskManager(include_path=dir)`. Training scores the same items in the loop (inloop.py).
Nothing here imports lm-eval: building the files needs only the tokenizer and the token files.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from xlab.errors import XLabError
from xlab.fsio import write_file
from xlab.schema import Choice

CONTINUATION = "xlab_continuation"
CLOZE = "xlab_cloze"
LOCAL_TASKS = (CONTINUATION, CLOZE)


class LocalTask(Choice):
    """The tasks built from a run's own predict split (this package), which training can score in the loop."""

    xlab_continuation = "xlab_continuation"  # 4-way multiple choice: which continuation is the document's own
    xlab_cloze = "xlab_cloze"  # the passage's next word (LAMBADA-style)

TEMPLATES = {CONTINUATION: Path(__file__).resolve().with_name("_continuation_template_yaml"),
             CLOZE: Path(__file__).resolve().with_name("_cloze_template_yaml")}
NUM_CHOICES = 4
# A cloze target: a whole word of letters after one space, followed by a non-letter inside the window (so the
# window did not cut it); three letters at least, so that it is a word to recall rather than "a" or "of".
CLOZE_WORD = re.compile(r" [A-Za-z]{3,}(?=[^A-Za-z])")


@dataclass(frozen=True)
class ContinuationSpec:
    """What the built task depends on besides the data; part of its cache key."""

    num_docs: int = 400  # items (multiple-choice questions) at most
    windows_per_doc: int = 8  # disjoint items taken from one document: a small predict split still gives a few
                              # hundred items (pydocs' has 20 documents), and no document dominates a big one
    prompt_tokens: int = 32  # context length
    continuation_tokens: int = 16  # length of each choice
    seed: int = 0  # picks the distractors and the position of the true continuation

    def fitted(self, max_len: int) -> ContinuationSpec:
        """The spec shortened so that <sos> + context + a choice fits the model's window: lm-eval would otherwise
        cut the context from the left, and a model with a short window would score a different task."""
        room = max_len - 1
        if self.prompt_tokens + self.continuation_tokens <= room:
            return self
        cont = max(1, min(self.continuation_tokens, room // 3))
        return replace(self, prompt_tokens=max(1, room - cont), continuation_tokens=cont)


def document_windows(tokens, tok, spec: ContinuationSpec) -> list[tuple[int, list[int]]]:
    """(document index, prompt_tokens + continuation_tokens ids) for up to windows_per_doc disjoint windows of each
    document (without <sos>/<eos>), first documents first, num_docs in all."""
    length = spec.prompt_tokens + spec.continuation_tokens
    windows: list[tuple[int, list[int]]] = []
    for i, doc in enumerate(tokens.documents(tok.sos_id, limit=spec.num_docs)):
        body = doc[1:-1] if len(doc) > 1 and doc[-1] == tok.eos_id else doc[1:]
        for start in range(0, min(len(body) - length + 1, spec.windows_per_doc * length), length):
            windows.append((i, body[start: start + length].tolist()))
            if len(windows) == spec.num_docs:
                return windows
    return windows


def continuation_docs(windows: list[tuple[int, list[int]]], tokenizer, spec: ContinuationSpec) -> list[dict]:
    """One multiple-choice item per window: the context is its first prompt_tokens, the choices its own rest and
    the rest of windows of three other documents, in a seeded order."""
    rng = random.Random(spec.seed)
    split = [(doc, tokenizer.decode(ids[:spec.prompt_tokens]), tokenizer.decode(ids[spec.prompt_tokens:]))
             for doc, ids in windows]
    items = []
    for i, (doc, context, truth) in enumerate(split):
        # another document's text, and never the same text: a repeated passage would be a "wrong" right answer
        others = [j for j, (d, _, text) in enumerate(split) if d != doc and text != truth]
        if len(others) < NUM_CHOICES - 1:
            continue
        candidates = [truth] + [split[j][2] for j in rng.sample(others, NUM_CHOICES - 1)]
        order = list(range(NUM_CHOICES))
        rng.shuffle(order)
        items.append({"id": i, "document": doc, "context": context, "choices": [candidates[k] for k in order],
                      "gold": order.index(0)})
    return items


def cloze_docs(windows: list[tuple[int, list[int]]], tokenizer, spec: ContinuationSpec) -> list[dict]:
    """One cloze item per window with a target word in its second half: the context is the text before the last
    such word, the target " word"."""
    items = []
    for i, (doc, ids) in enumerate(windows):
        text = tokenizer.decode(ids)
        words = [m for m in CLOZE_WORD.finditer(text) if m.start() >= len(text) // 2]
        if words:
            items.append({"id": i, "document": doc, "context": text[:words[-1].start()], "target": words[-1].group()})
    return items


BUILDERS = {CONTINUATION: continuation_docs, CLOZE: cloze_docs}


def task_items(datamodule, spec: ContinuationSpec = ContinuationSpec()) -> dict[str, list[dict]]:
    """Each local task's items, built from the predict split of `datamodule` (what its JSONL file holds)."""
    tok = datamodule.tokenizer
    windows = document_windows(datamodule.tokens("predict"), tok, spec)
    items = {name: build(windows, tok, spec) for name, build in BUILDERS.items()}
    if len(items[CONTINUATION]) < NUM_CHOICES or not items[CLOZE]:
        length = spec.prompt_tokens + spec.continuation_tokens
        raise XLabError(f"the local tasks need documents of more than {length} tokens in the predict split, from at "
                        f"least {NUM_CHOICES} different documents; it gives {len(items[CONTINUATION])} "
                        f"{CONTINUATION} and {len(items[CLOZE])} {CLOZE} items (use more data)")
    return items


def write_local_tasks(datamodule, out_dir: str | Path, spec: ContinuationSpec = ContinuationSpec()) -> Path:
    """Write each local task's data (JSONL) and task YAML into out_dir from the predict split of `datamodule`;
    returns out_dir, for TaskManager(include_path=...)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, items in task_items(datamodule, spec).items():
        data = out / f"{name}.jsonl"
        write_file(data, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in items))
        task = {"include": str(TEMPLATES[name]), "task": name, "dataset_kwargs": {"data_files": {"test": str(data)}},
                "metadata": {"version": 1.0, **asdict(spec), "num_items": len(items)}}
        write_file(out / f"{name}.yaml", yaml.safe_dump(task, sort_keys=False))
    return out


def local_tasks_dir(cache_dir: str | Path, datamodule, spec: ContinuationSpec) -> Path:
    """Where the local tasks of this tokenizer, data config and spec live: in the data cache, keyed by all three,
    so checkpoints of one run share them and checkpoint directories hold only weights and their results."""
    tokenizer = Path(datamodule.tokenizer_path).read_bytes()
    key = hashlib.sha256(tokenizer + repr((datamodule.data_cfg, spec)).encode()).hexdigest()[:16]
    return Path(cache_dir) / "lm_eval_tasks" / key
