"""Tiny tokenizers, models and synthetic data for tests and the demo (not the core)."""
