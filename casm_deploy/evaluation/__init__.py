"""Scoring masks: the paper's metrics, the baselines, the benchmark and the pictures."""
