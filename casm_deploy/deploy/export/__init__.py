"""`casm-deploy export`: the command (job.py), the exporters, the precisions, and parity, which
runs every written file through runtime/."""
