"""A sentencepiece tokenizer that round-trips text and code exactly.

Identity normalisation, no extra-whitespace removal, no dummy prefix and byte fallback
make `decode(encode(s)) == s` for any string without U+2581 ("▁", sentencepiece's own
space marker, which decodes as a space). Newline is a user-defined symbol, so it survives
sentencepiece's line-based training. With `whitespace_runs`, runs of spaces and newline +
indentation become single symbols, which saves a large share of tokens on code (Codex).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
SPACE = "\u2581"  # sentencepiece writes spaces as this symbol
NEWLINE = "\n"


def whitespace_symbols() -> list[str]:
    """Runs of 2..16 spaces, and newline + indentation of 1..16 spaces (and tabs)."""
    runs = [SPACE * n for n in (2, 3, 4, 5, 6, 7, 8, 10, 12, 16)]
    indents = [NEWLINE + SPACE * n for n in (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)]
    tabs = [NEWLINE + "\t" * n for n in (1, 2, 3)]
    return [NEWLINE * 2] + runs + indents + tabs


class Tokenizer:
    def __init__(self, processor: spm.SentencePieceProcessor, path: str | Path):
        self._sp = processor
        self.path = Path(path)
        self.vocab_size = processor.get_piece_size()
        self.pad_id, self.eos_id = processor.pad_id(), processor.eos_id()
        self.bos_id, self.unk_id = processor.bos_id(), processor.unk_id()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} not found")
        processor = spm.SentencePieceProcessor()
        try:
            processor.load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a valid sentencepiece model ({e})") from None
        return cls(processor, path)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) != self.pad_id])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def pieces(self) -> list[str]:
        """The vocabulary, by id: two tokenizers with the same pieces encode alike."""
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]


def _training_lines(texts: Iterable[str], max_lines: int, max_chars: int) -> Iterable[str]:
    """Sentencepiece trains on lines of bounded length; newlines are user-defined symbols."""
    count = 0
    for text in texts:
        for line in text.split("\n"):
            if count >= max_lines:
                return
            if line:
                yield line[:max_chars]
                count += 1


def train_tokenizer(texts: Iterable[str], out_path: str | Path, *, vocab_size: int,
                    whitespace_runs: bool = False, max_lines: int = 300_000,
                    model_type: str = "bpe") -> Tokenizer:
    """Trains on `texts` and writes the model atomically to `out_path`.

    BPE (as Llama and GPT-2 use) with byte fallback: every byte has a token, so nothing is
    ever unknown, and the rarest characters (0.05% of the text) are spelled in bytes rather
    than taking vocabulary slots. Digits are split so numbers are spelled digit by digit.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    symbols = [NEWLINE] + (whitespace_symbols() if whitespace_runs else [])
    symbols = list(dict.fromkeys(symbols))
    failures = []

    def lines():  # an error reading the text is the text's, not the tokenizer's
        try:
            yield from _training_lines(texts, max_lines, 4000)
        except Exception as e:
            failures.append(e)
            raise

    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        prefix = os.path.join(tmp, "spm")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines(),
                model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
                character_coverage=0.9995, byte_fallback=True, normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
                allow_whitespace_only_pieces=whitespace_runs, user_defined_symbols=symbols,
                pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
                max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1,
                hard_vocab_limit=False, minloglevel=2)
        except RuntimeError as e:  # sentencepiece's own message names the limit it hit
            if failures:
                raise failures[0] from None
            reason = str(e).split("] ")[-1].split(" Increase")[0]
            raise ValueError(f"cannot train a {vocab_size}-piece tokenizer on this corpus "
                             f"({reason}); raise the vocabulary size") from None
        os.replace(prefix + ".model", out_path)
    return Tokenizer.load(out_path)
