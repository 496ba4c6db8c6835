"""Algorithm 1: classifier pre-training, then the CASM phase, on one process or many."""
