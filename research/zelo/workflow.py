"""The ``research zelo`` steps end to end as library calls, so the command line only parses flags and prints.

- :func:`prepare_votes` -> :class:`VotesJob`: dataset -> candidates -> planned pairs -> judge ensemble, and which
  settings differ from those of the votes already on disk; :meth:`VotesJob.collect` writes the settings beside the
  votes (``OUT.meta.json``) and collects the missing votes (resumable, :func:`~research.zelo.pipeline.collect_votes`);
- :func:`fit_votes_file`: a votes file -> a scores file (and optionally the student's listwise groups);
- :func:`write_qrels_groups`: the same candidate groups labelled by the qrels (a baseline student's data);
- :func:`add_qrels_labels`: an existing groups file (e.g. zELO's) with the qrels' labels added beside its own fields.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from research.data.beir import RetrievalDataset, load_dataset
from research.data.votes import read_votes
from research.errors import DataFormatError, ResearchError
from research.io import iter_jsonl, require_field, write_json, write_jsonl
from research.models.runtime import inference_autocast
from research.zelo.fit import fit_votes, write_scores
from research.zelo.judges import Ensemble, build_ensemble
from research.zelo.pipeline import (
    CollectStats,
    PlannedPair,
    candidate_lists,
    collect_votes,
    plan_pairs,
    qrels_groups,
    write_groups,
)

# the settings that decide which pairs are planned and how they are judged: resuming under others mixes two runs' votes
RESUME_SETTINGS = ("candidates", "top_n", "cycles", "all_pairs", "seed", "judges")


@dataclass
class VotesJob:
    """A planned ``research zelo votes`` run: what to judge, by whom, and where the votes go."""

    data: RetrievalDataset
    candidates: dict[str, list[str]]
    pairs: list[PlannedPair]
    ensemble: Ensemble
    out: Path
    settings: dict[str, Any]  # the run's settings as OUT.meta.json records them (judges by env-var name, no key)
    changed: list[str]  # RESUME_SETTINGS that differ from the meta file of the votes already in ``out``
    batch_size: int = 32
    device: str = "cpu"
    precision: str = "32-true"

    @property
    def meta_path(self) -> Path:
        return meta_path(self.out)

    def collect(self, progress: Callable[[int, int], None] | None = None) -> CollectStats:
        """Write the settings file, then judge and append the pairs not yet in ``out``."""
        write_json(self.meta_path, self.settings)
        with inference_autocast(self.precision, self.device):
            return collect_votes(self.data, self.pairs, self.ensemble, self.out, batch_size=self.batch_size,
                                 progress=progress)


def meta_path(out: str | Path) -> Path:
    """Where the settings of the votes file ``out`` are kept: ``OUT.meta.json`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".meta.json")


def prepare_votes(data: str | Path, split: str, specs: Sequence[Mapping[str, Any]], out: str | Path, *,
                  candidates: str = "bm25", top_n: int = 20, cycles: int = 4, all_pairs: bool = False, seed: int = 0,
                  all_queries: bool = False, max_queries: int | None = None, batch_size: int = 32,
                  device: str = "cpu", precision: str = "32-true") -> VotesJob:
    """Load ``data``, plan each query's pairs among its top-``top_n`` candidates and build the judges of ``specs``.

    Queries are the split's judged ones (``all_queries``: every query in queries.jsonl), the first ``max_queries``
    of them if given. Nothing is written: :meth:`VotesJob.collect` does that.
    """
    dataset = load_dataset(data, split)
    query_ids = list(dataset.queries if all_queries else dataset.judged_queries)
    if max_queries is not None:
        query_ids = query_ids[:max_queries]
    lists = candidate_lists(dataset, candidates, top_n, query_ids)
    pairs = plan_pairs(lists, cycles=cycles, seed=seed, all_pairs=all_pairs)
    ensemble = build_ensemble(specs, dataset, device)
    settings = {"data": str(data), "split": split, "candidates": str(candidates), "top_n": top_n, "cycles": cycles,
                "all_pairs": all_pairs, "seed": seed, "queries": len(lists), "pairs": len(pairs),
                "precision": precision, "judges": ensemble.describe()}
    out = Path(out)
    changed: list[str] = []
    if out.is_file() and meta_path(out).is_file():
        before = json.loads(meta_path(out).read_text(encoding="utf-8"))
        changed = [key for key in RESUME_SETTINGS if before.get(key) != settings[key]]
    return VotesJob(dataset, lists, pairs, ensemble, out, settings, changed, batch_size, device, precision)


@dataclass(frozen=True)
class FitSummary:
    votes: int  # votes read
    scores: int  # score records written
    queries: int  # queries they cover


def fit_votes_file(votes_path: str | Path, out: str | Path, model: str = "thurstone", prior: float = 0.01,
                   groups: str | Path | None = None, allow_truncated_tail: bool = False) -> FitSummary:
    """Fit the votes in ``votes_path`` into per-document scores written to ``out`` (and listwise ``groups``)."""
    votes = read_votes(votes_path, allow_truncated_tail=allow_truncated_tail)
    if not votes:
        raise ResearchError(f"{votes_path}: no votes")
    records = fit_votes(votes, model=model, prior_strength=prior)
    count = write_scores(out, records)
    if groups:
        write_groups(groups, records)
    return FitSummary(votes=len(votes), scores=count, queries=len({r["query_id"] for r in records}))


def write_qrels_groups(data: str | Path, split: str, out: str | Path, candidates: str = "bm25", top_n: int = 20,
                       max_queries: int | None = None) -> int:
    """Write the qrels-labelled candidate groups of the first ``max_queries`` judged queries; returns the groups."""
    dataset = load_dataset(data, split)
    query_ids = list(dataset.judged_queries)[:max_queries] if max_queries is not None else None
    return write_jsonl(out, qrels_groups(dataset, candidate_lists(dataset, candidates, top_n, query_ids)))


def add_qrels_labels(data: str | Path, split: str, groups_from: str | Path, out: str | Path) -> int:
    """Write ``groups_from``'s groups with the qrels' binary ``labels`` added (every other field kept), so that a
    qrels-labelled and a teacher-labelled student read the same candidates in the same order; returns the groups.

    A group whose query has no qrels in ``split`` is refused (file, line): all-zero labels would hide a wrong split."""
    dataset = load_dataset(data, split)
    records = []
    for line, record in iter_jsonl(groups_from):
        query_id = str(require_field(record, "query_id", (str, int), groups_from, line))
        doc_ids = [str(d) for d in require_field(record, "doc_ids", list, groups_from, line)]
        if query_id not in dataset.qrels:
            raise DataFormatError(groups_from, line, "query_id", f"query '{query_id}' has no qrels in split '{split}' "
                                                                 f"of {data}")
        if "labels" in record:
            raise DataFormatError(groups_from, line, "labels", "already present (this command adds it)")
        records.append({**record, "labels": qrels_groups(dataset, {query_id: doc_ids})[0]["labels"]})
    if not records:
        raise ResearchError(f"{groups_from}: no groups")
    return write_jsonl(out, records)
