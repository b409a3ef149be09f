"""The token store: the tokenized splits as the cache holds them, read back memory-mapped.

What is stored (per split, one row per example: a preference pair, or an SFT target), in Arrow files
written and read through `datasets` (memory-mapped, so the ranks of a node share one copy through the
page cache, and a rank holds only the pages it touches):

    index        int64              the example's position in the split (rows -> examples order)
    prompt       list<int32>        the prompt's ids as trained on and generated from, once per example
    responses    list<list<int32>>  each response's ids after the prompt (chosen, rejected; or the target)
    unlabelled   list<list<int32>>  per response, [start, end) pairs of its ids that are not trained on
                                    (the user turns inside a multi-turn SFT target); empty almost always
    row          string             test split only: the example's text as JSON, for eval.checker

Labels follow from these (the prompt and the unlabelled spans are -100, the rest are the ids), so a
token costs 4 bytes on disk and nothing in a rank's memory until a batch reads it. Arrow through
`datasets` rather than bare numpy files: it is what the rest of the data path reads, it types and
validates every column, and `Dataset.from_file` memory-maps it as it is.

The manifest (written last by the build, data/cache.py) names each split's shards and digests.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from dpo_ds.data.tokenize import IGNORE, TokenizedSeq

MANIFEST = "manifest.json"
SPLITS = ("train", "test")


class TokenStore:
    """One split's tokenized examples: numpy views (zero-copy) into the Arrow columns, memory-mapped
    from the cache, or built in memory (tests, TokenStore.build). Answers, for example i, its sequences
    as TokenizedSeq (built when a batch asks, dropped after) and the lengths batching needs."""

    def __init__(self, columns: dict, split: str, rows: list | None = None, digest: str = ""):
        # columns: prompt_values, prompt_offsets, resp_values, resp_offsets, resp_starts, mask_values,
        # mask_offsets (numpy); rows: the test split's example texts (JSON strings) or None
        self.split = split
        self.c = columns
        self.n = len(columns["prompt_offsets"]) - 1
        self.width = int(columns["resp_starts"][-1]) // self.n if self.n else 0  # responses per example
        self._rows = rows
        self.digest = digest  # sha256 of the split's ids, as written (the manifest's)
        po = columns["prompt_offsets"]
        self.prompt_lens = (po[1:] - po[:-1]).astype(np.int64)
        ro = columns["resp_offsets"]
        self.response_lens = (ro[1:] - ro[:-1]).astype(np.int64).reshape(self.n, self.width)

    def __len__(self) -> int:
        return self.n

    @property
    def tokens(self) -> int:
        """Tokens as trained on: every sequence's prompt + its response."""
        return int(self.prompt_lens.sum() * self.width + self.response_lens.sum())

    def prompt(self, i: int) -> np.ndarray:
        po = self.c["prompt_offsets"]
        return self.c["prompt_values"][po[i] : po[i + 1]]

    def seqs(self, i: int) -> list[TokenizedSeq]:
        """Example i as the collators take it: [chosen, rejected] (or [target]), prompt + response ids,
        labels -100 on the prompt and on unlabelled spans."""
        prompt = self.prompt(i).tolist()
        p = len(prompt)
        out = []
        ro, rv = self.c["resp_offsets"], self.c["resp_values"]
        for k in range(self.width):
            j = i * self.width + k
            resp = rv[ro[j] : ro[j + 1]].tolist()
            labels = [IGNORE] * p + resp
            mo = self.c["mask_offsets"]
            spans = self.c["mask_values"][mo[j] : mo[j + 1]]
            for start, end in zip(spans[0::2].tolist(), spans[1::2].tolist()):
                labels[p + start : p + end] = [IGNORE] * (end - start)
            out.append(TokenizedSeq(prompt + resp, labels, p))
        return out

    def labelled(self) -> np.ndarray:
        """Trained-on tokens per example (n,): what per-token SFT normalises by. A sequence's first token
        is never scored (nothing predicts it), which matters when the prompt is empty."""
        mo = self.c["mask_offsets"]
        mv = self.c["mask_values"].astype(np.int64)
        masked = np.zeros(self.n * self.width, dtype=np.int64)
        for j in np.flatnonzero(mo[1:] > mo[:-1]):  # the rare responses with unlabelled spans
            spans = mv[mo[j] : mo[j + 1]]
            masked[j] = int((spans[1::2] - spans[0::2]).sum())
        per_seq = self.response_lens.reshape(-1) - masked
        first_unscored = np.repeat(self.prompt_lens == 0, self.width) & (self.response_lens.reshape(-1) > 0)
        if first_unscored.any():  # empty prompt: the response's first token is the sequence's first
            for j in np.flatnonzero(first_unscored):
                spans = mv[mo[j] : mo[j + 1]]
                starts_masked = len(spans) and spans[0] == 0
                per_seq[j] -= 0 if starts_masked else 1
        return per_seq.reshape(self.n, self.width).sum(axis=1)

    def row(self, i: int) -> dict:
        """The test split's example i as text (prompt, responses, origins), for eval.checker."""
        if self._rows is None:
            raise KeyError(f"{self.split} split: the cache keeps example texts for the test split only")
        return json.loads(self._rows[i])

    @classmethod
    def build(cls, examples, tokenization, split: str) -> TokenStore:
        """In memory, from Examples, in this process (tests and single-process tools)."""
        writer = _ShardBuilder(keep_rows=split == "test")
        for i, ex in enumerate(examples):
            writer.add(i, ex, tokenization.tokenize(ex.prompt, ex.responses, ex.truncation_mode, ex.origins))
        return writer.store(split)

    @classmethod
    def from_datasets(cls, parts: list, split: str, digest: str) -> TokenStore:
        """The store of memory-mapped shards (datasets.Dataset), in order."""
        arrays = {k: [] for k in ("prompt", "responses", "unlabelled")}
        rows = [] if split == "test" else None
        for ds in parts:
            table = ds.data.table
            for name in arrays:
                arrays[name].extend(table.column(name).chunks)
            if rows is not None:
                rows.extend(table.column("row").to_pylist())
        return cls(_columns(arrays), split, rows, digest)


