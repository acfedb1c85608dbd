"""KFAC, EKFAC and the KFAC inverse on a small GPT-style language model.

The model has token and position embeddings, two blocks of ``nn.MultiheadAttention`` +
``nn.LayerNorm`` + MLP, and a head tied to the token embedding; the loss is
``CrossEntropyLoss(ignore_index=-100)`` over logits ``[N, C, T]`` of padded sequences.

1. ``KFACLinearOperator(..., fallback="diagonal")`` over *all* parameters: every linear map
   (attention in- and out-projections, MLP layers) gets a Kronecker block, everything else
   (the tied embedding/head table, the position embedding, the LayerNorm parameters) the exact
   diagonal of the same Monte-Carlo Fisher. ``K.structure()`` prints which is which.
2. ``EKFACLinearOperator`` on the same model with flattened logits ``[N * T, C]`` (EKFAC needs
   2-d outputs and module calls; the attention projections fall back to the diagonal).
3. ``KFACInverseLinearOperator`` as a preconditioner: a few steps ``-lr (K + damping I)^{-1} g``,
   the factors recomputed at the current parameters every step.

Run: ``python docs/examples/example_kfac_gpt.py`` (``--quick``: fewer steps).
"""

import argparse
from collections import Counter

import torch
from torch import nn

from curvlinops import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator

VOCAB, EMBED, HEADS, LENGTH, PAD = 11, 16, 2, 8, 0
IGNORE = -100
DAMPING, LR = 1.0, 0.5


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP, both residual."""

    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(EMBED)
        self.attention = nn.MultiheadAttention(EMBED, HEADS, batch_first=True)
        self.ln2 = nn.LayerNorm(EMBED)
        self.mlp = nn.Sequential(
            nn.Linear(EMBED, 2 * EMBED), nn.Tanh(), nn.Linear(2 * EMBED, EMBED)
        )

    def forward(self, x):
        T = x.shape[1]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        h = self.ln1(x)  # query is key is value: the packed in-projection is one linear map
        x = x + self.attention(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + position embeddings, two blocks, final LayerNorm, head tied to the tokens."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, EMBED, padding_idx=PAD)
        nn.init.normal_(self.tokens.weight, std=0.3)  # moderate logits of the tied head
        self.positions = nn.Parameter(0.1 * torch.randn(LENGTH, EMBED))
        self.blocks = nn.Sequential(Block(), Block())
        self.ln = nn.LayerNorm(EMBED)

    def forward(self, tokens):  # [N, T] -> logits [N, C, T]
        x = self.tokens(tokens) + self.positions[: tokens.shape[1]]
        x = self.ln(self.blocks(x))
        return nn.functional.linear(x, self.tokens.weight).transpose(1, 2)


class Flat(nn.Module):
    """The same network with 2-d logits ``[N * T, C]`` (for EKFAC)."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, tokens):
        return self.gpt(tokens).transpose(1, 2).reshape(-1, VOCAB)


def problem(num_batches=4, batch_size=6, seed=0):
    """Sequences counting upwards (mod VOCAB - 1), right-padded to random lengths."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GPT().double()
    data = []
    for _ in range(num_batches):
        start = torch.randint(1, VOCAB, (batch_size, 1), generator=gen)
        sequence = (start + torch.arange(LENGTH + 1) - 1) % (VOCAB - 1) + 1
        lengths = torch.randint(LENGTH // 2, LENGTH + 1, (batch_size, 1), generator=gen)
        padded = torch.arange(LENGTH + 1) >= lengths
        tokens = sequence[:, :-1].masked_fill(padded[:, :-1], PAD)
        labels = sequence[:, 1:].masked_fill(padded[:, 1:], IGNORE)
        data.append((tokens, labels))
    return model, nn.CrossEntropyLoss(ignore_index=IGNORE), data


def mean_loss(model, loss_func, data):
    with torch.no_grad():
        return sum(loss_func(model(X), y).item() for X, y in data) / len(data)


def gradient(model, loss_func, data, params):
    loss = sum(loss_func(model(X), y) for X, y in data) / len(data)
    return list(torch.autograd.grad(loss, params))


def main(quick: bool):
    model, loss_func, data = problem()
    params = list(model.parameters())
    K = KFACLinearOperator(
        model, loss_func, params, data, fisher_type="type-2", fallback="diagonal"
    )
    kinds = Counter(kind.split(" ")[0] for kind in K.structure().values())
    print("structure:", dict(kinds))
    for name, kind in K.structure().items():
        print(f"  {name}: {kind}")

    # the inverse of the damped operator: (K + delta I)^{-1} (K + delta I) v = v
    damping = 1e-3
    inverse = KFACInverseLinearOperator(K, damping=damping, use_exact_damping=True)
    v = torch.randn(K.shape[1], dtype=torch.float64)
    residual = (inverse @ (K @ v + damping * v) - v).norm() / v.norm()
    print(f"inverse residual: {residual.item():.3e}")

    flat_data = [(X, y.reshape(-1)) for X, y in data]  # labels [N * T] for logits [N * T, C]
    E = EKFACLinearOperator(Flat(model), loss_func, params, flat_data, fallback="diagonal")
    ekfac_kinds = Counter(kind.split(" ")[0] for kind in E.structure().values())
    print("EKFAC structure:", dict(ekfac_kinds))
    E_inverse = KFACInverseLinearOperator(E, damping=damping, use_exact_damping=True)
    residual = (E_inverse @ (E @ v + damping * v) - v).norm() / v.norm()
    print(f"EKFAC inverse residual: {residual.item():.3e}")

    losses = [mean_loss(model, loss_func, data)]
    for _ in range(3 if quick else 10):
        K.compute_kronecker_factors()  # at the current parameters
        inverse = KFACInverseLinearOperator(K, damping=DAMPING, use_exact_damping=True)
        step = inverse @ gradient(model, loss_func, data, params)
        with torch.no_grad():
            for p, s in zip(params, step):
                p.sub_(LR * s)
        losses.append(mean_loss(model, loss_func, data))
    print("losses:", " ".join(f"{loss:.6f}" for loss in losses))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    main(parser.parse_args().quick)
