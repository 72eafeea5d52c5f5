"""lm-evaluation-harness on an XLab checkpoint, without converting it: `XLabLM` is an lm-eval model.

    from xlab.evaluation.harness import XLabLM
    lm = XLabLM(model, tokenizer, batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["xlab_continuation"], task_manager=...)

XLabLM subclasses lm-eval's TemplateLM, so contexts and continuations are tokenized exactly as its HF wrapper does
(context + continuation encoded whole, then split at the context's length; trailing spaces move to the
continuation); the one difference is that XLab's tokenizer adds no <sos>, so tok_encode adds it as training did.
A `format=hf` export scored by lm-eval's HFLM, with a tokenizer that prepends <sos>, therefore sees the same tokens.
Requests are scored in batches sorted longest first (lm-eval's Collator), so padding is small and memory peaks once.

This module imports lm-eval at the top: only `xlab.evaluate` imports it, and only when tasks= is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from xlab.checkpoint.read import Checkpoint
from xlab.data.datamodule import XLabDataModule
from xlab.errors import XLabError
from xlab.evaluation.tasks import LOCAL_TASKS, ContinuationSpec, local_tasks_dir, write_local_tasks
from xlab.evaluation.tasks.inloop import continuation_score
from xlab.fsio import write_file
from xlab.generation.api import cut_at_stop, generate_ids, load_for_decoding
from xlab.generation.config import SamplerConfig
from xlab.generation.fast import for_inference
from xlab.schema import user_cache_dir


class XLabLM(TemplateLM):
    """An XLabModel and its XLabTokenizer as an lm-eval model: loglikelihood, loglikelihood_rolling, generate_until.
    precision: "fp32" (exact) or "bf16": the model's weights are cast to bf16 in place (as HFLM's dtype=bfloat16
    loads them; autocast would cast every weight again at every forward)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise XLabError(f"precision={precision!r} is not valid for XLabLM; valid: fp32, bf16")
        self.model, self.tok, self.batch_size = model.eval(), tokenizer, int(batch_size)
        if precision == "bf16":
            for_inference(self.model, "bf16")

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.sos_id  # what an empty context becomes: every training document starts with it

    @property
    def max_length(self) -> int:
        return self.model.max_len

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return "xlab"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `string`, led by <sos> unless add_special_tokens=False or the text already starts with it
        (HFLM's rules for a tokenizer that adds a BOS)."""
        ids = self.tok.encode(string)
        if add_special_tokens is False or (add_special_tokens is None and string.startswith(self.tok.sos_token)):
            return ids
        return [self.tok.sos_id, *ids]

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]], scored: list[int]) -> list[torch.Tensor]:
        """Per right-padded row, the log-softmax (fp32, on the CPU) of the logits at its last scored[i] positions.
        The head runs on those positions only (for short continuations, most of a small model's FLOPs are the
        head's). Right padding leaves every real position as it is (attention is causal)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tok.eos_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        h = self.model.hidden(ids.to(self.device))
        picked = torch.cat([h[i, len(r) - n: len(r)] for i, (r, n) in enumerate(zip(rows, scored))])
        logprobs = F.log_softmax(self.model.head(picked).float(), dim=-1).cpu()
        return list(logprobs.split(scored))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding would produce it) for each request
        ((key, context ids, continuation ids)); the context is cut from the left to fit max_len."""
        for key, _, cont in requests:
            if len(cont) > self.max_length:
                raise XLabError(f"a continuation of {len(cont)} tokens is longer than max_len={self.max_length} "
                                f"({str(key)[:60]!r}); use a task with shorter answers")
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            logprobs = self._logprobs(rows, [len(cont) for _, _, cont in chunk])
            for (key, _, cont), picked in zip(chunk, logprobs):  # picked: the positions predicting the continuation
                score, greedy = continuation_score(picked, torch.tensor(cont))
                results.append((score, greedy))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, (score, greedy))
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, scored in disjoint windows of max_len tokens (each window but the
        first sees the previous tokens up to max_len as context; the first sees <sos>)."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context (sampled when a task asks do_sample with a temperature), cut at the
        first of its `until` strings; batched by generation settings, longest context first."""
        args = [req.args for req in requests]
        collator = Collator(args, sort_fn=lambda a: (-len(a[0]), a[0]), group_by="gen_kwargs", group_fn=lambda a: a[1])
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            cfg, max_new = self._sampler(chunk[0][1])
            keep = max(self.max_length - 1 - max_new, 0)  # <sos> + context + generated tokens fit max_len
            prompts = [self.tok.encode(context) for context, _ in chunk]
            prompts = [p[len(p) - keep:] if len(p) > keep else p for p in prompts]
            texts = [""] * len(chunk)
            for row, tokens, _ in generate_ids(self.model, self.tok, prompts, cfg, max_new, seed=0):
                texts[row] = cut_at_stop(self.tok.decode(tokens), cfg.stop)[0]
            for (context, kwargs), text in zip(chunk, texts):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, kwargs), text)
        return collator.get_original(results)

    def _sampler(self, gen_kwargs: dict):
        """SamplerConfig and max new tokens for one group of lm-eval generation settings."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks", 256))
        max_new = max(0, min(max_new, self.max_length - 2))  # leave room for <sos> and one context token
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        if gen_kwargs.get("do_sample") and temperature > 0:
            return SamplerConfig(name="multinomial", temperature=temperature, stop=until), max_new
        return SamplerConfig(name="greedy", temperature=0.0, stop=until), max_new


