"""Dataset converters: `python -m data_prep <source> ...` writes TFRecord clip shards."""
