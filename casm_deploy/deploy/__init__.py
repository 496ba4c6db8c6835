"""The mapping outside training, in three parts over one runtime: runtime/ (opening a model file
of any kind, its backends, `casm_deploy.Masker`), export/ (the command, the exporters, the
precisions, parity) and infer/ (the command, `merge`, and what they write)."""
