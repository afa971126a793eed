"""Two-stage training under DeepSpeed ZeRO on Ray Train (stage: train)."""
