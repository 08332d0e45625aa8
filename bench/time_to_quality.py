"""CPU time-to-quality on WikiText-2: validation perplexity after a fixed training time.

Two runs, one after the other on the same machine, each given the same wall-clock budget
(pytorch/examples' per-epoch validation is outside its budget; ours counts its validation,
as ``train.max_time`` does, so the comparison leans towards theirs):

* pytorch/examples' word_language_model default run (2-layer LSTM 200/200, dropout 0.2,
  batch 20, bptt 35, SGD lr 20 annealed /4 on a validation plateau each epoch, clip 0.25;
  its training step as in ``../shared/anchors/ptex_like.py``), evaluated as its ``main.py``
  does (eval batch 10, hidden state carried through the validation stream);
* ``python -m lm.train recipes/wikitext.yaml`` (its CPU profile) with ``train.max_time`` set to the budget,
  reporting its best validation perplexity.

Both perplexities are exp(NLL / tokens) over the same 217,646 validation tokens
(words + one ``<eos>`` per line), so they compare directly.

Usage:
    python bench/time_to_quality.py [--data ../shared/data/wikitext-2] [--minutes 20] [--only ours|theirs]

Quality per CPU minute (RESULTS.md): our run alone at several budgets, one after the other,
each kept in ``DIR/cpu_<M>min`` for ``bench/results.py --per-minute``:
    python bench/time_to_quality.py --only ours --minutes 5 10 20 40 --keep runs/cpu_minutes
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
from common import prepared_dir  # noqa: E402  (bench/common.py: run as python bench/NAME.py)


class _PtexModel(nn.Module):
    """pytorch/examples' RNNModel, default arguments (LSTM, untied)."""

    def __init__(self, ntoken: int, ninp: int = 200, nhid: int = 200, nlayers: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, x, h):
        out, h = self.rnn(self.drop(self.encoder(x)), h)
        return self.decoder(self.drop(out)), h


def _stream(path: Path, vocab: dict) -> torch.Tensor:
    ids = []
    for line in open(path, encoding="utf-8"):
        ids.extend(vocab.setdefault(w, len(vocab)) for w in line.split() + ["<eos>"])
    return torch.tensor(ids)


def _batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    nb = data.size(0) // bsz
    return data[: nb * bsz].view(bsz, -1).t().contiguous()  # (T, B)


def theirs(data_dir: Path, seconds: float) -> dict:
    torch.manual_seed(1111)
    vocab: dict = {}
    train = _batchify(_stream(data_dir / "train.txt", vocab), 20)
    valid = _batchify(_stream(data_dir / "valid.txt", vocab), 10)
    model, crit, bptt, lr = _PtexModel(len(vocab)), nn.CrossEntropyLoss(), 35, 20.0

    def evaluate() -> float:
        model.eval()
        total, h = 0.0, None
        with torch.no_grad():
            for i in range(0, valid.size(0) - 1, bptt):
                n = min(bptt, valid.size(0) - 1 - i)
                out, h = model(valid[i : i + n], h)
                total += n * valid.size(1) * crit(out.view(-1, len(vocab)), valid[i + 1 : i + 1 + n].reshape(-1)).item()
        model.train()
        return total / (valid.size(0) - 1) / valid.size(1)

    spent, best, epochs, steps = 0.0, math.inf, 0, 0
    while spent < seconds:
        h = None
        start = time.perf_counter()
        for i in range(0, train.size(0) - 1, bptt):
            n = min(bptt, train.size(0) - 1 - i)
            h = None if h is None else tuple(t.detach() for t in h)
            model.zero_grad()
            out, h = model(train[i : i + n], h)
            crit(out.view(-1, len(vocab)), train[i + 1 : i + 1 + n].reshape(-1)).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
            steps += 1
            if spent + time.perf_counter() - start >= seconds:
                break
        spent += time.perf_counter() - start
        val = evaluate()
        epochs += 1
        if val < best:
            best = val
        else:
            lr /= 4.0
    return {"val_ppl": math.exp(best), "steps": steps, "epochs_started": epochs, "train_seconds": round(spent, 1)}


def ours(data_dir: Path, seconds: float, extra: list[str], keep: Path | None = None) -> dict:
    """One ``lm.train`` run of the shipped recipe for ``seconds``; its folder is kept at ``keep``
    (its ``result.json`` records the command) or thrown away."""
    with tempfile.TemporaryDirectory() as tmp:
        out = keep.resolve() if keep else Path(tmp)
        cmd = ["python", "-m", "lm.train", "recipes/wikitext.yaml", f"data.source.dir={data_dir}",
               f"data.output={prepared_dir(data_dir)}", f"train.output_dir={out}",
               f"train.max_time={seconds:g}", "train.plot=false", *extra]
        subprocess.run([sys.executable, *cmd[1:]], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        result = json.loads((out / "result.json").read_text())
    return {"val_ppl": result["best_val_ppl"], "test_ppl": result.get("test_ppl"), "steps": result["steps"],
            "tokens": result["tokens"], "train_seconds": result["train_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2")
    ap.add_argument("--minutes", type=float, nargs="+", default=[20], help="one run per budget, in this order")
    ap.add_argument("--only", choices=["ours", "theirs"])
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for our run")
    ap.add_argument("--keep", type=Path, help="keep our runs in KEEP/cpu_<M>min (for bench/results.py --per-minute)")
    args = ap.parse_args()
    if not (args.data / "train.txt").is_file():
        sys.exit(f"no WikiText-2 at {args.data} (expected train.txt): pass --data")
    if args.keep and args.only != "ours":
        sys.exit("--keep keeps our runs only: pass --only ours")
    for minutes in args.minutes:
        if args.only != "ours":
            print(f"pytorch/examples default, {minutes:g} min: {json.dumps(theirs(args.data, minutes * 60))}", flush=True)
        if args.only != "theirs":
            keep = args.keep / f"cpu_{minutes:g}min" if args.keep else None
            res = ours(args.data, minutes * 60, args.extra, keep)
            print(f"lm.train recipes/wikitext.yaml (CPU profile), {minutes:g} min: {json.dumps(res)}", flush=True)


if __name__ == "__main__":
    main()