class _Pieces:
    """Int32 values that live in several Arrow chunks (one per shard), sliced by global offsets without
    concatenating them: a concatenation would copy every id into this process's private memory, where a
    view of each mapped chunk costs nothing (the pages stay the page cache's, shared by a node's ranks).
    A slice never crosses a chunk: the offsets of one chunk's lists all point into its own values."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays or [np.zeros(0, dtype=np.int32)]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, span: slice) -> np.ndarray:
        a, b = int(span.start), int(span.stop)
        k = int(np.searchsorted(self.starts, a, side="right")) - 1
        k = min(max(k, 0), len(self.arrays) - 1)
        if b > a and (b > self.starts[k + 1] or a < self.starts[k]):
            raise IndexError(f"values [{a}:{b}] cross a chunk boundary")
        return self.arrays[k][a - self.starts[k] : b - self.starts[k]]

    def astype(self, dtype) -> np.ndarray:  # the small columns (unlabelled spans), read whole
        return np.concatenate([a.astype(dtype) for a in self.arrays])


def _columns(arrays: dict) -> dict:
    """Numpy views of the Arrow list columns of every chunk (zero-copy); the offsets, one per list, are
    rebased into one global array (8 bytes an example), the values stay in their chunks (_Pieces)."""

    def flat(chunks):
        values, offsets, base = [], [np.zeros(1, dtype=np.int64)], 0
        for ch in chunks:
            off = ch.offsets.to_numpy().astype(np.int64)
            values.append(ch.values.slice(int(off[0]), int(off[-1] - off[0])))
            offsets.append(off[1:] - off[0] + base)
            base += int(off[-1] - off[0])
        return values, np.concatenate(offsets)

    def numbers(values):
        return _Pieces([v.to_numpy(zero_copy_only=v.null_count == 0) for v in values])

    p_vals, p_off = flat(arrays["prompt"])
    r_lists, r_starts = flat(arrays["responses"])  # (examples + 1) offsets into the responses
    m_lists, _ = flat(arrays["unlabelled"])
    r_vals, r_off = flat(r_lists)
    m_vals, m_off = flat(m_lists)
    return {
        "prompt_values": numbers(p_vals),
        "prompt_offsets": p_off,
        "resp_starts": r_starts,
        "resp_values": numbers(r_vals),
        "resp_offsets": r_off,
        "mask_values": numbers(m_vals),
        "mask_offsets": m_off,
    }


def _arrays(seqs: list[TokenizedSeq]) -> tuple[np.ndarray, list[np.ndarray], list[list[int]]]:
    """An example's sequences as stored: the prompt once, each response, its unlabelled spans."""
    p = seqs[0].prompt_len
    prompt = np.asarray(seqs[0].input_ids[:p], dtype=np.int32)
    responses, masks = [], []
    for s in seqs:
        responses.append(np.asarray(s.input_ids[p:], dtype=np.int32))
        labelled = np.asarray(s.labels[p:]) != IGNORE
        spans = []
        if not labelled.all():
            edges = np.flatnonzero(np.diff(np.concatenate([[1], labelled.astype(np.int8), [1]])))
            spans = edges.tolist()  # [start, end) of each unlabelled run, flattened
        masks.append(spans)
    return prompt, responses, masks


