"""Concept erasure for text-to-image diffusion models and GANs.

    from erasure import erase
    run = erase("advunlearn", ["seven"], "digits", out="runs/adv-seven")

The package imports lightly (the command line must start fast); `erase` loads on first use.
"""

__version__ = "0.1.0"
__all__ = ["erase", "__version__"]


def __getattr__(name: str):
    if name == "erase":
        from .api import erase

        return erase
    raise AttributeError(name)
