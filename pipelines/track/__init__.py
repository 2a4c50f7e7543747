"""The tracking stage: one MLflow run per command (`tracking`), the run's name and provenance
tags (`provenance`), what a finished run leaves for review (`review`: the model, the loss plot),
and `raylm runs` for listing and comparing runs from a terminal (`runs`).

A leaf: imports only the spine, models and pipelines/runtime.py, so every stage may use it."""
