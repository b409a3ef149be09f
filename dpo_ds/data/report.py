"""The data report: what the data holds, said before any GPU starts, for each source and in total.

Per split (train, test) of each `datasets` source, and of all of them together:

  rows                 rows read from the split (the parser's count, before any row is dropped)
  dropped              rows dropped by the parser, by reason (hh / flat rows whose chosen equals their
                       rejected, SHP pairs under the score ratio, ...)
  pairs                preference pairs the rows hold
  examples             what is trained on: one per pair, or one per prompt for SFT
  prompts              distinct prompts among the examples (by their exact text or messages)
  shared_prompts       prompts with more than one example; examples_on_shared_prompts: their examples
  identical_pairs      pairs whose chosen text equals their rejected (kept by the original row format)
  identical_ids        examples whose responses are the same ids as trained on: identical texts, or cut
                       to the same start by truncation (either way they carry no preference)
  truncated            how many prompts were cut, by how (tokens, turns, text, system: data/tallies.py),
                       and how many responses were cut to the room the prompt left (responses)
  lengths              token-length percentiles (p50, p90, p99: nearest rank; and max) of the prompt and
                       of each response (chosen, rejected; or target), as trained on (after truncation)
  chosen_longer        the fraction of pairs whose chosen has more tokens than their rejected: the length
                       bias that length-normalised losses (loss=simpo; loss=ipo with loss.ipo_normalize=length) exist for
and per source and in total, prompts_in_train_and_test: distinct prompts found in both splits (in total,
across sources too: a test prompt of one source that another source trains on counts).

Where each number comes from, so that the report costs nothing next to tokenizing:
  - the row-level counts are made on the sources as read, by the rank that writes the token cache's
    manifest, while the data is whole there (Survey, run in the build's worker) and kept in the manifest;
  - the tallies are counted by tokenization on each rank's share and summed into one total (data/cache.py);
  - the lengths are read from the mapped token store on rank 0 (its per-example lengths, already in memory).
A relaunch that maps the cache reports the same, without reading the sources again.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from dpo_ds.data.sources.groups import prompt_key
from dpo_ds.data.store import SPLITS
from dpo_ds.data.tallies import IDENTICAL_IDS, TRUNCATION_KINDS
from dpo_ds.run.lock import pid_alive

PERCENTILES = (50, 90, 99)
TOTAL = "total"
SFT_EXAMPLES = "sft targets"


# ----------------------------------------------------------------------------- the sources, as read


class Survey:
    """The sources of each split as the data phase reads them (data/prepare.py adds each); called once
    both splits are read, it counts what the report needs of their rows (survey)."""

    def __init__(self, sft: bool):
        self.sft = sft
        self.loaded: dict[str, list[tuple[str, list]]] = {}

    def add(self, split: str, spec: str, groups: list) -> None:
        self.loaded.setdefault(split, []).append((spec, groups))

    def __call__(self) -> dict:
        return survey(self.loaded, self.sft)


def _prompts(groups: list, sft: bool) -> Counter:
    """prompt key -> examples on it (an SFT example per group, else one per pair; groups without an
    example are not counted: nothing of them is trained on)."""
    keys: Counter = Counter()
    for g in groups:
        n = 1 if sft else len(g.pairs)
        if n:
            keys[prompt_key(g.prompt)] += n
    return keys


def _counts(parts: list, keys: Counter, sft: bool) -> dict:
    """The row-level counts of one split of one source (parts: its SourceGroups; a spec listed twice
    gives two) or of all of them, with `keys` their prompts."""
    groups = [g for gs in parts for g in gs]
    dropped = sum((Counter(getattr(gs, "dropped", {})) for gs in parts), Counter())
    shared = [n for n in keys.values() if n > 1]
    return {
        "rows": sum(getattr(gs, "rows", len(gs)) for gs in parts),
        "dropped": dict(sorted(dropped.items())),
        "pairs": sum(len(g.pairs) for g in groups),
        "examples": sum(keys.values()),
        "prompts": len(keys),
        "shared_prompts": len(shared),
        "examples_on_shared_prompts": sum(shared),
        "identical_pairs": None
        if sft
        else sum(g.responses[c] == g.responses[r] for g in groups for c, r in g.pairs),
    }


def survey(loaded: dict[str, list[tuple[str, list]]], sft: bool) -> dict:
    """The row-level counts of every source and of all of them, per split; `loaded`: split -> [(spec,
    its SourceGroups)], in `datasets` order. "order" keeps each split's (spec, examples) runs: the
    token store holds the examples in that order (batches.flatten), so a source's lengths are a slice."""
    out: dict = {"order": {}, "splits": {}, TOTAL: {}, "overlap": {}}
    keys: dict[str, dict[str, Counter]] = {}
    every: dict[str, Counter] = {}
    for split in SPLITS:
        parts = loaded.get(split, [])
        out["order"][split] = [
            [spec, len(gs) if sft else sum(len(g.pairs) for g in gs)] for spec, gs in parts
        ]
        by_spec: dict[str, list] = {}
        for spec, gs in parts:
            by_spec.setdefault(spec, []).append(gs)
        keys[split] = {spec: _prompts([g for gs in p for g in gs], sft) for spec, p in by_spec.items()}
        out["splits"][split] = {spec: _counts(p, keys[split][spec], sft) for spec, p in by_spec.items()}
        every[split] = sum(keys[split].values(), Counter())
        out[TOTAL][split] = _counts([gs for _, gs in parts], every[split], sft)
    for spec in dict.fromkeys([*keys["train"], *keys["test"]]):
        train, test = keys["train"].get(spec, Counter()), keys["test"].get(spec, Counter())
        out["overlap"][spec] = len(train.keys() & test.keys())
    out["overlap_total"] = len(every["train"].keys() & every["test"].keys())
    return out


