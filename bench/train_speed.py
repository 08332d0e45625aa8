"""Training throughput on CPU: lm.train against pytorch/examples' word LM, same model, same run.

The model is pytorch/examples' default (2-layer LSTM, 200 units, dropout 0.2, untied, full
softmax over WikiText-2's 33,278 classes, SGD lr 20, clip 0.25). Their training step is
timed by ``../shared/anchors/ptex_like.py`` (contiguous-stream batches of 20 x 35 tokens);
ours is the real trainer, ``python -m lm.train``, on length-bucketed packed batches, read
from its ``metrics.jsonl`` (predicted tokens per second, warm-up window excluded).

Usage:
    python bench/train_speed.py [--data ../shared/data/wikitext-2] [--seconds 60]
        [--max-tokens 2048 4096] [--extra key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANCHOR = ROOT.parent / "shared" / "anchors" / "ptex_like.py"
SAME_MODEL = [
    "model.cell=lstm", "model.embed_dim=200", "model.hidden_size=200", "model.num_layers=2",
    "model.dropout_emb=0.2", "model.dropout_rnn=0.2", "model.dropout_out=0.2", "model.locked_dropout=false",
    "model.tie_weights=false", "model.adaptive_cutoffs=null",
    "train.optimizer=sgd", "train.lr=20", "train.clip=0.25", "train.schedule=plateau", "train.warmup_steps=0",
    "train.weight_decay=0", "train.device=cpu", "train.epochs=null", "train.plot=false", "train.prompts=[]",
    "train.eval_every=null", "train.log_every=5",
]


def anchor(data: Path, seconds: float) -> float:
    out = subprocess.run([sys.executable, str(ANCHOR), str(data), str(seconds)], capture_output=True, text=True, check=True)
    return float(re.search(r"anchor tokens/s (\d+)", out.stdout).group(1))


def ours(data: Path, prepared: Path, seconds: float, max_tokens: int, extra: list[str]) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "lm.train", str(ROOT / "recipes" / "wikitext.yaml"), f"data.source.dir={data}",
               f"data.output={prepared}", f"train.output_dir={tmp}", f"train.max_time={seconds}",
               f"train.max_tokens={max_tokens}", *SAME_MODEL, *extra]
        subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in recs if r["split"] == "train"]
        first, last = train[0], train[-1]  # the first window holds the warm-up steps: excluded
        rate = (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
        return rate, last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for our run, e.g. train.amp=true")
    args = ap.parse_args()
    if not (args.data / "train.txt").is_file():
        sys.exit(f"no WikiText-2 at {args.data} (expected train.txt): pass --data")
    if not ANCHOR.is_file():
        sys.exit(f"anchor script not found: {ANCHOR}")
    prepared = Path(tempfile.gettempdir()) / "bench-wt2"
    print(f"cpu threads: {os.cpu_count()}, {args.seconds:.0f} s per run", flush=True)
    base = anchor(args.data, args.seconds)
    print(f"{'pytorch/examples (20x35 batches)':40s} {base:10,.0f} tokens/s   1.00x", flush=True)
    for mt in args.max_tokens:
        rate, last = ours(args.data, prepared, args.seconds, mt, args.extra)
        print(f"{f'lm.train max_tokens={mt}':40s} {rate:10,.0f} tokens/s   {rate / base:.2f}x  "
              f"(train loss {last['loss']:.2f} at step {last['step']})", flush=True)
    base2 = anchor(args.data, args.seconds)  # again: drift on a shared machine shows up here
    print(f"{'pytorch/examples, again':40s} {base2:10,.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
