"""Run a model on token batches: every calibration sequence of a chunk in one forward, so that a streamed weight
is read once per chunk, and the output of chosen blocks kept (to name the first block where two models part)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F

from normsurgery.engine.lazy_model import LazyModel
from normsurgery.errors import NormSurgeryError


@contextmanager
def block_outputs(model: torch.nn.Module, paths: list[str] | None) -> Iterator[list[torch.Tensor | None]]:
    """Within the context, the hidden states each block in `paths` returns are kept (float32, on the CPU)."""
    kept: list[torch.Tensor | None] = [None] * len(paths or [])
    handles = []

    def keeper(index: int):
        def keep(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            kept[index] = hidden.detach().float().cpu()
        return keep

    for i, path in enumerate(paths or []):
        handles.append(model.get_submodule(path).register_forward_hook(keeper(i)))
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def logits(lazy: LazyModel, tokens: torch.Tensor, *, blocks: list[str] | None = None
           ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Float32 logits [sequences, positions, vocab] on the CPU for one chunk of `tokens`, and the outputs of `blocks`."""
    with block_outputs(lazy.model, blocks) as kept:
        try:
            out = lazy.model(input_ids=tokens.to(lazy.runtime.device), use_cache=False).logits
        except NormSurgeryError:
            raise
        except Exception as err:  # the model's own code fails under the engine (streamed weights, skipped blocks)
            raise NormSurgeryError(
                f"running the {getattr(lazy.model.config, 'model_type', '')} model failed ({type(err).__name__}: "
                f"{err}); nothing was written. Its code does something the bounded-memory engine or the block "
                "hooks cannot follow; please report it with the model's config.json.") from None
    return out.float().cpu(), kept


def chunks(lazy: LazyModel, tokens: torch.Tensor) -> list[torch.Tensor]:
    """`tokens` split into as few forwards as the budget allows."""
    per = lazy.tokens_per_pass(int(tokens.shape[1]))
    return list(tokens.split(per))


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, *, reduction: str = "sum",
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Next-token negative log-likelihood (nats) of `ids` [batch, seq] under `logits` [batch, seq, vocab], summed
    (or averaged) over the predicted tokens, computed in `dtype`: the one cross-entropy of every measurement and
    of the fine-tunes' language-model loss."""
    return F.cross_entropy(logits[:, :-1].to(dtype).reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction=reduction)


@torch.no_grad()
def cross_entropy(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> float:
    """Mean next-token cross-entropy (nats/token) of `model` on `batches`, in eval mode (its mode restored)."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in batches:
            batch = batch if device.type == "meta" else batch.to(device)  # a streamed model places its own inputs
            total += float(next_token_nll(model(input_ids=batch, use_cache=False).logits, batch))
            count += batch[:, 1:].numel()
    finally:
        model.train(training)
    return total / count
