"""The data layer: tokenizer round trips, JSONL validation, tfds builders, grain pipelines."""
import json
import re
import string

import numpy as np
import pytest

from instructjax.data.builders import jsonl_data_source
from instructjax.data.jsonl import DataError, read_jsonl, write_jsonl_atomic
from instructjax.data.pipeline import BATCH_KEYS, lm_dataset, sft_dataset
from instructjax.data.tokenizer import SPACE, Tokenizer, train_tokenizer

CODE = '''class Parser:
    """Parses things."""

    def parse(self, text):
        for line in text.split("\\n"):
            if line:
                while True:
                    try:
                        yield self._one(line)
                    except ValueError:
                        break
'''
PROSE = ["The quick brown fox jumps over the lazy dog.",
         "Arvonia is a town on the river Brakou; about 1,200 people live there.",
         "Café crème, naïve façade, 東京 and 日本語, emoji 🙂 too.",
         "Q: What is 12 plus 30?\nA: 42."]
CORPUS = [CODE, CODE.replace("    ", "\t")] * 20 + PROSE * 40
VOCAB = 400


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tok_ws(tmp_path_factory):  # same corpus and vocabulary size, with whitespace-run symbols
    return train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "ws.model",
                           vocab_size=VOCAB, whitespace_runs=True)


TRICKY = ["", " ", "a", "\t", "tab\tseparated\tvalues\t", "crlf line\r\nnext\r\n",
          "trailing spaces   ", "   leading spaces", "\n\n\nthree blank lines\n\n\n\n",
          "  two  spaces  between  ", "Crème brûlée à la façade", "日本語のテキスト 東京",
          "emoji 🙂🚀👍🏽 and flags 🇫🇷", "mixed\u00a0nbsp and\u200bzero width", CODE,
          CODE.replace("    ", "\t"), "".join(f"{'    ' * d}x{d} = {d}\n" for d in range(12)),
          "numbers 1234567890 and 3.14159", "\x00\x01 control \x7f chars"]


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("which", ["tok", "tok_ws"])
def test_round_trip_tricky(text, which, request):
    t = request.getfixturevalue(which)
    ids = t.encode(text)
    assert all(0 <= i < t.vocab_size for i in ids)
    assert t.decode(ids) == text


def test_special_ids(tok):
    assert tok.pad_id != tok.eos_id
    assert len({tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id}) == 4
    assert tok.vocab_size >= 256 + 4  # byte fallback pieces plus specials
    assert tok.encode("") == []
    # Unseen characters go through byte fallback, never to <unk>.
    assert tok.unk_id not in tok.encode("Ω≈ç√∫ 🦀 ꙮ")
    assert tok.decode(tok.encode(f"a{SPACE}b")) == "a b"  # the documented exception
    assert Tokenizer.load(tok.path).encode(CODE) == tok.encode(CODE)
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tok.path.with_name("missing.model"))
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        Tokenizer.load(_write(tok.path.with_name("junk.model"), ["junk"]))


def _random_strings(n, seed):
    rng = np.random.default_rng(seed)
    alphabet = list(string.printable) + list("éèüßñøåçÆŒ") + list("日本語中文한국어") + \
        ["🙂", "🚀", "🦀", "\u00a0", "\u2028", "\u200d"]
    for _ in range(n):
        chars = [alphabet[i] for i in rng.integers(0, len(alphabet), rng.integers(0, 40))]
        for cp in rng.integers(0x80, 0x2FFFF, rng.integers(0, 3)):  # any code point but
            if not 0xD800 <= cp <= 0xDFFF and cp != ord(SPACE):    # surrogates and U+2581
                chars.insert(rng.integers(0, len(chars) + 1), chr(cp))
        yield "".join(chars)


def test_round_trip_random(tok, tok_ws):
    failures = [s for s in _random_strings(300, seed=0)
                for t in (tok, tok_ws) if t.decode(t.encode(s)) != s]
    assert failures == []


def test_whitespace_runs_save_tokens_on_code(tok, tok_ws):
    plain, runs = len(tok.encode(CODE * 3)), len(tok_ws.encode(CODE * 3))
    assert runs < 0.8 * plain, (runs, plain)
    prose = " ".join(PROSE)  # few whitespace runs: not much worse
    assert len(tok_ws.encode(prose)) <= 1.2 * len(tok.encode(prose))


