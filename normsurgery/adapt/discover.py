"""Find a model type's residual stream by tracing a tiny random instance: its norms and what each computes, the
linears that read each norm (and which output slices serve queries, keys or values), the linears that write into
the residual stream, the embeddings, the final norm and the unembedding. The result is a `Draft`."""

from __future__ import annotations

import copy
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from normsurgery.adapt.draft import Draft, LinDraft, NormDraft, Width
from normsurgery.adapt.tiny import VOCAB, perturb, tiny_config, tiny_model
from normsurgery.adapt.trace import Key, Node, Trace, record, walk
from normsurgery.arch.spec import NormRole

SEQ = 6
ADD = frozenset({"add", "__add__", "__radd__", "add_", "__iadd__"})
CAST = frozenset({"to", "float", "type", "type_as", "contiguous", "dropout", "clone", "detach", "double", "half",
                  "bfloat16"})
RESIDUAL_PASS = CAST | {"view", "reshape"}  # ops that keep the residual stream the residual stream
# ops between a norm and its readers that move no value across features or tokens
PASS = CAST | {"view", "reshape", "__getitem__", "flatten", "unsqueeze", "squeeze"}


def is_norm(module: nn.Module) -> bool:
    """A norm module: nn.LayerNorm, or a class named like one (RMSNorm, LayerNorm1P, ...)."""
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or HF's Conv1D."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _modules(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module], dict[str, nn.Module]]:
    """The innermost norm modules, the linears and the embeddings, by path."""
    named = dict(model.named_modules())
    norms = {p: m for p, m in named.items() if p and is_norm(m)
             and not any(is_norm(c) for c in m.modules() if c is not m)}
    linears = {p: m for p, m in named.items() if is_linear(m)}
    embeddings = {p: m for p, m in named.items() if isinstance(m, nn.Embedding)}
    return norms, linears, embeddings


@torch.no_grad()
def norm_facts(module: nn.Module, d: int) -> tuple[str, float, float]:
    """(kind, eps, gain offset) of a norm, from what it computes in float64 on probes: a LayerNorm ignores a shift
    of its input; a zero weight leaves a (1 + w) gain's output non-zero; eps from inputs small enough to show it."""
    m = copy.deepcopy(module).double()
    weight = getattr(m, "weight", None)
    bias = getattr(m, "bias", None)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else (d,)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((4, *shape), generator=gen, dtype=torch.float64) + 2.0
    if isinstance(bias, torch.Tensor):
        bias.zero_()
    offset = 0.0
    if isinstance(weight, torch.Tensor):
        weight.zero_()
        offset = 0.0 if float(m(x).abs().max()) < 1e-9 else 1.0
        weight.fill_(1.0 - offset)
    kind = "layernorm" if torch.allclose(m(x), m(x + 3.0), atol=1e-5) else "rmsnorm"
    small = torch.randn((64, *shape), generator=gen, dtype=torch.float64) * 1e-3
    centred = small - small.mean(-1, keepdim=True) if kind == "layernorm" else small
    y = m(small).double()
    ms = centred.pow(2).mean(-1, keepdim=True)
    keep = y.abs() > 1e-12
    eps = float(((centred / torch.where(keep, y, torch.ones_like(y))).pow(2) - ms)[keep].median())
    return kind, max(eps, 0.0), offset


def _eps_attr(config: Any, eps: float) -> str | None:
    """The config attribute that holds eps (names with 'eps' first), when one does."""
    raw = config.to_dict()
    hits = [k for k, v in raw.items() if isinstance(v, float) and v > 0 and abs(v - eps) <= 2e-3 * v]
    hits.sort(key=lambda k: ("eps" not in k, k))
    return hits[0] if hits else None


def _nice(eps: float) -> float:
    """eps rounded to two significant digits (the probe measures it to about 1e-4 relative)."""
    return float(f"{eps:.1e}") if eps > 0 else 0.0


