"""The comparison-data format for reward-model training, and the pairwise formats it reads.

Native JSONL, one K-way ranking per line (K in [2, 9], as in InstructGPT):

    {"prompt": str, "responses": [str, ...], "ranking": [int, ...], ...optional fields}

`ranking` is a permutation of range(K), best first: ranking[0] is the index into
`responses` of the preferred response. Optional fields (for example "id", "labeler",
"kind") are kept as they are. Empty response strings are allowed (a model may stop at
once), and so are duplicate responses: model samples repeat, and a pair of identical texts
gets identical rewards, so it adds a constant to the loss and no gradient.

Pairwise rows load as K = 2 comparisons through the same path (ranking [0, 1]):
  - generic:  {"prompt": str, "chosen": str, "rejected": str}
  - HH-RLHF:  {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}: each
    transcript is split at its LAST "\\n\\nAssistant:"; the prompt is everything up to
    and including that marker (it must be identical in chosen and rejected), the response
    the rest (usually starting with a space).
The format is detected per line from its fields: "responses" -> native; "chosen" and
"rejected" -> pairwise (generic when "prompt" is present). Every error names path:line.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from instructjax.data.jsonl import DataError, read_jsonl, write_jsonl_atomic

K_MIN, K_MAX = 2, 9
HH_MARKER = "\n\nAssistant:"
_PAIRWISE_FIELDS = ("chosen", "rejected")


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _native(record: dict, where: str) -> dict:
    for field in ("prompt", "responses", "ranking"):
        if field not in record:
            raise DataError(f"{where}: missing field {field!r}; a comparison needs 'prompt', "
                            "'responses' and 'ranking' (or 'chosen' and 'rejected')")
    prompt, responses, ranking = record["prompt"], record["responses"], record["ranking"]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' must be a string, got {_type_name(prompt)}")
    if not isinstance(responses, list):
        raise DataError(f"{where}: field 'responses' must be a list of strings, got "
                        f"{_type_name(responses)}")
    if not responses:
        raise DataError(f"{where}: field 'responses' is empty; a comparison needs {K_MIN} to "
                        f"{K_MAX} responses")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise DataError(f"{where}: responses[{i}] must be a string, got "
                            f"{_type_name(response)}")
    k = len(responses)
    if not K_MIN <= k <= K_MAX:
        raise DataError(f"{where}: {k} responses; a comparison needs {K_MIN} to {K_MAX} "
                        "(split larger rankings into several lines)")
    if not isinstance(ranking, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ranking):
        raise DataError(f"{where}: field 'ranking' must be a list of integers (indices into "
                        f"'responses', best first), got {ranking!r:.80}")
    if sorted(ranking) != list(range(k)):
        raise DataError(f"{where}: 'ranking' {ranking} is not a permutation of 0..{k - 1}; "
                        "it must list each index into 'responses' once, best first")
    return record


def _split_hh(transcript: str, field: str, where: str) -> tuple[str, str]:
    cut = transcript.rfind(HH_MARKER)
    if cut < 0:
        raise DataError(f"{where}: field {field!r} has no {HH_MARKER!r} turn; HH-RLHF rows "
                        "need the assistant's reply after a final '\\n\\nAssistant:' (or "
                        "give an explicit 'prompt' field)")
    cut += len(HH_MARKER)
    return transcript[:cut], transcript[cut:]


def _pairwise(record: dict, where: str) -> dict:
    for field in (*_PAIRWISE_FIELDS, *(("prompt",) if "prompt" in record else ())):
        if not isinstance(record[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, got "
                            f"{_type_name(record[field])}")
    extra = {k: v for k, v in record.items() if k not in (*_PAIRWISE_FIELDS, "prompt")}
    if "prompt" in record:
        prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    else:
        prompt, chosen = _split_hh(record["chosen"], "chosen", where)
        other, rejected = _split_hh(record["rejected"], "rejected", where)
        if other != prompt:
            at = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b),
                      min(len(prompt), len(other)))
            raise DataError(
                f"{where}: 'chosen' and 'rejected' differ before their last {HH_MARKER!r} "
                f"(first difference at character {at}: {prompt[at:at + 30]!r} vs "
                f"{other[at:at + 30]!r}); both must continue the same conversation")
    return {"prompt": prompt, "responses": [chosen, rejected], "ranking": [0, 1], **extra}


def to_comparison(record: dict, where: str = "<input>") -> dict:
    """A native comparison record from a native or pairwise one (validated)."""
    if "responses" in record:
        if any(f in record for f in _PAIRWISE_FIELDS):
            raise DataError(f"{where}: the record has both 'responses' and 'chosen'/'rejected'"
                            "; use one format per line")
        return _native(record, where)
    if all(f in record for f in _PAIRWISE_FIELDS):
        return _pairwise(record, where)
    if any(f in record for f in _PAIRWISE_FIELDS):
        missing = next(f for f in _PAIRWISE_FIELDS if f not in record)
        raise DataError(f"{where}: missing field {missing!r}; a pairwise comparison needs "
                        "'chosen' and 'rejected'")
    return _native(record, where)  # names the first missing native field


def read_comparisons(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yields (line_number, native comparison record) for each line of a native, generic
    pairwise or HH-RLHF JSONL file; errors are DataErrors starting with "path:line: "."""
    for line, record in read_jsonl(path, required={}):
        yield line, to_comparison(record, f"{path}:{line}")


def write_comparisons(path: str | Path, records: Iterable[dict]) -> None:
    """Validates and writes native comparison records atomically."""
    def checked():
        for i, record in enumerate(records):
            yield to_comparison(dict(record), f"{path}: record {i}")
    write_jsonl_atomic(path, checked())


def ranks(ranking: list[int]) -> list[int]:
    """The inverse permutation: ranks(ranking)[k] is the place of response k (0 = best)."""
    out = [0] * len(ranking)
    for place, index in enumerate(ranking):
        out[index] = place
    return out
