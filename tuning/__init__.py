"""Hyperparameter and architecture search with Ray Tune (each trial a pretrain job: tuning/trial.py)."""