class _ShardBuilder:
    """Collects one shard's examples as flat int32 arrays (4 bytes a token) and hashes them as it goes."""

    def __init__(self, keep_rows: bool):
        self.index: list[int] = []
        self.prompt: list[np.ndarray] = []
        self.responses: list[list[np.ndarray]] = []
        self.unlabelled: list[list[list[int]]] = []
        self.rows: list[str] | None = [] if keep_rows else None
        self.hash = hashlib.sha256()
        self.tokens = 0

    def add(self, i: int, example, seqs: list[TokenizedSeq]) -> None:
        self.add_arrays(i, example, *_arrays(seqs))

    def add_arrays(self, i: int, example, prompt: np.ndarray, responses: list, masks: list) -> None:
        self.tokens += len(prompt) * len(responses) + sum(len(r) for r in responses)
        self.index.append(i)
        self.prompt.append(prompt)
        self.responses.append(responses)
        self.unlabelled.append(masks)
        self.hash.update(np.int64(i).tobytes())
        self.hash.update(prompt.tobytes())
        for r, m in zip(responses, masks):
            self.hash.update(
                np.int64(len(r)).tobytes() + r.tobytes() + np.asarray(m, dtype=np.int32).tobytes()
            )
        if self.rows is not None:
            self.rows.append(
                json.dumps(
                    {"prompt": example.prompt, "responses": example.responses, "origins": example.origins}
                )
            )

    def batch(self) -> dict:
        return {
            "index": self.index,
            "prompt": [p.tolist() for p in self.prompt],
            "responses": [[r.tolist() for r in rs] for rs in self.responses],
            "unlabelled": self.unlabelled,
            **({"row": self.rows} if self.rows is not None else {}),
        }

    def store(self, split: str) -> TokenStore:
        import pyarrow as pa

        b = self.batch()
        arrays = {
            "prompt": [pa.array(b["prompt"], type=pa.list_(pa.int32()))],
            "responses": [pa.array(b["responses"], type=pa.list_(pa.list_(pa.int32())))],
            "unlabelled": [pa.array(b["unlabelled"], type=pa.list_(pa.list_(pa.int32())))],
        }
        return TokenStore(_columns(arrays), split, self.rows, self.hash.hexdigest())


def _read_manifest(path: Path, facts: dict) -> dict | None:
    f = path / MANIFEST
    if not f.is_file():
        return None
    try:
        manifest = json.loads(f.read_text())
    except (OSError, ValueError):
        return None  # cut short (it is written last, whole): built again
    if manifest.get("facts") != facts:
        return None
    return manifest


def _local_manifest(path: Path, facts: dict) -> dict | None:
    return _read_manifest(path, facts)


def _map(path: Path, manifest: dict) -> dict[str, TokenStore]:
    import datasets

    stores = {}
    for split in SPLITS:
        parts = [datasets.Dataset.from_file(str(path / name)) for name in manifest["shards"][split]]
        stores[split] = TokenStore.from_datasets(parts, split, manifest["digests"][split])
    return stores
