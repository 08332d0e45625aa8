"""Generate from a checkpoint: ``python -m lm.generate CHECKPOINT --prompt TEXT [...]``.

A checkpoint carries its recipe and tokenizer (as JSON text), so it generates on its
own. Greedy by default; ``--temperature`` / ``--top-k`` sample instead. Prints one line
per prompt: the prompt as the model read it, then its continuation, special tokens
shown as they are (``<unk>``); ``<eos>`` ends a line and is not printed.
"""
from __future__ import annotations

import sys
from typing import Iterable

import torch

from lm import checkpoint
from lm.checkpoint import Key
from lm.config import ModelConfig
from lm.decode import generate
from lm.device import resolve_device
from lm.runtime import tune_allocator
from lm.model import RNNLM, build_model
from pipeline.errors import ArgumentParser, UserError, cli

MAX_NEW_TOKENS = 100_000  # a bound that catches a typo (an RNN decodes a few thousand tokens/s on a CPU)


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
    banned_ids: Iterable[int] = (),
    warn: bool = True,
) -> list[str]:
    """Continue text prompts; returns each prompt followed by its continuation, detokenized.

    Each prompt is encoded as ``<bos> tokens`` (how training sequences start), so an
    empty prompt starts from ``<bos>`` alone: an unconditional sample. Decoding runs
    until ``<eos>`` or ``max_new_tokens``. Special tokens are kept in the text (a
    generated ``<unk>`` reads ``<unk>``); ``<eos>`` is the stop, never part of the text.

    Args:
        model: the language model.
        tokenizer_json: the tokenizer as ``tokenizers`` JSON (a checkpoint's ``tokenizer``).
        special_ids: ``{"bos": id, "eos": id, "unk": id or None, ...}`` (a checkpoint's).
        prompts: the texts to continue.
        max_new_tokens: most tokens generated per prompt.
        temperature: 0 = greedy; above 0 samples (see :func:`lm.decode.generate`).
        top_k: when sampling, only the ``top_k`` best tokens are candidates.
        generator: RNG for sampling.
        banned_ids: ids never generated (e.g. ``special_ids["unk"]``).
        warn: print a ``warning:`` line on stderr naming prompt words the vocabulary lacks
            (they are read as ``<unk>``).

    Returns:
        One string per prompt: the prompt as the model read it (unknown words as
        ``<unk>``), then the continuation.
    """
    from tokenizers import Tokenizer  # text in and out needs `tokenizers`; the model does not

    tok = Tokenizer.from_str(tokenizer_json)
    encoded = []
    for p in prompts:
        enc = tok.encode(p, add_special_tokens=False)
        unknown = _unknown_words(p, enc, special_ids.get("unk"))
        if unknown and warn:
            print(f"warning: prompt {p!r}: not in the vocabulary, read as <unk>: {', '.join(unknown)}", file=sys.stderr)
        encoded.append([special_ids["bos"], *enc.ids])
    new = generate(model, encoded, max_new_tokens=max_new_tokens, eos_id=special_ids["eos"],
                   temperature=temperature, top_k=top_k, generator=generator, banned_ids=banned_ids)
    return [tok.decode(e[1:] + n, skip_special_tokens=False) for e, n in zip(encoded, new)]


def _unknown_words(text: str, enc, unk_id: int | None) -> list[str]:
    """The pieces of ``text`` the tokenizer read as ``<unk>`` (a literal ``<unk>`` is not one)."""
    if unk_id is None:
        return []
    pieces = [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk_id]
    return list(dict.fromkeys(w for w in pieces if w != "<unk>"))


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[RNNLM, dict]:
    """Rebuild the model of a checkpoint (``best.pt`` or ``step-*.pt``) with its weights."""
    ckpt = checkpoint.load(path, map_location=device)
    try:
        cfg = ModelConfig(**ckpt[Key.RECIPE]["model"])
        model = build_model(cfg, ckpt[Key.VOCAB_SIZE])
        model.load_state_dict(ckpt[Key.MODEL])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{path}: cannot rebuild its model ({checkpoint.mismatch(e)})") from None
    return model.to(device).eval(), ckpt