# ----------------------------------------------------------------------------- the report


def percentiles(values: np.ndarray) -> dict | None:
    """Nearest-rank percentiles (the smallest value with at least p % of values at or below it) and
    the max; None for no values."""
    if len(values) == 0:
        return None
    ordered = np.sort(np.asarray(values))
    out = {f"p{p}": int(ordered[-(-p * len(ordered) // 100) - 1]) for p in PERCENTILES}
    out["max"] = int(ordered[-1])
    return out


def _lengths(store, index: np.ndarray, sft: bool) -> dict:
    """Token lengths of the examples `index` of a split's store, as trained on."""
    names = ["prompt", "target"] if sft else ["prompt", "chosen", "rejected"]
    if len(index) == 0:  # an empty split's store has no response columns to read
        return {"lengths": dict.fromkeys(names), **({} if sft else {"chosen_longer": None})}
    prompt = store.prompt_lens[index]
    responses = store.response_lens[index]  # (examples, responses)
    if sft:
        return {"lengths": {"prompt": percentiles(prompt), "target": percentiles(responses[:, 0])}}
    chosen, rejected = responses[:, 0], responses[:, 1]
    return {
        "lengths": {
            "prompt": percentiles(prompt),
            "chosen": percentiles(chosen),
            "rejected": percentiles(rejected),
        },
        "chosen_longer": int((chosen > rejected).sum()) / len(index),
    }


def _tokenized(tallies: dict, sources: list[str]) -> dict:
    """What tokenization counted on the examples of `sources` (summed over them)."""
    total = sum((Counter(tallies.get(s, {})) for s in sources), Counter())
    return {"identical_ids": total[IDENTICAL_IDS], "truncated": {k: total[k] for k in TRUNCATION_KINDS}}


def _index_of(order: list, spec: str | None) -> np.ndarray:
    """The store positions of a source's examples (None: all), from the split's (spec, examples) runs."""
    starts = np.cumsum([0] + [n for _, n in order])
    runs = [np.arange(starts[k], starts[k + 1]) for k, (s, _) in enumerate(order) if spec in (None, s)]
    return np.concatenate(runs) if runs else np.zeros(0, dtype=np.int64)


def build(facts: dict | None, stores: dict, *, sft: bool, max_length: int, max_prompt_length: int) -> dict:
    """The report (see the module docstring) of the cache's facts (Prepared.report) and its stores."""
    facts = facts or {}
    counted, tallies = facts.get("survey"), facts.get("tallies") or {}
    report = {
        "examples": SFT_EXAMPLES if sft else "preference pairs",
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "sources": {},
        TOTAL: {},
    }
    if counted is None:  # a cache built before data reports: what its store and tallies still tell
        report["note"] = "the token cache was built before data reports: rows and prompts are not counted"
    specs = list(counted["overlap"]) if counted else []
    for spec in specs:
        report["sources"][spec] = {"prompts_in_train_and_test": counted["overlap"][spec]}
    report[TOTAL]["prompts_in_train_and_test"] = counted["overlap_total"] if counted else None
    for split in SPLITS:
        store = stores[split]
        order = counted["order"][split] if counted else [["", len(store)]]
        split_tallies = tallies.get(split, {})
        for spec in specs:
            if spec in counted["splits"][split]:
                report["sources"][spec][split] = {
                    **counted["splits"][split][spec],
                    **_tokenized(split_tallies, [spec]),
                    **_lengths(store, _index_of(order, spec), sft),
                }
        report[TOTAL][split] = {
            **(counted[TOTAL][split] if counted else {}),
            **_tokenized(split_tallies, list(split_tallies)),
            **_lengths(store, _index_of(order, None), sft),
        }
    return report


def write(report: dict, path: Path) -> None:
    """The report as JSON at `path` (its directory made), replaced whole: a reader never sees half. A
    temporary left by a writer that was killed or met a full disk (found by bench/soak.py) goes: its own on
    the error, a dead process's before writing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        pid = stale.name[len(path.name) + 2 : -len(".tmp")]
        if pid.isdigit() and not pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- the table


def _cell(value) -> str:
    return "-" if value is None else str(value)


def _truncated(entry: dict) -> str:
    cut = {k: n for k, n in entry["truncated"].items() if n}
    return ", ".join(f"{k} {n}" for k, n in cut.items()) or "0"


def _spread(stats: dict | None) -> str:
    return "-" if stats is None else "/".join(str(stats[k]) for k in (*(f"p{p}" for p in PERCENTILES), "max"))


def _rows(report: dict):
    """(source, split, entry, the source's prompts in train and test) in table order, the total last."""
    for name, source in [*report["sources"].items(), (TOTAL, report[TOTAL])]:
        for split in SPLITS:
            if split in source:
                yield (
                    name,
                    split,
                    source[split],
                    source["prompts_in_train_and_test"] if split == "train" else "",
                )


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def table(report: dict) -> str:
    """The report as two markdown tables, counts then token lengths, readable in a log."""
    counts, lengths = [], []
    names = ["prompt", "target"] if report["examples"] == SFT_EXAMPLES else ["prompt", "chosen", "rejected"]
    for name, split, e, overlap in _rows(report):
        counts.append([name, split, *(_cell(e.get(k)) for k in ("rows", "pairs", "examples", "prompts")),
                       f"{_cell(e.get('shared_prompts'))} ({_cell(e.get('examples_on_shared_prompts'))})",
                       _cell(sum(e["dropped"].values()) if "dropped" in e else None),
                       f"{_cell(e.get('identical_pairs'))} / {e['identical_ids']}", _truncated(e),
                       _cell(overlap)])  # fmt: skip
        longer = e.get("chosen_longer")
        lengths.append([name, split, *(_spread(e["lengths"][k]) for k in names),
                        "-" if longer is None else f"{100 * longer:.1f}%"])  # fmt: skip
    head = [
        f"data report: {report['examples']}, max_length {report['max_length']}, "
        f"max_prompt_length {report['max_prompt_length']}"
        + (f" ({report['note']})" if "note" in report else "")
    ]
    first = ["source", "split", "rows", "pairs", "examples", "prompts", "shared prompts (examples)", "dropped rows",
             "chosen=rejected (text / ids)", "truncated", "prompts in train & test"]  # fmt: skip
    second = ["source", "split", *(f"{k} tokens p50/p90/p99/max" for k in names), "chosen longer"]
    return "\n".join([*head, *_markdown(first, counts), "", *_markdown(second, lengths)])
