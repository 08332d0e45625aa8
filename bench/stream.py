"""Streaming length bucketing: ``StreamBucketBatcher`` on WikiText-2 train lines streamed from
the text file (``datasets.load_dataset("text", streaming=True)``, encoded on the fly by
``pipeline.streaming.open_stream`` with the word-level tokenizer), batches of 32.

1. Padding efficiency (real tokens / rows x longest) against the bounds a user could reach
   with every length known: global sort, ``BucketBatchSampler``, random batches.
2. Overhead: time to read + encode the stream and consume its rows, with and without the
   batcher, interleaved rounds on the same process (the mean of ``--rounds``: a pass's cost,
   the garbage collector's included; the best of them is printed too).
3. Memory: peak RSS of a fresh child consuming ``--repeat 1`` and ``--repeat N`` passes
   of the stream through the batcher (the file re-streamed N times by a generator).

Usage: python bench/stream.py [--data ../shared/data/wikitext-2] [--repeat 50] [--rounds 3] [--gc-split]
"""
from __future__ import annotations

import argparse
import gc
import itertools
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def efficiency(batches: list[list[int]]) -> float:
    """Real tokens / (rows x longest), over batches of lengths."""
    return sum(sum(b) for b in batches) / sum(len(b) * max(b) for b in batches)


def chunks(order: np.ndarray, lengths: np.ndarray, size: int) -> list[list[int]]:
    return [lengths[order[i : i + size]].tolist() for i in range(0, len(order), size)]


def open_train(data: Path):
    """(streamed encoded train split, tokenizer) for WikiText-2's train.txt."""
    from pipeline.config import load_data_config
    from pipeline.streaming import open_stream

    cfg = load_data_config(REPO / "recipes" / "wikitext.yaml", [f"data.source.dir={data}"])
    splits, tok = open_stream(cfg, sample_lines=10**9)  # the tokenizer sees all of train, as prepare's does
    return splits["train"], tok


