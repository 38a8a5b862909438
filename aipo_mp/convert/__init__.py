"""Checkpoint conversion between Hugging Face and aipo_mp Megatron checkpoints (`aipo-mp convert`), and the trainer's handoff to vLLM."""
