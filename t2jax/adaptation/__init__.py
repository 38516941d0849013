"""Inference-time self-adaptation: dispatch, few-shot CEM, the two-pass pipeline."""
