"""Batching WikiText-2 train lines: padding efficiency of the sampler, collate speed of the collator.

Compared, in the same run, with what a user would otherwise reach for: random batches, a
global length sort, transformers' LengthGroupedSampler and DataCollatorWithPadding (when
``transformers`` is importable), and torch's pad_sequence + pack_padded_sequence.

Lines are read as /work/shared/anchors/collate_anchor.py reads them: whitespace words +
an ``<eos>`` per line, ids from a vocabulary built on the fly. Tokens/s counts those
tokens (for the ``shift=True`` row each sample gets a ``<bos>`` first, so its packed
inputs are the same tokens).

The extra-fields rows collate dataset rows (dicts) with a label (int) and an id (str)
beside the ids — what a classifier's ``Dataset`` holds — against the same rows with the
ids alone, over the same batches (goal: at most 1.3x the time), and with per-token tags
packed like the ids (``pack_fields``).

``--baseline FILE`` also runs another version of ``pipeline/collate.py`` (``git show
REV:pipeline/collate.py > FILE``) on the inputs without extra fields, interleaved with
ours, and prints the time ratio of each: whether a change slowed the fast path.

Usage: python bench/collate.py [--data ../shared/data/wikitext-2] [--repeats 5] [--baseline FILE]
"""
from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.collate import PackedCollator, PadCollator  # noqa: E402
from pipeline.sampling import BucketBatchSampler  # noqa: E402

BOS, EOS, B = 1, 2, 32


def read_lines(path: Path) -> list[list[int]]:
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        return [[vocab.setdefault(w, len(vocab) + 4) for w in line.split()] + [EOS] for line in f]


def efficiency(batches: list[list[int]], lengths: np.ndarray) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    return real / sum(len(b) * int(lengths[b].max()) for b in batches)


def chunks(order: list[int]) -> list[list[int]]:
    return [order[i : i + B] for i in range(0, len(order), B)]


