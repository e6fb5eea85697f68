"""Reference models (built offline from PyPI packages or trained here) and the real text they use."""

from normsurgery.reference.registry import (
    REFERENCE_MODELS,
    ReferenceModel,
    build_reference,
    describe_reference,
    is_built,
    is_reference_name,
    reference_path,
)

__all__ = [
    "REFERENCE_MODELS",
    "ReferenceModel",
    "build_reference",
    "describe_reference",
    "is_built",
    "is_reference_name",
    "reference_path",
]
