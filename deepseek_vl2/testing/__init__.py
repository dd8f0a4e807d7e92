"""Helpers for tests and demos: offline tokenizers and small random-weight checkpoints."""
