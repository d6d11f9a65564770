"""The extraction half of shnet: images -> staged Dask jobs -> HDF5/Parquet shard caches."""
