"""CPU bf16 autocast (``train.amp=bf16`` on a CPU) against fp32, same model, same batches.

What the policy puts in bf16 on a CPU is the full-softmax output layer where it runs under
autocast: evaluation and the scheduled-sampling step loop. Training with teacher forcing uses
the fused fp32 output-layer-plus-loss (``lm.losses.linear_cross_entropy_sum``) and the RNN stays fp32, so the
training step is timed too, as a control. Real WikiText-2 batches (prepared data), a
pytorch/examples-sized model (2 x 200 LSTM, 33,280 classes); rounds interleaved, medians.

Usage:
    python bench/cpu_bf16.py PREPARED_DIR [--rounds 5] [--batches 4] [--max-tokens 4096]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm import precision  # noqa: E402
from lm.model import RNNLM  # noqa: E402
from pipeline.collate import PackedCollator  # noqa: E402
from pipeline.data import TokenDataset, read_manifest  # noqa: E402
from pipeline.sampling import BucketBatchSampler  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("prepared", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=4096)
    args = ap.parse_args()
    V = read_manifest(args.prepared)["vocab_size"]
    ds = TokenDataset(args.prepared, "validation")
    loader = DataLoader(ds, batch_sampler=BucketBatchSampler(ds.lengths, max_tokens=args.max_tokens, seed=0),
                        collate_fn=PackedCollator(pad_id=0))
    batches = [b for _, b in zip(range(args.batches), loader)]
    tokens = sum(b.num_tokens for b in batches)
    torch.manual_seed(0)
    model = RNNLM(V, cell="lstm", embed_dim=200, hidden_size=200, num_layers=2)
    fp32, bf16 = precision.choose("off", "cpu", None), precision.choose("bf16", "cpu", None)
    bf16.apply(model)  # the RNN leaves autocast; a no-op for fp32 runs

    def evaluate(policy):
        with torch.no_grad(), policy.autocast():
            return sum(model(b, need_state=False, need_logits=False).nll_sum.item() for b in batches)

    def train(policy):
        for b in batches:
            model.zero_grad(set_to_none=True)
            with policy.autocast():
                out = model(b, need_state=False, need_logits=False)
            out.loss.backward()

    nll = {name: evaluate(p) for name, p in (("fp32", fp32), ("bf16", bf16))}
    times = {k: [] for k in ("eval_fp32", "eval_bf16", "train_fp32", "train_bf16")}
    for _ in range(args.rounds):
        for name, p in (("fp32", fp32), ("bf16", bf16)):
            times[f"eval_{name}"].append(timed(lambda: evaluate(p)))
            times[f"train_{name}"].append(timed(lambda: train(p)))
    print(f"{tokens} tokens x {args.rounds} rounds, {torch.get_num_threads()} threads")
    for kind in ("eval", "train"):
        a, b = statistics.median(times[f"{kind}_fp32"]), statistics.median(times[f"{kind}_bf16"])
        print(f"{kind:5s}  fp32 {tokens / a:9,.0f} tok/s   bf16 {tokens / b:9,.0f} tok/s   bf16/fp32 {a / b:.2f}")
    print(f"eval NLL/token  fp32 {nll['fp32'] / tokens:.5f}   bf16 {nll['bf16'] / tokens:.5f}")


if __name__ == "__main__":
    main()