def _block_list(model: nn.Module, n: int) -> tuple[str, list[nn.Module]]:
    """The ModuleList of decoder blocks: the first with one entry per layer."""
    for path, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n and n > 0:
            return path, list(m)
    raise ValueError("no list of decoder blocks with one entry per layer")


def _disk_names(model: nn.Module) -> tuple[dict[str, str], set[str]]:
    """In-memory tensor name -> its name in the saved checkpoint (transformers may rename on save), and the saved
    names."""
    from safetensors.torch import load_file
    from transformers.utils import logging

    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        saved: dict[str, torch.Tensor] = {}
        for f in Path(tmp).glob("*.safetensors"):
            saved.update(load_file(f))
    state = model.state_dict()
    mem_to_disk: dict[str, str] = {}
    for disk, t in saved.items():
        if disk in state and torch.equal(state[disk], t):
            mem_to_disk[disk] = disk
            continue
        for mem, s in state.items():
            if mem not in mem_to_disk and s.shape == t.shape and torch.equal(s, t):
                mem_to_disk[mem] = disk
                break
    return mem_to_disk, set(saved)


def _renames(mem_to_disk: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """On-disk -> in-memory prefix renames (regex, replacement) that explain every renamed tensor."""
    found: dict[str, str] = {}
    for mem, disk in mem_to_disk.items():
        if mem == disk:
            continue
        m, d = mem.split("."), disk.split(".")
        while m and d and m[-1] == d[-1]:
            m.pop(), d.pop()
        found["^" + "".join(re.escape(part) + r"\." for part in d)] = "".join(part + "." for part in m)
    return tuple(sorted(found.items()))


class _Finder:
    """Reads the residual stream off one trace."""

    def __init__(self, trace: Trace, norms: dict[str, nn.Module], linears: dict[str, nn.Module],
                 embeddings: dict[str, nn.Module]) -> None:
        self.trace = trace
        self.norms, self.linears, self.embeddings = norms, linears, embeddings
        self.problems: list[str] = []

    def kind(self, node: Node) -> str:
        """'linear', 'norm', 'embedding' or 'op'."""
        if node.kind == "module":
            return "linear" if node.name in self.linears else "norm" if node.name in self.norms else "embedding"
        return "op"

    def residual(self, start: Key, end: Key) -> tuple[set[Key], list[Node]]:
        """The residual tensors from `start` to `end` (through adds and casts, and through norms only where the
        stream cannot reach `end` without them: Post-LN), and the adds on the way."""
        for through_norms in (False, True):
            stream, steps = {start}, []
            for node in self.trace.nodes:
                if any(t in stream for t in node.inputs) and (
                        (node.kind == "op" and node.name in ADD | RESIDUAL_PASS)
                        or (through_norms and self.kind(node) == "norm")):
                    stream.update(node.outputs)
                    steps.append(node)
            if end in stream:
                break
        else:
            raise ValueError("the block's output is not its input plus sublayer outputs")
        chain = walk([end], lambda t: [i for n in steps if t in n.outputs for i in n.inputs if i in stream])
        return chain, [n for n in steps if any(t in chain for t in n.outputs)]

    def forward_to_linears(self, tensor: Key, what: str) -> list[str]:
        """The linears that read `tensor` through ops that move nothing across features (a norm's readers)."""
        found: list[str] = []

        def step(t: Key) -> list[Key]:
            out: list[Key] = []
            for node in self.trace.readers(t):
                kind = self.kind(node)
                if kind == "linear":
                    found.append(node.name)
                elif kind == "op" and node.name in PASS:
                    out.extend(node.outputs)
                else:
                    self.problems.append(f"{what} is read by {node.name!r}, which is not a linear layer")
            return out

        walk([tensor], step)
        return list(dict.fromkeys(found))

    def back_to_linears(self, tensor: Key, stop: set[Key], what: str,
                        embeddings: list[str] | None = None) -> tuple[list[str], list[str]]:
        """The linears whose outputs make `tensor` (a sublayer's contribution to the residual), and the norms on the
        way (output norms); the embeddings met are added to `embeddings`, or are a problem when it is None."""
        linears: list[str] = []
        norms: list[str] = []

        def step(t: Key) -> list[Key]:
            if t in stop:
                self.problems.append(f"{what} takes a sublayer output made from the residual stream by something "
                                     "other than linear layers (e.g. MoE experts held as fused parameters, which a "
                                     "family cannot declare yet)")
                return []
            node = self.trace.producer.get(t)
            if node is None:
                return []
            kind = self.kind(node)
            if kind == "linear":
                linears.append(node.name)
                return []
            if kind == "norm":
                norms.append(node.name)
            elif kind == "embedding":
                if embeddings is None:
                    self.problems.append(f"{what} comes from embedding {node.name}")
                else:
                    embeddings.append(node.name)
                return []
            return list(node.inputs)

        walk([tensor], step)
        return list(dict.fromkeys(linears)), list(dict.fromkeys(norms))

    def module_nodes(self, path: str) -> list[Node]:
        """The calls of one module."""
        return [n for n in self.trace.nodes if n.kind == "module" and n.name == path]


def _attention_labels(model: nn.Module, blocks: list[nn.Module], readers: list[list[str]], writers: list[list[str]],
                      ids: torch.Tensor) -> dict[str, list[str]]:
    """Per reader, each output channel's part in attention: 'q' (moves the scores of its own token), 'k' (moves the
    scores other tokens give it), 'v' (moves later tokens' attention output, not the scores) or '-' (moves only its
    own token: an MLP). Found from gradients, block by block."""
    from torch.overrides import TorchFunctionMode

    current = [-1]
    scores: dict[int, list[torch.Tensor]] = {}

    class Softmax(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("softmax", "_softmax") and args and isinstance(args[0], torch.Tensor):
                x = args[0]
                if x.ndim >= 3 and x.shape[-1] == x.shape[-2] == ids.shape[1] and current[0] >= 0:
                    scores.setdefault(current[0], []).append(x)
            return func(*args, **(kwargs or {}))

    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    handles = [b.register_forward_pre_hook(lambda _m, _a, i=i: current.__setitem__(0, i)) for i, b in enumerate(blocks)]
    for path in {p for r in readers for p in r}:
        handles.append(modules[path].register_forward_hook(lambda _m, _a, out, p=path: outputs.__setitem__(p, out)))
    for path in {p for w in writers for p in w}:
        handles.append(modules[path].register_forward_pre_hook(lambda _m, a, p=path: inputs.__setitem__(p, a[0])))
    try:
        with torch.enable_grad(), Softmax():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(1)
    labels: dict[str, list[str]] = {}
    for b, paths in enumerate(readers):
        if not paths:
            continue
        outs = [outputs[p] for p in paths]
        s_loss = sum((s[..., 1:, 0] * torch.randn(s[..., 1:, 0].shape, generator=gen)).sum() for s in scores.get(b, []))
        o_loss = sum((inputs[w][..., -1, :] * torch.randn(inputs[w][..., -1, :].shape, generator=gen)).sum()
                     for w in writers[b])
        zero = [torch.zeros_like(o) for o in outs]
        gs = torch.autograd.grad(s_loss, outs, allow_unused=True, retain_graph=True) if scores.get(b) else zero
        go = torch.autograd.grad(o_loss, outs, allow_unused=True, retain_graph=True)
        for p, o, g1, g2 in zip(paths, outs, gs, go):
            g1 = (torch.zeros_like(o) if g1 is None else g1).abs().reshape(-1, SEQ, o.shape[-1]).sum(0)
            g2 = (torch.zeros_like(o) if g2 is None else g2).abs().reshape(-1, SEQ, o.shape[-1]).sum(0)
            labels[p] = ["q" if g1[1:, j].any() else "k" if g1[0, j].any() else "v" if g2[:-1, j].any() else "-"
                         for j in range(o.shape[-1])]
    return labels


def _groups(labels: list[str], config: Any) -> tuple[tuple[str, ...], tuple[Width, ...], Width] | None:
    """A reader's (groups, widths, repeat) from its channels' labels; None when it mixes attention and MLP."""
    if set(labels) == {"-"}:
        return (), (), 1
    if "-" in labels:
        return None
    runs: list[list[Any]] = []
    for label in labels:
        if runs and runs[-1][0] == label:
            runs[-1][1] += 1
        else:
            runs.append([label, 1])
    period = next(p for p in range(1, len(runs) + 1) if len(runs) % p == 0 and runs == runs[:p] * (len(runs) // p))
    repeat, base = len(runs) // period, runs[:period]
    groups = tuple("v" if label == "v" else "qk" for label, _ in base)
    lengths = [n for _, n in base]
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv = int(getattr(config, "num_key_value_heads", 0) or 0)
    head_dim = int(getattr(config, "head_dim", 0) or (config.hidden_size // heads if heads else 0))
    widths: tuple[Width, ...] = ()
    if len(set(lengths)) > 1:
        if head_dim and all(n % head_dim == 0 for n in lengths):
            widths = tuple("num_attention_heads" if n == heads * head_dim else
                           "num_key_value_heads" if kv and n == kv * head_dim else n // head_dim for n in lengths)
        else:
            unit = math.gcd(*lengths)
            widths = tuple(n // unit for n in lengths)
    rep: Width = "num_attention_heads" if repeat > 1 and repeat == heads else repeat
    return groups, widths, rep


# boolean config attributes that say nothing about the architecture
NOT_LAYOUT = frozenset({"use_cache", "return_dict", "output_attentions", "output_hidden_states", "tie_word_embeddings",
                        "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder", "torchscript",
                        "use_return_dict"})


def flags(config: Any) -> dict[str, bool]:
    """The config's boolean attributes that may change the architecture."""
    return {k: v for k, v in sorted(config.to_dict().items())
            if isinstance(v, bool) and k not in NOT_LAYOUT and not k.startswith("_")}


def _bias_switches(model_type: str, layers: int, overrides: dict[str, Any] | None, base: dict[str, bool],
                   config: Any) -> dict[str, str]:
    """Which config flag switches each linear's bias: each flag named like '*bias*' flipped, the model rebuilt
    (on the meta device) and its linears' biases compared."""
    from transformers import AutoModelForCausalLM

    switches: dict[str, str] = {}
    for key, value in flags(config).items():
        if "bias" not in key:
            continue
        try:
            flipped = tiny_config(model_type, layers, {**(overrides or {}), key: not value})
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(flipped, attn_implementation="eager")
        except Exception:  # a flag that the config or model refuses to flip
            continue
        linears = {p: m.bias is not None for p, m in model.named_modules() if is_linear(m)}
        for p, has in base.items():
            if p in linears and linears[p] != has:
                switches.setdefault(p, key)
    return switches


@dataclass
class _Block:
    """What one block's trace shows: each norm's role and readers (in-memory paths), writers, direct readers."""

    prefix: str
    norms: dict[str, tuple[str, list[str]]]
    writers: list[str]
    direct: list[str]
    parallel: bool


def _block(find: _Finder, start: Key, end: Key, prefix: str) -> _Block:
    """Follow one block's residual stream from `start` to `end`: the adds on it, what each add takes (writers,
    through output norms), and what reads it (input norms and their readers, direct readers, the rest: QK-norms)."""
    trace = find.trace
    chain, adds = find.residual(start, end)
    stream = walk(list(chain), lambda t: [o for n in trace.readers(t) if n.kind == "op" and n.name in RESIDUAL_PASS
                                           for o in n.outputs])
    found: dict[str, tuple[str, list[str]]] = {}
    writers: list[str] = []
    for node in adds:
        if find.kind(node) == "norm":
            found[node.name] = ("residual", [])
            continue
        for operand in node.inputs:
            if operand not in chain and operand not in stream:
                linears, output_norms = find.back_to_linears(operand, stream, f"{prefix[:-1]}'s residual add")
                writers += linears
                found.update({n: ("output", []) for n in output_norms})
    direct: list[Node] = []
    for t in stream:
        for node in trace.readers(t):
            if node.kind != "module" or not node.name.startswith(prefix):
                continue  # ops, and the next block's or the final norm
            if find.kind(node) == "norm" and node.name not in found:
                found[node.name] = ("input", find.forward_to_linears(node.outputs[0], node.name))
            elif find.kind(node) == "linear":
                direct.append(node)
    for path in find.norms:  # called, but neither on nor reading the stream: inside a sublayer (QK-norms)
        if path.startswith(prefix) and path not in found and find.module_nodes(path):
            found[path] = ("qk", [])
    read = {n.inputs[0] for p, (role, _) in found.items() if role == "input" for n in find.module_nodes(p)}
    read |= {n.inputs[0] for n in direct}
    first_call = {p: find.module_nodes(p)[0].index for p in [*writers, *(n.name for n in direct)]}
    return _Block(prefix, found, sorted(set(writers), key=first_call.__getitem__),
                  sorted({n.name for n in direct}, key=first_call.__getitem__),
                  parallel=len(set(writers)) > 1 and read == {start})  # attention and MLP read the same residual


def _norm_draft(path: str, module: nn.Module, role: NormRole, readers: tuple[LinDraft, ...] = ()) -> NormDraft:
    """A norm's draft: its role, readers, and whether it holds a gain and a bias."""
    return NormDraft(path, role, readers, has_weight=getattr(module, "weight", None) is not None,
                     has_bias=getattr(module, "bias", None) is not None)


def draft_family(model_type: str, *, layers: int = 2, overrides: dict[str, Any] | None = None,
                 explore: bool = True) -> Draft:
    """Trace a tiny random `model_type` and draft its declaration; the Draft's `problems` say what tracing could
    not express (then the declaration needs a hand edit). `explore`: find the config flags that switch biases."""
    config = tiny_config(model_type, layers, overrides)
    model = tiny_model(config)
    draft = Draft(model_type=model_type, config=config)
    n_layers = int(config.num_hidden_layers)
    norms, linears, embeddings = _modules(model)
    try:
        draft.layers, blocks = _block_list(model, n_layers)
        facts = {p: norm_facts(m, int(config.hidden_size)) for p, m in norms.items()}
    except ValueError as err:
        draft.problems.append(str(err))
        return draft
    except Exception as err:  # a norm module that does not take one hidden vector (a group norm inside attention)
        draft.problems.append(f"a norm module could not be probed on its own ({type(err).__name__}: {err})")
        return draft
    params = dict(model.named_parameters(remove_duplicate=False))
    perturb(model, {f"{p}.weight": facts[p][2] for p in norms if f"{p}.weight" in params},
            {f"{p}.bias" for p in norms if f"{p}.bias" in params}, {f"{p}.weight" for p in embeddings})
    ids = torch.randint(3, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(0))
    atomic = {m: p for group in (norms, linears, embeddings) for p, m in group.items()}
    try:
        trace, ends = record(model, atomic, {b: i for i, b in enumerate(blocks)}, ids)
    except Exception as err:  # the model's own forward fails on the tiny config
        draft.problems.append(f"the tiny model's forward pass failed ({type(err).__name__}: {err})")
        return draft
    find = _Finder(trace, norms, linears, embeddings)
    mem_to_disk, saved = _disk_names(model)
    draft.key_renames = _renames(mem_to_disk)

    def disk(path: str) -> str:
        return mem_to_disk.get(f"{path}.weight", f"{path}.weight")[: -len(".weight")]

    try:
        found = [_block(find, start, end, f"{draft.layers}.{i}.") for i, (start, end) in sorted(ends.items())]
    except ValueError as err:
        draft.problems.append(str(err))
        return draft
    readers = [[r for role, rs in b.norms.values() if role == "input" for r in rs] for b in found]
    labels = _attention_labels(model, blocks, readers, [b.writers for b in found], ids)
    switches = _bias_switches(model_type, layers, overrides, {p: m.bias is not None for p, m in linears.items()},
                              config) if explore else {}

    def lin(path: str, prefix: str) -> LinDraft:
        module = linears[path]
        groups, widths, repeat = (), (), 1
        if path in labels:
            shape = _groups(labels[path], config)
            if shape is None:
                draft.problems.append(f"{path} serves both attention and the MLP")
            else:
                groups, widths, repeat = shape
        return LinDraft(disk(path)[len(prefix):], bias=switches.get(path, module.bias is not None),
                        conv1d=type(module).__name__ == "Conv1D", groups=groups, widths=widths, repeat=repeat)

    layouts = []
    for b in found:
        ordered = sorted(b.norms, key=lambda p: find.module_nodes(p)[0].index)
        layouts.append((
            tuple(_norm_draft(disk(p)[len(b.prefix):], norms[p], b.norms[p][0],  # type: ignore[arg-type]
                              tuple(lin(r, b.prefix) for r in b.norms[p][1])) for p in ordered),
            tuple(lin(w, b.prefix) for w in b.writers), tuple(lin(r, b.prefix) for r in b.direct), b.parallel))
    for i, layout in enumerate(layouts[1:], 1):
        if layout != layouts[0]:
            draft.problems.append(f"block {i} differs from block 0 (a per-block layout needs a hand-written function)")
    draft.norms, draft.writers, draft.direct_readers, draft.parallel = layouts[0]
    draft.post_ln = any(n.role == "residual" for n in draft.norms)
    _shared_facts(draft, {p: facts[p] for b in found for p, (role, _) in b.norms.items() if role != "qk"})
    _model_level(draft, find, model, ends, ids, disk)
    draft.problems.extend(dict.fromkeys(find.problems))
    draft.unembed = lin(_unembedding(model, linears), "")
    if not draft.problems:
        _others(draft, saved)
        draft.config_keys = _config_keys(draft)
    return draft


def _config_keys(draft: Draft) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The attributes the declaration reads that config.json holds under the class's own key (its attribute_map,
    e.g. GPT-2's n_embd), so that normsurgery reads config.json without transformers."""
    read = {"hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings"}
    read |= {w for n in draft.norms for r in n.readers for w in (*r.widths, r.repeat) if isinstance(w, str)}
    mapping = dict(getattr(type(draft.config), "attribute_map", {}) or {})
    return tuple((a, (mapping[a],)) for a in sorted(read) if a in mapping)


def _shared_facts(draft: Draft, facts: dict[str, tuple[str, float, float]]) -> None:
    """The family's norm kind, eps (and the config attribute holding it) and gain offset, which every norm on the
    residual stream must share."""
    if len({(kind, offset) for kind, _, offset in facts.values()}) > 1:
        draft.problems.append("the norms differ in kind or (1 + w) gain; a family declares one of each")
    if facts:
        kind, eps, draft.gain_offset = next(iter(facts.values()))
        draft.norm_kind = kind  # type: ignore[assignment]
        draft.eps_attr = _eps_attr(draft.config, eps)
        draft.eps = getattr(draft.config, draft.eps_attr) if draft.eps_attr else _nice(eps)


def _unembedding(model: nn.Module, linears: dict[str, nn.Module]) -> str:
    """The path of the output embedding."""
    output = model.get_output_embeddings()
    return next(p for p, m in linears.items() if m is output)


def _model_level(draft: Draft, find: _Finder, model: nn.Module, ends: dict[int, tuple[Key, Key]],
                 ids: torch.Tensor, disk: Callable[[str], str]) -> None:
    """Embeddings (token, position and its offset, an embedding norm, a sqrt(d) scale), the final norm and what
    reads it."""
    trace = find.trace
    first = ends[0][0]
    met: list[str] = []
    linears, before = find.back_to_linears(first, set(), "block 0's input", met)
    if linears:
        draft.problems.append(f"linear layers between the embeddings and block 0: {', '.join(linears)}")
    token_module = model.get_input_embeddings()
    nodes = [n for n in trace.nodes if find.kind(n) == "embedding" and n.name in met]
    token = [n for n in nodes if find.embeddings[n.name] is token_module]
    if not token:
        draft.problems.append("no embedding reads the input ids")
        return
    draft.token_embedding = disk(token[0].name)
    positions = [n for n in nodes if n is not token[0]]
    if len(positions) > 1:
        draft.problems.append(f"several position embeddings: {', '.join(n.name for n in positions)}")
    if positions:
        draft.position_embedding = disk(positions[0].name)
        table = find.embeddings[positions[0].name].weight.detach()  # position 0's row: an offset shows (OPT's 2)
        first_row = trace.tensors[positions[0].outputs[0]].reshape(-1, table.shape[1])[0]
        draft.position_offset = int((table - first_row).abs().sum(1).argmin())
    if before:
        draft.embedding_norm = _norm_draft(disk(before[0]), find.norms[before[0]], "embedding")
    else:
        rows = token_module.weight.detach()[ids].double()  # rows, not the module's output: some embeddings scale
        h = trace.tensors[first].double() - (trace.tensors[positions[0].outputs[0]].double() if positions else 0)
        scale = float((h * rows).sum() / (rows * rows).sum())
        d = int(draft.config.hidden_size)
        draft.embed_sqrt_d = abs(scale - math.sqrt(d)) < 1e-3 * math.sqrt(d)
        if float((h - scale * rows).abs().max()) > 1e-5 * float(h.abs().max()):
            draft.problems.append("block 0's input holds more than the (scaled) stored embeddings, e.g. position "
                                  "encodings computed rather than stored (sinusoidal), which a draft does not declare: "
                                  "declare the family by hand, `computed_positions` naming the module computing them")
        elif not draft.embed_sqrt_d and abs(scale - 1.0) > 1e-4:
            draft.notes.append(f"embeddings are multiplied by {scale:.4g} (a config multiplier the stock class applies, "
                               "kept by every rewrite)")
    unembed = _unembedding(model, find.linears)
    after_last = walk([ends[max(ends)][1]], lambda t: [o for n in trace.readers(t) if n.kind == "op" and n.name in PASS
                                                        for o in n.outputs])
    finals = [n for n in trace.nodes if find.kind(n) == "norm" and n.inputs and n.inputs[0] in after_last]
    if finals:
        draft.final_norm = _norm_draft(disk(finals[0].name), find.norms[finals[0].name], "final")
        readers = find.forward_to_linears(finals[0].outputs[0], finals[0].name)
        if readers != [unembed]:
            draft.problems.append(f"the final norm is read by {', '.join(readers)}, not only by the unembedding")
    extra = [p for p in find.linears if not p.startswith(f"{draft.layers}.") and p != unembed]
    if extra:
        draft.problems.append(f"model-level linear layers besides the unembedding: {', '.join(extra)}")


def _others(draft: Draft, saved: set[str]) -> None:
    """Block tensors that are neither norms nor linears (e.g. activation parameters), which rewrites leave alone;
    any other saved tensor the draft does not name is a problem."""
    arch = draft.family().resolve(draft.config)
    unknown = set(saved) - set(arch.roles()) - ({arch.unembed.weight} if arch.tied else set())
    n, prefix0 = arch.num_layers, f"{draft.layers}.0."
    others = tuple(sorted(t[len(prefix0):] for t in unknown if t.startswith(prefix0)))
    if all(f"{draft.layers}.{i}.{o}" in unknown for i in range(n) for o in others):
        draft.others = others
    rest = sorted(unknown - {f"{draft.layers}.{i}.{o}" for i in range(n) for o in draft.others})
    if rest:
        draft.problems.append(f"tensors the draft does not place: {', '.join(rest[:6])}")
