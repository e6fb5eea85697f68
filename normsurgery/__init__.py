"""normsurgery: post-training surgery on the normalization layers and depth of transformer LMs.

The Python API (normsurgery/api.py) is here at the top level; importing the package loads neither torch nor
transformers until a call needs them:

    import normsurgery as ns
    result = ns.fold("smollm2-135m", "out/folded")    # result.check.passed, result.check.rel_logit_diff
"""

from typing import Any

from normsurgery.adapt.runtime import traced_family as _traced_family
from normsurgery.arch import register_tracer as _register_tracer

__version__ = "0.1.0"

_register_tracer(_traced_family)  # model types no family declares are traced and proven at run time

_API = ("fold", "convert", "check", "diagnose", "prune", "evaluate", "run_recipe", "fold_model", "convert_model")
_ERRORS = ("NormSurgeryError", "CheckFailed")
__all__ = ["__version__", *_API, *_ERRORS]


def __getattr__(name: str) -> Any:
    """The API's calls and exceptions, imported on first use."""
    if name in _API:
        from normsurgery import api

        return getattr(api, name)
    if name in _ERRORS:
        from normsurgery import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'normsurgery' has no attribute {name!r}")
