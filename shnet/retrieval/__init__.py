"""Using a trained run: image and caption embeddings as Parquet shards with memory-mapped matrices
beside them (``shnet encode``), exact and approximate top-k search over them (``shnet search``)."""
