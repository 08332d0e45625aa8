"""Sentence classification: a bidirectional GRU (lm.encoder.RNNEncoder) over a Hugging Face Dataset.

The task (synthetic): does token 1 occur more often than token 2 in the sentence? Lengths
vary, so PackedCollator sorts every batch by length; batch.fields["label"] stays in the
caller's order, the order of the encoder's final state, so each label meets its own row.
A label paired with another row's state would leave held-out accuracy at chance (0.5).

Run: python examples/classify.py   (seeded; a few seconds on 2 CPU cores)
"""
import random

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.data import DataLoader

from lm.encoder import RNNEncoder
from pipeline import PackedCollator


def make_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    while len(rows) < n:
        ids = [rng.randint(1, 5) for _ in range(rng.randint(2, 30))]
        if ids.count(1) != ids.count(2):  # no ties: every sentence has an answer
            rows.append({"input_ids": ids, "label": int(ids.count(1) > ids.count(2)), "id": f"s{len(rows)}"})
    return rows


def run(collate=PackedCollator(shift=False), epochs: int = 3, seed: int = 0) -> float:
    """Train on 4,000 sentences, return the accuracy on 1,000 held-out ones."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    train, test = Dataset.from_list(make_rows(4000, rng)), Dataset.from_list(make_rows(1000, rng))
    encoder = RNNEncoder(vocab_size=6, cell="gru", embed_dim=16, hidden_size=32, bidirectional=True)
    head = torch.nn.Linear(2 * 32, 2)
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-2)

    def logits(batch) -> torch.Tensor:
        h = encoder.by_layer(encoder(batch).state)[0][-1]  # (2, B, H): top layer, both directions, caller's order
        return head(torch.cat([h[0], h[1]], dim=-1))  # (B, 2)

    for _ in range(epochs):
        for batch in DataLoader(train, batch_size=32, shuffle=True, collate_fn=collate):
            opt.zero_grad()
            F.cross_entropy(logits(batch), batch.fields["label"]).backward()
            opt.step()
    right = 0
    with torch.no_grad():
        for batch in DataLoader(test, batch_size=250, collate_fn=PackedCollator(shift=False)):
            right += int((logits(batch).argmax(-1) == batch.fields["label"]).sum())
    return right / len(test)


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny batches: more threads only add overhead
    print(f"held-out accuracy {run():.3f}")
