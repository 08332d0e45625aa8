"""Perplexity of a checkpoint: ``python -m lm.evaluate CHECKPOINT [--split NAME | --file PATH ...]``.

Scores prepared splits (the checkpoint's ``data.output``, or ``--data``) or any text file,
encoded with the checkpoint's own tokenizer the way ``pipeline.prepare`` encodes a split
(``<bos> tokens <eos>`` per line, or per paragraph in document mode), in either protocol:

* ``--mode stream`` (the published protocol): the text is one stream, cut into
  ``--batch-size`` streams read in windows of ``--bptt`` tokens, state carried across;
* ``--mode sequence``: every line from a zero state.

The default is the protocol the checkpoint was trained in. For each text it prints one
line and one JSON object (stdout; ``--output FILE`` writes them all as a JSON list):
summed NLL (nats), predicted tokens, perplexity, and bits per character and per byte of
the original text (``NLL / ln 2`` over its characters or UTF-8 bytes), so word, subword
and character models compare on one scale.

:func:`evaluate` is the one evaluation of the toolkit: ``lm.train`` validates and tests
with it too.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import contextlib

import numpy as np
import torch

from lm import state as st
from lm.batches import BatchSource, batch_source
from lm.checkpoint import Key
from lm.config import TrainConfig
from lm.device import resolve_device
from lm.distributed import Dist
from lm.model import RNNLM
from lm.precision import Precision
from lm.runtime import release_free_memory, tune_allocator
from pipeline.data import TokenDataset, read_manifest
from pipeline.encode import Encoder
from pipeline.sources import text_units
from pipeline.errors import ArgumentParser, UserError, cli


@torch.no_grad()
def evaluate(model: RNNLM, source: BatchSource, device: torch.device, d: Dist,
             policy: Precision | None = None) -> tuple[float, int]:
    """Summed NLL and predicted tokens over a whole split, across all ranks.

    With ``source.carries_state`` (stream mode) each window starts from the previous
    window's final state, as the published protocol does; otherwise every sequence starts
    from a zero state. The NLL is summed on the device: one host sync per split, not per batch.

    Returns:
        ``(nll_sum, tokens)``; perplexity is ``exp(nll_sum / tokens)`` (:func:`perplexity`).
    """
    was = model.training
    model.eval()
    release_free_memory()  # training's blocks differ in size from evaluation's: hand them back first
    carry = source.carries_state
    nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    state = None
    for batch, _ in source:
        batch = batch.to(device, non_blocking=True)
        if state is not None and st.hidden(state).size(1) > len(batch.lengths):
            state = st.narrow(state, len(batch.lengths))  # exhausted streams drop off the end
        with policy.autocast() if policy is not None else contextlib.nullcontext():
            out = model(batch, state, need_state=carry, need_logits=False)
        state = out.state if carry else None
        nll += out.nll_sum.double()
        tokens += out.num_tokens
    model.train(was)
    release_free_memory()  # and evaluation's before training goes on
    nll, tokens = d.all_sum(float(nll), tokens)
    return nll, int(tokens)


def perplexity(nll: float, tokens: int) -> float:
    """``exp(nll / tokens)``, capped where ``exp`` would overflow (a diverged model)."""
    return math.exp(min(nll / max(tokens, 1), 700.0))


def _text_of(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise UserError(f"--file {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--file {path}: invalid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None


def encode_text(text: str, tokenizer_json: str, special_ids: dict, mode: str) -> TokenDataset:
    """``text`` as rows of ``<bos> ids <eos>``, cut and encoded as ``pipeline.prepare`` cuts
    and encodes a file: one row per line (``line`` mode, blank lines included) or per
    blank-line separated paragraph (``document``)."""
    from tokenizers import Tokenizer

    units = text_units(text, "line" if mode == "line" else "document")
    encoder = Encoder(Tokenizer.from_str(tokenizer_json), special_ids["bos"], special_ids["eos"])
    rows = [np.array(row, dtype=np.int64) for row in encoder.encode(units)]
    if not rows:
        raise UserError("the text is empty: nothing to score")
    return TokenDataset.from_rows(rows, "file")


def _scores(nll: float, tokens: int, text: str | None, nbytes: int | None) -> dict:
    bits = nll / math.log(2)
    return {"nll": nll, "tokens": tokens, "ppl": perplexity(nll, tokens), "loss": nll / tokens,
            "bits_per_char": bits / len(text) if text else None,
            "bits_per_byte": bits / nbytes if nbytes else None}


@cli
def main(argv: list[str]) -> int:
    tune_allocator()  # before the first large allocation: no mmap/munmap churn per batch
    ap = ArgumentParser(prog="python -m lm.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint written by lm.train (best.pt or step-*.pt)")
    ap.add_argument("--split", action="append", default=[], help="a prepared split to score (repeatable; "
                    "default: validation and test when no --file is given)")
    ap.add_argument("--file", action="append", default=[], type=Path, help="a UTF-8 text file to score (repeatable)")
    ap.add_argument("--data", type=Path, help="the prepared folder (default: the checkpoint's data.output)")
    ap.add_argument("--mode", choices=["stream", "sequence"], help="protocol (default: the checkpoint's train.mode)")
    ap.add_argument("--batch-size", type=int, help="streams (stream mode; default train.eval_batch_size) "
                    "or sequences per batch (sequence mode; default: the checkpoint's max_tokens batching)")
    ap.add_argument("--bptt", type=int, help="window length in stream mode (default: the checkpoint's train.bptt)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    ap.add_argument("--output", type=Path, help="also write the results as a JSON list to this file")
    args = ap.parse_args(argv)

    device = resolve_device(args.device, option="--device")
    from lm.generate import load_model

    model, ckpt = load_model(args.checkpoint, device)
    recipe = ckpt[Key.RECIPE]
    saved = recipe["train"]
    mode = args.mode or saved.get("mode", "sequence")
    try:
        cfg = TrainConfig(
            mode=mode, bptt=args.bptt or saved.get("bptt", 35),
            eval_batch_size=args.batch_size or saved.get("eval_batch_size", 10),
            max_tokens=None if mode == "stream" or args.batch_size else (saved.get("max_tokens") or 4096),
            batch_size=args.batch_size if mode == "sequence" else None, epochs=1,
        )
    except ValueError as e:
        raise UserError(str(e)) from None

    jobs: list[tuple[str, TokenDataset, str | None, int | None]] = []
    if args.split or not args.file:
        folder = args.data or Path(recipe["data"]["output"])
        manifest = read_manifest(folder)
        if (folder / "tokenizer.json").read_text(encoding="utf-8") != ckpt[Key.TOKENIZER]:
            raise UserError(f"{folder} was prepared with another tokenizer than {args.checkpoint}; "
                            f"point --data at the folder it was trained on, or score text with --file")
        splits = args.split or [s for s in ("validation", "test") if s in manifest["splits"]]
        for split in splits:
            text, nbytes = _split_text(manifest, split)
            jobs.append((split, TokenDataset(folder, split), text, nbytes))
    for path in args.file:
        text = _text_of(path)
        ds = encode_text(text, ckpt[Key.TOKENIZER], ckpt[Key.SPECIAL_IDS], recipe["data"].get("mode", "line"))
        jobs.append((str(path), ds, text, path.stat().st_size))

    results = []
    for name, ds, text, nbytes in jobs:
        nll, tokens = evaluate(model, batch_source(ds, cfg, Dist(), train=False, pin=False), device, Dist())
        res = {"checkpoint": str(args.checkpoint), "text": name, "mode": mode,
               **({"streams": cfg.eval_batch_size, "bptt": cfg.bptt} if mode == "stream" else {}),
               **_scores(nll, tokens, text, nbytes)}
        results.append(res)
        bpc = f" | {res['bits_per_char']:.4f} bits/char" if res["bits_per_char"] else ""
        print(f"{name}: perplexity {res['ppl']:.2f} ({mode} protocol, {tokens:,} tokens){bpc}", file=sys.stderr)
        print(json.dumps(res))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _split_text(manifest: dict, split: str) -> tuple[str | None, int | None]:
    """The split's original text and byte count, when its source files are still there."""
    sources = [s for s in manifest.get("sources", []) if s.get("split") == split]
    if not sources:
        return None, None
    nbytes = sum(s.get("bytes", 0) for s in sources) or None
    try:
        text = "".join(Path(s["path"]).read_bytes().decode("utf-8-sig", errors="replace") for s in sources)
    except (OSError, KeyError):
        text = None
    return text, nbytes


if __name__ == "__main__":
    sys.exit(main())