# ----------------------------------------------------------------------------- jsonl


def _write(path, lines):  # lines: a list of str lines, the file's bytes, or None: no file
    if lines is not None:
        path.write_bytes(lines if isinstance(lines, bytes) else
                         "".join(line + "\n" for line in lines).encode())
    return path


BAD_JSONL = [  # (lines, required fields, what the error says after "<path>:")
    (['{"text": "ok"}', "", '{"text": "broken"'], {"text": str}, "3: malformed JSON"),
    (['{"text": "ok"}', '["a"]'], {"text": str}, "2: expected a JSON object, got list"),
    (['{"prompt": "p", "response": "r"}', '{"prompt": "p"}'], {"prompt": str, "response": str},
     "2: missing field 'response'"),
    (['{"text": 3}'], {"text": str}, "1: field 'text' must be a string, got int"),
    (['{"n": true}'], {"n": int}, "1: field 'n' must be an integer, got bool"),
    (["", "   "], {}, " the file has no records"),
    (None, {}, " file not found"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', {"text": str}, "2: not valid UTF-8"),
    (b'\xef\xbb\xbf{"x": 1}\n\xef\xbb\xbf{"x": 2}\n', {}, "2: malformed JSON"),  # BOM: line 1 only
    (['{"x": 1.5}', '{"x": NaN}'], {"x": float}, "2: NaN is not valid JSON"),
    (['{"x": [-Infinity]}'], {}, "1: -Infinity is not valid JSON"),
]


@pytest.mark.parametrize("lines,required,message", BAD_JSONL)
def test_read_jsonl_errors_name_file_and_line(tmp_path, lines, required, message):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:{message}")):
        list(read_jsonl(path, required=required))


def test_read_and_write_jsonl(tmp_path):
    path = _write(tmp_path / "ok.jsonl", b'\xef\xbb\xbf{"x": 1.5, "n": 2}\r\n\r\n'  # BOM, CRLF
                  b'{"x": 2, "n": 3, "s": "caf\xc3\xa9"}\r\n')
    assert list(read_jsonl(path, required={"x": float, "n": int})) == \
        [(1, {"x": 1.5, "n": 2}), (3, {"x": 2, "n": 3, "s": "café"})]  # ints count as numbers
    records = [{"text": "héllo\nworld", "n": i, "x": [1.5, None]} for i in range(5)]
    path = tmp_path / "sub" / "out.jsonl"
    write_jsonl_atomic(path, records)
    write_jsonl_atomic(path, records[:3])  # overwrites in place
    assert [r for _, r in read_jsonl(path, required={"text": str, "n": int})] == records[:3]
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]

    def failing():
        yield {"text": "a"}
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, failing())
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]  # no temp file left
    assert len(list(read_jsonl(path, required={}))) == 3  # old contents untouched


# ----------------------------------------------------------------------------- builders


