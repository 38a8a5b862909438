"""The Megatron trainer: the loop (read loop.py first), set-up and run state, batches, reference
log-probs, metrics, step checkpoints and resume, forward, log-probs, optimizer, guards, run identity."""
