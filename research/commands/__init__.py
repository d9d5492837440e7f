"""Subcommands of the ``research`` CLI beyond Lightning's fit/validate/test; each module has ``register(subparsers)``."""
