"""Modeling code shipped inside checkpoints written by normsurgery (https://pypi.org/project/normsurgery/).

It needs only torch and transformers. The checkpoint is a stock transformers model (`base_config`)
with a few modules changed, listed in `surgery`: norms swapped for RMSNorm, CRMSNorm, DyT, Derf or identity,
biases added to linear layers, tensors whose residual width shrank (CRMSNorm stores d-1
coordinates) and module attributes that hold that width, the output of modules that compute what they add to the
residual (XGLM's sinusoidal positions) centred like every other writer's, and pruned attention or MLP sub-layers
replaced by modules that add nothing to the residual.
Load it with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING


AUTO_MAP = {
    "AutoConfig": "modeling_normsurgery.NormSurgeryConfig",
    "AutoModelForCausalLM": "modeling_normsurgery.NormSurgeryForCausalLM",
}
# Copied to the wrapper's top level so tools that read a config without loading the model see them.
SHARED_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings", "n_positions",
    "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "transformers_version",
)  # fmt: skip


def _code_only(base: dict) -> bool:
    """Whether the base model exists only as code shipped in its folder (a model type transformers does not know)."""
    return "auto_map" in base and base.get("model_type") not in CONFIG_MAPPING


def wrap_config(base: dict, surgery: dict) -> dict:
    """config.json of a rewritten model: the stock config `base` and its `surgery`, loaded through this file (and,
    for a base model whose code ships in its folder, that code beside it, named by the base's own auto_map)."""
    base = {k: v for k, v in base.items() if k != "normsurgery" and (k != "auto_map" or _code_only(base))}
    wrapper = {k: base[k] for k in SHARED_KEYS if k in base}
    wrapper.update({"model_type": "normsurgery", "architectures": ["NormSurgeryForCausalLM"],
                    "auto_map": dict(AUTO_MAP), "base_config": base, "surgery": surgery})
    return wrapper


class NormSurgeryConfig(PretrainedConfig):
    """A stock config (`base_config`) plus the module changes (`surgery`) that normsurgery made."""

    model_type = "normsurgery"

    def __init__(self, base_config: dict | None = None, surgery: dict | None = None, **kwargs):
        self.base_config = dict(base_config or {})
        self.surgery = dict(surgery or {})
        super().__init__(**kwargs)

    def to_base(self) -> PretrainedConfig:
        """The stock config the model is built from (or the config class its folder's own code defines), carrying
        the surgery for the patched class."""
        values = dict(self.base_config)
        if _code_only(values):
            folder = getattr(self, "_name_or_path", "") or getattr(self, "name_or_path", "")
            base = get_class_from_dynamic_module(values["auto_map"]["AutoConfig"], folder)(**values)
            base.code_folder = folder
        else:
            base = AutoConfig.for_model(values.pop("model_type"), **values)
        base.normsurgery = self.surgery
        return base


def base_class(base: PretrainedConfig) -> type:
    """The causal-LM class of a base config: transformers' own, or the one its folder's code defines."""
    code = getattr(base, "auto_map", None) or {}
    if type(base) not in MODEL_FOR_CAUSAL_LM_MAPPING and "AutoModelForCausalLM" in code:
        return get_class_from_dynamic_module(code["AutoModelForCausalLM"], base.code_folder)
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(base)]


