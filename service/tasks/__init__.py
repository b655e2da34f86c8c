"""lm-evaluation-harness task configs for the local evaluation files (see configs.py)."""
