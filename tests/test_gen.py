"""The generator's building blocks on tiny adapters."""

from __future__ import annotations

import pytest
import torch

from loramint.adapters import LoraAdapter
from loramint.gen.canonical import canonical_factors, canonicalize
from loramint.gen.layout import Layout


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


def test_layout_turns_an_adapter_into_group_tokens_and_back_exactly(tmp_path):

    adapter = LoraAdapter.random("tiny-llama", r=4, target_modules=("q_proj", "v_proj", "down_proj"), seed=1)
    layout = Layout.of(adapter)
    assert layout.layers == (0, 1) and layout.module_types == ("down_proj", "q_proj", "v_proj")
    tokens = layout.to_tokens(adapter)
    assert sorted(tokens) == sorted(layout.groups)
    for group, values in tokens.items():
        rows, cols = layout.group_shape(group)
        assert tuple(values.shape) == (2, rows * cols)
    back = layout.from_tokens(tokens)
    assert sorted(back.modules) == sorted(adapter.modules)
    for module, (a, b) in adapter.weights.items():
        assert torch.equal(back.weights[module][0], a) and torch.equal(back.weights[module][1], b)
    back.validate("tiny-llama")
    assert Layout.from_json(layout.to_json()) == layout


def test_layout_refuses_what_it_cannot_represent():
    from loramint.errors import AdapterError

    adapter = LoraAdapter.random("tiny-llama", r=4, seed=1)
    partial = LoraAdapter(adapter.config, dict(list(adapter.weights.items())[:-1]))
    with pytest.raises(AdapterError, match="lacks modules"):
        Layout.of(partial)
    layout = Layout.of(adapter)
    tokens = layout.to_tokens(adapter)
    with pytest.raises(AdapterError, match="expected"):
        layout.from_tokens({g: v[:, :-1] for g, v in tokens.items()})
    other = LoraAdapter.random("tiny-llama", r=2, seed=1)
    with pytest.raises(AdapterError, match="differs"):
        layout.to_tokens(other)


def test_normalizer_z_scores_each_group_and_round_trips(tmp_path):
    from loramint.gen.layout import Layout, Normalizer

    adapters = [
        canonicalize(LoraAdapter.random("tiny-llama", r=4, seed=s, std=0.02 * (1 + s))) for s in range(6)
    ]
    layout = Layout.of(adapters[0])
    samples = [layout.to_tokens(a) for a in adapters]
    norm = Normalizer.fit(samples)
    normed = [norm.normalize(s) for s in samples]
    for group in layout.groups:
        stack = torch.stack([n[group] for n in normed])  # [N, layers, dim]
        torch.testing.assert_close(stack.mean(dim=0), torch.zeros_like(stack[0]), atol=1e-5, rtol=0)
        torch.testing.assert_close(stack.pow(2).mean(dim=(0, 2)), torch.ones(2), atol=1e-4, rtol=1e-4)
    for sample, n in zip(samples, normed, strict=True):
        for group, values in norm.denormalize(n).items():
            torch.testing.assert_close(values, sample[group], atol=1e-6, rtol=1e-5)
    norm.save(tmp_path / "norm.safetensors")
    loaded = Normalizer.load(tmp_path / "norm.safetensors")
    assert sorted(loaded.mean) == sorted(norm.mean)
    for group in norm.mean:
        assert torch.equal(loaded.mean[group], norm.mean[group]) and torch.equal(
            loaded.scale[group], norm.scale[group]
        )


