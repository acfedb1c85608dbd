"""KFAC on transformer layers (issue 16): attention projections, shared weights, embeddings.

Every test compares with an independent float64 reference: the same model written with
explicit ``nn.Linear`` layers, the weight-sharing formula evaluated by hand with autograd, or
a bias-free ``nn.Linear`` on one-hot inputs.
"""

import pytest
import torch
import torch.nn.functional as F
from reference import assert_close, densify
from torch import nn

from curvlinops import KFACInverseLinearOperator
from curvlinops.kfac import KFACLinearOperator

DT = torch.float64
TOL = {"rtol": 1e-10, "atol_scale": 1e-10}


def _kfac(model, loss, params, data, **kwargs):
    kwargs.setdefault("fisher_type", "type-2")
    K = KFACLinearOperator(model, loss, params, data, check_deterministic=False, **kwargs)
    K.compute_kronecker_factors()
    return K


# ----------------------------------------------------------------- multi-head attention
class Attend(nn.Module):
    """Self-attention through ``nn.MultiheadAttention`` (batch-first or sequence-first)."""

    def __init__(self, E, H, batch_first):
        super().__init__()
        self.attention = nn.MultiheadAttention(E, H, batch_first=batch_first)
        self.batch_first = batch_first

    def forward(self, x):  # x: [B, T, E]
        x = x if self.batch_first else x.transpose(0, 1)
        out = self.attention(x, x, x, need_weights=False)[0]
        return out if self.batch_first else out.transpose(0, 1)