class RMSNorm(nn.Module):
    """y = g * x / sqrt(mean(x^2) + eps) (+ b where a LayerNorm's bias stays), computed in float32 for low-precision
    inputs."""

    def __init__(self, dim: int, eps: float, affine: bool = True, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused call with the gain inside; on CPU it ties the written-out formula under torch.compile and
        # is mixed in eager mode (bench/forward_speed.py, README "Performance").
        weight = None if self.weight is None else self.weight.float()
        y = F.rms_norm(x.float(), (x.shape[-1],), weight, self.eps)
        return (y if self.bias is None else y + self.bias.float()).to(x.dtype)


class CRMSNorm(nn.Module):
    """RMSNorm of a zero-mean d-vector stored as its first d-1 coordinates: mean(x^2) = (|x'|^2 + (sum x')^2) / d."""

    def __init__(self, dim: int, eps: float, **_: object):
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        mean_square = (x.pow(2).sum(-1, keepdim=True) + x.sum(-1, keepdim=True).pow(2)) / self.dim
        return (x * torch.rsqrt(mean_square + self.eps)).to(dtype)


class DynamicTanh(nn.Module):
    """DyT (Zhu et al. 2025): y = g * tanh(alpha x) + b with a learnt scalar alpha, in place of a norm."""

    def __init__(self, dim: int, bias: bool = True, **_: object):
        super().__init__()
        self.dim = dim
        self.alpha = nn.Parameter(torch.ones(()))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def squash(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha.float() * x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.squash(x.float()) * self.weight.float()
        return (y if self.bias is None else y + self.bias.float()).to(x.dtype)


class DynamicErf(DynamicTanh):
    """Derf (zlab-princeton 2025): y = g * erf(alpha x + s) + b with learnt scalars alpha and s."""

    def __init__(self, dim: int, bias: bool = True, **_: object):
        super().__init__(dim, bias)
        self.shift = nn.Parameter(torch.zeros(()))

    def squash(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(self.alpha.float() * x + self.shift.float())


NORMS = {"rmsnorm": RMSNorm, "crmsnorm": CRMSNorm, "dyt": DynamicTanh, "derf": DynamicErf}
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")  # names across transformers versions


class PrunedMLP(nn.Module):
    """A removed MLP: adds nothing to the residual. A stock module that adds the residual itself (BLOOM, MPT: a
    `residual` argument) returns that residual."""

    def __init__(self, replaced: nn.Module, **_: object):
        super().__init__()
        names = [p for p in inspect.signature(type(replaced).forward).parameters if p != "self"]
        self.residual_at = names.index("residual") if "residual" in names else None

    def output(self, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.residual_at is None:
            return torch.zeros_like(hidden)
        return args[self.residual_at] if len(args) > self.residual_at else kwargs["residual"]

    def forward(self, *args, **kwargs):
        return self.output(args, kwargs)


class PrunedAttention(PrunedMLP):
    """A removed attention: adds nothing to the residual and stores no keys or values. Its cache layer still
    records how many tokens went by (one zero per token, not heads x head size), because transformers reads the
    sequence length and the mask sizes from the cache's layers."""

    def __init__(self, replaced: nn.Module, layer: int, **_: object):
        super().__init__(replaced)
        self.layer = layer

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = next((kwargs[k] for k in CACHE_ARGUMENTS if kwargs.get(k) is not None), None)
        if cache is not None:
            marker = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
            cache.update(marker, marker, self.layer)
        return self.output(args, kwargs), None


class Empty(nn.Module):
    """A removed MLP's input projection kept in the block itself (OPT, BioGPT fc1): zero features."""

    def __init__(self, replaced: nn.Module, **_: object):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], 0)


class Zeros(nn.Module):
    """A removed MLP's output projection kept in the block itself (OPT, BioGPT fc2): zeros of the residual width."""

    def __init__(self, replaced: nn.Module, width: int, **_: object):
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.width)


PRUNED = {"attention": PrunedAttention, "mlp": PrunedMLP, "empty": Empty, "zeros": Zeros}


def centring_hook(drop_last: bool):
    """A forward hook that centres a module's output over its last dimension (in float32 for low-precision outputs)
    and, for CRMSNorm's d-1 stored coordinates, drops the last coordinate."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = output.float()
        centred = (x - x.mean(-1, keepdim=True)).to(output.dtype)
        return centred[..., :-1] if drop_last else centred

    return hook


def _module(model: nn.Module, path: str, unembed: str | None) -> nn.Module:
    if path == unembed:
        return model.get_output_embeddings()
    return model.get_submodule(path)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def apply_surgery(model: nn.Module, surgery: dict) -> None:
    """Replace pruned sub-layers, swap norms, add biases, resize tensors, set attributes and centre module outputs as
    `surgery` lists, before the weights are loaded."""
    unembed = surgery.get("unembed")
    for path, spec in surgery.get("modules", {}).items():
        spec = dict(spec)
        _set_module(model, path, PRUNED[spec.pop("kind")](model.get_submodule(path), **spec))
    for path, spec in surgery.get("norms", {}).items():
        spec = dict(spec)
        kind = spec.pop("kind")
        _set_module(model, path, nn.Identity() if kind == "identity" else NORMS[kind](**spec))
    for path in surgery.get("add_bias", []):
        linear = _module(model, path, unembed)
        w = linear.weight
        out_features = w.shape[1] if type(linear).__name__ == "Conv1D" else w.shape[0]
        linear.bias = nn.Parameter(torch.zeros(out_features, dtype=w.dtype, device=w.device))
    for name, shape in surgery.get("shapes", {}).items():
        path, _, param = name.rpartition(".")
        module = _module(model, path, unembed)
        old = getattr(module, param)
        setattr(module, param, nn.Parameter(torch.zeros(shape, dtype=old.dtype, device=old.device)))
        if type(module).__name__ == "Conv1D" and param == "weight":
            module.nx, module.nf = shape
        elif isinstance(module, nn.Linear) and param == "weight":
            module.out_features, module.in_features = shape
        elif isinstance(module, nn.Embedding):
            module.embedding_dim = shape[1]
    for name, value in surgery.get("attributes", {}).items():
        path, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(path), attribute, value)
    for path, spec in surgery.get("centred", {}).items():
        model.get_submodule(path).register_forward_hook(centring_hook(**spec))


def patched(base_class: type) -> type:
    """A subclass of the stock class that applies the surgery right after building its modules, and whose
    `save_pretrained` writes a folder that loads the same way (the wrapped config and this file beside it)."""

    def __init__(self, config, *args, **kwargs):
        base_class.__init__(self, config, *args, **kwargs)
        apply_surgery(self, getattr(config, "normsurgery", {}))

    def save_pretrained(self, save_directory, *args, **kwargs):
        base_class.save_pretrained(self, save_directory, *args, **kwargs)
        path = os.path.join(save_directory, "config.json")
        with open(path, encoding="utf-8") as f:
            base = json.load(f)
        surgery = base.get("normsurgery") or getattr(self.config, "normsurgery", {})
        with open(path, "w", encoding="utf-8") as f:
            json.dump(wrap_config(base, surgery), f, indent=2)
            f.write("\n")
        shutil.copyfile(__file__, os.path.join(save_directory, "modeling_normsurgery.py"))

    # same class name: transformers looks up checkpoint key renamings (e.g. GPT-NeoX embed_out) by it
    return type(base_class.__name__, (base_class,), {"__init__": __init__, "save_pretrained": save_pretrained})


class NormSurgeryForCausalLM(PreTrainedModel):
    """Entry point for `auto_map`: builds the patched stock class and loads the weights into it."""

    config_class = NormSurgeryConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        kwargs.pop("trust_remote_code", None)
        if not isinstance(config, NormSurgeryConfig):
            config = NormSurgeryConfig.from_pretrained(pretrained_model_name_or_path)
        base = config.to_base()
        model_class = patched(base_class(base))
        if config.surgery.get("key_mapping"):  # stock renamings are not applied to custom code
            kwargs.setdefault("key_mapping", config.surgery["key_mapping"])
        return model_class.from_pretrained(pretrained_model_name_or_path, *model_args, config=base, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        base = config.to_base()
        return patched(base_class(base))(base)
