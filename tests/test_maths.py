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
    monkeypatch.setattr(maths, "BLOCK_ELEMENTS", 7 * 12)
    blocked = [maths.fold_into_reader(w, None, gain64, bias, conv1d=conv1d), maths.compress_reader(w, gain64, conv1d=conv1d),
               maths.center_rows(w)]
    assert torch.equal(whole[0][0], blocked[0][0]) and torch.allclose(whole[0][1], blocked[0][1], rtol=0, atol=1e-12)
    assert torch.equal(whole[1], blocked[1]) and torch.equal(whole[2], blocked[2])
    view = w.double().t() if conv1d else w.double()
    expected = (view * gain64)[:, :-1] - (view * gain64)[:, -1:]
    assert torch.equal(blocked[1], (expected.t() if conv1d else expected).to(torch.float32))
    assert torch.allclose(maths.center_rows(w).double().mean(-1), torch.zeros(50, dtype=torch.float64), atol=1e-7)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_writers_and_tables_are_centred_in_their_stored_layout(conv1d, drop_last, monkeypatch):
    """Centring (and CRMS's dropped coordinate) in stored-row blocks equals the textbook (out, in) formula."""
    monkeypatch.setattr(maths, "BLOCK_ELEMENTS", 5 * 16)
    d, other = 16, 23
    w = torch.randn((other, d) if conv1d else (d, other), generator=GEN)
    bias = torch.randn(d, generator=GEN)
    view = w.double().t() if conv1d else w.double()  # (out=d, in)
    expected = view - view.mean(dim=0, keepdim=True)
    expected = expected[:-1] if drop_last else expected
    got, c = maths.center_writer(w, bias, conv1d=conv1d, drop_last=drop_last)
    torch.testing.assert_close(got, (expected.t() if conv1d else expected).float(), rtol=2**-23, atol=1e-7)
    expected_c = bias.double() - bias.double().mean()
    assert torch.equal(c, expected_c[:-1] if drop_last else expected_c)

    gain, shift = 1 + 0.1 * torch.randn(d, generator=GEN), torch.randn(d, generator=GEN)
    table = torch.randn(40, d, generator=GEN)
    ln = torch.nn.functional.layer_norm(table.double(), (d,), gain.double(), shift.double(), 1e-5)
    centred = ln - ln.mean(dim=-1, keepdim=True)
    got = maths.center_rows(table, drop_last=drop_last, layer_norm=(gain, shift, 1e-5))
    torch.testing.assert_close(got, (centred[:, :-1] if drop_last else centred).float(), rtol=2**-23, atol=1e-7)
