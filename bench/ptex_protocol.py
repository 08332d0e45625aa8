"""The same model, the same protocol as pytorch/examples: one epoch each, same machine, same run.

* theirs: ``../shared/anchors/ptex_epoch.py`` — pytorch/examples' ``word_language_model``
  default run (2x200 LSTM, dropout 0.2, batch 20, bptt 35, SGD lr 20, clip 0.25), stream
  protocol, validation with 10 streams;
* ours: ``python -m lm.train recipes/ptex_wikitext2.yaml train.epochs=N`` — the same
  model and protocol (``train.mode: stream``).

Prints, per side: wall seconds of the epoch(s), training tokens/s, validation perplexity
after the last epoch (both over WikiText-2's 217,646 validation predictions), and the ratios.
Each side runs in a fresh process, one after the other.

``--keep DIR`` keeps our run (``result.json`` for ``bench/results.py``) with theirs beside it
(``anchor.json``).

Usage:
    python bench/ptex_protocol.py [--data ../shared/data/wikitext-2] [--epochs 1] [--keep runs/ptex_wikitext2]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from common import prepared_dir  # noqa: E402  (bench/common.py: run as python bench/NAME.py)
ANCHOR = ROOT.parent / "shared" / "anchors" / "ptex_epoch.py"


def theirs(data: Path, epochs: int) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(ANCHOR), str(data), str(epochs)], check=True, capture_output=True,
                         text=True).stdout
    wall = time.perf_counter() - t0
    last = re.findall(r"epoch \d+: (\d+) s, train (\d+) tokens/s, lr \S+, valid ppl ([\d.]+)", out)[-1]
    test = re.search(r"test ppl ([\d.]+)", out)
    return {"val_ppl": float(last[2]), "test_ppl": float(test[1]) if test else None, "tokens_per_s": float(last[1]),
            "epoch_seconds": float(last[0]), "wall_seconds": round(wall, 1),
            "command": f"python {os.path.relpath(ANCHOR, ROOT)} {data} {epochs}"}


def ours(data: Path, epochs: int, keep: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = keep or Path(tmp) / "run"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lm.train", "recipes/ptex_wikitext2.yaml",
                        f"data.source.dir={data}", f"data.output={prepared_dir(data)}",
                        f"train.output_dir={run}", f"train.epochs={epochs}", "train.plot=false",
                        "train.prompts=[]"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        res = json.loads((run / "result.json").read_text())
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if r["split"] == "validation"][-1]
    return {"val_ppl": val["ppl"], "val_tokens": val["tokens"], "tokens_per_s": res["tokens_per_s"],
            "train_seconds": res["train_seconds"], "wall_seconds": round(wall, 1), "test_ppl": res.get("test_ppl")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--keep", type=Path, help="train our side into this run folder (a new one) and write "
                    "pytorch/examples' figures beside it as anchor.json, for bench/results.py")
    args = ap.parse_args()
    if args.keep is not None:
        args.keep = args.keep.resolve()
        if args.keep.exists():
            sys.exit(f"error: --keep {args.keep} exists; give a new folder")
    a = theirs(args.data, args.epochs)
    print(f"pytorch/examples ({args.epochs} epoch): {json.dumps(a)}", flush=True)
    b = ours(args.data, args.epochs, args.keep)
    if args.keep is not None:
        (args.keep / "anchor.json").write_text(json.dumps({"what": "pytorch/examples main.py defaults "
                                                           "(../shared/anchors/ptex_epoch.py), same machine, same bench run",
                                                           "bench_command": " ".join(["python", "bench/ptex_protocol.py", *sys.argv[1:]]),
                                                           **a}, indent=1) + "\n")
    print(f"lm.train recipes/ptex_wikitext2.yaml ({args.epochs} epoch): {json.dumps(b)}", flush=True)
    print(f"validation ppl ours/theirs {b['val_ppl'] / a['val_ppl']:.3f}; "
          f"tokens/s ours/theirs {b['tokens_per_s'] / a['tokens_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
