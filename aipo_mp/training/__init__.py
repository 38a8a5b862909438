"""The Megatron trainer: the loop (read loop.py first), forward, log-probs, optimizer, checkpoints, resume, guards, run identity."""
