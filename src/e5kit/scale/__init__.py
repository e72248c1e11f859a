"""Past one machine: corpus embedding on Ray Data (``e5kit embed-corpus``) into parquet vector shards."""
