"""DataLoader throughput over prepared data: TokenDataset + BucketBatchSampler + PackedCollator.

One epoch of WikiText-2 train (memory-mapped Arrow, as ``pipeline.prepare`` writes it),
``num_workers`` 0 and 2, against a padded baseline a user would write (the same batches,
rows as tensors, ``pad_sequence`` + ``pack_padded_sequence``) in the same run.

Usage: python bench/loader.py [--data ../shared/data/wikitext-2] [--max-tokens 4096]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

ROOT = Path(__file__).resolve().parents[1]
from common import prepared_dir  # noqa: E402  (bench/common.py: run as python bench/NAME.py)


def _epoch(loader) -> tuple[float, int, int]:
    t = time.perf_counter()
    batches = tokens = 0
    for b in loader:
        batches += 1
        tokens += b.num_tokens if hasattr(b, "num_tokens") else int(b.data.numel())
    return time.perf_counter() - t, batches, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2")
    ap.add_argument("--max-tokens", type=int, default=4096)
    args = ap.parse_args()
    if not (args.data / "train.txt").is_file():
        sys.exit(f"no WikiText-2 at {args.data} (expected train.txt): pass --data")
    from lm.config import load
    from pipeline.data import TokenDataset, make_loader
    from pipeline.prepare import prepare

    folder = prepared_dir(args.data)
    cfg = load(ROOT / "recipes" / "wikitext.yaml", [f"data.source.dir={args.data}", f"data.output={folder}"]).data
    prepare(cfg, quiet=True)
    ds = TokenDataset(folder, "train")
    torch.set_num_threads(1)

    rows = []
    for workers in (0, 2):
        loader = make_loader(ds, max_tokens=args.max_tokens, seed=0, num_workers=workers)
        _epoch(loader)  # warm: page cache, worker start-up
        dt, nb, nt = _epoch(loader)
        rows.append((f"make_loader (packed), num_workers={workers}", nb / dt, nt / dt))

    plan = make_loader(ds, max_tokens=args.max_tokens, seed=0).batch_sampler.plan(0)

    def naive(idx):  # what a user writes by hand: tensors, sort, pad, pack
        seqs = sorted((torch.from_numpy(ds[i].astype("int64")) for i in idx), key=len, reverse=True)
        x = pad_sequence(seqs, batch_first=True)
        return pack_padded_sequence(x, torch.tensor([len(s) for s in seqs]), batch_first=True)

    t = time.perf_counter()
    nt = sum(int(naive(b).data.numel()) for b in plan)
    dt = time.perf_counter() - t
    rows.append(("pad_sequence + pack_padded_sequence, in process", len(plan) / dt, nt / dt))

    print(f"WikiText-2 train, max_tokens={args.max_tokens}, {len(plan)} batches/epoch, torch threads 1")
    for name, bps, tps in rows:
        print(f"{name:50s} {bps:8,.0f} batches/s {tps / 1e6:7.2f} M tokens/s   {bps / rows[-1][1]:.1f}x")


if __name__ == "__main__":
    main()
