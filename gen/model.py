"""The conditional VAE over LoRA weights (ICM-LoRA / SG-LoRA style, decoder heads per slice as in T2L).

Shapes: B adapters, L decoder layers, G groups (module type x factor, see `layout.Layout`), C condition
size (description embedding), Z latent size, K retrieved experts.

- encoder q(z | W, c): each layer's slice of each group -> d_model (a linear map per group), plus learned
  layer and group embeddings; mean over the L*G tokens; with c -> (mu, logvar) [B, Z].
- prior p(z | c, semantic prior): the semantic prior is the moment-matched mixture of the K retrieved
  experts' posteriors with weights softmax(sim / tau) (mean = sum w mu, variance by the law of total
  variance); a network maps (c, its mean, its log-variance) to the prior's (mu, logvar).
- decoder p(W | z, c): one vector from (z, c), plus each (layer, group) embedding, through a shared trunk
  into one linear head per group: the whole adapter in one batched pass, [B, L, dim_g] per group.

Everything works in the normalised space of `layout.Normalizer`; `gen/minter.py` wraps
retrieval, decoding, de-normalising and writing PEFT files.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loramint.gen.config import GeneratorConfig
from loramint.gen.layout import Layout
from loramint.gen.residual import mixture_weights

HEAD_INIT_SCALE = 0.01
LOGVAR_BOUND = 10.0
"""Every log-variance the networks emit is squashed into (-LOGVAR_BOUND, LOGVAR_BOUND): e^10 ~ 2.2e4. The
functional objective never constrains the encoder's log-variance (no KL term); past e^88 exp() overflows to
inf and the semantic prior turns NaN (the suspected cause of the NaN residual runs: not reproduced, but the
bounded run of the same seed stayed finite)."""


def bound_logvar(logvar: torch.Tensor) -> torch.Tensor:
    """Soft clamp to (-LOGVAR_BOUND, LOGVAR_BOUND); ~identity near 0, smooth, gradients never vanish abruptly."""
    return LOGVAR_BOUND * torch.tanh(logvar / LOGVAR_BOUND)


def mlp(n_in: int, hidden: int, n_out: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, n_out),
    )


def semantic_prior(
    mu: torch.Tensor, logvar: torch.Tensor, sims: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moment-matched mixture of K Gaussians: mu, logvar [B, K, Z], sims [B, K] -> (mean, logvar) [B, Z].

    Weights w = softmax(sims / tau); mean = sum_k w_k mu_k; variance (law of total variance)
    = sum_k w_k (var_k + mu_k^2) - mean^2.
    """
    w = torch.softmax(sims / tau, dim=-1)[..., None]  # [B, K, 1]
    mean = (w * mu).sum(dim=1)  # [B, Z]
    second = (w * (logvar.exp() + mu.pow(2))).sum(dim=1)  # [B, Z]
    var = (second - mean.pow(2)).clamp_min(1e-6)
    return mean, var.log()


def gaussian_kl(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) summed over the last dimension: [B]."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1.0).sum(
        dim=-1
    )


