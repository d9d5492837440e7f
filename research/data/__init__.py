"""Data formats and validated readers: BEIR, MS MARCO, TREC runs and qrels, training groups, votes, typed batches."""
