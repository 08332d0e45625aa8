"""Peak resident memory of ``lm.train`` on WikiText-2 train x1 and x50 (about 100 M tokens).

Prepared data is memory-mapped and the sampler reads only the length column, so the
trainer's own memory should not grow with the corpus. Each run trains a fixed number of
steps of the same small model, with ``num_workers`` 0 and 2, and reports the peak RSS of
the trainer process (``ru_maxrss``) and of its whole process tree (workers included,
sampled every 0.1 s; shared pages of the memory-mapped files count once per process, so
the tree figure over-counts them).

Each configuration runs twice, interleaved: as shipped (allocator tuned at start-up by
:func:`lm.runtime.tune_allocator`, which keeps freed blocks in the process) and with
``RNNLM_MALLOC_TUNING=0`` (glibc's defaults, the trainer before issue 13), so the table shows
what keeping the blocks costs in peak RSS. ``--repeat 1`` runs WikiText-2 x1 only.

Usage: python bench/train_memory.py [--data ../shared/data/wikitext-2] [--repeat 50] [--steps 60]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.embed_dim=64", "model.hidden_size=64", "model.num_layers=1", "model.tie_weights=true",
         "model.locked_dropout=false", "train.max_tokens=4096", "train.plot=false", "train.prompts=[]", "train.epochs=null",
         "train.schedule=constant", "train.warmup_steps=0", "train.eval_every=null", "train.device=cpu",
         "train.mode=sequence", "train.batch_size=null", "model.adaptive_cutoffs=null"]


def _tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and its descendants, from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(x.split()[1]) for x in f if x.startswith("VmRSS:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total / 1024


def _hwm_mb(pid: int) -> float:
    """The process's own peak RSS so far (VmHWM)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def run(cmd: list[str], tuned: bool = True) -> tuple[float, float, float]:
    """Wall seconds, the trainer's own peak RSS and the peak RSS of its process tree (MB)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "RNNLM_MALLOC"))}
    if not tuned:
        env["RNNLM_MALLOC_TUNING"] = "0"
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    own = tree = 0.0
    while proc.poll() is None:
        own, tree = max(own, _hwm_mb(proc.pid)), max(tree, _tree_rss_mb(proc.pid))
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}")
    return time.perf_counter() - t, own, tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    if not (args.data / "train.txt").is_file():
        sys.exit(f"no WikiText-2 at {args.data} (expected train.txt): pass --data")
    work = Path(tempfile.mkdtemp(prefix="bench-train-mem-"))
    try:
        big = work / f"x{args.repeat}"
        big.mkdir()
        text = (args.data / "train.txt").read_bytes()
        with open(big / "train.txt", "wb") as f:
            for _ in range(args.repeat):
                f.write(text)
        for name in ("valid.txt", "test.txt"):
            shutil.copy(args.data / name, big / name)
        print(f"{'corpus':8s} {'workers':>7s} {'allocator':>9s} {'wall s':>7s} {'trainer peak RSS MB':>20s} "
              f"{'tree peak RSS MB':>17s}")
        for label, src in (("x1", args.data), (f"x{args.repeat}", big))[: 1 if args.repeat == 1 else 2]:
            prepared = work / f"prepared-{label}"
            subprocess.run([sys.executable, "-m", "pipeline.prepare", "recipes/wikitext.yaml", f"data.source.dir={src}",
                            f"data.output={prepared}", "--quiet"], cwd=ROOT, check=True)
            for workers in (0, 2):
                cmd = [sys.executable, "-m", "lm.train", "recipes/wikitext.yaml", f"data.source.dir={src}",
                       f"data.output={prepared}", f"train.max_steps={args.steps}", f"train.num_workers={workers}", *MODEL]
                for tuned in (True, False):
                    wall, own, tree = run(cmd + [f"train.output_dir={work / f'run-{label}-{workers}-{tuned}'}"], tuned)
                    print(f"{label:8s} {workers:7d} {'tuned' if tuned else 'glibc':>9s} {wall:7.1f} {own:20.0f} "
                          f"{tree:17.0f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
