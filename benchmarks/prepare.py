"""Benchmark `python -m xlab.prepare` on synthetic Wikipedia-schema corpora: throughput and peak memory.

    python benchmarks/prepare.py                       # 50 MB and 200 MB corpora, all cores
    python benchmarks/prepare.py --sizes 50 --num-proc 2

For each size it writes a corpus of parquet shards (id, url, title, text; xlab/data/synthetic.py; kept in --workdir
for reruns), then runs the real CLI (`data=wikipedia data.data_files=...`) in a fresh cache and reports:
  - end-to-end MB/s per core: corpus MB / wall time of the whole command (start-up, ids pass, tokenizer training
    on a fixed sample of tokenizer.train_docs articles, tokenization, shard writing) / cores; and corpus MB per
    CPU-second of all its processes, which is the same figure on an idle machine but is not lowered by other load;
  - tokenization: the tokenize-and-write stage alone, as logged by the preparation: MB/s per process (wall) and
    MB per CPU-second (its main process plus its workers);
  - peak RSS: the largest sum of resident memory over the process and its worker processes (sampled every 50 ms),
    and the largest single process.
Goals (issue 5): peak RSS of the 200 MB run within 20% of the 50 MB run and under 1.5 GB; >= 5 MB/s per core.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from xlab.data.synthetic import write_wikipedia_parquet  # noqa: E402


def corpus(workdir: Path, mb: int) -> tuple[Path, float]:
    """The corpus directory for `mb` MB (written once) and its exact text size in MB."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = workdir / f"wiki_{mb}mb"
    if not (out / "done").exists():
        t0 = time.perf_counter()
        write_wikipedia_parquet(out, mb=mb, shards=max(2, mb // 25), seed=mb)
        (out / "done").write_text("")
        print(f"wrote {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    size = 0
    for f in sorted(out.glob("*.parquet")):
        t = pq.read_table(f, columns=["title", "text"])
        size += sum(pc.sum(pc.binary_length(t[c])).as_py() for c in ("title", "text"))
    return out, size / 1e6


def run(data_dir: Path, args: argparse.Namespace, cache: Path) -> dict:
    cmd = [sys.executable, "-m", "xlab.prepare", "data=wikipedia", f"data.data_files={data_dir}/*.parquet",
           f"tokenizer.vocab_size={args.vocab_size}", f"tokenizer.train_docs={args.train_docs}",
           f"data.num_proc={args.num_proc}", f"hydra.run.dir={cache / 'run'}", "logger=none"]
    env = {**os.environ, "XLAB_CACHE_DIR": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    log_path = cache / "prepare.out"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = psutil.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak_sum = peak_one = 0
        while proc.poll() is None:
            try:
                procs = [proc, *proc.children(recursive=True)]
                rss = [p.memory_info().rss for p in procs]
            except psutil.Error:
                continue
            peak_sum, peak_one = max(peak_sum, sum(rss)), max(peak_one, max(rss))
            time.sleep(0.05)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the worker processes, which were waited for
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out = log_path.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    m = re.search(r"tokenized ([\d.]+) MB of text in ([\d.]+) s .*, ([\d.]+) MB per CPU-second", out)
    return {"wall": wall, "cpu": cpu, "peak_sum": peak_sum, "peak_one": peak_one,
            "tok_mb": float(m.group(1)), "tok_s": float(m.group(2)), "tok_cpu": float(m.group(3)), "log": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200], help="corpus sizes in MB")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "xlab_bench_prepare")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--num-proc", type=int, default=cores, help="tokenization processes (default: all cores)")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--train-docs", type=int, default=5000, help="tokenizer sample (the same for every size)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    rows = []
    for mb in args.sizes:
        data_dir, text_mb = corpus(args.workdir, mb)
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            r = run(data_dir, args, Path(tmp))
        rows.append((mb, text_mb, r))
        print(f"{mb} MB: {r['wall']:.1f} s, peak RSS {r['peak_sum'] / 2**20:.0f} MiB", flush=True)

    load = os.getloadavg()[0]
    print(f"\ncores: {cores}, tokenization processes: {args.num_proc}, vocab {args.vocab_size}, "
          f"tokenizer sample {args.train_docs} articles, load average before the last run {load:.1f}")
    print("| corpus | text MB | wall s | CPU s | end-to-end MB/s per core (wall) | end-to-end MB per CPU-s | "
          "tokenization MB/s per process (wall) | tokenization MB per CPU-s | peak RSS (all processes) | "
          "peak RSS (largest process) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mb, text_mb, r in rows:
        print(f"| {mb} MB | {text_mb:.1f} | {r['wall']:.1f} | {r['cpu']:.1f} | {text_mb / r['wall'] / cores:.2f} | "
              f"{text_mb / r['cpu']:.2f} | {r['tok_mb'] / r['tok_s'] / args.num_proc:.2f} | {r['tok_cpu']:.2f} | "
              f"{r['peak_sum'] / 2**20:.0f} MiB | {r['peak_one'] / 2**20:.0f} MiB |")
    if len(rows) >= 2:
        small, big = rows[0][2], rows[-1][2]
        print(f"\npeak RSS (all processes) {rows[-1][0]} MB / {rows[0][0]} MB: "
              f"{big['peak_sum'] / small['peak_sum']:.2f}")

if __name__ == "__main__":
    main()
