"""zELO (ZeroEntropy, arXiv 2509.12541): pairwise judge votes to per-document scores a student can regress on.

- :mod:`~research.zelo.pairs`: which document pairs to judge (random Hamiltonian cycles);
- :mod:`~research.zelo.judges`: the judges (BM25, any scorer directory, an OpenAI-compatible chat model, ensembles)
  and the registry that parses and builds them from specs;
- :mod:`~research.zelo.pipeline`: candidates -> planned pairs -> resumable vote collection -> listwise groups;
- :mod:`~research.zelo.fit`: votes -> Thurstone / Bradley-Terry scores on the Elo scale;
- :mod:`~research.zelo.workflow`: the ``research zelo`` steps end to end as library calls.

Only the judge-free parts are re-exported here, so ``import research.zelo`` does not load torch or the judges.
"""

from research.data.votes import Vote, append_votes, read_votes, voted_pairs, write_votes
from research.seeds import key_seed
from research.zelo.fit import (
    MODELS,
    BradleyTerryModel,
    PairwiseModel,
    ThurstoneModel,
    elo_to_target,
    fit_query,
    fit_votes,
    get_model,
    neg_log_posterior,
    normalize_across_queries,
    probability_to_elo,
    read_scores,
    write_scores,
)
from research.zelo.pairs import sample_pairs

__all__ = [
    "MODELS", "BradleyTerryModel", "PairwiseModel", "ThurstoneModel", "Vote", "append_votes", "key_seed",
    "elo_to_target", "fit_query", "fit_votes", "get_model", "neg_log_posterior", "normalize_across_queries",
    "probability_to_elo", "read_scores", "read_votes", "sample_pairs", "voted_pairs", "write_scores", "write_votes",
]
