"""The generator's building blocks on tiny adapters."""

from __future__ import annotations

import pytest
import torch

from loramint.adapters import LoraAdapter
from loramint.gen.canonical import canonical_factors, canonicalize


def factors(seed: int, r: int = 4, n_in: int = 24, n_out: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(r, n_in, generator=gen), torch.randn(n_out, r, generator=gen)


@pytest.mark.parametrize("seed", range(5))
def test_canonical_factors_keep_the_update_and_forget_the_factorisation(seed):
    a, b = factors(seed)
    a_c, b_c = canonical_factors(a, b)
    torch.testing.assert_close(b_c @ a_c, b @ a, atol=1e-5, rtol=1e-5)
    # any other factorisation of the same update, B R and R^-1 A, has the same canonical form
    r = torch.randn(4, 4, generator=torch.Generator().manual_seed(100 + seed)) + 3 * torch.eye(4)
    a2, b2 = torch.linalg.solve(r, a), b @ r
    torch.testing.assert_close(b2 @ a2, b @ a, atol=1e-4, rtol=1e-4)
    a2_c, b2_c = canonical_factors(a2, b2)
    torch.testing.assert_close(a2_c, a_c, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b2_c, b_c, atol=1e-4, rtol=1e-4)
    # idempotent; components by decreasing singular value (|row i of A'|^2 = |column i of B'|^2 = s_i)
    again = canonical_factors(a_c, b_c)
    torch.testing.assert_close(again[0], a_c, atol=1e-5, rtol=1e-5)
    norms_a, norms_b = a_c.norm(dim=1) ** 2, b_c.norm(dim=0) ** 2
    torch.testing.assert_close(norms_a, norms_b, atol=1e-4, rtol=1e-4)
    assert torch.all(norms_a[:-1] >= norms_a[1:])
    torch.testing.assert_close(norms_a, torch.linalg.svdvals(b @ a)[:4], atol=1e-4, rtol=1e-4)


def test_rank_deficient_update_and_shape_errors():
    a, b = factors(0)
    b[:, 2:] = 0.0  # rank 2 update in rank-4 factors
    a_c, b_c = canonical_factors(a, b)
    torch.testing.assert_close(b_c @ a_c, b @ a, atol=1e-5, rtol=1e-5)
    assert torch.allclose(a_c[2:], torch.zeros_like(a_c[2:]), atol=1e-6)
    with pytest.raises(ValueError, match="expected A"):
        canonical_factors(a, b.T)


def test_canonicalize_an_adapter_keeps_every_module_update():
    adapter = LoraAdapter.random("tiny-llama", r=4, seed=3)
    canon = canonicalize(adapter)
    assert canon.modules == adapter.modules and canon.config == adapter.config
    for module in adapter.modules:
        torch.testing.assert_close(canon.delta(module), adapter.delta(module), atol=1e-6, rtol=1e-5)
    canon.validate("tiny-llama")
