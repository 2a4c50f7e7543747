"""raylm's stages, one subpackage each, and the two modules that compose them.

- `data/`: raw files -> clean, deduplicated documents -> tokenizer -> packed windows on disk.
- `train/`: the Ray Train job: pretraining and fine-tuning, checkpoints, cost, interrupts.
- `eval/`: scoring checkpoints on prepared splits and tasks, sampling text.
- `track/`: MLflow runs: metrics, provenance tags, review artifacts, `raylm runs`.
- `runtime.py`: where raylm meets a Ray cluster and an MLflow store; any stage may use it.
- `jobs.py`: the lifecycle behind the CLI, composing the stages.

Arrows point one way: data <- eval <- train <- jobs, and track is a leaf every stage may use
(tests/test_layers.py enforces it). Ray is imported only where distribution happens: runtime,
data/prepare, data/packing, train/pretrain, train/loop and eval/evaluate.
"""
