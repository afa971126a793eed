"""Instruction records: schema, synthetic generator, importers, sharding to Parquet (stage: data)."""