class ExplicitAttend(nn.Module):
    """The same attention with explicit ``nn.Linear`` projections."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        E = mha.embed_dim
        self.H = mha.num_heads
        self.in_proj = nn.Linear(E, 3 * E)
        self.out_proj = nn.Linear(E, E)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.in_proj.bias.copy_(mha.in_proj_bias)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, x):  # [B, T, E]
        B, T, E = x.shape
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, T, self.H, E // self.H).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / (E // self.H) ** 0.5, dim=-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(B, T, E))


def _sequence_data(B=3, T=4, E=6, num_batches=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(B, T, E, generator=gen, dtype=DT),
            torch.randn(B, T, E, generator=gen, dtype=DT),
        )
        for _ in range(num_batches)
    ]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_multihead_attention_equals_explicit_linears(batch_first, fisher_type):
    torch.manual_seed(0)
    model = Attend(6, 2, batch_first).to(DT)
    explicit = ExplicitAttend(model.attention).to(DT)
    data = _sequence_data()
    assert_close(model(data[0][0]), explicit(data[0][0]), **TOL)
    mha = model.attention
    params = [mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias]
    ref_params = [explicit.in_proj.weight, explicit.in_proj.bias]
    ref_params += [explicit.out_proj.weight, explicit.out_proj.bias]
    loss = nn.MSELoss()
    K = _kfac(model, loss, params, data, fisher_type=fisher_type)
    K_ref = _kfac(explicit, loss, ref_params, data, fisher_type=fisher_type)
    assert list(K._mapping) == ["attention.in_proj", "attention.out_proj"]
    for name, ref in (("attention.in_proj", "in_proj"), ("attention.out_proj", "out_proj")):
        assert_close(K._input_covariances[name], K_ref._input_covariances[ref], **TOL)
        assert_close(K._gradient_covariances[name], K_ref._gradient_covariances[ref], **TOL)
    assert_close(densify(K), densify(K_ref), **TOL)


def test_multihead_attention_reduce_needs_batch_axis():
    model = Attend(6, 2, True).to(DT)
    params = list(model.parameters())
    with pytest.raises(NotImplementedError, match="kfac_approx='expand'"):
        _kfac(model, nn.MSELoss(), params, _sequence_data(), kfac_approx="reduce")


def test_cross_attention_packed_weights_raise():
    """Query != key: the packed in-projection is split into calls on slices of the weight."""

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(6, 2, batch_first=True)

        def forward(self, x):
            return self.attention(x, 2 * x, 2 * x, need_weights=False)[0]

    model = Cross().to(DT)
    params = [model.attention.in_proj_weight]
    with pytest.raises(NotImplementedError, match="slice"):
        _kfac(model, nn.MSELoss(), params, _sequence_data())


def test_cross_attention_separate_projections():
    """kdim/vdim != embed_dim: separate q/k/v weights, each its own Kronecker unit."""

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(6, 2, batch_first=True, kdim=4, vdim=4)

        def forward(self, x):
            return self.attention(x, x[..., :4], x[..., :4], need_weights=False)[0]

    model = Cross().to(DT)
    mha = model.attention
    params = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight, mha.out_proj.weight]
    data = _sequence_data()
    K = _kfac(model, nn.MSELoss(), params, data)
    assert list(K._mapping) == [
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.out_proj",
    ]
    # the value projection's input factor is that of x[..., :4], one row per position
    xs = torch.cat([X[..., :4].reshape(-1, 4) for X, _ in data])
    num_data = sum(X.shape[0] for X, _ in data)
    assert_close(K._input_covariances["attention.v_proj"], xs.T @ xs / (num_data * 4), **TOL)


# ----------------------------------------------------------------- shared weights
class Twice(nn.Module):
    """One linear layer applied twice: ``L(tanh(L(x)))``."""

    def __init__(self, d):
        super().__init__()
        self.layer = nn.Linear(d, d)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


def _shared_reference(model, data, reduce):
    """The weight-sharing formula by hand: all uses as more rows (or reduced per datum)."""
    W, b = model.layer.weight, model.layer.bias
    N = sum(X.shape[0] for X, _ in data)
    A = torch.zeros(W.shape[1], W.shape[1], dtype=DT)
    G = torch.zeros(W.shape[0], W.shape[0], dtype=DT)
    for X, _ in data:
        z1 = F.linear(X, W, b)
        x2 = torch.tanh(z1)
        z2 = F.linear(x2, W, b)
        # MSE, sum reduction: loss Hessian 2 I, square root sqrt(2) I, one column per output
        grads = []
        for c in range(z2.shape[1]):
            e = torch.zeros_like(z2)
            e[:, c] = 2**0.5
            grads.append(torch.autograd.grad(z2, [z1, z2], e, retain_graph=True))
        inputs = [X, x2.detach()]
        if reduce:
            x_mean = sum(inputs) / 2
            A += x_mean.T @ x_mean / N
            for g1, g2 in grads:
                G += (g1 + g2).T @ (g1 + g2)
        else:
            A += sum(x.T @ x for x in inputs) / (N * 2)
            for g1, g2 in grads:
                G += g1.T @ g1 + g2.T @ g2
    return A, G


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_layer_used_twice_equals_weight_sharing_formula(kfac_approx):
    torch.manual_seed(1)
    model = Twice(3).to(DT)
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 3, generator=gen, dtype=DT), torch.randn(4, 3, dtype=DT))] * 2
    K = _kfac(
        model, nn.MSELoss(reduction="sum"), list(model.parameters()), data, kfac_approx=kfac_approx
    )
    A, G = _shared_reference(model, data, kfac_approx == "reduce")
    assert_close(K._input_covariances["layer"], A, **TOL)
    assert_close(K._gradient_covariances["layer"], G, **TOL)


def test_layer_used_twice_equals_layer_on_sequence():
    """Using a layer on two inputs = the layer on their stack (a linear weight-sharing axis)."""
    torch.manual_seed(3)
    layer = nn.Linear(3, 2).to(DT)
    head = nn.Linear(4, 2).to(DT)

    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.head = layer, head

        def forward(self, x):  # x: [B, 2, 3]
            return self.head(torch.cat([self.layer(x[:, 0]), self.layer(x[:, 1])], 1))

    class Stack(Split):
        def forward(self, x):
            return self.head(self.layer(x).flatten(1))

    gen = torch.Generator().manual_seed(4)
    data = [(torch.randn(5, 2, 3, generator=gen, dtype=DT), torch.randn(5, 2, dtype=DT))]
    for approx in ("expand", "reduce"):
        for separate in (True, False):
            kwargs = {"kfac_approx": approx, "separate_weight_and_bias": separate}
            K = _kfac(Split(), nn.MSELoss(), list(layer.parameters()), data, **kwargs)
            K_ref = _kfac(Stack(), nn.MSELoss(), list(layer.parameters()), data, **kwargs)
            assert_close(densify(K), densify(K_ref), **TOL)


# ----------------------------------------------------------------- embeddings
class Embed(nn.Module):
    def __init__(self, vocab, d, C, padding_idx):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.head = nn.Linear(d, C)

    def forward(self, tokens):  # [B, T] -> [B, C, T]
        return self.head(torch.tanh(self.embedding(tokens))).transpose(1, 2)


class OneHot(nn.Module):
    """The same model with a bias-free linear layer on one-hot inputs (zero at padding)."""

    def __init__(self, embed: Embed):
        super().__init__()
        vocab, d = embed.embedding.weight.shape
        self.padding_idx = embed.embedding.padding_idx
        self.linear = nn.Linear(vocab, d, bias=False)
        self.head = embed.head
        with torch.no_grad():
            self.linear.weight.copy_(embed.embedding.weight.T)

    def forward(self, tokens):
        one_hot = F.one_hot(tokens, self.linear.in_features).to(DT)
        if self.padding_idx is not None:
            one_hot[..., self.padding_idx] = 0
        return self.head(torch.tanh(self.linear(one_hot))).transpose(1, 2)


def _token_data(vocab=7, C=3, B=4, T=5, num_batches=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(vocab, (B, T), generator=gen),
            torch.randint(C, (B, T), generator=gen),
        )
        for _ in range(num_batches)
    ]


def _transpose_permutation(rows, cols):
    """Index map from the row-major vec of a [cols, rows] matrix to that of its transpose."""
    return torch.arange(rows * cols).reshape(cols, rows).T.reshape(-1)


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical", "forward-only"])
def test_embedding_equals_linear_on_one_hot(padding_idx, fisher_type):
    torch.manual_seed(5)
    vocab, d = 7, 4
    model = Embed(vocab, d, 3, padding_idx).to(DT)
    reference = OneHot(model).to(DT)
    data = _token_data(vocab)
    assert_close(model(data[0][0]), reference(data[0][0]), **TOL)
    loss = nn.CrossEntropyLoss()
    K = _kfac(model, loss, [model.embedding.weight], data, fisher_type=fisher_type)
    K_ref = _kfac(reference, loss, [reference.linear.weight], data, fisher_type=fisher_type)
    A = K._input_covariances["embedding"]
    assert A.shape == (vocab,)  # stored as a diagonal, never vocab x vocab
    assert_close(torch.diag(A), K_ref._input_covariances["linear"], **TOL)
    assert_close(K._gradient_covariances["embedding"], K_ref._gradient_covariances["linear"], **TOL)
    if padding_idx is not None:
        assert A[padding_idx] == 0
    perm = _transpose_permutation(vocab, d)
    dense, dense_ref = densify(K), densify(K_ref)
    assert_close(dense, dense_ref[perm][:, perm], **TOL)
    # trace, log-determinant and norm from the diagonal structure
    assert_close(K.trace, dense.trace(), **TOL)
    assert_close(K.frobenius_norm, dense.norm(), **TOL)
    if padding_idx is None:
        assert_close(K.logdet, torch.linalg.slogdet(dense)[1], **TOL)


@pytest.mark.parametrize(
    "inverse_kwargs",
    [{"damping": 1e-2}, {"damping": (1e-2, 1e-3)}, {"damping": 1e-2, "use_exact_damping": True}],
)
def test_embedding_inverse(inverse_kwargs):
    torch.manual_seed(6)
    vocab, d = 7, 4
    model = Embed(vocab, d, 3, 0).to(DT)
    reference = OneHot(model).to(DT)
    data = _token_data(vocab)
    loss = nn.CrossEntropyLoss()
    K = _kfac(model, loss, [model.embedding.weight], data)
    K_ref = _kfac(reference, loss, [reference.linear.weight], data)
    inverse = densify(KFACInverseLinearOperator(K, **inverse_kwargs))
    inverse_ref = densify(KFACInverseLinearOperator(K_ref, **inverse_kwargs))
    perm = _transpose_permutation(vocab, d)
    assert_close(inverse, inverse_ref[perm][:, perm], rtol=1e-9, atol_scale=1e-9)
    if inverse_kwargs.get("use_exact_damping"):
        damped = densify(K) + 1e-2 * torch.eye(vocab * d, dtype=DT)
        assert_close(inverse @ damped, torch.eye(vocab * d, dtype=DT), rtol=1e-9, atol_scale=1e-9)


def test_embedding_checkpoint_round_trip():
    torch.manual_seed(7)
    model = Embed(7, 4, 3, 0).to(DT)
    data = _token_data(7)
    params = list(model.parameters())
    K = _kfac(model, nn.CrossEntropyLoss(), params, data)
    dense = densify(K)
    state = K.state_dict()
    with pytest.warns(UserWarning, match="will overwrite the parameters"):
        K2 = KFACLinearOperator.from_state_dict(state, model, params, data)
    assert_close(densify(K2), dense, **TOL)
    state["input_covariances"]["embedding"] = torch.ones(7, 7, dtype=DT)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"\[7\]"):
        K2.load_state_dict(state)


def test_embedding_options_and_tied_head_raise():
    model = Embed(7, 4, 3, None).to(DT)
    data = _token_data(7)
    with pytest.raises(NotImplementedError, match="expand"):
        _kfac(model, nn.CrossEntropyLoss(), [model.embedding.weight], data, kfac_approx="reduce")
    model.embedding.scale_grad_by_freq = True
    with pytest.raises(NotImplementedError, match="scale_grad_by_freq"):
        _kfac(model, nn.CrossEntropyLoss(), [model.embedding.weight], data)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.embedding.weight

        def forward(self, tokens):
            return self.head(self.embedding(tokens)).transpose(1, 2)

    tied = Tied().to(DT)
    params = list(tied.parameters())
    assert KFACLinearOperator.compute_parameter_mapping(params, tied) == {
        "embedding": {"weight": 0}
    }
    with pytest.raises(NotImplementedError, match="tied"):
        _kfac(tied, nn.CrossEntropyLoss(), params, _token_data(7, C=7))
