"""Sweeps over training and evaluation on Ray Tune (stage: tune); flows/tune_memory.py runs one."""