def test_semantic_prior_is_the_moment_matched_mixture_and_kl_is_exact():
    from loramint.gen.model import gaussian_kl, semantic_prior

    gen = torch.Generator().manual_seed(0)
    mu, logvar, sims = (
        torch.randn(2, 3, 5, generator=gen),
        torch.randn(2, 3, 5, generator=gen),
        torch.rand(2, 3),
    )
    mean, lv = semantic_prior(mu, logvar, sims, tau=0.5)
    w = torch.softmax(sims / 0.5, dim=-1)
    # Monte Carlo of the mixture for batch row 0
    comp = torch.multinomial(w[0], 200_000, replacement=True, generator=gen)
    draws = mu[0, comp] + (0.5 * logvar[0, comp]).exp() * torch.randn(200_000, 5, generator=gen)
    torch.testing.assert_close(mean[0], draws.mean(dim=0), atol=0.02, rtol=0.02)
    torch.testing.assert_close(lv[0].exp(), draws.var(dim=0), atol=0.05, rtol=0.03)
    # one overwhelming expert: the prior is that expert
    one_mean, one_lv = semantic_prior(mu, logvar, torch.tensor([[10.0, 0.0, 0.0]] * 2), tau=0.01)
    torch.testing.assert_close(one_mean, mu[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(one_lv, logvar[:, 0], atol=1e-4, rtol=0)
    # KL: zero for equal Gaussians, and the closed form for 1-d unit variances
    assert torch.allclose(gaussian_kl(mean, lv, mean, lv), torch.zeros(2), atol=1e-6)
    kl = gaussian_kl(torch.tensor([[1.0]]), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1))
    assert kl.item() == pytest.approx(0.5)


def test_cvae_shapes_gradients_and_deterministic_minting():

    from loramint.gen.model import GeneratorConfig, LoraCVAE

    adapter = canonicalize(
        LoraAdapter.random("tiny-llama", r=4, target_modules=("q_proj", "down_proj"), seed=2)
    )
    layout = Layout.of(adapter)
    torch.manual_seed(0)
    model = LoraCVAE(layout, GeneratorConfig(cond_dim=12, d_model=16, hidden=32, d_latent=8))
    tokens = {g: v[None].repeat(3, 1, 1) for g, v in layout.to_tokens(adapter).items()}
    cond, sem_mu, sem_lv = torch.randn(3, 12), torch.randn(3, 8), torch.zeros(3, 8)
    out = model(tokens, cond, sem_mu, sem_lv, generator=torch.Generator().manual_seed(0))
    assert {g: tuple(v.shape) for g, v in out["recon"].items()} == {
        g: tuple(v.shape) for g, v in tokens.items()
    }
    loss = sum(((out["recon"][g] - tokens[g]) ** 2).mean() for g in tokens) + out["kl"].mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    first, again = model.generate(cond, sem_mu, sem_lv), model.generate(cond, sem_mu, sem_lv)
    assert all(torch.equal(first[g], again[g]) for g in first), "mean decoding is deterministic"
    mu, _ = model.prior(cond, sem_mu, sem_lv)
    assert all(torch.equal(first[g], model.decode(mu, cond)[g]) for g in first), "the prior's mean, decoded"
    minted = layout.from_tokens({g: v[0].detach() for g, v in first.items()})
    minted.validate("tiny-llama")


def test_cvae_learns_to_reconstruct_a_small_library():
    """A real effect: a few hundred steps fit 4 distinct adapters from their conditions far below the
    error of predicting their mean."""
    from loramint.gen.layout import Layout, Normalizer
    from loramint.gen.model import GeneratorConfig, LoraCVAE

    adapters = [canonicalize(LoraAdapter.random("tiny-llama", r=2, seed=s)) for s in range(4)]
    layout = Layout.of(adapters[0])
    samples = [layout.to_tokens(a) for a in adapters]
    norm = Normalizer.fit(samples)
    tokens = {g: torch.stack([norm.normalize(s)[g] for s in samples]) for g in layout.groups}  # [4, L, dim]
    cond = torch.eye(4, 8)
    torch.manual_seed(0)
    model = LoraCVAE(layout, GeneratorConfig(cond_dim=8, d_model=32, hidden=64, d_latent=4))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    zeros = torch.zeros(4, 4)
    for _ in range(300):
        out = model(tokens, cond, zeros, zeros)
        loss = sum(((out["recon"][g] - tokens[g]) ** 2).mean() for g in tokens) + 1e-3 * out["kl"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    minted = model.generate(cond, zeros, zeros)
    error = sum(((minted[g] - tokens[g]) ** 2).mean() for g in tokens).item()
    baseline = sum(tokens[g].pow(2).mean() for g in tokens).item()  # predicting the (zero) mean
    assert error < 0.1 * baseline


def test_expert_set_from_a_library_with_phrasings_and_leave_one_out_neighbours(tmp_path):
    from loramint.gen.data import ExpertSet
    from loramint.index import ExpertLibrary

    descriptions = {
        "add": "Add two numbers and give the sum.",
        "sub": "Subtract the second number from the first.",
        "poem": "Write a short poem about the sea.",
        "story": "Tell a short story about a dragon.",
    }
    with ExpertLibrary.open(tmp_path / "lib") as library:
        for seed, (name, text) in enumerate(descriptions.items()):
            library.add(
                LoraAdapter.random("tiny-llama", r=2, seed=seed), id=name, name=name, description=text
            )
        data = ExpertSet.from_library(
            library, phrasings={"add": ["Sum up two integers.", "Addition, please."]}
        )
    assert data.ids == list(descriptions) and len(data) == 4
    assert {g: tuple(v.shape)[:2] for g, v in data.tokens.items()} == {g: (4, 2) for g in data.layout.groups}
    assert [c.shape[0] for c in data.conds] == [3, 1, 1, 1]
    torch.testing.assert_close(data.conds[0][0], data.keys[0])
    # normalised canonical tokens invert to the stored experts' updates
    first = data.layout.from_tokens(data.normalizer.denormalize({g: v[0] for g, v in data.tokens.items()}))
    original = LoraAdapter.random("tiny-llama", r=2, seed=0)
    for module in original.modules:
        torch.testing.assert_close(first.delta(module), original.delta(module), atol=1e-5, rtol=1e-4)
    # leave-one-out: an expert never is its own neighbour; the nearest of "sub" is "add"
    idx, sims = data.neighbours(data.keys, k=1, exclude=list(range(4)))
    assert all(int(i) != row for row, i in enumerate(idx[:, 0]))
    assert data.ids[int(idx[1, 0])] == "add" and data.ids[int(idx[2, 0])] == "story"
    assert torch.all(sims[:, 0] < 1.0)
    with pytest.raises(ValueError, match="k must be"):
        data.neighbours(data.keys, k=4, exclude=list(range(4)))


def test_compose_is_the_exact_weighted_sum_and_differentiable():
    from loramint.gen.residual import compose, delta_error, delta_inner, mixture_weights

    experts = [canonicalize(LoraAdapter.random("tiny-llama", r=2, seed=s)) for s in (1, 2, 3)]
    layout = Layout.of(experts[0])
    correction = LoraAdapter.random("tiny-llama", r=2, seed=4)
    for m, (a, b) in correction.weights.items():
        correction.weights[m] = (a, b.clone().requires_grad_(True))
    weights = mixture_weights(torch.tensor([0.6, 0.3, -0.1]))
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(mixture_weights(torch.tensor([-0.2, -0.1])), torch.tensor([0.5, 0.5]))
    gain = torch.rand(len(layout.layers), len(layout.module_types)) + 0.5
    out = compose(layout, experts, weights, correction, gain)
    assert out.config.r == 8 and out.config.scaling(out.modules[0]) == 1.0
    for li, layer in enumerate(layout.layers):
        for ti, t in enumerate(layout.module_types):
            m = layout.path(layer, t)
            want = gain[li, ti] * sum(
                w * e.delta(m) for e, w in zip(experts, weights, strict=True)
            ) + correction.delta(m)
            torch.testing.assert_close(out.delta(m), want, atol=1e-5, rtol=1e-4)
    # factor-space inner products equal the dense ones; the error is 0 at the target and has gradients
    dense = lambda ad: torch.cat([ad.delta(m).flatten() for m in ad.modules])  # noqa: E731
    inner = float(delta_inner(out, experts[0]).detach())
    assert inner == pytest.approx(float((dense(out) @ dense(experts[0])).detach()), rel=1e-4)
    assert float(delta_error(experts[1], experts[1])) == pytest.approx(0.0, abs=1e-5)
    delta_error(out, experts[0]).backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for _, b in correction.weights.values())
    with pytest.raises(ValueError, match="3 experts but 2 weights"):
        compose(layout, experts, weights[:2], correction)
    # experts of other ranks and scalings (alpha != r), gradients to the weights and the gain
    mixed = [experts[0], LoraAdapter.random("tiny-llama", r=3, alpha=12.0, seed=5)]
    w2 = torch.tensor([0.4, 0.6], requires_grad=True)
    g2 = gain.clone().requires_grad_(True)
    out = compose(layout, mixed, w2, correction, g2)
    assert out.config.r == 2 + 3 + 2
    for li, layer in enumerate(layout.layers):
        for ti, t in enumerate(layout.module_types):
            m = layout.path(layer, t)
            want = g2[li, ti] * (0.4 * mixed[0].delta(m) + 0.6 * mixed[1].delta(m)) + correction.delta(m)
            torch.testing.assert_close(out.delta(m), want, atol=1e-5, rtol=1e-4)
    delta_error(out, experts[1]).backward()
    assert w2.grad.abs().sum() > 0 and g2.grad.abs().sum() > 0


def test_log_variances_are_bounded_so_exp_never_overflows():
    from loramint.gen.model import LOGVAR_BOUND, bound_logvar, semantic_prior

    x = torch.tensor([-1e6, -3.0, 0.0, 0.5, 3.0, 1e6])
    y = bound_logvar(x)
    assert y.abs().max() <= LOGVAR_BOUND and torch.isfinite(y.exp()).all()
    torch.testing.assert_close(y[2:4], x[2:4], atol=1e-3, rtol=0)  # ~identity near 0
    mu = torch.zeros(1, 2, 3)
    mean, logvar = semantic_prior(mu, bound_logvar(torch.full((1, 2, 3), 500.0)), torch.zeros(1, 2), 0.1)
    assert torch.isfinite(mean).all() and torch.isfinite(logvar).all()  # unbounded: e^500 = inf -> NaN
