"""The jobs (prepare, pretrain, evaluate) and the pieces they share (config, checkpoint,
tracking). Ray is used only in runtime.py, prepare.py, packing.py, pretrain.py, train_loop.py
and evaluate.py: the modules whose job is distribution. The rest (readers, cleaning, dedup,
decontam, data_report, loader, checkpoint, ...) is plain Python that those modules call."""
