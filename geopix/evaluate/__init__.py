"""Pixel, region and text metrics, distributed evaluation and reports (stage: evaluate)."""
