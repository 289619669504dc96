"""The store's constants that the command line shows before any heavy module is imported."""

# Rows per chunk. 4,096 rows keeps a chunk of a 512-d float16 embedding at 4 MiB
# uncompressed (a good unit for local disks and for object stores), and is small enough
# that a killed extraction loses little work. See benchmarks/store_bench.py.
DEFAULT_CHUNK_ROWS = 4096
DTYPES = ("float16", "float32")
