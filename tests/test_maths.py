"""The rewrite maths on real tensors: block-wise float64 equals whole-matrix float64, and products in the
stored dtype are bit-identical to the float64 product rounded once."""

from __future__ import annotations

import pytest
import torch

from normsurgery.rewrite import maths

GEN = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("conv1d", [False, True])
def test_gain_product_in_stored_dtype_is_the_rounded_exact_product(dtype, conv1d):
    w = torch.randn(37, 29, generator=GEN).to(dtype)
    g = (1 + 0.3 * torch.randn(29 if not conv1d else 37, generator=GEN)).to(dtype)
    folded, _ = maths.fold_into_reader(w, None, g, None, conv1d=conv1d)
    exact = w.double() * (g.double()[:, None] if conv1d else g.double()[None, :])
    assert folded.dtype == dtype and torch.equal(folded, exact.to(dtype))


@pytest.mark.parametrize("conv1d", [False, True])
def test_blocks_of_rows_equal_the_whole_matrix(conv1d, monkeypatch):
    """Vocabulary-sized readers are processed a block of rows at a time; the result must not depend on the block."""
    w = torch.randn(50, 12, generator=GEN)
    gain64 = 1 + 0.2 * torch.randn(12 if not conv1d else 50, dtype=torch.float64, generator=GEN)
    bias = torch.randn(12 if not conv1d else 50, generator=GEN)
    whole = [maths.fold_into_reader(w, None, gain64, bias, conv1d=conv1d), maths.compress_reader(w, gain64, conv1d=conv1d),
             maths.center_rows(w)]
    monkeypatch.setattr(maths, "ROW_BLOCK", 7)
    blocked = [maths.fold_into_reader(w, None, gain64, bias, conv1d=conv1d), maths.compress_reader(w, gain64, conv1d=conv1d),
               maths.center_rows(w)]
    assert torch.equal(whole[0][0], blocked[0][0]) and torch.allclose(whole[0][1], blocked[0][1], rtol=0, atol=1e-12)
    assert torch.equal(whole[1], blocked[1]) and torch.equal(whole[2], blocked[2])
    view = w.double().t() if conv1d else w.double()
    expected = (view * gain64)[:, :-1] - (view * gain64)[:, -1:]
    assert torch.equal(blocked[1], (expected.t() if conv1d else expected).to(torch.float32))
    assert torch.allclose(maths.center_rows(w).double().mean(-1), torch.zeros(50, dtype=torch.float64), atol=1e-7)