def _tokenizer(path: str, ckpt: dict):
    """The checkpoint's tokenizer and special ids, or a one-line reason it has none."""
    from tokenizers import Tokenizer

    text, ids = ckpt.get(Key.TOKENIZER), ckpt.get(Key.SPECIAL_IDS)
    if not isinstance(text, str) or not isinstance(ids, dict) or not {"bos", "eos"} <= ids.keys():
        raise UserError(f"{path} holds no tokenizer (a checkpoint written by lm.train carries one); "
                        "it cannot turn text into ids")
    try:
        return Tokenizer.from_str(text), ids
    except Exception as e:  # tokenizers raises its own Exception type for bad JSON
        raise UserError(f"{path}: its tokenizer cannot be read ({str(e).splitlines()[0][:200]})") from None


def _check_prompt(i: int, prompt: str) -> None:
    """A prompt from argv that was not UTF-8 holds surrogate escapes; name the byte."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(prompt[e.start]) - 0xDC00
        shown = prompt.encode("utf-8", "backslashreplace").decode()
        raise UserError(f"--prompt #{i} ({shown}): invalid UTF-8 (byte 0x{byte:02x} at character {e.start + 1}); "
                        "prompts must be UTF-8 text") from None


def _banned(names: list[str], tok, ids: dict, no_unk: bool, vocab_size: int) -> list[int]:
    """``--ban`` items (a token as spelled in the vocabulary, else an integer id) and ``--no-unk``."""
    banned = [ids["unk"]] if no_unk and ids.get("unk") is not None else []
    for name in names:
        token_id = tok.token_to_id(name)
        if token_id is None and name.lstrip("-").isdigit():
            token_id = int(name)
            if not 0 <= token_id < vocab_size:
                raise UserError(f"--ban {name}: no such id (the vocabulary has ids 0..{vocab_size - 1})")
        if token_id is None:
            raise UserError(f"--ban {name}: not a token of this checkpoint's vocabulary, nor an id")
        banned.append(token_id)
    if len(set(banned)) >= vocab_size:
        raise UserError("--ban bans every token of the vocabulary: nothing is left to generate")
    return banned


def _parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m lm.generate", description=__doc__.replace("``", ""))
    ap.add_argument("checkpoint", help="a checkpoint written by lm.train (e.g. runs/tiny/checkpoints/best.pt)")
    ap.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                    help="text to continue; repeat for several prompts (decoded as one batch). Words the "
                         "vocabulary lacks are read as <unk> (with a warning); an empty prompt starts from <bos>")
    ap.add_argument("--max-new-tokens", type=int, default=30, metavar="N",
                    help=f"most tokens generated per prompt, 1..{MAX_NEW_TOKENS:,}; <eos> stops earlier")
    ap.add_argument("--temperature", type=float, default=None, metavar="T",
                    help="sample from softmax(scores / T); 0 = greedy. Default: greedy, or 1.0 with --top-k")
    ap.add_argument("--top-k", type=int, default=None, metavar="K",
                    help="sample among the K most likely allowed tokens (implies sampling)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling RNG")
    ap.add_argument("--no-unk", action="store_true", help="never generate <unk>: take the best other token")
    ap.add_argument("--ban", nargs="+", action="extend", default=[], metavar="TOKEN",
                    help="never generate these tokens (as spelled in the vocabulary, e.g. '<eos>'; "
                         "a number that is not a token is an id)")
    ap.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, mps")
    return ap


@cli
def main(argv: list[str]) -> int:
    tune_allocator()  # before the first large allocation: no mmap/munmap churn per step
    args = _parser().parse_args(argv)
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max-new-tokens={args.max_new_tokens}: must be >= 1" if args.max_new_tokens < 1 else
                        f"--max-new-tokens={args.max_new_tokens}: at most {MAX_NEW_TOKENS:,}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k={args.top_k}: must be >= 1")
    if args.temperature is None:
        args.temperature = 1.0 if args.top_k is not None else 0.0
    if not args.temperature >= 0 or args.temperature == float("inf"):  # `not >=` also catches nan
        raise UserError(f"--temperature={args.temperature}: must be a finite number >= 0")
    if args.temperature == 0 and args.top_k is not None:
        raise UserError(f"--top-k={args.top_k} samples, but --temperature=0 means greedy; drop one of them")
    for i, prompt in enumerate(args.prompt, 1):
        _check_prompt(i, prompt)
    device = resolve_device(args.device, option="--device")
    model, ckpt = load_model(args.checkpoint, device)
    tok, ids = _tokenizer(args.checkpoint, ckpt)
    banned = _banned(args.ban, tok, ids, args.no_unk, model.embed.num_embeddings)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    texts = complete(model, ckpt[Key.TOKENIZER], ids, args.prompt, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, generator=gen, banned_ids=banned)
    for text in texts:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
