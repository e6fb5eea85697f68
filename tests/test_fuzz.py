"""Fuzzing (hypothesis, bounded): whatever bytes a safetensors header or a recipe file holds, normsurgery either
reads it or refuses it with its own one-paragraph error, never another exception and never a huge allocation."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normsurgery.checkpoint.safetensors_header import read_header
from normsurgery.errors import NormSurgeryError
from normsurgery.recipe.schema import RecipeError, load_recipe

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

_dtype = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "Q4", "", "f32"])
_number = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=3), st.none())
_entry = st.one_of(
    st.fixed_dictionaries({"dtype": _dtype, "shape": st.lists(st.integers(-2, 2**40), max_size=4),
                           "data_offsets": st.lists(st.integers(-10, 2**62), min_size=0, max_size=3)}),
    st.dictionaries(st.text(max_size=8), _number, max_size=3),
    _number,
)
_header = st.dictionaries(st.text(max_size=12), _entry, max_size=5)


def _check_header(prefix: bytes, body: bytes, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(prefix + body + data)
        try:
            infos, _ = read_header(path)
        except NormSurgeryError:
            return
        size = path.stat().st_size
        for info in infos.values():  # whatever was accepted lies inside the file
            assert 0 <= info.begin and info.data_start + info.begin + info.nbytes <= size


@FUZZ
@given(_header, st.binary(max_size=64), st.integers(-1, 3))
def test_fuzzed_safetensors_headers_are_read_or_refused(header, data, length_skew):
    body = json.dumps(header).encode()
    length = max(0, len(body) + length_skew)
    _check_header(struct.pack("<Q", length), body, data)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_as_safetensors_are_refused(blob):
    _check_header(b"", blob, b"")


@FUZZ
@given(st.integers(2**20, 2**64 - 1))
def test_a_header_claiming_huge_sizes_is_refused_cheaply(claimed):
    _check_header(struct.pack("<Q", claimed), b"{}", b"")


_scalar = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=10), st.booleans(), st.none())
_options = st.dictionaries(st.sampled_from(["to", "remove", "layers", "against", "steps", "heal", "max_kl", "id",
                                            "tasks", "limit", "colour"]),
                           st.one_of(_scalar, st.lists(_scalar, max_size=3)), max_size=4)
_step = st.dictionaries(st.sampled_from(["fold", "convert", "prune", "heal", "check", "eval", "export", "squash"]),
                        st.one_of(_options, _scalar), min_size=1, max_size=2)
_recipe = st.fixed_dictionaries({}, optional={
    "model": _scalar, "output": st.one_of(_scalar, st.just("${out}/x")), "dtype": _scalar,
    "vars": st.one_of(st.dictionaries(st.text(max_size=5), _scalar, max_size=2), _scalar),
    "steps": st.one_of(st.lists(st.one_of(_step, _scalar), max_size=4), _scalar)})


@FUZZ
@given(_recipe)
def test_fuzzed_recipes_are_validated_or_refused_with_a_line(document):
    import yaml

    _load(yaml.safe_dump(document))


@FUZZ
@given(st.text(max_size=200))
def test_random_text_as_a_recipe_is_refused(text):
    _load(text)


def _load(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_recipe(path)
        except RecipeError as err:
            assert str(path) in str(err)


def test_yaml_is_loaded_safely(tmp_path):
    """A recipe cannot construct Python objects (yaml.safe_load)."""
    path = tmp_path / "r.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\noutput: o\nsteps: [{fold: {}}]\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
