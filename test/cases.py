"""Small deterministic float64 problems for the core-operator tests.

Every problem is built from a fixed seed by ``make_case(name, reduction)`` and consists of a model,
a loss module, the list of parameters, three batches of unequal size (3, 2, 4 data points) and an
optional ``batch_size_fn``. Everything is tiny (at most a few hundred parameters) so that the dense
references in ``reference.py`` are cheap.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from torch import Tensor, nn

BATCH_SIZES = (3, 2, 4)
REDUCTIONS = ("mean", "sum")


@dataclass
class Case:
    """One test problem."""

    name: str
    model: nn.Module
    loss_func: nn.Module
    params: List[Tensor]
    data: List[Any]
    batch_size_fn: Optional[Callable] = None
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_data(self) -> int:
        bs = self.batch_size_fn or (lambda X: X.shape[0])
        return sum(bs(X) for X, _ in self.data)

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params)

    def kwargs(self) -> dict:
        """Keyword arguments for the operators that are not always the default."""
        return {} if self.batch_size_fn is None else {"batch_size_fn": self.batch_size_fn}

    def converted(self, dtype: torch.dtype) -> "Case":
        """A copy whose model parameters and floating-point data have ``dtype``."""

        def conv(t):
            if isinstance(t, dict):
                return {k: conv(v) for k, v in t.items()}
            return t.to(dtype) if t.is_floating_point() else t.clone()

        model = copy.deepcopy(self.model).to(dtype)
        index = {id(p): i for i, p in enumerate(self.model.parameters())}
        all_new = list(model.parameters())
        params = [all_new[index[id(p)]] for p in self.params]
        return Case(
            name=self.name,
            model=model,
            loss_func=self.loss_func,
            params=params,
            data=[(conv(X), conv(y)) for X, y in self.data],
            batch_size_fn=self.batch_size_fn,
            description=self.description,
        )

    def tensors(self):
        """(model, loss_func, params, data) as passed to the curvature operators."""
        return self.model, self.loss_func, self.params, self.data


class TinyTransformer(nn.Module):
    """Embedding -> LayerNorm -> self-attention (residual) -> Linear head.

    Input: integer tokens ``[N, T]``. Output: logits ``[N, C, T]`` (class axis 1, for CE).
    """

    def __init__(self, vocab=7, embed=4, heads=2, classes=3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.norm = nn.LayerNorm(embed)
        self.attention = nn.MultiheadAttention(embed, heads, batch_first=True)
        self.head = nn.Linear(embed, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embedding(tokens)
        h = self.norm(x)
        a, _ = self.attention(h, h, h, need_weights=False)
        logits = self.head(x + a)  # [N, T, C]
        return logits.transpose(1, 2)  # [N, C, T]


class DictInputModel(nn.Module):
    """An MLP whose input is a dict ``{"x": [N, 3], "offset": [N, 2]}``.

    It also owns a 0-d parameter (a learnable output temperature).
    """

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.temperature = nn.Parameter(torch.tensor(1.3))

    def forward(self, X) -> Tensor:
        return self.temperature * self.net(X["x"]) + X["offset"]


class SequenceModel(nn.Module):
    """Position-wise MLP with a cross-position mixing step; ``[N, T, D_in] -> [N, T, C]``."""

    def __init__(self, d_in=3, hidden=4, out=2):
        super().__init__()
        self.lin1 = nn.Linear(d_in, hidden)
        self.lin2 = nn.Linear(hidden, out)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin1(x))
        h = h + h.mean(dim=1, keepdim=True)
        return self.lin2(h)


def _mlp_ce(reduction, gen, soft=False, label_smoothing=0.0):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    data = []
    for b in BATCH_SIZES:
        X = torch.randn(b, 4, generator=gen)
        if soft:
            y = torch.rand(b, 3, generator=gen).softmax(dim=1)
        else:
            y = torch.randint(0, 3, (b,), generator=gen)
        data.append((X, y))
    loss = nn.CrossEntropyLoss(reduction=reduction, label_smoothing=label_smoothing)
    return model, loss, data, None


def _cnn_mse(reduction, gen):
    model = nn.Sequential(
        nn.Conv2d(1, 2, kernel_size=3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 2),
    )
    data = [
        (torch.randn(b, 1, 5, 5, generator=gen), torch.randn(b, 2, generator=gen))
        for b in BATCH_SIZES
    ]
    return model, nn.MSELoss(reduction=reduction), data, None


def _mlp_bce(reduction, gen, soft=False):
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2))
    data = []
    for b in BATCH_SIZES:
        X = torch.randn(b, 4, generator=gen)
        if soft:
            y = torch.rand(b, 2, generator=gen)
        else:
            y = torch.randint(0, 2, (b, 2), generator=gen).to(torch.get_default_dtype())
        data.append((X, y))
    return model, nn.BCEWithLogitsLoss(reduction=reduction), data, None


def _transformer_ce(reduction, gen):
    model = TinyTransformer()
    T = 3
    data = [
        (
            torch.randint(0, 7, (b, T), generator=gen),
            torch.randint(0, 3, (b, T), generator=gen),
        )
        for b in BATCH_SIZES
    ]
    return model, nn.CrossEntropyLoss(reduction=reduction), data, None


def _dict_ce(reduction, gen):
    model = DictInputModel()
    data = [
        (
            {"x": torch.randn(b, 3, generator=gen), "offset": torch.randn(b, 2, generator=gen)},
            torch.randint(0, 2, (b,), generator=gen),
        )
        for b in BATCH_SIZES
    ]
    return model, nn.CrossEntropyLoss(reduction=reduction), data, dict_batch_size


def dict_batch_size(X) -> int:
    return X["x"].shape[0]


def _seq_mse(reduction, gen):
    model = SequenceModel()
    T = 3
    data = [
        (torch.randn(b, T, 3, generator=gen), torch.randn(b, T, 2, generator=gen))
        for b in BATCH_SIZES
    ]
    return model, nn.MSELoss(reduction=reduction), data, None


def _seq_bce(reduction, gen, soft=False):
    model = SequenceModel()
    T = 3
    data = []
    for b in BATCH_SIZES:
        X = torch.randn(b, T, 3, generator=gen)
        if soft:
            y = torch.rand(b, T, 2, generator=gen)
        else:
            y = torch.randint(0, 2, (b, T, 2), generator=gen).to(torch.get_default_dtype())
        data.append((X, y))
    return model, nn.BCEWithLogitsLoss(reduction=reduction), data, None


_BUILDERS = {
    "mlp_ce": (_mlp_ce, "MLP (Linear-Tanh-Linear), CrossEntropyLoss, 2-d output"),
    "cnn_mse": (_cnn_mse, "CNN (Conv2d-ReLU-Flatten-Linear), MSELoss"),
    "mlp_bce": (_mlp_bce, "MLP (Linear-Sigmoid-Linear), BCEWithLogitsLoss, binary targets"),
    "transformer_ce": (
        _transformer_ce,
        "Embedding-LayerNorm-MultiheadAttention-Linear, logits [N, C, T], CrossEntropyLoss",
    ),
    "dict_ce": (_dict_ce, "dict input X with batch_size_fn, 0-d parameter, CrossEntropyLoss"),
    "seq_mse": (_seq_mse, "sequence output [N, T, C], MSELoss"),
    "seq_bce": (_seq_bce, "sequence output [N, T, C], BCEWithLogitsLoss, binary targets"),
    # variants only meaningful for Hessian / GGN / EF
    "mlp_bce_soft": (
        lambda r, g: _mlp_bce(r, g, soft=True),
        "MLP, BCEWithLogitsLoss with soft (probability) targets",
    ),
    "seq_bce_soft": (
        lambda r, g: _seq_bce(r, g, soft=True),
        "sequence output, BCEWithLogitsLoss with soft targets",
    ),
    "mlp_ce_soft": (
        lambda r, g: _mlp_ce(r, g, soft=True),
        "MLP, CrossEntropyLoss with probability targets",
    ),
    "mlp_ce_ls": (
        lambda r, g: _mlp_ce(r, g, label_smoothing=0.1),
        "MLP, CrossEntropyLoss with label_smoothing=0.1",
    ),
}

# problems supported by every loss-based operator (MC-Fisher needs hard targets)
HARD_CASES = ["mlp_ce", "cnn_mse", "mlp_bce", "transformer_ce", "dict_ce", "seq_mse", "seq_bce"]
SOFT_CASES = ["mlp_bce_soft", "seq_bce_soft", "mlp_ce_soft", "mlp_ce_ls"]
ALL_CASES = HARD_CASES + SOFT_CASES


def make_case(
    name: str,
    reduction: str = "mean",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> Case:
    """Build a fresh, seeded problem. ``dtype`` applies to parameters and float data."""
    builder, description = _BUILDERS[name]
    gen = torch.Generator().manual_seed(1234 + seed)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        model, loss_func, data, batch_size_fn = builder(reduction, gen)
    finally:
        torch.set_default_dtype(old_dtype)
    model = model.to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    return Case(
        name=name,
        model=model,
        loss_func=loss_func,
        params=params,
        data=data,
        batch_size_fn=batch_size_fn,
        description=description,
    )


def case_tuple(name: str, reduction: str = "mean"):
    """The problem as a plain tuple (model, loss_func, params, data, batch_size_fn, description)."""
    c = make_case(name, reduction)
    return c.model, c.loss_func, c.params, c.data, c.batch_size_fn, c.description
