"""Concept erasure for text-to-image diffusion models and GANs.

    from erasure import erase, evaluate
    run = erase("advunlearn", ["seven"], "digits-sd", out="runs/adv-seven")
    report = evaluate(run)  # runs/adv-seven/eval.json

The package imports lightly (the command line must start fast); `erase` and `evaluate` load on first use.
"""

__version__ = "0.1.0"  # the one place the version is set (pyproject.toml reads it)
DISTRIBUTION = "concept-erasure-toolkit"  # the name on the package index; the command is `erasure`
__all__ = ["erase", "evaluate", "InputError", "__version__"]


def __getattr__(name: str):
    if name == "erase":
        from .api import erase

        return erase
    if name == "evaluate":  # `erasure eval`; evaluation.py names it run_eval beside the report's own `evaluate`
        from .evaluation import run_eval

        return run_eval
    if name == "InputError":  # what both raise for a bad argument, before any model loads
        from pipelines.errors import InputError

        return InputError
    raise AttributeError(name)


def __dir__() -> list[str]:  # tab completion lists the lazy names too
    return sorted({*globals(), *__all__})
