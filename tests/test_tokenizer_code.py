"""The code tokenizer: exact round trip on whitespace and unicode that tests/test_data.py
does not cover, whitespace-run symbols as single tokens, what U+2581 in the input does,
and the token-count benchmark (benchmarks/tokenizer_code.py) on a tiny corpus."""
import inspect
import sysconfig
import textwrap
import unicodedata
from pathlib import Path

import pytest

from benchmarks.tokenizer_code import compare
from instructjax.data.tokenizer import NEWLINE, SPACE, train_tokenizer, whitespace_symbols

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Real code: a few small standard-library modules (train) and another one (held out).
TRAIN_CODE = [inspect.getsource(m) for m in (textwrap, inspect)]
HELD_OUT = (STDLIB / "shlex.py").read_text(encoding="utf-8")
VOCAB = 512


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return {runs: train_tokenizer(TRAIN_CODE, out / f"{runs}.model", vocab_size=VOCAB,
                                  whitespace_runs=runs) for runs in (False, True)}


TRICKY = [
    "lone\rcarriage\rreturns\r", "\r", "\r\r\n", "mixed\r\nline\nends\r",
    "form\x0cfeed and\x0bvertical tab",
    "def f():\n\t    return 1  \t \n",  # tab then spaces, trailing mixed whitespace
    "if x:\n    \n        y = 1\n    ",   # whitespace-only line, indentation at the end
    " " * 37 + "x" + "\t" * 5,              # runs longer than any symbol
    "\n" * 7 + " \n \n",
    unicodedata.normalize("NFD", "déjà vu, Ångström"),  # combining accents, not composed
    "a\u0301\u0302\u0303 stacked combining marks",
    "family 👨‍👩‍👧 and skin tone 👋🏿 and keycap 1️⃣",
    "\ufeffbyte order mark, \u200ezero-width marks\u200f, \U0010fffd private use",
    "é", "e\u0301",  # composed and decomposed stay distinct
]


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("runs", [False, True])
def test_round_trip(toks, text, runs):
    tok = toks[runs]
    assert tok.decode(tok.encode(text)) == text


def test_no_normalisation(toks):
    for tok in toks.values():
        assert tok.encode("é") != tok.encode("e\u0301")
        assert tok.encode("\r\n") != tok.encode("\n")


def test_whitespace_symbols_are_single_tokens(toks):
    plain, ws = toks[False], toks[True]
    for symbol in whitespace_symbols():
        text = symbol.replace(SPACE, " ")
        ids = ws.encode(text)
        assert len(ids) == 1 and ws.id_to_piece(ids[0]) == symbol, (repr(text), ids)
        assert len(plain.encode(text)) == len(symbol)  # without them: one token per char
    # In context, the longest symbol wins: a newline with 8 spaces of indentation is one.
    ids = ws.encode("x = 1\n        return x")
    assert ws.id_to_piece(ids[ids.index(ws.encode(NEWLINE + " " * 8)[0])]) == NEWLINE + SPACE * 8


def test_u2581_in_input_is_a_space(toks):
    """Sentencepiece writes spaces as U+2581 internally, so that character in the input is
    encoded exactly as a space would be and decodes as a space: the one character that does
    not round-trip. Here is the whole of that behaviour, pinned down."""
    for tok in toks.values():
        for text in ("a\u2581b", "\u2581" * 4 + "return", "x\u2581 \u2581y", "\u2581"):
            assert tok.encode(text) == tok.encode(text.replace(SPACE, " "))
            assert tok.decode(tok.encode(text)) == text.replace(SPACE, " ")
    # Runs mixing it with spaces become the run symbols too.
    assert len(toks[True].encode(" \u2581 \u2581")) == 1


def test_benchmark_compare(tmp_path):
    result = compare(TRAIN_CODE, [HELD_OUT], VOCAB, tmp_path, max_train_lines=100_000)
    plain, ws = result["plain"], result["whitespace"]
    assert plain["round_trip_failures"] == ws["round_trip_failures"] == 0
    assert result["chars"] == len(HELD_OUT)
    assert ws["tokens"] < 0.8 * plain["tokens"], result  # the 20% target
    assert result["reduction_percent"] == pytest.approx(100 * (1 - ws["tokens"] / plain["tokens"]))
    assert ws["chars_per_token"] == pytest.approx(len(HELD_OUT) / ws["tokens"])
    # A held-out file that cannot round-trip is counted and named, not passed over.
    bad = compare(TRAIN_CODE, [HELD_OUT, "x\u2581y"], VOCAB, tmp_path, max_train_lines=100_000)
    for name in ("plain", "whitespace"):
        assert bad[name]["round_trip_failures"] == 1 and bad[name]["failed_files"] == [1]
