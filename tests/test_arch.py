"""Every family's adapter names every tensor of a real (tiny, stock transformers) checkpoint, with the right facts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import ALL_FIXTURES
from family_configs import FAMILY_CONFIGS
from fixtures import config_for
from normsurgery.arch import SUPPORTED_MODEL_TYPES, architecture_of, config_view, load_config
from normsurgery.arch.families import FAMILIES
from normsurgery.errors import NormSurgeryError


def _checkpoint_names(folder) -> set[str]:
    names: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            names |= set(h.keys())
    return names


def test_every_listed_family_is_covered_by_a_fixture():
    covered = {config_for(n).model_type for n in ALL_FIXTURES}
    assert covered == set(SUPPORTED_MODEL_TYPES)
    assert len(FAMILIES) == 52


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_adapter_classifies_every_tensor(name, tiny_model):
    folder = tiny_model(name)
    config = load_config(json.loads((folder / "config.json").read_text()))
    roles = architecture_of(config).roles()
    names = _checkpoint_names(folder)
    assert sorted(names - set(roles)) == [], "tensors the adapter does not know"
    assert sorted(set(roles) - names) == [], "tensors the adapter expects but the checkpoint lacks"


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_config_json_is_read_as_transformers_reads_it(name, tiny_model):
    """The architecture read from config.json alone equals the one from the transformers config, without it."""
    raw = json.loads((tiny_model(name) / "config.json").read_text())
    view = config_view(raw)
    assert architecture_of(view) == architecture_of(load_config(raw))
    assert view._loaded is None, "a transformers-written config.json should need no class defaults"


def test_config_view_takes_legacy_keys_and_defaults_like_transformers():
    """BLOOM's legacy n_embed wins over hidden_size, as in BloomConfig; an absent key is the class default: from
    normsurgery's table for one a declaration reads, else from the transformers config, built then."""
    raw = {**config_for("bloom").to_dict(), "n_embed": 48, "hidden_size": 32}
    raw.pop("layer_norm_epsilon")
    raw.pop("initializer_range")
    view = config_view(raw)
    full = load_config(raw)
    assert view.hidden_size == full.hidden_size == 48
    assert view.layer_norm_epsilon == full.layer_norm_epsilon
    assert view._loaded is None
    assert view.initializer_range == full.initializer_range
    assert view._loaded is not None


def test_config_view_reads_internlm3_bias_keys_as_transformers_does():
    """InternLM3's original config.json names the biases qkv_bias and bias (its attribute_map); those win over
    attention_bias / mlp_bias, as in InternLM3Config."""
    raw = {k: v for k, v in config_for("internlm3").to_dict().items() if k not in ("attention_bias", "mlp_bias")}
    raw.update(qkv_bias=False, bias=False, attention_bias=True, mlp_bias=True)
    view = config_view(raw)
    full = load_config(raw)
    assert (view.attention_bias, view.mlp_bias) == (full.attention_bias, full.mlp_bias) == (False, False)
    assert architecture_of(view) == architecture_of(full) and view._loaded is None


