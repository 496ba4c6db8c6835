"""`casm-deploy infer` and `merge` (job.py): the pipeline, the output files, OUT and its record,
its locks, and the shards of many processes."""
