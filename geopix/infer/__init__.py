"""Chat and batch segmentation of large scenes (stage: infer)."""
