"""Scripts that print speed, memory and quality figures (not timed unit tests); shared helpers in common.py."""
