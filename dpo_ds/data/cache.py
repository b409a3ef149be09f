"""Tokenized data at real size: tokenized once per cluster, cached by fingerprint, memory-mapped.

What is stored, and how a split is read back from it: data/store.py (TokenStore).

Tokenized once: every rank reads the sources (cheap next to tokenizing: the rows' text), takes its
contiguous share of the examples, tokenizes and checks it (the chat template is still checked on every
row), and writes its shard, all in a forked worker whose heap leaves with it; rank 0 writes the manifest and renames the whole directory into place, so a
cache cut short by a crash is never found. A bad row stops every rank with the message of the rank
that met it. When the cache directory is not visible to every rank (node-local disks: rank 0's marker
file is missing on some rank), each node builds its own copy, its local rank 0 tokenizing all of it,
the node's other ranks waiting for its manifest; a shared filesystem (the usual run dir or
data.cache_dir) is what lets the work be split over every rank of the cluster.

Cached by a fingerprint of everything that changes the ids: the data files' identities (path, size,
mtime, a hash of their ends; a hub dataset's `datasets` fingerprint), the tokenizer's files, the chat
template, max_length, max_prompt_length, the truncation mode, add_bos, SFT or pairs, and
DATA_FORMAT_VERSION; under data.cache_dir when set (shared by every run that points there), else in the
run dir. A relaunch or resume with the same fingerprint maps the cache without reading the sources.
The digest a resume checks and the precomputed reference's fingerprint come from the manifest (each
shard hashed as it was written), not from a second pass over the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dpo_ds.data.sources import source_files
from dpo_ds.data.sources.files import file_identity
from dpo_ds.data.sources.groups import DataError
from dpo_ds.data.store import (
    MANIFEST,
    SPLITS,
    TokenStore,
    _arrays,
    _local_manifest,
    _map,
    _read_manifest,
    _ShardBuilder,
)
from dpo_ds.data.tokenize import TokenizationError

log = logging.getLogger("dpo_ds.data")

DATA_FORMAT_VERSION = 1  # bump when what is stored, or how ids are made, changes


def _features(split: str):
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    feats = {
        "index": datasets.Value("int64"),
        "prompt": ids,
        "responses": datasets.Sequence(ids),
        "unlabelled": datasets.Sequence(ids),
    }
    if split == "test":
        feats["row"] = datasets.Value("string")
    return datasets.Features(feats)


# ----------------------------------------------------------------------------- fingerprint


def fingerprint(cfg, model_dir: Path, sft: bool) -> dict[str, str]:
    """Everything that changes the cached ids, each named (a mismatch says what changed)."""
    facts = {"format": str(DATA_FORMAT_VERSION), "examples": "sft targets" if sft else "preference pairs"}
    # the list as given: its order decides the examples' order, and a source named twice counts twice
    facts["datasets"] = ", ".join(cfg.datasets)
    for split in SPLITS:
        for spec in cfg.datasets:
            files = source_files(spec, split)
            facts[f"{split}: {spec}"] = (
                "; ".join(file_identity(f) for f in files)
                if files is not None
                else _hub_identity(spec, split, cfg)
            )
    tok = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja"):  # fmt: skip
        f = Path(model_dir) / name
        if f.is_file():
            tok.update(name.encode() + f.read_bytes())
    facts["tokenizer"] = tok.hexdigest()
    template = Path(cfg.data.chat_template).read_bytes() if cfg.data.chat_template else b"(the tokenizer's)"
    facts["chat template"] = hashlib.sha256(template).hexdigest()
    for key in ("max_length", "max_prompt_length"):
        facts[key] = str(getattr(cfg, key))
    facts["data.truncation_mode"] = cfg.data.truncation_mode
    facts["data.add_bos"] = str(cfg.data.add_bos)
    return facts


def _hub_identity(spec: str, split: str, cfg) -> str:
    """A hub dataset's identity: its name, split and `datasets` fingerprint (from the local cache)."""
    from dpo_ds.data.sources.readers import _read_hub
    from dpo_ds.data.sources.specs import HUB_NAMES, _hub_split

    ds = _read_hub(spec, split, cfg.data.cache_dir)
    return f"{HUB_NAMES[spec]} {_hub_split(spec, split)} fingerprint {getattr(ds, '_fingerprint', '?')}"


