"""A Python process in which normsurgery cannot be imported: it loads outputs the way a user without
normsurgery would, and answers one JSON request per line on stdin."""

from __future__ import annotations

import json
import sys

sys.modules["normsurgery"] = None  # type: ignore[assignment]  # any `import normsurgery` now fails

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def compare(original: str, candidate: str) -> dict:
    """Logits and greedy generation with the KV cache of a stock original vs. a candidate loaded with remote code."""
    a = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(candidate, dtype=torch.float32, trust_remote_code=True).eval()
    ids = torch.randint(3, a.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(ids).logits.double(), b(ids).logits.double()
        kw = dict(max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        ga, gb = a.generate(ids[:1], **kw), b.generate(ids[:1], **kw)
    return {
        "rel": ((la - lb).abs().max() / la.abs().max()).item(),
        "same_generation": ga.tolist() == gb.tolist(),
        # LayerNorm modules (stock classes, or families' own, e.g. CohereLayerNorm) by path
        "layernorms_left": sorted(n for n, m in b.named_modules()
                                  if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("LayerNorm")),
        "normsurgery_importable": "normsurgery" in sys.modules and sys.modules["normsurgery"] is not None,
    }


def logits_with_code(original: str, candidate: str) -> dict:
    """Logits of two models that both load through code shipped in their folders (trust_remote_code)."""
    a = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32, trust_remote_code=True).eval()
    b = AutoModelForCausalLM.from_pretrained(candidate, dtype=torch.float32, trust_remote_code=True).eval()
    ids = torch.randint(3, a.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(ids).logits.double(), b(ids).logits.double()
    return {"rel": ((la - lb).abs().max() / la.abs().max()).item(), "class": type(b).__name__,
            "normsurgery_importable": "normsurgery" in sys.modules and sys.modules["normsurgery"] is not None}


def norm_free(candidate: str) -> dict:
    """The norm modules a loaded candidate still has, and whether greedy generation with the KV cache matches
    generation without it."""
    b = AutoModelForCausalLM.from_pretrained(candidate, dtype=torch.float32, trust_remote_code=True).eval()
    ids = torch.randint(3, b.config.get_text_config().vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        cached, uncached = b.generate(ids, use_cache=True, **kw), b.generate(ids, use_cache=False, **kw)
    return {
        "norm_modules": sorted({type(m).__name__ for m in b.modules() if "norm" in type(m).__name__.lower()}),
        "swaps": sorted({type(m).__name__ for m in b.modules() if type(m).__name__.startswith("Dynamic")}),
        "cache_consistent": cached.tolist() == uncached.tolist(),
    }


def pruned(original: str, candidate: str, skipped: str) -> dict:
    """A stock-loaded pruned candidate against the stock original run with blocks `skipped` (comma-separated) passing
    their input through (hooks written here, independently of normsurgery): logits, greedy generation with the
    KV cache, and each kept layer's cache index."""
    a = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(candidate, dtype=torch.float32).eval()
    depth = a.config.get_text_config().num_hidden_layers
    blocks = next(m for n, m in a.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == depth and n.split(".")[-1] in ("layers", "h", "blocks"))

    def through(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    for i in map(int, skipped.split(",")):
        blocks[i].register_forward_hook(through, with_kwargs=True)
    ids = torch.randint(3, a.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(ids).logits.double(), b(ids).logits.double()
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        ga, gb = a.generate(ids[:1], use_cache=True, **kw), b.generate(ids[:1], use_cache=True, **kw)
        uncached = b.generate(ids[:1], use_cache=False, **kw)
    indices = [getattr(m, "layer_idx", None) for n, m in b.named_modules() if n.endswith("attn") or n.endswith("attention")]
    return {
        "rel": ((la - lb).abs().max() / la.abs().max()).item(),
        "same_generation": ga.tolist() == gb.tolist() == uncached.tolist(),
        "num_layers": b.config.get_text_config().num_hidden_layers,
        "layer_indices": [i for i in indices if i is not None],
    }


def pruned_sublayers(original: str, candidate: str, zeroed: str) -> dict:
    """A candidate without some sub-layers, loaded with its own code, against the stock original whose modules
    `zeroed` (comma-separated paths: what each removed sub-layer adds to the residual) output zeros (hooks written
    here): logits; greedy generation of a left-padded batch with the KV cache, against the original's and against
    the candidate's own without the cache; a cached prefill + continuation against one full forward; and the size
    of the candidate's cache per layer after those 12 tokens."""
    a = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(candidate, dtype=torch.float32, trust_remote_code=True).eval()
    for path in zeroed.split(","):
        a.get_submodule(path).register_forward_hook(lambda module, args, output: torch.zeros_like(output))
    ids = torch.randint(3, a.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        la, lb = a(ids).logits.double(), b(ids).logits.double()
        kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        ga, gb = a.generate(ids, use_cache=True, **kw), b.generate(ids, use_cache=True, **kw)
        uncached = b.generate(ids, use_cache=False, **kw)
        prefill = b(ids[:, :8], use_cache=True)
        step = b(ids[:, 8:], past_key_values=prefill.past_key_values).logits.double()
    cache = prefill.past_key_values
    return {
        "rel": ((la - lb).abs().max() / la.abs().max()).item(),
        "same_generation": ga.tolist() == gb.tolist() == uncached.tolist(),
        "incremental_rel": ((step - lb[:, 8:]).abs().max() / lb.abs().max()).item(),
        "cache_numel": [layer.keys.numel() for layer in cache.layers],
        "replaced": sorted({type(m).__name__ for m in b.modules() if type(m).__name__ in (
            "PrunedAttention", "PrunedMLP", "Empty", "Zeros")}),
        "normsurgery_importable": "normsurgery" in sys.modules and sys.modules["normsurgery"] is not None,
    }


def stock_vs_native(stock: str, native: str) -> dict:
    """A stock candidate loaded WITHOUT remote code against a native one loaded with it: logits, the stock model's
    class and norm eps, and whether its greedy generation with the KV cache matches generation without it."""
    import json as _json
    from pathlib import Path

    a = AutoModelForCausalLM.from_pretrained(stock, dtype=torch.float32, trust_remote_code=False).eval()
    b = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32, trust_remote_code=True).eval()
    ids = torch.randint(3, a.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(ids).logits.double(), b(ids).logits.double()
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        cached, uncached = a.generate(ids[:1], use_cache=True, **kw), a.generate(ids[:1], use_cache=False, **kw)
    eps = {getattr(m, name) for m in a.modules() if "norm" in type(m).__name__.lower()
           for name in ("eps", "variance_epsilon", "epsilon") if isinstance(getattr(m, name, None), float)}
    return {
        "rel": ((la - lb).abs().max() / lb.abs().max()).item(),
        "class": type(a).__name__,
        "auto_map": "auto_map" in _json.loads((Path(stock) / "config.json").read_text()),
        "norm_eps": sorted(eps),
        "cache_consistent": cached.tolist() == uncached.tolist(),
        "normsurgery_importable": "normsurgery" in sys.modules and sys.modules["normsurgery"] is not None,
    }


for line in sys.stdin:
    request = json.loads(line)
    try:
        reply = {"ok": True, "result": globals()[request["call"]](*request["args"])}
    except Exception as err:  # report, keep serving
        reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    print(json.dumps(reply), flush=True)
