"""Generate from a checkpoint: ``python -m lm.generate CHECKPOINT --prompt TEXT [...]``.

A checkpoint carries its recipe and tokenizer (as JSON text), so it generates on its
own. Greedy by default; ``--temperature`` / ``--top-k`` sample instead. Prints one line
per prompt: the prompt followed by its continuation.
"""
from __future__ import annotations

import argparse
import sys

import torch

from lm import checkpoint
from lm.config import ModelConfig
from lm.decode import generate
from lm.model import RNNLM
from pipeline.errors import UserError, cli


def complete(
    model: RNNLM,
    tokenizer_json: str,
    special_ids: dict,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Continue text prompts; returns each prompt followed by its continuation, detokenized.

    Each prompt is encoded as ``<bos> tokens`` (how training sequences start), decoded
    until ``<eos>`` or ``max_new_tokens``.
    """
    from tokenizers import Tokenizer  # text in and out needs `tokenizers`; the model does not

    tok = Tokenizer.from_str(tokenizer_json)
    encoded = [[special_ids["bos"], *tok.encode(p, add_special_tokens=False).ids] for p in prompts]
    new = generate(model, encoded, max_new_tokens=max_new_tokens, eos_id=special_ids["eos"],
                   temperature=temperature, top_k=top_k, generator=generator)
    return [tok.decode(e[1:] + n, skip_special_tokens=True) for e, n in zip(encoded, new)]


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[RNNLM, dict]:
    """Rebuild the model of a checkpoint (``best.pt`` or ``step-*.pt``) with its weights."""
    from lm.train import build_model

    ckpt = checkpoint.load(path, map_location=device)
    try:
        cfg = ModelConfig(**ckpt["recipe"]["model"])
        model = build_model(cfg, ckpt["vocab_size"])
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{path}: cannot rebuild its model ({checkpoint.mismatch(e)})") from None
    return model.to(device).eval(), ckpt


@cli
def main(argv: list[str]) -> int:
    from lm.runtime import tune_allocator

    tune_allocator()  # before the first large allocation: no mmap/munmap churn per step (issue 13)
    ap = argparse.ArgumentParser(prog="python -m lm.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint written by lm.train (e.g. runs/x/checkpoints/best.pt)")
    ap.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    ap.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    ap.add_argument("--seed", type=int, default=0, help="seed for sampling")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={args.max_new_tokens}: must be >= 1")
    if args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
        raise UserError("--temperature must be >= 0 and --top-k >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={args.device} but no CUDA GPU is available")
    model, ckpt = load_model(args.checkpoint, args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    texts = complete(model, ckpt["tokenizer"], ckpt["special_ids"], args.prompt, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, generator=gen)
    for text in texts:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
