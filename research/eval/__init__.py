"""Evaluation: ranking metrics equal to trec_eval, run evaluation, significance tests."""
