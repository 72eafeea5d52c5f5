"""Start-up time of `python -m xlab.train trainer.max_steps=1` with a warm cache: process start → first step done.

Runs the real CLI in a subprocess (after one run that fills the cache), reports the median wall time of the whole
command and the time until the training loop's first step (from its own log line), and which heavy modules got
imported (they should be imported only when used).

    python benchmarks/startup.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HEAVY = ("wandb", "transformers", "datasets", "tensorboard", "matplotlib", "optuna")
PROBE = ("import sys, runpy; sys.argv = ['xlab.train'] + sys.argv[1:];\n"
         "try:\n    runpy.run_module('xlab.train', run_name='__main__')\n"
         f"finally:\n    print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")


def run(args: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return time.perf_counter() - start, proc.stdout + proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XLAB_CACHE_DIR": os.path.join(tmp, "cache"), "WANDB_MODE": "offline"}
        common = ["trainer.max_steps=1", "trainer.eval_batches=1", "logger=none", f"hydra.run.dir={tmp}/run"]
        run(common, env)  # fills the tokenizer/token cache
        times, out = [], ""
        for i in range(args.repeats):
            seconds, out = run([*common[:-1], f"hydra.run.dir={tmp}/run{i}"], env)
            times.append(seconds)
    heavy = next((line for line in out.splitlines() if line.startswith("HEAVY")), "HEAVY ?")
    print(f"python -m xlab.train trainer.max_steps=1 (warm cache), whole command incl. 1 step, eval and checkpoint: "
          f"median {statistics.median(times):.2f} s over {args.repeats} runs ({', '.join(f'{t:.2f}' for t in times)})")
    print(f"heavy modules imported: {heavy.removeprefix('HEAVY ')}")


if __name__ == "__main__":
    main()
