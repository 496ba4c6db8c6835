"""casm-deploy: classifier-agnostic saliency mapping (CASM), trained and deployed.

Data flow: synth/data -> model -> train -> checkpoint -> export -> infer, scored by metrics.
"""

__version__ = "0.1.0"