def _declared_norm(norm, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """What the declared facts (kind, eps, gain offset, weight, bias) say a norm computes on x, over its last axis."""
    x = x.double()
    if norm.kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    if norm.weight:
        y = y * (params[norm.weight].double() + norm.gain_offset)
    return y + params[norm.bias].double() if norm.bias else y


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_adapter_facts_match_the_modules(name):
    """Every norm computes what its declaration says (kind, eps, (1 + w) gain, bias, or none), on inputs small enough
    for eps to show; orientation and reader widths agree with what stock transformers builds (experts included,
    read through the stacked parameters transformers builds from them)."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from fixtures import perturb_
    from normsurgery.rewrite.in_memory import ModelTensors

    config = config_for(name)
    model = AutoModelForCausalLM.from_config(config)
    perturb_(model, 0)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    arch = architecture_of(config)
    tensors = ModelTensors(model, arch.key_renames, arch.fused)

    def features(linear) -> tuple[int, int]:
        """(in, out) of a linear by its declared orientation (each expert's, for stacked experts); a module of its
        own (not experts that transformers stacks) is a Conv1D exactly when declared so."""
        lin = modules.get(tensors.loaded_name(linear.weight).rsplit(".", 1)[0])
        if isinstance(lin, (torch.nn.Linear, Conv1D)):
            assert isinstance(lin, Conv1D) == linear.conv1d, linear.weight
        weight = tensors.get(linear.weight)
        if linear.experts:
            if weight.ndim == 2:  # the experts' rows stacked in one 2D tensor (DBRX)
                assert weight.shape[0] % linear.experts == 0, linear.weight
                weight = weight.view(linear.experts, -1, weight.shape[1])
            assert weight.ndim == 3 and weight.shape[0] == linear.experts, linear.weight
            weight = weight[0]
        return tuple(weight.shape) if linear.conv1d else tuple(weight.shape[::-1])

    d = arch.hidden_size
    gen = torch.Generator().manual_seed(0)
    for norm in arch.all_norms():
        shape = tuple(params[norm.weight].shape) if norm.weight else (d,)
        scales = torch.tensor([1.0, 1e-2, 1e-3, 1e-4, 1e-6]).view(-1, *[1] * len(shape))
        x = (torch.randn((5, *shape), generator=gen) + 2.0) * scales
        with torch.no_grad():
            got = modules[norm.name](x).double()
        expected = _declared_norm(norm, params, x)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item()), norm.name
        assert norm.role in ("latent", "qk") or shape == (d,), norm.name  # latent norms: their latent's width
        for reader in norm.readers:
            in_features, out_features = features(reader)
            assert in_features == shape[-1], reader.weight
            assert sum(s.stop - s.start for _, s in reader.group_slices(out_features)) == out_features, reader.weight
    for block in arch.blocks:
        for writer in block.writers:
            assert features(writer)[1] == d, writer.weight
    assert arch.tied == bool(config.tie_word_embeddings)


def test_unknown_or_unsupported_model_types_are_refused_with_the_reason():
    from normsurgery.arch import architecture_of

    with pytest.raises(NormSurgeryError, match="not one that transformers .* knows"):
        load_config({"model_type": "no_such_model"})
    with pytest.raises(NormSurgeryError, match="model_type"):
        load_config({"hidden_size": 3})
    with pytest.raises(NormSurgeryError, match="encoder-only"):
        architecture_of(load_config({"model_type": "bert"}))


@pytest.mark.parametrize("model_type", sorted({mt for f in FAMILIES for mt in f.model_types}))
def test_per_layer_filled_names_exactly_what_the_config_class_fills_in(model_type):
    """ConfigView answers a per-block key that config.json lacks with None unless the family declares that its
    config class fills it in (per_layer_filled): checked against transformers for every family, on a config.json
    that holds none of the per-block keys."""
    from normsurgery.arch import FAMILY_BY_MODEL_TYPE, load_config

    family = FAMILY_BY_MODEL_TYPE[model_type]
    kwargs = next(kw for mt, kw in FAMILY_CONFIGS.values() if mt == model_type)
    raw = {"model_type": model_type, **{k: v for k, v in kwargs.items() if k not in family.per_layer}}
    full = load_config(raw)
    filled = {key for key in family.per_layer if getattr(full, key, None) is not None}
    assert filled == set(family.per_layer_filled), (model_type, filled)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_class_defaults_are_what_the_config_class_gives(model_type):
    """normsurgery's table of class defaults (what ConfigView answers for an attribute config.json lacks, without
    transformers) holds the installed transformers' default of every entry; every declared model type has one, and
    every per-block key a class fills in is either a constant default or derived."""
    from normsurgery.arch import FAMILY_BY_MODEL_TYPE
    from normsurgery.arch.class_defaults import DEFAULTS, DERIVED, SUB_DEFAULTS

    family = FAMILY_BY_MODEL_TYPE[model_type]
    defaults, derived = DEFAULTS[model_type], DERIVED.get(model_type, {})
    kwargs = next(kw for mt, kw in FAMILY_CONFIGS.values() if mt == model_type)
    keys = dict(family.config_keys)
    stored = {key for attribute in defaults for key in (attribute, *keys.get(attribute, ()))}
    full = load_config({"model_type": model_type, **{k: v for k, v in kwargs.items() if k not in stored}})
    assert {k: getattr(full, k) for k in defaults} == defaults
    assert set(family.per_layer_filled) <= set(defaults) | set(derived), "a per-block key only transformers fills in"
    assert set(derived) <= set(family.per_layer_filled)
    for (mt, section), keys in SUB_DEFAULTS.items():
        if mt == model_type:
            sub = type(full).sub_configs[section]()
            assert {k: getattr(sub, k) for k in keys} == keys


def _prune_updates(config, family, depth):
    """What pruning writes into config.json for a few choices of kept blocks."""
    from normsurgery.arch.layer_config import pruned_config_updates

    keeps = [list(range(1, depth)), list(range(depth - 1)), [depth - 1], [0]]
    return [pruned_config_updates(config, family.per_layer, "depth", keep) for keep in keeps]


@pytest.mark.parametrize("per_layer", ["as the model sets them", "absent"])
@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_hub_config_json_is_read_as_transformers_reads_it_without_transformers(name, per_layer):
    """A config.json as the hub ships it (an older transformers wrote it: no eps, no tie_word_embeddings at the class
    default, no attribute added since, no per-block list the class fills in; see fixtures.hub_config) gives, read
    without transformers, the transformers config's architecture, depth-dependence flags and every per-block config
    update a prune writes, and never builds the transformers config (the unverified prune imports neither torch
    nor transformers)."""
    from fixtures import hub_config
    from normsurgery.arch import FAMILY_BY_MODEL_TYPE

    raw = hub_config(name)
    family = FAMILY_BY_MODEL_TYPE[raw["model_type"]]
    if per_layer == "absent":
        raw = {k: v for k, v in raw.items() if k not in family.per_layer}
    view, full = config_view(raw), load_config(raw)
    arch = architecture_of(view)
    assert arch == architecture_of(full)
    assert [getattr(view, k, None) for k in family.depth_dependent] == [getattr(full, k, None)
                                                                          for k in family.depth_dependent]
    assert _prune_updates(view, family, arch.num_layers) == _prune_updates(full, family, arch.num_layers)
    assert view._loaded is None, "an attribute the declaration reads needs transformers: add it to class_defaults.py"


# config.json values that choose how a class fills in its per-block keys (raw keys set or left out)
_DERIVED_CASES = [
    ("qwen2", {}), ("qwen2", {"use_sliding_window": True}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": None}),
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 1}),
    ("qwen3", {"use_sliding_window": True, "max_window_layers": 1}),
    ("qwen3", {"use_sliding_window": False, "sliding_window": 16}),
    ("qwen2_moe", {"use_sliding_window": True, "max_window_layers": 2, "mlp_only_layers": None}),
    ("qwen2_moe", {"use_sliding_window": True}), ("qwen3_moe", {"mlp_only_layers": [0, 2]}), ("qwen3_moe", {}),
    ("gemma2", {"sliding_window_pattern": 3}), ("gemma3_text", {}), ("gemma3_text", {"sliding_window_pattern": 2}),
    ("gemma3_text", {"num_hidden_layers": 7}), ("cohere2", {}), ("cohere2", {"sliding_window_pattern": 2}),
    ("gpt_oss", {}), ("gpt_oss", {"num_hidden_layers": 5}), ("exaone4", {}), ("exaone4", {"sliding_window_pattern": 2}),
    ("exaone4", {"sliding_window": None}), ("exaone4", {"sliding_window_pattern": "LLG"}),
    ("ministral", {}), ("ministral", {"sliding_window": None}),
    ("smollm3", {}), ("smollm3", {"no_rope_layer_interval": 2}),
    ("smollm3", {"use_sliding_window": True, "sliding_window": 16, "no_rope_layer_interval": 2}),
    ("smollm3", {"no_rope_layers": [1, 0, 1, 0], "use_sliding_window": True, "sliding_window": 16}),
    ("llama4_text", {}), ("llama4_text", {"attention_chunk_size": None}), ("llama4_text", {"no_rope_layers": []}),
    ("llama4_text", {"no_rope_layers": [1, 1, 0, 0], "moe_layers": [0]}),
    ("llama4_text", {"interleave_moe_layer_step": 1, "no_rope_layer_interval": 3}),
    ("gpt_neo", {}), ("gpt_neo", {"attention_types": [[["local"], 1], [["global"], 1]]}),
    ("gpt_neo", {"num_layers": 24, "attention_types": None}),
]


@pytest.mark.parametrize("model_type, changes", _DERIVED_CASES)
def test_per_block_keys_are_filled_in_as_the_config_class_fills_them(model_type, changes):
    """The per-block keys ConfigView derives without transformers (class_defaults.DERIVED) equal what the config class
    fills in, for the config.json values each depends on (set, absent or null); a value the class reads otherwise (a
    pattern string) is left to the transformers config."""
    from normsurgery.arch import FAMILY_BY_MODEL_TYPE
    from normsurgery.arch.class_defaults import DERIVED

    family = FAMILY_BY_MODEL_TYPE[model_type]
    kwargs = next(kw for mt, kw in FAMILY_CONFIGS.values() if mt == model_type)
    raw = {"model_type": model_type, **{k: v for k, v in kwargs.items() if k not in family.per_layer}}
    raw.update(changes)
    try:
        full = load_config(raw)
    except NormSurgeryError:  # transformers refuses the values: the view must not answer instead
        full = None
    view = config_view(raw)
    for key in DERIVED[model_type]:
        if full is None:
            with pytest.raises(NormSurgeryError):
                getattr(view, key)
        else:
            assert getattr(view, key) == getattr(full, key), key


FUSED = [n for n in ALL_FIXTURES if any(len(set(r.groups)) > 1 for norm in architecture_of(config_for(n)).all_norms()
                                        for r in norm.readers)]


@pytest.mark.parametrize("name", FUSED)
def test_fused_readers_name_their_value_slices(name):
    """A fused q/k/v reader's declared "v" slices are the values: zeroed, attention outputs zero (a slice named
    wrongly, e.g. in CodeGen's (q, v, k) chunks or a multi-query c_attn, would leave it non-zero)."""
    from transformers import AutoModelForCausalLM

    from fixtures import perturb_

    config = config_for(name)
    model = AutoModelForCausalLM.from_config(config).eval()
    perturb_(model, 0)
    arch = architecture_of(config)
    modules = dict(model.named_modules())
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        for block in arch.blocks:
            for reader in (r for n in block.norms for r in n.readers if len(set(r.groups)) > 1):
                lin = modules[reader.weight.rsplit(".", 1)[0]]
                for group, part in reader.group_slices(lin.weight.shape[1] if reader.conv1d else lin.weight.shape[0]):
                    if group == "v":
                        (lin.weight[:, part] if reader.conv1d else lin.weight[part]).zero_()
                        if lin.bias is not None:
                            lin.bias[part].zero_()
            attention_out = modules[block.writers[0].weight.rsplit(".", 1)[0]]
            attention_out.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        model(torch.randint(3, config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0)))
    assert len(seen) == arch.num_layers and all(float(x.abs().max()) == 0.0 for x in seen)
