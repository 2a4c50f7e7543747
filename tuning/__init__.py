"""Hyperparameter and architecture search with Ray Tune (wraps the pretrain job; issue 7)."""
