"""Prove a drafted declaration the way the test suite proves a hand-written one: on a tiny random model with
perturbed norms, every checkpoint tensor is named, config.json reads without transformers, every norm computes
what the declaration says, and fold (and,
for a Pre-LN LayerNorm family, the conversions to RMSNorm and CRMSNorm) keep the logits, in memory and from file
to file. Only a draft that passes every check is trusted."""

from __future__ import annotations

import copy
import re
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from normsurgery.adapt.tiny import VOCAB, perturb, tiny_model
from normsurgery.arch.facts import applicability
from normsurgery.arch.spec import Architecture, Family
from normsurgery.errors import CheckFailed, NormSurgeryError

REL_TOLERANCE = 2e-5  # max |logit diff| / max |logit| in float32, the exactness bound of the test suite


@dataclass(frozen=True)
class Check:
    """One proof step: its name, whether it passed, and what was measured or what went wrong."""

    name: str
    passed: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """Plain data for --json."""
        return asdict(self)


@contextmanager
def declared(family: Family) -> Iterator[None]:
    """Resolve the family's model types to `family` for a while (a draft under proof, not in families.py)."""
    from normsurgery.arch import FAMILY_BY_MODEL_TYPE

    saved = {mt: FAMILY_BY_MODEL_TYPE.get(mt) for mt in family.model_types}
    FAMILY_BY_MODEL_TYPE.update({mt: family for mt in family.model_types})
    try:
        yield
    finally:
        for mt, old in saved.items():
            if old is None:
                FAMILY_BY_MODEL_TYPE.pop(mt, None)
            else:
                FAMILY_BY_MODEL_TYPE[mt] = old


def proof_model(config: Any, arch: Architecture) -> nn.Module:
    """The tiny model with every parameter re-drawn as the test fixtures do, norm gains by the declaration."""
    from normsurgery.rewrite.in_memory import ModelTensors

    model = tiny_model(config)
    names = ModelTensors(model, arch.key_renames, arch.fused, arch.split)
    gains = {names.loaded_name(n.weight): n.gain_offset for n in arch.all_norms() if n.weight}
    biases = {names.loaded_name(n.bias) for n in arch.all_norms() if n.bias}
    embeddings = {names.loaded_name(t) for t in (arch.token_embedding, arch.position_embedding) if t}
    perturb(model, gains, biases, embeddings)
    return model


def _ship_code(config: Any, model: nn.Module, folder: Path) -> None:
    """Give a saved tiny model of a remote-code architecture its code (the files that define its classes) and its
    auto_map, as its real checkpoint has them."""
    import json
    import shutil
    import sys

    raw = json.loads((folder / "config.json").read_text())
    raw["auto_map"] = dict(config.auto_map)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    for cls in (type(config), type(model)):
        source = Path(sys.modules[cls.__module__].__file__)
        for code in source.parent.glob("*.py"):
            if code.name != "__init__.py" and not (folder / code.name).exists():
                shutil.copy(code, folder / code.name)


