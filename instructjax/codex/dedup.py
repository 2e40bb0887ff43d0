"""Duplicate detection for the code corpus: exact content hashes, MinHash + LSH
near-duplicates, and shared token n-grams with reference texts (decontamination).

Text is compared as a sequence of word tokens (runs of letters, digits and underscores),
so whitespace, indentation and punctuation changes do not matter. All hashes are stable
across processes and machines (blake2b of each token, then 64-bit polynomial hashing of
token windows), so a rerun makes the same decisions.

MinHash: for a set S of shingle hashes and random hash functions h_1..h_P, the
probability that min h_i(S) == min h_i(T) equals the Jaccard similarity |S & T| / |S | T|;
the fraction of equal signature entries estimates it (standard error sqrt(J (1 - J) / P)).
LSH banding: signatures are cut into B bands of R rows; two files become candidates when
any band matches exactly, which happens with probability 1 - (1 - J^R)^B. Candidates are
then kept only when their estimated Jaccard reaches the threshold.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import numpy as np

_WORD = re.compile(r"\w+")
_ROLL = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier for hashing token windows
_CHUNK = 4096  # shingles per MinHash block: bounds memory at _CHUNK x num_perm x 8 bytes


def content_hash(text: str) -> str:
    """Hash of `text` with CRLF / CR line endings made LF (exact-duplicate key)."""
    return hashlib.sha256(normalize_newlines(text).encode("utf-8")).hexdigest()


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


class TokenHasher:
    """Maps text to an array of stable 64-bit token hashes (memoised per token)."""

    def __init__(self):
        self._cache: dict[str, int] = {}

    def _hash(self, token: str) -> int:
        value = self._cache.get(token)
        if value is None:
            digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
            value = self._cache[token] = int.from_bytes(digest, "little")
        return value

    def __call__(self, text: str) -> np.ndarray:
        tokens = _WORD.findall(text)
        return np.fromiter((self._hash(t) for t in tokens), dtype=np.uint64, count=len(tokens))


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """Hashes of every window of `n` consecutive tokens (empty if there are fewer)."""
    count = len(tokens) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    out = np.zeros(count, dtype=np.uint64)
    for j in range(n):  # uint64 arithmetic wraps: a polynomial hash mod 2^64
        out = out * _ROLL + tokens[j:j + count]
    return out


def shingles(tokens: np.ndarray, size: int) -> np.ndarray:
    """The distinct shingles of a file; one short of `size` tokens is a single shingle."""
    if 0 < len(tokens) < size:
        return ngram_hashes(tokens, len(tokens))
    return np.unique(ngram_hashes(tokens, size))


class MinHasher:
    """MinHash signatures with P multiply-add-shift hash functions of a 64-bit key."""

    def __init__(self, num_perm: int = 128, seed: int = 0):
        rng = np.random.default_rng(seed)
        high = np.iinfo(np.uint64).max
        self.num_perm = num_perm
        self._a = rng.integers(1, high, size=num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
        self._b = rng.integers(0, high, size=num_perm, dtype=np.uint64, endpoint=True)

    def signature(self, shingle_hashes: np.ndarray) -> np.ndarray:
        """uint32[num_perm]; an empty set gives all-max (similar to nothing but itself)."""
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
        for start in range(0, len(shingle_hashes), _CHUNK):
            x = shingle_hashes[start:start + _CHUNK, None]
            # The high 32 bits of (a x + b) mod 2^64 form a near-universal family.
            hashed = (x * self._a + self._b) >> np.uint64(32)
            np.minimum(sig, hashed.min(axis=0), out=sig)
        return sig.astype(np.uint32)


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    return 1.0 - (1.0 - jaccard ** rows) ** bands


def choose_bands(num_perm: int, threshold: float, recall: float = 0.95) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest spurious candidates to verify) that
    still make a pair at exactly `threshold` a candidate with probability >= `recall`."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if candidate_probability(threshold, bands, rows) >= recall:
            return bands, rows
    return num_perm, 1


class NearDuplicateIndex:
    """Greedy near-duplicate removal in arrival order: a file is a duplicate when it is
    similar (estimated Jaccard >= threshold) to a file kept before it; otherwise it is
    kept and indexed. Feeding files in a fixed order keeps the first of each cluster."""

    def __init__(self, *, threshold: float, num_perm: int, seed: int = 0):
        self.threshold = threshold
        self.minhasher = MinHasher(num_perm, seed)
        self.bands, self.rows = choose_bands(num_perm, threshold)
        self._buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(self.bands)]
        self._signatures: list[np.ndarray] = []
        self._names: list[str] = []
        self.candidate_checks = 0

    def _keys(self, sig: np.ndarray) -> list[bytes]:
        r = self.rows
        return [sig[i * r:(i + 1) * r].tobytes() for i in range(self.bands)]

    def add(self, name: str, shingle_hashes: np.ndarray) -> tuple[str, float] | None:
        """None if `name` is kept (and indexed); else (kept file it duplicates, Jaccard)."""
        sig = self.minhasher.signature(shingle_hashes)
        keys = self._keys(sig)
        candidates = sorted({i for band, key in zip(self._buckets, keys) for i in band.get(key, ())})
        for i in candidates:  # lowest index first: the earliest similar file wins
            self.candidate_checks += 1
            similarity = jaccard_estimate(sig, self._signatures[i])
            if similarity >= self.threshold:
                return self._names[i], similarity
        index = len(self._signatures)
        self._signatures.append(sig)
        self._names.append(name)
        for band, key in zip(self._buckets, keys):
            band[key].append(index)
        return None


class NgramOverlapIndex:
    """Distinct token n-grams of reference texts (e.g. benchmark prompts and solutions).
    A text matches a reference when it holds at least `min_fraction` of that reference's
    distinct n-grams; a reference shorter than n tokens has none and matches nothing."""

    def __init__(self, references: dict[str, str], *, n: int, min_fraction: float,
                 hasher: TokenHasher):
        self.n, self.min_fraction = n, min_fraction
        self._names = list(references)
        self._sizes = []
        owners: dict[int, list[int]] = defaultdict(list)
        for i, text in enumerate(references.values()):
            grams = np.unique(ngram_hashes(hasher(text), n))
            self._sizes.append(len(grams))
            for h in grams.tolist():
                owners[h].append(i)
        self._owners = owners
        self._sorted = np.array(sorted(owners), dtype=np.uint64)

    def __len__(self) -> int:
        return len(self._sorted)

    def best_match(self, tokens: np.ndarray) -> tuple[str, float] | None:
        """(reference, share of its n-grams found in `tokens`) for the reference with the
        largest share, if that share reaches min_fraction; else None."""
        grams = ngram_hashes(tokens, self.n)
        if not len(grams) or not len(self._sorted):
            return None
        pos = np.searchsorted(self._sorted, grams).clip(max=len(self._sorted) - 1)
        hits = np.unique(grams[self._sorted[pos] == grams])
        counts: dict[int, int] = defaultdict(int)
        for h in hits.tolist():
            for i in self._owners[h]:
                counts[i] += 1
        if not counts:
            return None
        best = max(counts, key=lambda i: (counts[i] / self._sizes[i], -i))
        share = counts[best] / self._sizes[best]
        return (self._names[best], share) if share >= self.min_fraction else None
