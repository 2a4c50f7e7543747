"""The evaluation stage: `evaluate` scores a checkpoint on a prepared split (`scoring`) and on
YAML tasks (`tasks`, graded by `task_metrics`), `sampling` decodes text from a checkpoint, and
`lm_eval_adapter` runs lm-evaluation-harness tasks on raylm models.

May import data and track; never train."""
