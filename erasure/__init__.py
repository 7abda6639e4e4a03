"""Concept erasure for text-to-image diffusion models and GANs.

    from erasure import erase
    run = erase("advunlearn", ["seven"], "digits-sd", out="runs/adv-seven")

The package imports lightly (the command line must start fast); `erase` loads on first use.
"""

__version__ = "0.1.0"  # the one place the version is set (pyproject.toml reads it)
DISTRIBUTION = "concept-erasure-toolkit"  # the name on the package index; the command is `erasure`
__all__ = ["erase", "__version__"]


def __getattr__(name: str):
    if name == "erase":
        from .api import erase

        return erase
    raise AttributeError(name)