def digest_of(facts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- building


@dataclass
class Prepared:
    """What the data phase hands the rest of the run."""

    stores: dict[str, TokenStore]
    path: Path
    built: bool  # tokenized in this launch (else mapped)
    seconds: float
    summary: list[str] = field(default_factory=list)  # tokenization's own log lines (cuts, merges)
    sources: list[str] = field(default_factory=list)  # one line per source: how its rows are rendered
    # what the build counted for the data report (data/report.py): {"survey": the sources' counts, or
    # None; "tallies": {split: {source: Tokenization.tallies summed}}}; None for a cache built before
    report: dict | None = None
    data_report: dict | None = None  # rank 0: the report made of it (data/prepare.py)

    def digest(self, splits=("train",)) -> str:
        h = hashlib.sha256()
        for s in splits:
            h.update(s.encode() + self.stores[s].digest.encode())
        return h.hexdigest()


def prepare(
    cfg, tokenization, model_dir: Path, cache_root: Path, sft: bool, *, rank: int, world: int, comm,
    load_examples, describe=None, num_proc: int = 1, survey=None,
) -> Prepared:  # fmt: skip
    """The tokenized train and test splits: mapped from the cache when its fingerprint matches, else
    built by the ranks together (see the module docstring) and then mapped.

    comm: the collectives (dist.comm): decided_by_rank0, all_gather_objects, fail_alike, barrier.
    load_examples(split) -> the split's Examples (reads and parses the sources; build only).
    describe(split, examples) -> log lines about them (how each source is rendered).
    survey() -> what the data report counts on the sources' rows (data/report.py), called in the build's
    worker after both splits are read, on the rank that writes the manifest; kept in the manifest."""
    t0 = time.time()
    facts = fingerprint(cfg, model_dir, sft)
    path = Path(cache_root) / f"tokens-{digest_of(facts)}"
    found = comm.decided_by_rank0(lambda: _read_manifest(path, facts))
    built = False
    if found is None:
        _build(path, facts, tokenization, rank=rank, world=world, comm=comm, load_examples=load_examples,
               describe=describe, num_proc=num_proc, survey=survey)  # fmt: skip
        built = True
        _give_back_memory()  # the parsed rows and the shard's lists are gone; return their pages
        found = comm.decided_by_rank0(lambda: _read_manifest(path, facts))
        if found is None:
            raise DataError(f"token cache {path}: its manifest is not there after building it")
    if not built:
        found = _local_manifest(path, facts) or found  # node-local copies hold their own
    stores = _map(path, found)
    seconds = time.time() - t0
    info = found["info"]
    mib = sum(f.stat().st_size for f in path.glob("*.arrow")) / 2**20
    what = "built" if built else "mapped (fingerprint matches; the sources were not read)"
    log.info(
        f"token cache {path}: {what} in {seconds:.1f} s: {info['train_examples']} train / {info['test_examples']} "
        f"test examples, {info['tokens']} tokens, {mib:.1f} MiB"
    )
    return Prepared(
        stores, path, built, seconds, info.get("summary", []), info.get("sources", []), info.get("report")
    )


def _give_back_memory() -> None:
    """Building leaves the parsed source rows and the shard's Python lists freed but their pages still
    this process's (glibc keeps freed heap for reuse): hand them back, so what a rank holds for the rest
    of the run is the store's few bytes per example, not the build's high-water mark."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the pages are reused, not returned
        pass
    import pyarrow

    pyarrow.default_memory_pool().release_unused()  # Arrow's own allocator (mimalloc) keeps its pages too


def _build(
    path: Path,
    facts: dict,
    tokenization,
    *,
    rank,
    world,
    comm,
    load_examples,
    describe,
    num_proc=1,
    survey=None,
) -> None:
    """Every rank tokenizes its share of each split into its shard in a temporary directory next to
    `path`; rank 0 writes the manifest and renames the directory into place."""
    tmp_name = comm.decided_by_rank0(lambda: f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp = path.parent / tmp_name
    marker = tmp / "shared"

    def make():
        tmp.mkdir(parents=True, exist_ok=True)
        marker.write_text(tmp_name)
        return None

    comm.decided_by_rank0(make, (OSError,))
    sees = comm.all_gather_objects(marker.is_file())
    shared = all(sees)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    finishing = rank == 0 if shared else local_rank == 0  # writes the manifest (of its node's copy)
    if shared:
        share, parts = rank, world  # every rank of the cluster tokenizes its share
    else:
        share, parts = (0, 1) if local_rank == 0 else (None, 1)  # each node's local rank 0 builds its copy
        if local_rank == 0:
            tmp.mkdir(parents=True, exist_ok=True)
    import datasets  # noqa: F401  (this process maps the shards with it: imported once, before the fork)

    error = None
    try:
        done = _in_worker(
            lambda: _tokenize_shares(tmp, share, parts, tokenization, rank, load_examples, describe, num_proc,
                                     survey if finishing else None)
        )  # fmt: skip
    except (DataError, TokenizationError) as e:
        error = (type(e).__name__, str(e))

    def failure(failed):  # every rank stops with the message of the first rank that met a bad row
        if rank == 0 or not shared:
            shutil.rmtree(tmp, ignore_errors=True)
        kind, message = failed[0][1]
        return (DataError if kind == "DataError" else TokenizationError)(message)

    comm.fail_alike(error, failure)
    own = {k: done.pop(k) for k in ("counts", "sources", "survey")}  # this rank's, never gathered
    parts_info = comm.all_gather_objects(done)
    if not shared:
        parts_info = [p for p in parts_info if p["shards"]][:1]  # this node's copy: its local rank 0's
    if shared:
        comm.barrier()
        if rank == 0:
            _finish(tmp, path, facts, parts_info, _info(parts_info, own, tokenization))
        comm.barrier()
    else:
        if local_rank == 0:
            _finish(tmp, path, facts, parts_info, _info(parts_info, own, tokenization))
        else:
            _wait_for(path / MANIFEST)
        comm.barrier()


def _info(parts_info: list[dict], own: dict, tokenization) -> dict:
    """The manifest's "info": counts, the sources' lines, and tokenization's tallies summed over every
    share, so that each is said once, as one total (a rank's own count is a fraction of it)."""
    tallies = {s: {} for s in SPLITS}
    for part in parts_info:
        for split, by_source in part["tallies"].items():
            for source, counted in by_source.items():
                tallies[split].setdefault(source, Counter()).update(counted)
    total = sum((c for by_source in tallies.values() for c in by_source.values()), Counter())
    return {
        "train_examples": own["counts"]["train"],
        "test_examples": own["counts"]["test"],
        "tokens": sum(p["tokens"] for p in parts_info),
        "summary": tokenization.summary(total),
        "sources": own["sources"],
        "report": {
            "survey": own["survey"],
            "tallies": {s: {src: dict(c) for src, c in by.items()} for s, by in tallies.items()},
        },
    }


def _tokenize_shares(
    tmp: Path, share, parts: int, tokenization, rank: int, load_examples, describe, num_proc, survey=None
):
    """Read each split's sources and tokenize this rank's share of it into its shard (share None: read
    only, for the counts). Returns what the manifest needs from this rank."""
    out = {"shards": {}, "digests": {}, "tokens": 0, "counts": {}, "sources": [], "tallies": {}}
    for split in SPLITS:
        examples = load_examples(split)
        out["counts"][split] = len(examples)
        if describe is not None and split == "train":
            out["sources"] = describe(split, examples)
        if share is None:
            continue
        lo, hi = len(examples) * share // parts, len(examples) * (share + 1) // parts
        name = f"{split}-{share:05d}-of-{parts:05d}.arrow"
        digest, tokens, tallies = _write_shard(
            tmp / name, split, examples, lo, hi, tokenization, rank, num_proc
        )
        out["shards"][split], out["digests"][split], out["tallies"][split] = [name], [digest], tallies
        out["tokens"] += tokens
    out["survey"] = survey() if survey is not None else None
    return out


def _in_worker(fn):
    """fn() in a forked child process, its result returned here and its exception raised here.

    The build's heap (every source row parsed, the shard's lists before they are written) is the
    child's and goes with it: glibc, pymalloc and Arrow's allocator each keep freed pages, and a rank
    that built the cache would otherwise hold ~100 MB more for the whole run than one that mapped it.
    The child dies with this process (PR_SET_PDEATHSIG), so a killed rank leaves no orphan tokenizing."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def run():
        from dpo_ds.dist.launcher import die_with_parent

        die_with_parent()
        try:
            outcome = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the parent, whatever it is
            outcome = ("error", e)
        try:
            send.send(outcome)
        except Exception as e:  # noqa: BLE001 - an exception that does not pickle: its text
            send.send(("error", DataError(f"{type(outcome[1]).__name__}: {outcome[1]} ({e})")))
        send.close()

    child = ctx.Process(target=run, name="dpo_ds-tokenize")  # not a daemon: data.num_proc forks its own
    child.start()
    send.close()
    try:
        kind, value = receive.recv()
    except EOFError:
        child.join()
        raise DataError(
            f"the data worker (tokenizing this rank's share) died with exit code {child.exitcode} before "
            f"it finished (killed for memory? a negative code is the signal)"
        ) from None
    finally:
        receive.close()
    child.join()
    if kind == "error":
        raise value
    return value


_WORK: tuple = ()  # (tokenization, examples) for the forked workers of data.num_proc


def _tokenize_range(bounds: tuple[int, int]):
    """A worker's chunk: (compact arrays of examples[lo:hi], what tokenization counted on them)."""
    tokenization, examples = _WORK
    tokenization.reset_tallies()
    out = []
    for i in range(*bounds):
        ex = examples[i]
        out.append(_arrays(tokenization.tokenize(ex.prompt, ex.responses, ex.truncation_mode, ex.origins)))
    return out, dict(tokenization.tallies())


def _runs(examples, lo: int, hi: int) -> list[tuple[int, int, str]]:
    """examples[lo:hi] as (start, end, source) runs of one source each (sources come one after another)."""
    runs = []
    for i in range(lo, hi):
        source = examples[i].source
        if runs and runs[-1][2] == source:
            runs[-1] = (runs[-1][0], i + 1, source)
        else:
            runs.append((i, i + 1, source))
    return runs


def _write_shard(
    target: Path, split: str, examples, lo: int, hi: int, tokenization, rank: int, num_proc: int = 1
):
    """Tokenize examples[lo:hi] into one Arrow file; returns (digest, tokens, {source: what tokenization
    counted on its examples}). Shows progress. With num_proc > 1, forked workers tokenize chunks (never
    across two sources) and this process hashes and writes them in order."""
    from datasets.arrow_writer import ArrowWriter

    builder = _ShardBuilder(keep_rows=split == "test")
    progress = _Progress(split, hi - lo, rank)
    tallies: dict[str, Counter] = {}
    if num_proc > 1 and hi - lo > num_proc:
        import multiprocessing

        global _WORK
        _WORK = (tokenization, examples)
        step = max(1, min(1000, (hi - lo) // (4 * num_proc)))
        chunks = [(a, min(a + step, end), src) for start, end, src in _runs(examples, lo, hi)
                  for a in range(start, end, step)]  # fmt: skip
        with multiprocessing.get_context("fork").Pool(num_proc) as pool:
            results = pool.imap(_tokenize_range, [(a, b) for a, b, _ in chunks])
            for (a, _, src), (arrays, counted) in zip(chunks, results):
                for k, arr in enumerate(arrays):
                    builder.add_arrays(a + k, examples[a + k], *arr)
                tallies.setdefault(src, Counter()).update(counted)
                progress.update(len(builder.index))
        _WORK = ()
    else:
        for start, end, src in _runs(examples, lo, hi):
            before = tokenization.tallies()
            for i in range(start, end):
                ex = examples[i]
                seqs = tokenization.tokenize(ex.prompt, ex.responses, ex.truncation_mode, ex.origins)
                builder.add(i, ex, seqs)
                progress.update(i - lo + 1)
            tallies.setdefault(src, Counter()).update(tokenization.tallies() - before)
    progress.close()
    with ArrowWriter(path=str(target), features=_features(split)) as writer:
        writer.write_batch(builder.batch())
        writer.finalize()
    return builder.hash.hexdigest(), builder.tokens, {src: dict(+c) for src, c in tallies.items()}


def _finish(tmp: Path, path: Path, facts: dict, parts_info: list[dict], info: dict) -> None:
    """The manifest, written last into the temporary directory, then the directory renamed into place
    (another run that built the same fingerprint first wins: ours goes)."""
    shards = {s: [n for p in parts_info for n in p["shards"].get(s, [])] for s in SPLITS}
    split_digests = {}
    for s in SPLITS:
        h = hashlib.sha256()
        for p in parts_info:
            for d in p["digests"].get(s, []):
                h.update(d.encode())
        split_digests[s] = h.hexdigest()
    manifest = {"facts": facts, "shards": shards, "digests": split_digests, "info": info}
    (tmp / "shared").unlink(missing_ok=True)
    with open(tmp / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    try:
        os.rename(tmp, path)
    except OSError:
        if _read_manifest(path, facts) is not None:  # built by another run meanwhile: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
            return
        # a directory with no whole manifest of these facts: a copy cut short (it is renamed into place
        # only once its manifest is written), or damaged since; replaced
        log.warning(f"token cache {path} has no whole manifest (cut short or damaged): built again")
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)


def _wait_for(f: Path, poll_s: float = 1.0) -> None:
    while not f.is_file():
        time.sleep(poll_s)


PROGRESS_QUIET_S = 10.0  # a share tokenized sooner than this logs no progress at all


def progress_due(done: int, total: int, elapsed_s: float, last_quarter: int) -> int | None:
    """The quarter of a share (1, 2 or 3: 25, 50, 75 %) to log now, or None: at most three lines a share,
    each the first update past a new quarter, and none until the share has taken PROGRESS_QUIET_S (the
    cache's own line says when it is done, so a share of seconds needs nothing more)."""
    if total <= 0 or elapsed_s < PROGRESS_QUIET_S:
        return None
    quarter = min(4 * done // total, 3)
    return quarter if quarter > last_quarter else None


class _Progress:
    """tqdm on a terminal (rank 0), else a few log lines (progress_due) with rows per second."""

    def __init__(self, split: str, total: int, rank: int, clock=time.monotonic):
        self.split, self.total, self.rank = split, total, rank
        self.clock = clock
        self.t0 = clock()
        self.quarter = 0
        self.bar = None
        if rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"tokenizing {split} (rank 0's share)", unit=" rows")

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            return
        if self.rank != 0:
            return
        elapsed = self.clock() - self.t0
        quarter = progress_due(done, self.total, elapsed, self.quarter)
        if quarter is not None:
            self.quarter = quarter
            log.info(
                f"tokenizing {self.split}: {done}/{self.total} rows of rank 0's share "
                f"({done / max(elapsed, 1e-9):.0f} rows/s)"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
