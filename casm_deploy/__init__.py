"""casm-deploy: classifier-agnostic saliency mapping (CASM), trained and deployed.

Data flow: data -> models -> training -> checkpoint -> deploy (export, infer), scored by
evaluation. ARCHITECTURE.md says which module does what.
"""

from casm_deploy.version import __version__

__all__ = ["Masker", "__version__"]


def __getattr__(name: str):
    # `casm_deploy.Masker` loads on first use: importing the package stays instant (no torch).
    if name == "Masker":
        from casm_deploy.deploy.runtime.masker import Masker

        return Masker
    raise AttributeError(f"module 'casm_deploy' has no attribute {name!r}")
