"""The exact rewrites as pure tensor functions (DESIGN.md section 5, items 1-4).

Every function takes weights in the layout they are stored in (`conv1d` True: HF Conv1D's (in, out);
False: nn.Linear's (out, in)), works in float64, and returns float64; the caller casts once at the end.
The one exception is the gain multiply of `fold_into_reader`, done in the stored dtype when that is
bit-identical (see there): it is the bulk of a fold, and float64 would triple its time.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _as_out_in(weight: Tensor, conv1d: bool) -> Tensor:
    """View a stored linear weight as (out, in) in float64."""
    w = weight.to(torch.float64)
    return w.t() if conv1d else w


def _stored(weight_out_in: Tensor, conv1d: bool) -> Tensor:
    """Back from (out, in) to the stored layout."""
    return weight_out_in.t().contiguous() if conv1d else weight_out_in.contiguous()


FLOAT32_EXACT = (torch.float32, torch.bfloat16, torch.float16)


def effective_gain(weight: Tensor | None, offset: float, size: int) -> Tensor:
    """The gain a norm multiplies by: w, or (1 + w) for Gemma-style norms; ones when the norm has no weight.

    A plain gain comes back as stored; (1 + w) in float64.
    """
    if weight is None:
        return torch.ones(size, dtype=torch.float64)
    if offset == 0:
        return weight
    return weight.to(torch.float64) + offset


def fold_into_reader(
    weight: Tensor, bias: Tensor | None, gain: Tensor | None, norm_bias: Tensor | None, *, conv1d: bool
) -> tuple[Tensor, Tensor | None]:
    """A reader y = W z + c of a norm output z = g * n + b becomes y = (W diag g) n + (c + W b).

    Returns the new weight (stored layout) and bias; the bias is None only when there was none and
    the norm has no bias to fold.
    """
    new_bias = None if bias is None else bias.to(torch.float64)
    if norm_bias is not None:
        shift = _as_out_in(weight, conv1d) @ norm_bias.to(torch.float64)
        new_bias = shift if new_bias is None else new_bias + shift
    if gain is None:
        return weight, new_bias
    if gain.dtype == weight.dtype and weight.dtype in FLOAT32_EXACT:
        # One correctly rounded product in the stored dtype: the same bits as the exact (float64) product
        # cast back, since torch forms 16-bit products in float32, where they are exact.
        return weight * (gain[:, None] if conv1d else gain[None, :]), new_bias
    w = weight.to(torch.float64)
    return w * (gain.to(torch.float64)[:, None] if conv1d else gain.to(torch.float64)[None, :]), new_bias


def center_writer(weight: Tensor, bias: Tensor | None, *, conv1d: bool) -> tuple[Tensor, Tensor | None]:
    """A writer's output projected onto zero mean: W <- P W, c <- P c with P = I - 11^T/d."""
    w = _as_out_in(weight, conv1d)
    w = w - w.mean(dim=0, keepdim=True)
    new_bias = None if bias is None else bias.to(torch.float64) - bias.to(torch.float64).mean()
    return _stored(w, conv1d), new_bias


def center_rows(table: Tensor) -> Tensor:
    """Embedding rows projected onto zero mean: E <- E P."""
    e = table.to(torch.float64)
    return e - e.mean(dim=-1, keepdim=True)


def layer_norm_rows(table: Tensor, gain: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm applied to every row of a table (to bake an embedding LayerNorm into the embeddings)."""
    e = table.to(torch.float64)
    centered = e - e.mean(dim=-1, keepdim=True)
    normed = centered / torch.sqrt(centered.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = normed * gain.to(torch.float64)
    return out if bias is None else out + bias.to(torch.float64)


def drop_last_output(weight: Tensor, bias: Tensor | None, *, conv1d: bool) -> tuple[Tensor, Tensor | None]:
    """CRMS writer: keep the first d-1 output coordinates of a zero-mean writer (the last is minus their sum)."""
    w = _as_out_in(weight, conv1d)[:-1]
    return _stored(w, conv1d), None if bias is None else bias.to(torch.float64)[:-1]


def compress_reader(weight: Tensor, *, conv1d: bool) -> Tensor:
    """CRMS reader: W' = W[:, :d-1] - W[:, d-1] 1^T, since x_d = -sum(x_1..x_{d-1}) on a zero-mean residual."""
    w = _as_out_in(weight, conv1d)
    return _stored(w[:, :-1] - w[:, -1:], conv1d)
