"""The data stage: raw files -> documents (readers) -> cleaned and filtered (cleaning) ->
deduplicated (dedup) and decontaminated (decontam) -> a BPE tokenizer (tokenizer) -> packed
token windows (packing; sft for chat data), written with a report (report) by `prepare`, and
read back in a seeded global order by the training and scoring loaders (loader).

Imports only the spine, models and pipelines/runtime.py: nothing of train, eval or track."""
