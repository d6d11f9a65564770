"""Using a trained run: image and caption embeddings as Parquet shards (``shnet encode``), exact and
approximate top-k search over them (``shnet search``)."""