def _names(folder: Path, arch: Architecture) -> Check:
    """Every saved tensor has a role in the declaration, and every declared tensor is saved."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            names |= set(h.keys())
    roles = set(arch.roles())
    unknown, missing = sorted(names - roles), sorted(roles - names)
    if unknown or missing:
        return Check("tensor names", False, f"not declared: {', '.join(unknown[:5]) or '-'}; declared but not saved: "
                                            f"{', '.join(missing[:5]) or '-'}")
    return Check("tensor names", True, f"all {len(names)} saved tensors declared")


def _config_json(folder: Path, family: Family) -> Check:
    """config.json read without transformers (the declaration's config_keys) names the same tensors as the
    transformers config, and needs no class default."""
    import json

    from normsurgery.arch import architecture_of, config_view, load_config

    if family.origin == "traced":
        return Check("config.json alone", True, "a traced family is resolved from the transformers config")
    raw = json.loads((folder / "config.json").read_text())
    view = config_view(raw)
    if architecture_of(view) != architecture_of(load_config(raw)):
        return Check("config.json alone", False, "config.json read without transformers gives another architecture: "
                                                 "a key is missing from config_keys")
    if view._loaded is not None and family.origin == "declared":
        return Check("config.json alone", False, "an attribute the declaration reads is not in config.json under its "
                                                 "name: add it to config_keys")
    return Check("config.json alone", True, "read without transformers, as transformers reads it")


@torch.no_grad()
def _facts(model: nn.Module, arch: Architecture) -> Check:
    """Each norm computes what the declaration says (kind, eps, (1 + w) gain, bias); readers read and writers
    write the hidden size."""
    from normsurgery.rewrite.in_memory import ModelTensors

    names = ModelTensors(model, arch.key_renames, arch.fused, arch.split)
    modules = dict(model.named_modules())
    params = {n: names.get(n).double() for n in arch.roles() if n in names}
    d = arch.hidden_size
    gen = torch.Generator().manual_seed(0)
    for norm in arch.all_norms():
        if norm.role == "qk":  # inside a sublayer, left alone by every rewrite (may take more than one input)
            continue
        module = modules[names.loaded_name(norm.weight or norm.name + ".weight").rsplit(".", 1)[0]]
        shape = tuple(params[norm.weight].shape) if norm.weight else (d,)
        scales = torch.tensor([1.0, 1e-2, 1e-3, 1e-4]).view(-1, *[1] * len(shape))
        x = (torch.randn((4, *shape), generator=gen) + 2.0) * scales
        got = module(x).double()
        y = x.double() - x.double().mean(-1, keepdim=True) if norm.kind == "layernorm" else x.double()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.eps)
        if norm.weight:
            y = y * (params[norm.weight] + norm.gain_offset)
        if norm.bias:
            y = y + params[norm.bias]
        if not torch.allclose(got, y, rtol=1e-4, atol=1e-5 * float(y.abs().max())):
            return Check("norm facts", False, f"{norm.name} does not compute a {norm.kind} with eps {norm.eps:g} and "
                                              f"gain offset {norm.gain_offset:g}")
    for norm in arch.all_norms():
        for reader in norm.readers:
            weight = params.get(reader.weight, names.get(reader.weight).double())
            if weight.shape[-2 if reader.conv1d else -1] != d:
                return Check("norm facts", False, f"{reader.weight} does not read the hidden size")
    for block in arch.blocks:
        for writer in block.writers:
            weight = params[writer.weight]
            if weight.shape[-1 if writer.conv1d else (-2 if writer.experts else 0)] != d:
                return Check("norm facts", False, f"{writer.weight} does not write the hidden size")
    return Check("norm facts", True, f"{len(arch.all_norms())} norms compute what is declared")


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    """The model's logits on fixed random tokens."""
    vocab = min(VOCAB, int(getattr(model.config, "vocab_size", VOCAB) or VOCAB))
    ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    return model(ids, use_cache=False).logits.double()


def _compare(name: str, reference: torch.Tensor, got: torch.Tensor) -> Check:
    """Relative max |logit diff| and top-1 agreement against the exactness bound."""
    rel = float((got - reference).abs().max() / reference.abs().max())
    top1 = float((got.argmax(-1) == reference.argmax(-1)).double().mean())
    return Check(name, rel <= REL_TOLERANCE and top1 == 1.0, f"max |logit diff| / max |logit| = {rel:.2g}, "
                                                             f"top-1 agreement {top1:.0%}")


def _in_memory(name: str, model: nn.Module, arch: Architecture, plan_for: Callable[[Architecture], Any],
               reference: torch.Tensor) -> Check:
    """A plan run on a copy of the loaded model."""
    from normsurgery.rewrite.in_memory import apply_in_memory

    rewritten = apply_in_memory(copy.deepcopy(model), plan_for(arch), arch)
    return _compare(name, reference, _logits(rewritten))


def _file_to_file(name: str, folder: Path, out: Path, run: Callable[[Path, Path], Any]) -> Check:
    """A command's API call from the saved folder to a new one, verified as the CLI verifies it."""
    result = run(folder, out)
    check = result["check"] if isinstance(result, dict) else result.check  # prune reports plain data
    passed, rel, top1 = (check["passed"], check["rel_logit_diff"], check["top1_agreement"]) if isinstance(
        check, dict) else (check.passed, check.rel_logit_diff, check.top1_agreement)
    detail = f"max |logit diff| / max |logit| = {rel:.2g}, top-1 agreement {top1:.0%}"
    return Check(name, passed and rel <= REL_TOLERANCE, detail)


def _prune(folder: Path, out: Path, remote: bool) -> Check:
    """Block 0 removed, verified against the original with it skipped: every later block then runs one index lower
    and the depth is one less, so a model whose blocks compute with their own index or with the depth (a residual
    scaled by 1/sqrt(depth) or by the block index) fails it. A prune refused before it runs (a kept block would change
    kind; a config list that only this tiny depth makes one entry per block) proves nothing either way: the real
    model's prune meets the same checks."""
    from normsurgery import api

    name = "prune block 0, file to file"
    try:
        return _file_to_file(name, folder, out, lambda src, dst: api.prune(str(src), dst, layers=[0], device="cpu",
                                                                           trust_remote_code=remote))
    except CheckFailed as err:  # the verification's measure, not its advice
        measured = re.findall(r"max \|logit diff\| / logit scale = [^ ;]+|top-1 agreement [0-9.]+%", str(err))
        return Check(name, False, f"verification failed: {', '.join(measured) or err}")
    except NormSurgeryError as err:
        return Check(name, True, f"not run: {err}")


def prove(family: Family, config: Any) -> list[Check]:
    """Run every check that applies to the declaration on a tiny model of `config`; a check that raises fails."""
    from normsurgery import api
    from normsurgery.rewrite.center import plan_center_swap
    from normsurgery.rewrite.fold import plan_fold

    checks: list[Check] = []

    def attempt(name: str, run: Callable[[], Check]) -> bool:
        try:
            checks.append(run())
        except NormSurgeryError as err:
            checks.append(Check(name, False, str(err)))
        except Exception as err:  # a wrong declaration fails in many ways: each is a failed check, not a crash
            checks.append(Check(name, False, f"{type(err).__name__}: {err}"))
        return checks[-1].passed

    try:
        arch = family.resolve(config)
    except Exception as err:  # the declaration cannot even name this model's tensors
        return [Check("resolve", False, f"{type(err).__name__}: {err}")]
    applies = {a.operation: a.applies for a in applicability(arch)}
    remote = bool(getattr(config, "auto_map", None))  # its code ships in the folder: the user opted in
    model = proof_model(config, arch)
    reference = _logits(model)
    with tempfile.TemporaryDirectory() as tmp, declared(family):
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        if remote:
            _ship_code(config, model, folder)
        if not attempt("tensor names", lambda: _names(folder, arch)):
            return checks
        attempt("config.json alone", lambda: _config_json(folder, family))
        attempt("norm facts", lambda: _facts(model, arch))
        if applies["fold"]:
            attempt("fold, in memory", lambda: _in_memory("fold, in memory", model, arch, plan_fold, reference))
            attempt("fold, file to file", lambda: _file_to_file(
                "fold, file to file", folder, Path(tmp) / "fold",
                lambda src, out: api.fold(str(src), out, device="cpu", trust_remote_code=remote)))
        if applies["prune"]:
            attempt("prune block 0, file to file", lambda: _prune(folder, Path(tmp) / "prune", remote))
        for target in ("rmsnorm", "crmsnorm"):
            if applies[target]:
                if target == "rmsnorm":
                    attempt("convert to rmsnorm, in memory", lambda: _in_memory(
                        "convert to rmsnorm, in memory", model, arch, lambda a: plan_center_swap(a, "rmsnorm"),
                        reference))
                attempt(f"convert to {target}, file to file", lambda t=target: _file_to_file(
                    f"convert to {t}, file to file", folder, Path(tmp) / t,
                    lambda src, out: api.convert(str(src), out, to=t, device="cpu", trust_remote_code=remote)))
    return checks