TEXTS = [f"Document {i}: " + " ".join(["word"] * (i % 7 + 1)) + "." for i in range(30)]
DEMOS = [{"prompt": f"What is {i} plus {i}?\n", "response": f"{2 * i}", "kind": "arith", "id": i}
         for i in range(24)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_jsonl_atomic(d / "text.jsonl", [{"text": t} for t in TEXTS])
    write_jsonl_atomic(d / "text_eval.jsonl", [{"text": t} for t in TEXTS[:4]])
    write_jsonl_atomic(d / "sft.jsonl", DEMOS)
    text = jsonl_data_source({"train": d / "text.jsonl", "eval": d / "text_eval.jsonl"},
                             kind="text", data_dir=d / "tfds")
    sft = jsonl_data_source({"train": d / "sft.jsonl"}, kind="sft", data_dir=d / "tfds")
    return d, text, sft


def test_builder_round_trip(sources, tmp_path):
    d, text, sft = sources
    assert len(text["train"]) == len(TEXTS) and len(text["eval"]) == 4
    assert sorted(r["text"] for r in text["train"]) == sorted(TEXTS)
    ev = text["eval"]
    assert list(ev) == [ev[i] for i in range(4)] and ev[-1] == ev[3] and ev[-4] == ev[0]
    for index in (4, -5):
        with pytest.raises(IndexError):
            ev[index]
    records = sorted(sft["train"], key=lambda r: json.loads(r["meta"])["id"])
    for demo, rec in zip(DEMOS, records, strict=True):
        assert (rec["prompt"], rec["response"]) == (demo["prompt"], demo["response"])
        assert json.loads(rec["meta"]) == {"kind": "arith", "id": demo["id"]}
        path, line = rec["origin"].rsplit(":", 1)
        assert path == str(d / "sft.jsonl") and int(line) == demo["id"] + 1
    copy = tmp_path / "copy.jsonl"  # the same bytes at another path get their own build
    copy.write_bytes((d / "sft.jsonl").read_bytes())
    built = jsonl_data_source({"train": copy}, kind="sft", data_dir=d / "tfds")
    assert {r["origin"].rsplit(":", 1)[0] for r in built["train"]} == {str(copy)}


def test_a_split_of_several_files(sources, tmp_path):
    d, _, sft = sources
    second = tmp_path / "more.jsonl"
    write_jsonl_atomic(second, [{"prompt": "Say hi.\n", "response": "hi"}] * 3)
    both = jsonl_data_source({"train": [d / "sft.jsonl", second]}, kind="sft",
                             data_dir=d / "tfds")["train"]
    assert len(both) == len(DEMOS) + 3
    origins = [r["origin"].rsplit(":", 1) for r in both]
    assert sorted((p, int(n)) for p, n in origins if p == str(second)) == \
        [(str(second), n) for n in (1, 2, 3)]
    # The first file's examples keep their keys, hence their order, from a one-file build.
    assert [r for r in both if r["origin"].startswith(str(d))] == list(sft["train"])
    with pytest.raises(ValueError, match="split 'train' has no files"):
        jsonl_data_source({"train": []}, kind="sft", data_dir=d / "tfds")


def test_builder_errors_and_rebuild(tmp_path, tok):
    with pytest.raises(ValueError, match="kind must be"):
        jsonl_data_source({"train": tmp_path / "x.jsonl"}, kind="nope", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        jsonl_data_source({"train": tmp_path / "x.jsonl"}, kind="text", data_dir=tmp_path)
    path = _write(tmp_path / "x.jsonl", ['{"text": "a"}', '{"text": ["b"]}'])
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:2: field 'text'")):
        jsonl_data_source({"train": path}, kind="text", data_dir=tmp_path / "tfds")
    for n in (2, 3):  # fixed, then changed contents: each gets a fresh build
        _write(path, [json.dumps({"text": c}) for c in "abc"[:n]])
        built = jsonl_data_source({"train": path}, kind="text", data_dir=tmp_path / "tfds")
        assert sorted(built["train"][i]["text"] for i in range(n)) == list("abc"[:n])
    write_jsonl_atomic(path, [{"prompt": "short\n", "response": "ok"},
                              {"prompt": "a long prompt " * 20, "response": "x"}])
    src = jsonl_data_source({"train": path}, kind="sft", data_dir=tmp_path / "tfds")
    ds = sft_dataset(src["train"], tok, seq_len=16, batch_size=1, seed=0, num_epochs=1,
                     shuffle=False, pack=False)
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:2: the prompt is ")):
        list(ds)  # a prompt longer than seq_len: the error names its line


# ----------------------------------------------------------------------------- pipelines


def _check_row_invariants(b, seq_len, batch_size):
    assert set(b) == set(BATCH_KEYS)
    for k in BATCH_KEYS:
        assert b[k].shape == (batch_size, seq_len)
        assert b[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
    seg, pos, mask = b["segment_ids"], b["positions"], b["loss_mask"]
    assert np.all(mask[seg == 0] == 0) and set(np.unique(mask)) <= {0.0, 1.0}
    for r in range(batch_size):
        real = seg[r] > 0
        assert not np.any(np.diff(real.astype(int)) > 0)  # padding only at the end of a row
        for s in np.unique(seg[r][real]):
            idx = np.flatnonzero(seg[r] == s)
            assert np.all(np.diff(idx) == 1) and np.all(pos[r][idx] == np.arange(len(idx)))
            # Within a segment the target at i is the input at i + 1.
            assert np.all(b["targets"][r][idx[:-1]] == b["inputs"][r][idx[1:]])


def test_lm_batches(sources, tok):
    _, text, _ = sources
    seq_len, bsz = 16, 2
    batches = list(lm_dataset(text["train"], tok, seq_len=seq_len, batch_size=bsz, seed=0,
                              num_epochs=1, shuffle=False))
    for b in batches:
        _check_row_invariants(b, seq_len, bsz)
    assert any(len(np.unique(b["segment_ids"][r])) > 1 for b in batches for r in range(bsz))
    # Unshuffled, the loss-masked targets spell out every document (tokens after the first,
    # then EOS) in order, up to the remainder dropped by the last incomplete batch.
    stream = np.concatenate([b["targets"][r][b["loss_mask"][r] > 0]
                             for b in batches for r in range(bsz)])
    docs = [r["text"] for r in text["train"]]
    expected = np.concatenate([tok.encode(t)[1:] + [tok.eos_id] for t in docs])
    assert len(expected) - 2 * seq_len < len(stream) <= len(expected)
    np.testing.assert_array_equal(stream, expected[:len(stream)])


def test_sft_batches_mask_prompt(sources, tok):
    _, _, sft = sources
    demos, seen = {tuple(tok.encode(d["prompt"])): d for d in DEMOS}, set()
    for pack in (True, False):
        it = iter(sft_dataset(sft["train"], tok, seq_len=32, batch_size=4, seed=1, pack=pack))
        for _ in range(6):
            b = next(it)
            _check_row_invariants(b, 32, 4)
            for r in range(4):
                for s in np.unique(b["segment_ids"][r][b["segment_ids"][r] > 0]):
                    idx = np.flatnonzero(b["segment_ids"][r] == s)
                    inputs, targets = b["inputs"][r][idx], b["targets"][r][idx]
                    mask = b["loss_mask"][r][idx]
                    tokens = [int(inputs[0])] + targets.tolist()
                    prompt = next(p for p in demos if tuple(tokens[:len(p)]) == p)
                    demo, n = demos[prompt], len(prompt)
                    response = tok.encode(demo["response"]) + [tok.eos_id]
                    assert tokens == list(prompt) + response
                    # Loss on exactly the response tokens and the EOS (targets from n-1 on).
                    np.testing.assert_array_equal(mask, np.arange(len(idx)) >= n - 1)
                    assert targets[-1] == tok.eos_id and mask[-1] == 1
                    seen.add(demo["id"])
    assert len(seen) > len(DEMOS) // 2


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("kind", ["lm", "sft_packed", "sft_padded"])
def test_iterator_state_resumes_exactly(sources, tok, kind):
    _, text, sft = sources
    if kind == "lm":
        ds = lm_dataset(text["train"], tok, seq_len=32, batch_size=2, seed=3)
    else:
        ds = sft_dataset(sft["train"], tok, seq_len=32, batch_size=3, seed=3,
                         pack=kind == "sft_packed")
    it, fresh = iter(ds), iter(ds)
    _take(it, 5)
    fresh.set_state(json.loads(json.dumps(it.get_state())))  # checkpoints hold JSON
    for a, b in zip(_take(it, 12), _take(fresh, 12)):  # crosses an epoch boundary
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(_take(it, 1)[0]["inputs"], _take(iter(ds), 1)[0]["inputs"])


def test_shuffle_seed_and_shards(sources, tok):
    _, text, _ = sources

    def docs(**kw):
        ds = lm_dataset(text["train"], tok, seq_len=4096, batch_size=1, **kw)
        return [tok.decode(b["inputs"][0][b["segment_ids"][0] == s])
                for b in ds for s in np.unique(b["segment_ids"][0]) if s > 0]
    a, b = docs(seed=0, num_epochs=1), docs(seed=1, num_epochs=1)
    assert a != b and sorted(a) == sorted(b) == sorted(TEXTS) and a == docs(seed=0, num_epochs=1)
    twice = docs(seed=0, num_epochs=2)  # each epoch is reshuffled
    assert twice[:30] == a and sorted(twice[30:]) == sorted(a) and twice[30:] != a
    in_order = [r["text"] for r in text["train"]]  # tfds's stored order
    assert docs(seed=0, num_epochs=1, shuffle=False) == in_order != a
    shards = [docs(seed=0, num_epochs=1, shard_index=i, shard_count=3) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(a) and all(len(s) == 10 for s in shards)
    with pytest.raises(ValueError, match="out of range"):
        docs(seed=0, num_epochs=1, shard_index=3, shard_count=3)