def time_collate(runs, batches, n_tok: int, repeats: int) -> dict[str, float]:
    """Best tokens/s of each collator over ``repeats`` passes through all batches.

    Passes are interleaved (one pass of each collator per round) and timed in CPU
    seconds of this process, so other jobs on a shared machine move every collator alike.
    """
    best = {name: 0.0 for name, _, _ in runs}
    for _ in range(repeats):
        for name, fn, samples in runs:
            t = time.process_time()
            for b in batches:
                fn([samples[i] for i in b])
            best[name] = max(best[name], n_tok / (time.process_time() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "wikitext-2")
    ap.add_argument("--repeats", type=int, default=5, help="passes per collator; the best counts")
    ap.add_argument("--baseline", type=Path, help="another version of pipeline/collate.py, timed beside ours")
    args = ap.parse_args()
    train = args.data / "train.txt"
    if not train.is_file():
        sys.exit(f"no {train}: pass --data DIR with WikiText-2's train.txt (default ../shared/data/wikitext-2)")
    torch.set_num_threads(1)  # collators run in DataLoader workers, which use one thread each

    seqs = read_lines(train)
    lengths = np.array([len(s) for s in seqs])
    print(f"{train}: {len(seqs)} lines, {lengths.sum()} tokens, longest {lengths.max()}, batch_size={B}")

    try:
        from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast
        from transformers.trainer_pt_utils import LengthGroupedSampler
    except ImportError:
        LengthGroupedSampler = None
        print("transformers is not importable: its anchors are skipped (pip install transformers)")

    # ---- padding efficiency: real tokens / (rows x longest), over an epoch
    print("\npadding efficiency (real / padded tokens)")
    sampler = BucketBatchSampler(lengths, batch_size=B, seed=0)
    ours = [efficiency(sampler.plan(e), lengths) for e in range(3)]
    idx = list(range(len(seqs)))
    random.Random(0).shuffle(idx)
    rows = [("BucketBatchSampler, epochs 0-2", " ".join(f"{e:.4f}" for e in ours))]
    rows.append(("random batches", f"{efficiency(chunks(idx), lengths):.4f}"))
    if LengthGroupedSampler is not None:
        hf = LengthGroupedSampler(B, lengths=lengths.tolist(), generator=torch.Generator().manual_seed(0))
        rows.append(("transformers LengthGroupedSampler", f"{efficiency(chunks(list(hf)), lengths):.4f}"))
    by_length = np.argsort(lengths, kind="stable").tolist()
    rows.append(("global sort (upper bound)", f"{efficiency(chunks(by_length), lengths):.4f}"))
    for name, v in rows:
        print(f"  {name:36s} {v}")

    # ---- plan cost at scale: 2M sequences drawn from WikiText-2's lengths
    print("\nsampler plan, wall time")
    big = np.random.default_rng(0).choice(lengths, 2_000_000)
    for kw in (dict(batch_size=B), dict(max_tokens=4096), dict(max_tokens=4096, cost="padded", num_replicas=8)):
        t = time.perf_counter()
        s = BucketBatchSampler(big, seed=0, **kw)
        t_init = time.perf_counter() - t
        s.set_epoch(1)
        t = time.perf_counter()
        next(iter(s))  # builds the epoch's plan
        args_txt = ", ".join(f"{k}={v!r}" for k, v in kw.items())
        print(f"  2M sequences ({args_txt}): constructor {t_init:.3f} s, epoch plan {time.perf_counter() - t:.3f} s")

    # ---- collate speed, on the same batches (our sampler's epoch 0) for every collator
    batches = sampler.plan(0)
    n_tok = int(lengths.sum())
    flat = np.concatenate([np.asarray(s, dtype=np.uint16) for s in seqs])
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    views = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]  # what the prepared dataset returns
    flat_bos = np.concatenate([np.asarray([BOS] + s, dtype=np.uint16) for s in seqs])
    views_bos = [flat_bos[a + i : b + i + 1] for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))]
    tensors = [torch.tensor(s) for s in seqs]

    def pad_pack(samples: list[torch.Tensor]):
        samples = sorted(samples, key=len, reverse=True)
        padded = pad_sequence(samples, batch_first=True)  # (B, T)
        return pack_padded_sequence(padded, torch.tensor([len(s) for s in samples]), batch_first=True)

    packed, packed_shift = PackedCollator(shift=False), PackedCollator(shift=True)
    ids_rows = [{"input_ids": v} for v in views]
    field_rows = [{"input_ids": v, "label": i % 5, "id": f"wt2-train-{i}"} for i, v in enumerate(views)]
    tag_rows = [{**r, "tags": (v % 17).astype(np.uint8)} for r, v in zip(field_rows, views)]  # one tag per id
    ROWS_IDS, ROWS_FIELDS = "PackedCollator(shift=False), rows: ids alone", "PackedCollator(shift=False), rows: ids+label+id"
    runs = [
        ("PackedCollator(shift=False), uint16 views", packed, views),
        ("PackedCollator(shift=True), uint16 views", packed_shift, views_bos),
        ("PackedCollator(shift=False), int lists", packed, seqs),
        ("PackedCollator(shift=False), tensors", packed, tensors),
        (ROWS_IDS, packed, ids_rows),
        (ROWS_FIELDS, packed, field_rows),
        ("PackedCollator(pack_fields=['tags']), rows: +tags", PackedCollator(shift=False, pack_fields=["tags"]), tag_rows),
        ("PadCollator(shift=False), uint16 views", PadCollator(shift=False), views),
        ("torch pad_sequence+pack_padded_sequence, tensors", pad_pack, tensors),
    ]
    fast_path = [r for r in runs  # our collators on inputs without extra fields
                 if isinstance(r[1], (PackedCollator, PadCollator)) and r[2] is not field_rows and r[2] is not tag_rows]
    if args.baseline is not None:
        spec = importlib.util.spec_from_file_location("collate_baseline", args.baseline)
        base = sys.modules["collate_baseline"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(base)
        for name, fn, samples in fast_path:
            cls = base.PadCollator if isinstance(fn, PadCollator) else base.PackedCollator
            runs.append((f"baseline {name}", cls(shift=fn.shift), samples))
    if LengthGroupedSampler is not None:
        from tokenizers import Tokenizer, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
        hf_collate = DataCollatorWithPadding(hf_tok, return_tensors="pt")
        runs.append(("transformers DataCollatorWithPadding, lists", hf_collate, [{"input_ids": s} for s in seqs]))

    speed = time_collate(runs, batches, n_tok, args.repeats)
    ours_best = speed[runs[0][0]]
    print(f"\ncollate speed: {len(batches)} batches, best of {args.repeats} interleaved passes, "
          "CPU time, 1 torch thread")
    print(f"  {'collator':56s} {'M tok/s':>8s} {'ours/this':>9s}")
    for name, v in speed.items():
        print(f"  {name:56s} {v / 1e6:8.2f} {ours_best / v:9.2f}")
    print(f"\ntwo extra fields (label int, id str): {speed[ROWS_IDS] / speed[ROWS_FIELDS]:.3f}x the time of the same "
          f"rows with ids alone, {ours_best / speed[ROWS_FIELDS]:.3f}x that of bare uint16 views (goal: <= 1.3x)")
    if args.baseline is not None:
        print(f"\nfast path against {args.baseline} (time, ours / baseline)")
        for name, _, _ in fast_path:
            print(f"  {name:56s} {speed[f'baseline {name}'] / speed[name]:6.3f}")


if __name__ == "__main__":
    main()
