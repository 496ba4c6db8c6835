"""Opening a model file of any kind (`open.open_model`) and its backends (ONNX Runtime, torch),
device I/O, the model's description as inference knows it (`info.ModelInfo`), and
`casm_deploy.Masker` (masker.py). Imports nothing of export/ or infer/."""