# --- running tasks: names -> lm-eval's TaskManager -> simple_evaluate -> eval_tasks.json --------------------------

_FULL_INDEX: dict[tuple[str, ...], object] = {}  # lm-eval's full task index takes ~15 s to build: once per process


def task_manager(tasks: list[str], paths: list[str]):
    """A TaskManager that knows every name in `tasks`, or a one-line error naming the unknown ones. Only local task
    folders are indexed when they cover the names (fast); lm-eval's own ~15k task index only when they do not."""
    local = TaskManager(include_path=paths or None, include_defaults=False) if paths else None
    if local is not None and all(t in local.all_tasks for t in tasks):
        return local
    key = tuple(paths)
    if key not in _FULL_INDEX:
        _FULL_INDEX[key] = TaskManager(include_path=paths or None)
    manager = _FULL_INDEX[key]
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise XLabError(f"tasks={unknown} unknown to lm-eval {lm_eval_version()}; local tasks: "
                        f"{', '.join(local_names(paths))} (lm-eval's own: `lm_eval ls tasks`)")
    return manager


def local_names(paths: list[str]) -> list[str]:
    return sorted({*LOCAL_TASKS, *(p.stem for d in paths for p in Path(d).rglob("*.yaml"))})


def check_fetchable(tasks: list[str], manager) -> None:
    """Load each task (its dataset included) before any scoring, so that a hub task that cannot be fetched here
    fails in one line naming it, not as a traceback from deep inside datasets."""
    for name in tasks:
        try:
            manager.load([name])
        # datasets raises ConnectionError offline, FileNotFoundError/ValueError for a missing or bad local file
        except (OSError, ConnectionError, ValueError, ImportError) as exc:
            detail = (str(exc).strip().splitlines() or [""])[0][:200]
            raise XLabError(f"task {name!r} cannot be loaded here ({type(exc).__name__}: {detail}); offline, run a "
                            "local task (tasks=[xlab_continuation]) or an lm-eval YAML over local files "
                            "(task_path=DIR)") from None


def lm_eval_version() -> str:
    return lm_eval.__version__


def run_tasks(lm, tasks: list[str], manager, num_fewshot: int = 0, limit: int | None = None,
              log_samples: bool = False) -> dict:
    """lm-eval's simple_evaluate of `lm` on `tasks`; its results dict."""
    check_fetchable(tasks, manager)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                   task_manager=manager, log_samples=log_samples, bootstrap_iters=1000,
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def result_rows(results: dict, limit: int | None) -> list[dict]:
    """One row per task and metric: task, metric, value, stderr, n-shot, limit, lm-eval version."""
    rows = []
    version = lm_eval_version()
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")  # "acc,none": metric and filter; bookkeeping has no comma
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "num_fewshot": results.get("n-shot", {}).get(task), "limit": limit,
                         "lm_eval_version": version})
    return rows


def score_tasks(ckpt: str | Path | Checkpoint, tasks: list[str], num_fewshot: int = 0, limit: int | None = None,
                batch_size: int = 8, precision: str = "fp32", device: str | torch.device = "cpu",
                cache_dir: str | None = None, task_path: str | None = None) -> tuple[dict, Path]:
    """Run lm-eval `tasks` on a checkpoint and write eval_tasks.json beside its weights; (lm-eval's results, path).
    The local tasks (tasks/) are built from the checkpoint's own predict split into the data cache."""

    ckpt = Checkpoint.of(ckpt)
    if task_path is not None and not Path(task_path).expanduser().is_dir():
        raise XLabError(f"task_path={task_path!r} is not a directory (of lm-eval task YAML files)")
    # loaded as generate and serve load a checkpoint; XLabLM casts to `precision` itself
    model = load_for_decoding(ckpt, torch.device(device), "fp32", compile="off", announce=False).model
    datamodule = XLabDataModule.load_from_checkpoint(ckpt, cache_dir=cache_dir)
    paths = [str(Path(task_path).expanduser().resolve())] if task_path else []
    if any(t in LOCAL_TASKS for t in tasks):
        spec = ContinuationSpec().fitted(model.max_len)
        paths.insert(0, str(write_local_tasks(datamodule, local_tasks_dir(cache_dir or user_cache_dir(), datamodule,
                                                                          spec), spec)))
    manager = task_manager(tasks, paths)
    lm = XLabLM(model, datamodule.tokenizer, batch_size, precision)
    results = run_tasks(lm, tasks, manager, num_fewshot, limit)
    out = ckpt / "eval_tasks.json"
    record = {"checkpoint": str(ckpt), "rows": result_rows(results, limit), "task_dirs": paths,
              "precision": precision, "lm_eval_version": lm_eval_version()}
    try:
        write_file(out, json.dumps(record, indent=2))  # atomic; replaces a symlink there instead of writing through
    except OSError as exc:
        raise XLabError(f"cannot write {out}: {exc}") from None
    return results, out
