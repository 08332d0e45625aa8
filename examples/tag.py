"""Token tagging: a bidirectional GRU (lm.encoder.RNNEncoder) over a Hugging Face Dataset.

Synthetic task: tag a token 1 if it is larger than both neighbours (a peak), else 0. The
tags are packed exactly like the ids (pack_fields) and unpack in the caller's order, as the
encoder's outputs do; another row's tags would leave accuracy at the majority rate (0.69).
Run: python examples/tag.py   (seeded; a few seconds on 2 CPU cores)
"""
import random

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.nn.utils.rnn import pad_packed_sequence
from torch.utils.data import DataLoader

from lm.encoder import RNNEncoder
from pipeline import PackedCollator


def make_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        ids = [rng.randint(1, 9) for _ in range(rng.randint(2, 30))]
        s = [0, *ids, 0]  # 0 is below every id: an end compares with its one neighbour
        rows.append({"input_ids": ids, "tags": [int(s[j - 1] < s[j] > s[j + 1]) for j in range(1, len(s) - 1)]})
    return rows


def run(collate=PackedCollator(shift=False, pack_fields=["tags"]), epochs: int = 3, seed: int = 0) -> float:
    """Train on 3,000 sentences, return the token accuracy on 500 held-out ones."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    train, test = Dataset.from_list(make_rows(3000, rng)), Dataset.from_list(make_rows(500, rng))
    encoder = RNNEncoder(vocab_size=10, cell="gru", embed_dim=16, hidden_size=32, bidirectional=True, batch_first=True)
    head = torch.nn.Linear(2 * 32, 2)
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-2)

    def scores_and_tags(batch) -> tuple[torch.Tensor, torch.Tensor]:
        scores = head(encoder(batch).outputs)  # (B, T, 2), caller's order
        tags, _ = pad_packed_sequence(batch.fields["tags"], batch_first=True, padding_value=-100)  # (B, T), as scores
        return scores, tags

    for _ in range(epochs):
        for batch in DataLoader(train, batch_size=32, shuffle=True, collate_fn=collate):
            scores, tags = scores_and_tags(batch)
            opt.zero_grad()
            F.cross_entropy(scores.transpose(1, 2), tags).backward()  # -100 (padding) is ignored
            opt.step()
    test_batches = DataLoader(test, batch_size=250, collate_fn=PackedCollator(shift=False, pack_fields=["tags"]))
    with torch.no_grad():
        held_out = [scores_and_tags(b) for b in test_batches]
    right = sum(int((scores.argmax(-1) == tags).sum()) for scores, tags in held_out)
    return right / sum(int((tags != -100).sum()) for _, tags in held_out)


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny batches: more threads only add overhead
    print(f"held-out accuracy {run():.3f}")
