"""Prompts from held-out documents (the predict split), and the files that set samples beside the truth.

`python -m xlab.generate ckpt=PATH prompts_from=predict num_prompts=N prompt_tokens=K` takes the first N documents
of the split that are longer than K tokens, prompts the model with `<sos>` and their first K tokens, and writes
each sample next to the document's true continuation: `samples_<split>.jsonl` (one object per prompt) and
`samples_<split>.md` (for reading) in the checkpoint directory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from xlab.data.shards import TokenShards
from xlab.data.tokenizer import XLabTokenizer
from xlab.errors import XLabError
from xlab.fsio import write_file


@dataclass
class Prompt:
    document: int  # index of the document in its split
    prompt_ids: list[int]  # without <sos>
    true_ids: list[int]  # the next tokens of the document (up to max_new_tokens, without <eos>)


@dataclass
class Sample:
    document: int
    prompt: str
    generated: str
    true_continuation: str
    prompt_tokens: int
    generated_tokens: int


def split_prompts(tokens: TokenShards, tok: XLabTokenizer, num_prompts: int, prompt_tokens: int,
                  max_new_tokens: int, split: str = "predict") -> list[Prompt]:
    if num_prompts < 1 or prompt_tokens < 1:
        raise XLabError(f"num_prompts={num_prompts} and prompt_tokens={prompt_tokens} must be >= 1")
    prompts: list[Prompt] = []
    # Documents are read lazily in growing chunks, so a big predict split is not scanned to the end.
    limit = 4 * num_prompts
    while True:
        docs = tokens.documents(tok.sos_id, limit=limit)
        prompts = []
        for i, doc in enumerate(docs):
            body = doc[1:-1] if len(doc) > 1 and doc[-1] == tok.eos_id else doc[1:]
            if len(body) > prompt_tokens:
                prompts.append(Prompt(i, body[:prompt_tokens].tolist(),
                                      body[prompt_tokens : prompt_tokens + max_new_tokens].tolist()))
                if len(prompts) == num_prompts:
                    return prompts
        if len(docs) < limit:  # the whole split was read
            break
        limit *= 4
    if not prompts:
        raise XLabError(f"no document of the {split} split is longer than prompt_tokens={prompt_tokens}")
    return prompts


def _quote(text: str) -> str:
    # split on newlines only: str.splitlines would also break at the control characters a sample may contain
    return "\n".join("> " + line for line in text.split("\n"))


def write_samples(samples: list[Sample], prefix: Path, header: str) -> tuple[Path, Path]:
    """`<prefix>.jsonl` and `<prefix>.md`; returns both paths."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    jsonl, md = prefix.with_name(prefix.name + ".jsonl"), prefix.with_name(prefix.name + ".md")
    text = "".join(json.dumps(asdict(s), ensure_ascii=False) + "\n" for s in samples)
    parts = [f"# {header}\n"]
    for n, s in enumerate(samples, 1):
        parts.append(f"## {n}. document {s.document}\n\n**Prompt** ({s.prompt_tokens} tokens)\n\n{_quote(s.prompt)}\n\n"
                     f"**Model** ({s.generated_tokens} tokens)\n\n{_quote(s.generated)}\n\n"
                     f"**True continuation**\n\n{_quote(s.true_continuation)}\n")
    for path, data in ((jsonl, text), (md, "\n".join(parts))):
        try:
            write_file(path, data)  # replaces a symlink there instead of writing through it
        except OSError as exc:
            raise XLabError(f"cannot write {path}: {exc}") from None
    return jsonl, md