class LoraCVAE(nn.Module):
    """q(z | W, c), p(z | c, semantic prior) and p(W | z, c) for one adapter `Layout`."""

    def __init__(self, layout: Layout, config: GeneratorConfig | None = None) -> None:
        super().__init__()
        self.layout, self.config = layout, config or GeneratorConfig()
        cfg = self.config
        self.groups = layout.groups
        self.dims = {g: math.prod(layout.group_shape(g)) for g in self.groups}
        n_layers = len(layout.layers)
        key = self._key
        self.layer_emb = nn.Embedding(n_layers, cfg.d_model)
        self.group_emb = nn.Embedding(len(self.groups), cfg.d_model)
        self.enc_in = nn.ModuleDict({key(g): nn.Linear(self.dims[g], cfg.d_model) for g in self.groups})
        self.enc_out = mlp(cfg.d_model + cfg.cond_dim, cfg.hidden, 2 * cfg.d_latent, cfg.dropout)
        self.prior_net = mlp(cfg.cond_dim + 2 * cfg.d_latent, cfg.hidden, 2 * cfg.d_latent, cfg.dropout)
        self.dec_in = mlp(cfg.d_latent + cfg.cond_dim, cfg.hidden, cfg.d_model, cfg.dropout)
        self.trunk = nn.Sequential(nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, cfg.hidden), nn.GELU())
        self.heads = nn.ModuleDict({key(g): nn.Linear(cfg.hidden, self.dims[g]) for g in self.groups})
        if cfg.residual_k:  # gain on the retrieved mixture per (layer, module type), see gen.residual
            self.mix_gain = nn.Parameter(torch.ones(n_layers, len(layout.module_types)))
        with (
            torch.no_grad()
        ):  # start near 0: the library's mean adapter (residual: the retrieved mixture), never a random one
            for head in self.heads.values():
                head.weight.mul_(HEAD_INIT_SCALE)
                head.bias.zero_()

    @staticmethod
    def mix(sims: torch.Tensor) -> torch.Tensor:
        """[..., K] cosines of the retrieved experts (best first) -> their mixture weights [..., K]: the fixed
        rule cos_k / Σ_j cos_j (a learned mixer lost to it: docs/history.md)."""
        return mixture_weights(sims)

    def decoding_linears(self) -> list[tuple[str, nn.Linear]]:
        """(name, layer) of every linear layer minting runs (`generate`: the learned prior, the decoder's
        input, trunk and heads); the encoder is not among them."""
        parts = ("prior_net", "dec_in", "trunk", "heads")
        return [
            (name, m)
            for name, m in self.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[0] in parts
        ]

    @staticmethod
    def _key(group: str) -> str:
        return group.replace(".", "__")  # ModuleDict keys cannot hold dots

    def _slot(self, i: int) -> torch.Tensor:
        """[L, d_model]: layer embeddings + the embedding of group i."""
        return self.layer_emb.weight + self.group_emb.weight[i]

    def encode(
        self, tokens: dict[str, torch.Tensor], cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens {group: [B, L, dim_g]} (normalised), cond [B, C] -> (mu, logvar) [B, Z]."""
        parts = [self.enc_in[self._key(g)](tokens[g]) + self._slot(i) for i, g in enumerate(self.groups)]
        pooled = torch.cat(parts, dim=1).mean(dim=1)  # [B, d_model]
        mu, logvar = self.enc_out(torch.cat([pooled, cond], dim=-1)).chunk(2, dim=-1)
        return mu, bound_logvar(logvar)

    def prior(
        self, cond: torch.Tensor, sem_mu: torch.Tensor, sem_logvar: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cond [B, C] and the semantic prior's (mean, logvar) [B, Z] -> the learned prior's (mu, logvar)."""
        mu, logvar = self.prior_net(torch.cat([cond, sem_mu, sem_logvar], dim=-1)).chunk(2, dim=-1)
        return mu, bound_logvar(logvar)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """z [B, Z], cond [B, C] -> {group: [B, L, dim_g]} (normalised)."""
        h = self.dec_in(torch.cat([z, cond], dim=-1))  # [B, d_model]
        out = {}
        for i, g in enumerate(self.groups):
            x = self.trunk(h[:, None, :] + self._slot(i))  # [B, L, hidden]
            out[g] = self.heads[self._key(g)](x)  # [B, L, dim_g]
        return out

    def forward(
        self,
        tokens: dict[str, torch.Tensor],
        cond: torch.Tensor,
        sem_mu: torch.Tensor,
        sem_logvar: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, object]:
        """Training pass: posterior, prior, a reparameterised sample and its reconstruction."""
        mu_q, logvar_q = self.encode(tokens, cond)
        mu_p, logvar_p = self.prior(cond, sem_mu, sem_logvar)
        noise = torch.randn(mu_q.shape, generator=generator, device=mu_q.device, dtype=mu_q.dtype)
        z = mu_q + (0.5 * logvar_q).exp() * noise
        return {
            "recon": self.decode(z, cond),
            "kl": gaussian_kl(mu_q, logvar_q, mu_p, logvar_p),  # [B]
            "mu_p": mu_p,
            "mu_q": mu_q,
            "logvar_q": logvar_q,
        }

    @torch.no_grad()
    def generate(
        self, cond: torch.Tensor, sem_mu: torch.Tensor, sem_logvar: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Mint: decode the learned prior's mean (deterministic; no sampling: the shipped objective never
        trains the prior's variance). Normalised tokens."""
        mu, _ = self.prior(cond, sem_mu, sem_logvar)
        return self.decode(mu, cond)
