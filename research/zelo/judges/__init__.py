"""Pairwise judges for zELO: each says how likely document A is more relevant to a query than document B.

Every judge has ``name`` and ``judge_pairs(queries, docs_a, docs_b) -> list[float]`` (batched, one probability
per pair); :meth:`Judge.judge` is the single-pair form.

- :mod:`~research.zelo.judges.base`: :class:`Judge`, :class:`JudgeError`, and :class:`Ensemble` (the mean of several
  judges' probabilities, keeping each judge's vote);
- :mod:`~research.zelo.judges.score`: :class:`ScoreJudge` (any pointwise scorer, ``p = sigmoid((s_a - s_b) / T)``),
  :func:`bm25_judge` over :class:`BM25Scorer`, and :func:`model_judge` over a scorer directory;
- :mod:`~research.zelo.judges.chat`: :class:`ChatJudge`, an OpenAI-compatible chat model asked "A or B?";
- :mod:`~research.zelo.judges.registry`: the judge types by name, behind :func:`parse_judge_spec` (short strings such
  as ``bm25:temperature=1.0``, ``model:DIR:temperature=0.1``, ``llm:URL:MODEL:KEY_ENV``), :func:`read_judge_specs`
  (YAML / JSON lists), :func:`build_judge` and :func:`build_ensemble`.
"""

from research.zelo.judges.base import Ensemble, Judge, JudgeError
from research.zelo.judges.chat import ChatJudge
from research.zelo.judges.registry import (
    JUDGE_TYPES,
    JUDGES,
    JudgeType,
    build_ensemble,
    build_judge,
    check_spec,
    parse_judge_spec,
    read_judge_specs,
)
from research.zelo.judges.score import BM25Scorer, ScoreJudge, bm25_judge, model_judge

__all__ = [
    "JUDGES", "JUDGE_TYPES", "BM25Scorer", "ChatJudge", "Ensemble", "Judge", "JudgeError", "JudgeType", "ScoreJudge",
    "bm25_judge", "build_ensemble", "build_judge", "check_spec", "model_judge", "parse_judge_spec", "read_judge_specs",
]