def child(data: Path, repeat: int, buffer_size: int) -> None:
    """Consume ``repeat`` passes through the batcher; print rows, batches, peak RSS MB.

    The file is re-read ``repeat`` times by a plain generator (lines in batches of 1,000,
    ``encode_batch_fast``): the same rows as the ``datasets`` stream, several times faster.
    """
    from pipeline import StreamBucketBatcher

    _, tok = open_train(data)

    def passes():
        for _ in range(repeat):
            with open(data / "train.txt", encoding="utf-8") as f:
                while lines := [line.rstrip("\n") for line in itertools.islice(f, 1000)]:
                    yield from ([1, *e.ids, 2] for e in tok.encode_batch_fast(lines, add_special_tokens=False))

    b = StreamBucketBatcher(passes, batch_size=32, buffer_size=buffer_size, seed=0)
    rows = batches = 0
    for batch in b:
        rows += len(batch)
        batches += 1
    print(rows, batches, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "wikitext-2")
    p.add_argument("--repeat", type=int, default=50, help="passes of the file for the memory row")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--buffer-size", type=int, default=10_000)
    p.add_argument("--gc-split", action="store_true", help="also time both with gc.disable(), to split off the collector's share")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        return child(args.data, args.child, args.buffer_size)
    if not (args.data / "train.txt").is_file():
        sys.exit(f"error: {args.data}/train.txt not found; pass --data FOLDER")

    from pipeline import BucketBatchSampler, StreamBucketBatcher

    print(f"cpus {os.cpu_count()}, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    train, _ = open_train(args.data)
    lengths = np.array([len(r["input_ids"]) for r in train])  # lengths only: held rows would slow every full collection
    print(f"WikiText-2 train: {len(lengths):,} lines, {int(lengths.sum()):,} tokens (with <bos>/<eos>)\n")

    # 1. padding efficiency, batches of 32
    rng = np.random.default_rng(0)
    stream = [[len(r["input_ids"]) for r in batch] for batch in StreamBucketBatcher(train, batch_size=32, buffer_size=args.buffer_size, seed=0)]
    small = [[len(r["input_ids"]) for r in batch] for batch in StreamBucketBatcher(train, batch_size=32, buffer_size=1000, seed=0)]
    table = [
        (f"StreamBucketBatcher, buffer {args.buffer_size:,} (streamed)", efficiency(stream)),
        ("StreamBucketBatcher, buffer 1,000 (streamed)", efficiency(small)),
        ("global sort (every length known)", efficiency(chunks(np.argsort(-lengths, kind="stable"), lengths, 32))),
        ("BucketBatchSampler (every length known)", efficiency([lengths[b].tolist() for b in BucketBatchSampler(lengths, batch_size=32)])),
        ("random batches", efficiency(chunks(rng.permutation(len(lengths)), lengths, 32))),
    ]
    got = sorted(n for b in stream for n in b)
    assert got == sorted(lengths.tolist()), (len(got), sum(got), len(lengths), int(lengths.sum()))
    print("padding efficiency, batch_size=32")
    for name, eff in table:
        print(f"  {name:55s} {eff:.4f}")
    # the draws vary with the seed: the same buffer over seeds 0-7 (the rows of a list give the stream's batches)
    rows = [np.zeros(n, np.int8) for n in lengths]
    seeds = [efficiency([[len(r) for r in batch] for batch in StreamBucketBatcher(rows, batch_size=32, buffer_size=args.buffer_size, seed=s)])
             for s in range(8)]
    del rows
    print(f"  StreamBucketBatcher, buffer {args.buffer_size:,}, seeds 0-7: mean {np.mean(seeds):.4f}, "
          f"min {min(seeds):.4f}, max {max(seeds):.4f}")

    # 2. overhead: the stream alone vs through the batcher, interleaved rounds. The mean is what
    # a pass costs: a full collection of the heap (~0.13 s with torch and datasets loaded) falls
    # in some rounds and not others, and a best-of-N would leave out whichever arm brings on more.
    full = [0]
    gc.callbacks.append(lambda phase, info: full.__setitem__(0, full[0] + (phase == "start" and info["generation"] == 2)))

    def plain() -> int:
        return sum(len(r["input_ids"]) for r in train)

    def batched() -> int:
        return sum(len(r["input_ids"]) for batch in StreamBucketBatcher(train, batch_size=32, buffer_size=args.buffer_size) for r in batch)

    arms = [("plain", plain), ("batched", batched)]
    if args.gc_split:  # the same two with Python's garbage collector off: what the collector costs
        arms += [("plain, gc off", plain), ("batched, gc off", batched)]
    times: dict[str, list[float]] = {name: [] for name, _ in arms}
    full_gcs = dict.fromkeys(times, 0)
    for _ in range(args.rounds):
        for name, fn in arms:
            if name.endswith("gc off"):
                gc.disable()
            f0, t0 = full[0], time.perf_counter()
            try:
                fn()
            finally:
                gc.enable()
            times[name].append(time.perf_counter() - t0)
            full_gcs[name] += full[0] - f0
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    a, b = mean["plain"], mean["batched"]
    print(f"\nread + encode the stream: {a:.3f} s a pass (mean of {args.rounds} interleaved rounds); through the batcher: "
          f"{b:.3f} s; overhead {100 * (b / a - 1):+.1f}%")
    print(f"  best of {args.rounds}: {min(times['plain']):.3f} s and {min(times['batched']):.3f} s "
          f"({100 * (min(times['batched']) / min(times['plain']) - 1):+.1f}%); full collections of the heap: "
          f"{full_gcs['plain']} and {full_gcs['batched']}")
    print(f"  rounds: {', '.join(f'{x:.2f}' for x in times['plain'])} | {', '.join(f'{x:.2f}' for x in times['batched'])}")
    if args.gc_split:
        c, d = mean["plain, gc off"], mean["batched, gc off"]
        print(f"with gc.disable(): plain {c:.3f} s, batched {d:.3f} s: the batcher's own work {d - c:.3f} s "
              f"({1e6 * (d - c) / len(lengths):.1f} us per row), the collector's extra {(b - a) - (d - c):.3f} s")

    # 3. memory, fresh children
    print("\npeak RSS through the batcher (fresh process each):")
    for r in (1, args.repeat):
        out = subprocess.run([sys.executable, __file__, "--data", str(args.data), "--child", str(r), "--buffer-size", str(args.buffer_size)],
                             capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        n_rows, n_batches, rss = out.stdout.split()
        print(f"  x{r:<3d} {int(n_rows):>10,} rows {int(n_batches):>9,} batches  peak RSS {float(rss):,.0f} MB")
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
