"""zELO (ZeroEntropy, arXiv 2509.12541): pairwise judge votes to per-document scores a student can regress on."""

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
