"""The tokenizer of a recipe's ``data.tokenizer``: trained on the train split (streamed in
batches) or loaded from ``tokenizer.json``, through ``tokenizers``; and the special tokens
every prepared row and every model rely on.

``tokenizers`` is imported when a tokenizer is built, not with this module.
"""
from __future__ import annotations

import json

from pipeline.config import DataConfig
from pipeline.errors import UserError

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3: <pad> = 0 is the notebook's pad id


def build_tokenizer(cfg: DataConfig, train, text_column: str, quiet: bool = False):
    """Train the configured tokenizer on the train split, streamed in batches, or load one.

    Args:
        cfg: the ``data:`` section (``tokenizer``, ``batch_size``).
        train: the train split, a ``datasets.Dataset`` (unused when ``data.tokenizer.path``
            is set: ``None`` will do).
        text_column: its text column.
        quiet: no progress bar.

    Returns:
        A ``tokenizers.Tokenizer`` with :data:`SPECIALS` at ids 0..3 (a loaded one is only
        checked to have ``<pad>`` = 0, ``<bos>`` and ``<eos>``: see :func:`special_ids`).

    Raises:
        UserError: a ``data.tokenizer.path`` that is missing, not a tokenizer, or lacks
            the special tokens or its unknown token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tqdm.auto import tqdm

    tc = cfg.tokenizer
    if tc.path is not None:
        if not tc.path.is_file():
            raise UserError(f"data.tokenizer.path: no such file: {tc.path}")
        try:
            tok = Tokenizer.from_file(str(tc.path))
        except Exception as e:
            raise UserError(f"{tc.path}: not a tokenizers tokenizer.json ({e})") from None
        special_ids(tok, where=str(tc.path))
        _check_unknown_token(tok, where=str(tc.path))
        return tok

    if tc.kind == "word" and not (tc.nfkc or tc.lowercase):
        # the same tokenizer WordLevelTrainer makes, counted on Arrow buffers (pipeline/fast_word.py)
        from pipeline import fast_word

        counts = fast_word.count_dataset_words(train, text_column)
        words = fast_word.word_vocab(counts, SPECIALS, tc.vocab_size, tc.min_frequency)
        return fast_word.word_tokenizer(words, SPECIALS, unk="<unk>")
    norms = ([normalizers.NFKC()] if tc.nfkc else []) + ([normalizers.Lowercase()] if tc.lowercase else [])
    big = 1 << 30  # "keep every type"
    common = {"min_frequency": tc.min_frequency, "special_tokens": list(SPECIALS), "show_progress": False}
    if tc.kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.WordLevelTrainer(vocab_size=tc.vocab_size or big, **common)
    elif tc.kind == "char":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(vocab_size=tc.vocab_size or big, **common)
    elif tc.kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=tc.vocab_size or 8000, **common)
    elif tc.kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=tc.vocab_size or 8000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common
        )
    else:  # unigram
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        common.pop("min_frequency")
        trainer = trainers.UnigramTrainer(vocab_size=tc.vocab_size or 8000, unk_token="<unk>", **common)
    if norms:
        tok.normalizer = normalizers.Sequence(norms)

    def batches():
        # streamed from the memory-mapped train split: never one giant Python string
        for start in range(0, len(train), cfg.batch_size):
            yield [t if t is not None else "" for t in train[start : start + cfg.batch_size][text_column]]

    n = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    it = tqdm(batches(), total=n, desc=f"train {tc.kind} tokenizer", unit="batch", disable=True if quiet else None)
    tok.train_from_iterator(it, trainer=trainer, length=len(train))
    if tc.kind in ("word", "char"):
        tok = renumber_word_level(tok)
    return tok


def renumber_word_level(tok):
    """Give a trained word-level vocabulary contiguous ids with the specials first.

    ``WordLevelTrainer`` counts a special token that also occurs in the text (WikiText's
    literal ``<unk>``) as a word too, which moves it and leaves a hole in the ids.

    Args:
        tok: a ``tokenizers.Tokenizer`` with a ``WordLevel`` model, as trained.

    Returns:
        A new tokenizer: :data:`SPECIALS` at ids 0..3, the other words after them in
        their trained order; normalizer, pre-tokenizer and decoder kept.
    """
    from tokenizers import AddedToken, Tokenizer, models

    vocab = tok.get_vocab(with_added_tokens=False)
    words = sorted((i, w) for w, i in vocab.items() if w not in SPECIALS)
    new = Tokenizer(models.WordLevel({**{s: i for i, s in enumerate(SPECIALS)}, **{w: len(SPECIALS) + k for k, (_, w) in enumerate(words)}}, unk_token="<unk>"))
    new.normalizer, new.pre_tokenizer, new.decoder = tok.normalizer, tok.pre_tokenizer, tok.decoder
    new.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return new


def _check_unknown_token(tok, where: str) -> None:
    """A word-level (or WordPiece) model must hold its unknown token, or the first word
    outside its vocabulary fails deep inside the encoder."""
    model = json.loads(tok.to_str())["model"]
    unk = model.get("unk_token")
    if model.get("type") in ("WordLevel", "WordPiece") and (unk is None or tok.token_to_id(unk) is None):
        raise UserError(f"{where}: the tokenizer's unknown token {unk!r} is not in its vocabulary, so words outside "
                        f"it cannot be encoded; add it (e.g. <unk>) to the vocabulary")


def special_ids(tok, where: str) -> dict[str, int]:
    """The ids of the special tokens, checked to be usable: ``<pad>``, ``<bos>`` and
    ``<eos>`` present, ``<pad>`` = 0 (the collators' pad id) and not ``<eos>``'s id.

    Args:
        tok: a ``tokenizers.Tokenizer``.
        where: what the tokenizer is (a path, or ``"tokenizer"``), for the message.

    Returns:
        ``{"<pad>": 0, "<bos>": ..., "<eos>": ..., "<unk>": ... or None}``.

    Raises:
        UserError: a special token missing, or ``<pad>`` not 0 or shared with ``<eos>``.
    """
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    missing = [s for s in ("<pad>", "<bos>", "<eos>") if ids[s] is None]
    if missing:
        raise UserError(f"{where}: the tokenizer lacks the special tokens {', '.join(missing)}")
    if ids["<pad>"] != 0:
        raise UserError(f"{where}: <pad> must have id 0 (it has {ids['<pad>']})")
    if ids["<pad>"] == ids["<eos>"]:
        raise UserError(f"{where}: <pad> and <eos> share id {ids['<pad>']}")
    return ids
