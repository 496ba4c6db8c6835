"""casm-deploy: classifier-agnostic saliency mapping (CASM), trained and deployed.

Data flow: synth/data -> model -> train -> checkpoint -> export -> infer, scored by metrics.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `casm_deploy.Masker` loads on first use: importing the package stays instant (no torch).
    if name == "Masker":
        from casm_deploy.deploy.api import Masker

        return Masker
    raise AttributeError(f"module 'casm_deploy' has no attribute {name!r}")
