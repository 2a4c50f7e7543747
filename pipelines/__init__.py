"""The jobs (prepare, pretrain, evaluate) and the pieces they share (config, checkpoint,
tracking). Ray is used only in runtime.py, prepare.py, pretrain.py, train_loop.py and
evaluate.py: the modules whose job is distribution."""
