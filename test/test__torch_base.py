"""Tests for ``curvlinops._torch_base``: input formats, composition, SciPy export and the shared
behaviour of data-driven ``CurvatureLinearOperator`` subclasses (sections 2, 14, 15, 16 of the
contract)."""

from collections import UserDict

import numpy
import pytest
import torch
from cases import make_case
from reference import (
    assert_close,
    assert_list_close,
    cached_reference,
    densify,
    empirical_fisher,
    ggn,
    gradient_and_loss,
    hessian,
    jacobian,
    rel_fro_error,
    unflatten,
)
from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator
from scipy.sparse.linalg import cg, eigsh
from torch import nn

from curvlinops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    TransposedJacobianLinearOperator,
)
from curvlinops._torch_base import CurvatureLinearOperator, PyTorchLinearOperator
from curvlinops.examples import IdentityLinearOperator, TensorLinearOperator

DT = torch.float64
LOSS_OPERATORS = [
    HessianLinearOperator,
    GGNLinearOperator,
    EFLinearOperator,
    FisherMCLinearOperator,
]
JACOBIANS = [JacobianLinearOperator, TransposedJacobianLinearOperator]
SQUARE_EXACT = [HessianLinearOperator, GGNLinearOperator, EFLinearOperator]  # FIXED_DATA_ORDER off
ALL_OPERATORS = LOSS_OPERATORS + JACOBIANS


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def build(cls, c, **kwargs):
    """Construct any operator class on a case (Jacobians take no loss function)."""
    kwargs = {**c.kwargs(), **kwargs}
    if cls in JACOBIANS:
        return cls(c.model, c.params, c.data, **kwargs)
    return cls(c.model, c.loss_func, c.params, c.data, **kwargs)


class MetaOperator(PyTorchLinearOperator):
    """An operator that claims to live on the meta device (to simulate device mismatches)."""

    SELF_ADJOINT = True

    def __init__(self, shapes, dtype=DT):
        super().__init__(shapes, shapes)
        self._dtype = dtype

    @property
    def device(self):
        return torch.device("meta")

    @property
    def dtype(self):
        return self._dtype

    def _matmat(self, X):
        return X


class BrokenOperator(PyTorchLinearOperator):
    """Its ``_matmat`` returns the wrong number of tensors or wrong shapes."""

    SELF_ADJOINT = True

    def __init__(self, mode):
        super().__init__([(2, 3), (4,)], [(2, 3), (4,)])
        self.mode = mode

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dtype(self):
        return DT

    def _matmat(self, X):
        if self.mode == "number":
            return X[:1]
        if self.mode == "shape":
            return [X[0].reshape(3, 2, -1), X[1]]
        return [X[0], X[1][:, 0]]  # missing column axis


# ------------------------------------------------------------------------------------------------
# PyTorchLinearOperator: construction and input formats
# ------------------------------------------------------------------------------------------------


def test_base_constructor_attributes():
    A = PyTorchLinearOperator([(2, 3), (4,)], [(5,), (1, 2), ()])
    assert A._in_shape == [torch.Size([2, 3]), torch.Size([4])]
    assert A._out_shape == [torch.Size([5]), torch.Size([1, 2]), torch.Size([])]
    assert all(isinstance(s, torch.Size) for s in A._in_shape + A._out_shape)
    assert A._in_shape_flat == [6, 4]
    assert A._out_shape_flat == [5, 2, 1]
    assert all(type(n) is int for n in A._in_shape_flat + A._out_shape_flat)
    assert A.shape == (8, 10)
    assert isinstance(A.shape, tuple)
    assert PyTorchLinearOperator.SELF_ADJOINT is False
    with pytest.raises(NotImplementedError, match=r"_matmat"):
        A @ torch.ones(10)
    with pytest.raises(NotImplementedError, match=r"device"):
        _ = A.device
    with pytest.raises(NotImplementedError, match=r"dtype"):
        _ = A.dtype


@pytest.mark.parametrize("name", ["dict_ce", "transformer_ce"])
def test_vector_and_matrix_formats(name):
    """[D], [D, K] (incl. K = 1), lists with exact shapes and lists with a trailing K axis."""
    c = make_case(name)
    H = HessianLinearOperator(*c.tensors(), **c.kwargs())
    H_ref = cached_reference("hessian", name)
    D = c.dim
    shapes = [p.shape for p in c.params]
    if name == "dict_ce":
        assert torch.Size([]) in shapes  # the 0-d temperature parameter

    v = torch.randn(D, dtype=DT, generator=_gen(1))
    Hv = H @ v
    assert isinstance(Hv, torch.Tensor) and Hv.shape == (D,)
    assert_close(Hv, H_ref @ v)

    for K in [1, 3]:
        M = torch.randn(D, K, dtype=DT, generator=_gen(K))
        HM = H @ M
        assert HM.shape == (D, K)
        assert_close(HM, H_ref @ M)

        HM_list = H @ unflatten(M, shapes, trailing=K)
        assert isinstance(HM_list, list)
        assert [t.shape for t in HM_list] == [torch.Size((*s, K)) for s in shapes]
        assert_list_close(HM_list, unflatten(H_ref @ M, shapes, trailing=K))

    # exact shapes: one vector in list format (tried before the matrix interpretation)
    Hv_list = H @ unflatten(v, shapes)
    assert isinstance(Hv_list, list)
    assert [t.shape for t in Hv_list] == shapes
    assert_list_close(Hv_list, unflatten(H_ref @ v, shapes))


def test_non_square_formats():
    A = torch.randn(7, 10, dtype=DT, generator=_gen())
    op = PyTorchLinearOperatorFromDense(A, [(2, 5)], [(7,)])
    x = torch.randn(2, 5, dtype=DT, generator=_gen(1))
    out = op @ [x]
    assert len(out) == 1 and out[0].shape == (7,)
    assert_close(out[0], A @ x.flatten())
    X = torch.randn(2, 5, 1, dtype=DT, generator=_gen(2))
    out = op @ [X]
    assert out[0].shape == (7, 1)
    assert_close(out[0], A @ X.reshape(10, 1))
    assert_close(op @ x.flatten(), A @ x.flatten())


class PyTorchLinearOperatorFromDense(PyTorchLinearOperator):
    """A user-written subclass (section 2.1.4) representing a dense matrix on given spaces."""

    def __init__(self, A, in_shape, out_shape):
        super().__init__(in_shape, out_shape)
        self._A = A

    @property
    def device(self):
        return self._A.device

    @property
    def dtype(self):
        return self._A.dtype

    def _matmat(self, X):
        K = X[0].shape[-1]
        flat = torch.cat([x.reshape(-1, K) for x in X])
        result = self._A @ flat
        return unflatten(result, self._out_shape, trailing=K)

    def _adjoint(self):
        return PyTorchLinearOperatorFromDense(self._A.T, self._out_shape, self._in_shape)


def test_format_errors():
    c = make_case("mlp_ce")
    H = HessianLinearOperator(*c.tensors())
    D = c.dim
    shapes = [p.shape for p in c.params]
    with pytest.raises(ValueError, match=r"(?i)shape"):
        H @ torch.ones(D, 2, 2, dtype=DT)  # more than 2 axes
    with pytest.raises(ValueError, match=r"(?i)shape"):
        H @ torch.ones(D + 1, dtype=DT)  # wrong length
    with pytest.raises(ValueError, match=r"(?i)shape"):
        H @ torch.ones(D - 1, 3, dtype=DT)
    with pytest.raises(ValueError, match=r"tuple"):
        H @ tuple(torch.ones(s, dtype=DT) for s in shapes)
    with pytest.raises(ValueError, match=r"(?i)ndarray|numpy"):
        H @ numpy.ones(D)
    with pytest.raises(ValueError, match=r"(?i)ndarray|numpy"):
        H @ numpy.ones((D, 2))
    with pytest.raises(ValueError, match=r"(?i)\b4\b|length|number"):
        H @ [torch.ones(s, dtype=DT) for s in shapes[:-1]]  # too few
    with pytest.raises(ValueError, match=r"(?i)\b4\b|length|number"):
        H @ [torch.ones(s, dtype=DT) for s in shapes + [shapes[0]]]  # too many
    with pytest.raises(ValueError, match=r"(?i)shape"):
        H @ [torch.ones(3, dtype=DT) for _ in shapes]  # fits neither interpretation
    with pytest.raises(ValueError, match=r"(?i)shape"):
        H @ [torch.ones(s, dtype=DT) for s in shapes[:-1]] + [torch.ones(7, dtype=DT)]
    with pytest.raises(ValueError, match=r"(?i)column|trailing"):
        H @ [torch.ones(*s, k + 1, dtype=DT) for k, s in enumerate(shapes)]
    with pytest.raises(ValueError, match=r"(?i)column|trailing|shape"):
        # mixture of the vector and matrix interpretations
        H @ [torch.ones(*shapes[0], dtype=DT)] + [torch.ones(*s, 1, dtype=DT) for s in shapes[1:]]


def test_wrong_matmat_outputs():
    x = [torch.ones(2, 3, dtype=DT), torch.ones(4, dtype=DT)]
    for mode, match in [
        ("number", r"(?i)number|tensors|\b2\b|length"),
        ("shape", r"(?i)shape"),
        ("columns", r"(?i)shape|column"),
    ]:
        with pytest.raises(ValueError, match=match):
            BrokenOperator(mode) @ x


def test_dtype_and_device_mismatch_of_input():
    c = make_case("mlp_ce")
    for op in [HessianLinearOperator(*c.tensors()), JacobianLinearOperator(*_jac_args(c))]:
        D = op.shape[1]
        with pytest.raises(ValueError, match=r"dtype|float32"):
            op @ torch.ones(D, dtype=torch.float32)
        with pytest.raises(ValueError, match=r"dtype|float32"):
            op @ torch.ones(D, 2, dtype=torch.float32)
        with pytest.raises(ValueError, match=r"dtype|float32"):
            op @ [torch.ones(s, dtype=torch.float32) for s in op._in_shape]
        with pytest.raises(ValueError, match=r"device|meta"):
            op @ torch.ones(D, dtype=DT, device="meta")
        with pytest.raises(ValueError, match=r"device|meta"):
            op @ [torch.ones(s, dtype=DT, device="meta") for s in op._in_shape]


def _jac_args(c):
    return c.model, c.params, c.data


# ------------------------------------------------------------------------------------------------
# Composition (section 2.1.2)
# ------------------------------------------------------------------------------------------------


def test_composition_of_curvature_operators():
    c = make_case("mlp_ce")
    H = HessianLinearOperator(*c.tensors())
    G = GGNLinearOperator(*c.tensors())
    H_ref = cached_reference("hessian", "mlp_ce")
    G_ref = cached_reference("ggn", "mlp_ce")
    D = c.dim

    for op, expected in [
        (H + G, H_ref + G_ref),
        (H - G, H_ref - G_ref),
        (2.5 * H, 2.5 * H_ref),
        (H * -0.5, -0.5 * H_ref),
        (H @ G, H_ref @ G_ref),
        (0.5 * (H + G) - 3 * H @ G, 0.5 * (H_ref + G_ref) - 3 * H_ref @ G_ref),
    ]:
        assert isinstance(op, PyTorchLinearOperator)
        assert op.shape == (D, D)
        assert op._in_shape == op._out_shape == [p.shape for p in c.params]
        assert op.dtype == DT and op.device == H.device
        assert_close(densify(op), expected)
        assert_close(densify(op.adjoint()), expected.T)
        # list format works on composites
        v = torch.randn(D, dtype=DT, generator=_gen())
        assert_list_close(op @ unflatten(v, H._in_shape), unflatten(expected @ v, H._in_shape))

    assert (H + G).SELF_ADJOINT is True
    assert (H - G).SELF_ADJOINT is True
    assert (2.0 * H).SELF_ADJOINT is True
    assert (H @ G).SELF_ADJOINT is False

    # typical damping: GGN + δ I
    Id = IdentityLinearOperator([p.shape for p in c.params], H.device, DT)
    damped = G + 1e-2 * Id
    assert damped.SELF_ADJOINT is True
    assert_close(densify(damped), G_ref + 1e-2 * torch.eye(D, dtype=DT))


def test_composition_jacobians():
    """Jᵀ J and J Jᵀ as lazy products; adjoints of non-self-adjoint composites."""
    c = make_case("seq_mse")
    J = JacobianLinearOperator(*_jac_args(c))
    JT = TransposedJacobianLinearOperator(*_jac_args(c))
    J_ref = cached_reference("jacobian", "seq_mse")

    JTJ = JT @ J
    assert JTJ._in_shape == J._in_shape and JTJ._out_shape == JT._out_shape
    assert JTJ.shape == (c.dim, c.dim)
    assert JTJ.SELF_ADJOINT is False
    assert_close(densify(JTJ), J_ref.T @ J_ref)
    JJT = J @ JT
    assert JJT.shape == (J_ref.shape[0], J_ref.shape[0])
    assert_close(densify(JJT), J_ref @ J_ref.T)

    # adjoint of a product is B* A*, of a scaled operator s A*, of a sum A* + B*
    A = 2.0 * J
    assert A.shape == J.shape
    assert_close(densify(A.adjoint()), 2.0 * J_ref.T)
    B = J + J
    assert B.SELF_ADJOINT is False
    assert_close(densify(B.adjoint()), 2.0 * J_ref.T)
    H = HessianLinearOperator(*c.tensors())
    H_ref = cached_reference("hessian", "seq_mse")
    P = J @ H  # [N T C] x D
    assert P._in_shape == H._in_shape and P._out_shape == J._out_shape
    assert_close(densify(P), J_ref @ H_ref)
    assert_close(densify(P.adjoint()), H_ref @ J_ref.T)


def test_composition_tensor_operators():
    gen = _gen(5)
    A_mat = torch.randn(4, 6, dtype=DT, generator=gen)
    B_mat = torch.randn(6, 3, dtype=DT, generator=gen)
    S_mat = torch.randn(4, 4, dtype=DT, generator=gen)
    S_mat = S_mat + S_mat.T
    A, B, S = (TensorLinearOperator(m) for m in (A_mat, B_mat, S_mat))
    assert S.SELF_ADJOINT is True and A.SELF_ADJOINT is False

    AB = A @ B
    assert AB.shape == (4, 3)
    assert AB._in_shape == B._in_shape and AB._out_shape == A._out_shape
    assert_close(densify(AB), A_mat @ B_mat)
    assert AB.adjoint().shape == (3, 4)
    assert_close(densify(AB.adjoint()), (A_mat @ B_mat).T)

    SA = S @ A - 3 * A
    assert_close(densify(SA), S_mat @ A_mat - 3 * A_mat)
    assert_close(densify(SA.adjoint()), (S_mat @ A_mat - 3 * A_mat).T)
    assert (S + S).SELF_ADJOINT is True
    assert (S + S @ S).SELF_ADJOINT is False  # a product is never flagged self-adjoint
    assert (A + A).SELF_ADJOINT is False
    assert (4 * S).SELF_ADJOINT is True
    assert (A * 4).SELF_ADJOINT is False

    # composites report device and dtype of the first operand
    assert AB.dtype == DT and AB.device == torch.device("cpu")


def test_composition_errors():
    c = make_case("mlp_ce")
    H = HessianLinearOperator(*c.tensors())
    D = c.dim
    flat = TensorLinearOperator(torch.eye(D, dtype=DT))  # [(D,)] spaces, same D
    with pytest.raises(ValueError, match=r"(?i)shape|space"):
        H + flat
    with pytest.raises(ValueError, match=r"(?i)shape|space"):
        H - flat
    with pytest.raises(ValueError, match=r"(?i)shape|space"):
        H @ flat
    with pytest.raises(ValueError, match=r"(?i)shape|space"):
        flat @ H
    f32 = TensorLinearOperator(torch.eye(D, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"dtype"):
        flat + f32
    with pytest.raises(ValueError, match=r"dtype"):
        flat @ f32
    with pytest.raises(ValueError, match=r"dtype"):
        f32 - flat
    meta = MetaOperator([(D,)])
    with pytest.raises(ValueError, match=r"device"):
        flat + meta
    with pytest.raises(ValueError, match=r"device"):
        flat @ meta
    with pytest.raises(ValueError, match=r"device"):
        meta - flat
    rect = TensorLinearOperator(torch.ones(3, D, dtype=DT))
    with pytest.raises(ValueError, match=r"(?i)shape|space"):
        rect + flat
    with pytest.raises(ValueError, match=r"(?i)shape|space"):
        rect @ rect
    # the result of a valid composition can be used further
    assert_close(densify(rect @ flat), torch.ones(3, D, dtype=DT))


def test_scalar_multiplication_with_integer_and_numpy_scalar():
    A_mat = torch.randn(3, 3, dtype=DT, generator=_gen())
    A = TensorLinearOperator(A_mat)
    assert_close(densify(3 * A), 3 * A_mat)
    assert_close(densify(A * 0.25), 0.25 * A_mat)


# ------------------------------------------------------------------------------------------------
# SciPy export (section 2.1.3)
# ------------------------------------------------------------------------------------------------


def test_to_scipy_eigsh_and_dtypes():
    c = make_case("transformer_ce")
    H = HessianLinearOperator(*c.tensors())
    H_ref = cached_reference("hessian", "transformer_ce").numpy()
    D = c.dim
    H_scipy = H.to_scipy()
    assert isinstance(H_scipy, ScipyLinearOperator)
    assert H_scipy.shape == (D, D)
    assert H_scipy.dtype == numpy.float64

    k = 3
    evals = eigsh(H_scipy, k=k, which="LA", return_eigenvectors=False)
    expected = numpy.linalg.eigh(H_ref)[0][-k:]
    numpy.testing.assert_allclose(numpy.sort(evals), expected, rtol=1e-8)
    evals_lm = eigsh(H_scipy, k=k, which="LM", return_eigenvectors=False)
    all_evals = numpy.linalg.eigh(H_ref)[0]
    expected_lm = all_evals[numpy.argsort(numpy.abs(all_evals))[-k:]]
    numpy.testing.assert_allclose(numpy.sort(evals_lm), numpy.sort(expected_lm), rtol=1e-8)

    rng = numpy.random.default_rng(0)
    x64 = rng.standard_normal(D)
    X64 = rng.standard_normal((D, 2))
    for fn, arg, expected in [
        (H_scipy.matvec, x64, H_ref @ x64),
        (H_scipy.rmatvec, x64, H_ref.T @ x64),
        (H_scipy.matmat, X64, H_ref @ X64),
        (H_scipy.rmatmat, X64, H_ref.T @ X64),
    ]:
        out = fn(arg)
        assert isinstance(out, numpy.ndarray)
        assert out.dtype == numpy.float64
        numpy.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
        out32 = fn(arg.astype(numpy.float32))  # returned dtype follows the input array
        assert out32.dtype == numpy.float32
        numpy.testing.assert_allclose(out32, expected, rtol=1e-4, atol=1e-5)

    assert H.to_scipy(dtype=numpy.float32).dtype == numpy.float32


def test_to_scipy_cg_and_non_square():
    c = make_case("mlp_bce")
    G = GGNLinearOperator(*c.tensors())
    D = c.dim
    Id = IdentityLinearOperator([p.shape for p in c.params], G.device, G.dtype)
    damped = G + 0.1 * Id
    A = cached_reference("ggn", "mlp_bce").numpy() + 0.1 * numpy.eye(D)
    b = numpy.random.default_rng(1).standard_normal(D)
    x, info = cg(damped.to_scipy(), b, rtol=1e-12, atol=0, maxiter=10 * D)
    assert info == 0
    numpy.testing.assert_allclose(x, numpy.linalg.solve(A, b), rtol=1e-7, atol=1e-9)

    J = JacobianLinearOperator(*_jac_args(c))
    J_ref = cached_reference("jacobian", "mlp_bce").numpy()
    J_scipy = J.to_scipy()
    assert J_scipy.shape == J_ref.shape
    v = numpy.random.default_rng(2).standard_normal(J_ref.shape[1])
    u = numpy.random.default_rng(3).standard_normal(J_ref.shape[0])
    numpy.testing.assert_allclose(J_scipy.matvec(v), J_ref @ v, rtol=1e-10, atol=1e-12)
    numpy.testing.assert_allclose(J_scipy.rmatvec(u), J_ref.T @ u, rtol=1e-10, atol=1e-12)
    numpy.testing.assert_allclose(
        J_scipy.rmatmat(numpy.stack([u, 2 * u], 1)),
        J_ref.T @ numpy.stack([u, 2 * u], 1),
        rtol=1e-10,
        atol=1e-12,
    )
    numpy.testing.assert_allclose((J_scipy.T @ u), J_ref.T @ u, rtol=1e-10, atol=1e-12)


def test_to_scipy_float32_operator():
    c = make_case("mlp_ce").converted(torch.float32)
    H = HessianLinearOperator(*c.tensors())
    H_scipy = H.to_scipy()
    assert H_scipy.dtype == numpy.float64
    x = numpy.random.default_rng(0).standard_normal(c.dim)
    out = H_scipy.matvec(x)
    assert out.dtype == numpy.float64  # follows the input array
    expected = cached_reference("hessian", "mlp_ce").numpy() @ x
    assert numpy.linalg.norm(out - expected) < 1e-4 * numpy.linalg.norm(expected)


# ------------------------------------------------------------------------------------------------
# CurvatureLinearOperator: shared behaviour
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", ["mlp_ce", "transformer_ce", "dict_ce", "seq_bce"])
def test_gradient_and_loss(name, reduction):
    c = make_case(name, reduction)
    grad_ref, loss_ref = gradient_and_loss(c.model, c.loss_func, c.params, c.data, c.batch_size_fn)
    for cls in [HessianLinearOperator, FisherMCLinearOperator]:
        op = build(cls, c)
        grad, loss = op.gradient_and_loss()
        assert isinstance(grad, list)
        assert [g.shape for g in grad] == [p.shape for p in c.params]
        assert_list_close(grad, grad_ref)
        assert loss.ndim == 0 and loss.dtype == DT
        assert_close(loss, loss_ref)
        assert all(p.grad is None for p in c.params)


def test_bare_curvature_operator():
    c = make_case("mlp_ce")
    op = CurvatureLinearOperator(*c.tensors(), check_deterministic=False)
    grad_ref, loss_ref = gradient_and_loss(*c.tensors())
    grad, loss = op.gradient_and_loss()
    assert_list_close(grad, grad_ref)
    assert_close(loss, loss_ref)
    assert op._N_data == c.num_data
    assert op._block_sizes == [len(c.params)]
    assert op.SUPPORTS_BLOCKS is False and op.FIXED_DATA_ORDER is False
    assert op.SELF_ADJOINT is False
    with pytest.raises(NotImplementedError):
        op @ torch.ones(c.dim, dtype=DT)


def test_data_prediction_loss_gradient():
    c = make_case("dict_ce", "mean")
    op = HessianLinearOperator(*c.tensors(), **c.kwargs())
    results = list(op.data_prediction_loss_gradient())
    assert len(results) == len(c.data)
    total_loss = 0
    total_grad = [torch.zeros_like(p) for p in c.params]
    N = c.num_data
    for ((X, y), prediction, loss, gradient), (X_ref, y_ref) in zip(results, c.data):
        assert torch.equal(X["x"], X_ref["x"]) and torch.equal(y, y_ref)
        assert_close(prediction, c.model(X_ref).detach())
        w = X_ref["x"].shape[0] / N
        assert_close(loss, w * c.loss_func(c.model(X_ref), y_ref).detach())
        assert loss.ndim == 0 and not loss.requires_grad
        assert all(not g.requires_grad for g in gradient)
        total_loss = total_loss + loss
        total_grad = [a + g for a, g in zip(total_grad, gradient)]
    grad_ref, loss_ref = gradient_and_loss(c.model, c.loss_func, c.params, c.data, c.batch_size_fn)
    assert_close(total_loss, loss_ref)
    assert_list_close(total_grad, grad_ref)

    # without a loss function (Jacobian) loss and gradient are None; no gradient_and_loss
    J = JacobianLinearOperator(*_jac_args(c), **c.kwargs())
    for (_, _), prediction, loss, gradient in J.data_prediction_loss_gradient(desc="x"):
        assert prediction is not None and loss is None and gradient is None
    with pytest.raises(ValueError, match=r"(?i)loss"):
        J.gradient_and_loss()


@pytest.mark.parametrize("cls", ALL_OPERATORS)
def test_num_data_and_stored_attributes(cls):
    c = make_case("dict_ce", "mean")
    op = build(cls, c)
    assert op._N_data == c.num_data == 9
    assert op._model_func is c.model
    assert len(op._params) == len(c.params)
    assert all(a is b for a, b in zip(op._params, c.params))
    assert op._data is c.data
    assert op._batch_size_fn is c.batch_size_fn
    assert op._progressbar is False
    if cls not in JACOBIANS:
        assert op._loss_func is c.loss_func
    op2 = build(cls, c, num_data=9)
    assert op2._N_data == 9
    # default batch size: X.shape[0]
    c2 = make_case("cnn_mse")
    assert build(cls, c2)._N_data == 9


@pytest.mark.parametrize("cls", ALL_OPERATORS)
def test_progressbar(cls, capsys):
    c = make_case("mlp_bce", "sum")
    op = build(cls, c, progressbar=True)
    op @ torch.ones(op.shape[1], dtype=DT)
    err = capsys.readouterr().err
    assert cls.__name__ in err
    assert "cpu" in err
    assert op._progressbar is True


@pytest.mark.parametrize(
    "cls, reference",
    [
        (HessianLinearOperator, hessian),
        (GGNLinearOperator, ggn),
        (EFLinearOperator, empirical_fisher),
        (JacobianLinearOperator, lambda m, loss, p, d, bs: jacobian(m, p, d)),
    ],
)
@pytest.mark.parametrize("name", ["transformer_ce", "seq_bce"])
def test_float32(cls, reference, name):
    c64 = make_case(name, "mean")
    c32 = c64.converted(torch.float32)
    assert all(p.dtype == torch.float32 for p in c32.params)
    op = build(cls, c32)
    assert op.dtype == torch.float32
    v = torch.randn(op.shape[1], generator=_gen())
    result = op @ v
    assert result.dtype == torch.float32
    dense = densify(op)
    assert dense.dtype == torch.float32
    expected = reference(c64.model, c64.loss_func, c64.params, c64.data, c64.batch_size_fn)
    assert rel_fro_error(dense.double(), expected) < 1e-4


def test_float32_mc_fisher():
    c32 = make_case("mlp_ce").converted(torch.float32)
    F = FisherMCLinearOperator(*c32.tensors(), mc_samples=500)
    dense = densify(F)
    assert dense.dtype == torch.float32
    G = cached_reference("ggn", "mlp_ce")
    assert rel_fro_error(dense.double(), G) < 0.15


@pytest.mark.parametrize(
    "name, indices",
    [("mlp_ce", [2, 0]), ("transformer_ce", [8, 3, 1, 5]), ("dict_ce", [4, 0, 2])],
)
def test_parameter_subsets_and_order(name, indices):
    c = make_case(name, "mean")
    params = [c.params[i] for i in indices]
    args = (c.model, c.loss_func, params, c.data, c.batch_size_fn)
    for cls, reference in [
        (HessianLinearOperator, hessian),
        (GGNLinearOperator, ggn),
        (EFLinearOperator, empirical_fisher),
    ]:
        op = cls(c.model, c.loss_func, params, c.data, **c.kwargs())
        assert op._in_shape == [p.shape for p in params]
        assert_close(densify(op), reference(*args))
    J = JacobianLinearOperator(c.model, params, c.data, **c.kwargs())
    J_ref = jacobian(c.model, params, c.data)
    assert_close(densify(J), J_ref)
    assert_close(densify(J.adjoint()), J_ref.T)

    # MC-Fisher samples do not depend on the parameters: the subset is a sub-matrix
    F_full = densify(FisherMCLinearOperator(*c.tensors(), seed=3, **c.kwargs()))
    F_sub = densify(
        FisherMCLinearOperator(c.model, c.loss_func, params, c.data, seed=3, **c.kwargs())
    )
    offsets = numpy.cumsum([0] + [p.numel() for p in c.params])
    idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in indices])
    assert_close(F_sub, F_full[idx][:, idx])


def test_protected_helpers_and_self_adjointness():
    """Section 15: protected attributes downstream code relies on."""
    c = make_case("dict_ce", "mean")
    for cls in LOSS_OPERATORS:
        op = build(cls, c)
        assert op.adjoint() is op
        assert op.SELF_ADJOINT is True
        op._check_deterministic()  # deterministic setup: no error
        for X, y in c.data:
            B = X["x"].shape[0]
            assert op._get_normalization_factor(X, y) == pytest.approx(B / 9)
        assert len(list(op._loop_over_data())) == len(c.data)
    c_sum = make_case("mlp_ce", "sum")
    op = HessianLinearOperator(*c_sum.tensors())
    for X, y in c_sum.data:
        assert op._get_normalization_factor(X, y) == 1.0
    assert HessianLinearOperator.FIXED_DATA_ORDER is False
    assert GGNLinearOperator.FIXED_DATA_ORDER is False
    assert EFLinearOperator.FIXED_DATA_ORDER is False


def test_user_dict_inputs():
    """Dict-like X need not be a dict (any MutableMapping, e.g. HuggingFace BatchEncoding)."""
    c = make_case("dict_ce", "mean")
    c.data = [(UserDict(X), y) for X, y in c.data]
    H = HessianLinearOperator(*c.tensors(), **c.kwargs())
    assert_close(densify(H), cached_reference("hessian", "dict_ce", "mean"))
    J = JacobianLinearOperator(*_jac_args(c), **c.kwargs())
    J_ref = cached_reference("jacobian", "dict_ce")
    assert_close(densify(J), J_ref)
    assert_close(densify(J.adjoint()), J_ref.T)
    c.batch_size_fn = None
    with pytest.raises(ValueError, match=r"batch_size_fn"):
        HessianLinearOperator(*c.tensors())


def test_parameter_grads_untouched():
    c = make_case("mlp_ce")
    for cls in ALL_OPERATORS:
        op = build(cls, c)
        op @ torch.ones(op.shape[1], dtype=DT)
        if cls not in JACOBIANS:
            op.gradient_and_loss()
        assert all(p.grad is None for p in c.params)
    # existing gradients are left as they are
    for p in c.params:
        p.grad = torch.full_like(p, 3.0)
    HessianLinearOperator(*c.tensors()).gradient_and_loss()
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in c.params)


def test_device_dtype_properties():
    c = make_case("mlp_ce")
    H = HessianLinearOperator(*c.tensors())
    assert H.device == torch.device("cpu") and H.dtype == DT
    # mixed dtypes: RuntimeError from the properties
    model = nn.Linear(2, 2)
    model.bias.data = model.bias.data.double()
    data = [(torch.ones(3, 2), torch.ones(3, 2))]
    op = CurvatureLinearOperator(
        model, nn.MSELoss(), list(model.parameters()), data, check_deterministic=False
    )
    with pytest.raises(RuntimeError, match=r"dtype"):
        _ = op.dtype


# ------------------------------------------------------------------------------------------------
# Error paths of the data-driven operators
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("check_deterministic", [True, False])
@pytest.mark.parametrize("cls", LOSS_OPERATORS)
def test_reduction_none(cls, check_deterministic):
    c = make_case("mlp_ce")
    loss_func = nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(ValueError, match=r"none") as info:
        cls(c.model, loss_func, c.params, c.data, check_deterministic=check_deterministic)
    assert isinstance(info.value, KeyError)
    assert "reduction" in str(info.value)


@pytest.mark.parametrize("cls", ALL_OPERATORS + [CurvatureLinearOperator])
def test_empty_data(cls):
    c = make_case("mlp_ce")
    c.data = []
    with pytest.raises(ValueError, match=r"(?i)empty|no batch|at least one"):
        build(cls, c)


@pytest.mark.parametrize("cls", ALL_OPERATORS)
def test_dict_input_requires_batch_size_fn(cls):
    c = make_case("dict_ce")
    c.batch_size_fn = None
    with pytest.raises(ValueError, match=r"batch_size_fn"):
        build(cls, c)
    with pytest.raises(ValueError, match=r"batch_size_fn"):
        build(cls, c, check_deterministic=False)


class ChangingData:
    """Re-iterable whose batches differ on every pass (e.g. random augmentation)."""

    def __init__(self, data):
        self.data = data
        self.num_passes = 0

    def __iter__(self):
        self.num_passes += 1
        noise = 1e-2 * self.num_passes
        for X, y in self.data:
            yield X + noise, y


class ShuffledData:
    """Re-iterable that yields the same batches in a different order on every pass."""

    def __init__(self, data):
        self.data = data
        self.num_passes = 0

    def __iter__(self):
        self.num_passes += 1
        k = self.num_passes % len(self.data)
        yield from self.data[k:] + self.data[:k]


class WithDropout(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.dropout = nn.Dropout(p=0.5)

    def forward(self, X):
        return self.dropout(self.model(X))


# the message must name what differed between the two passes
ORDER_FREE_MATCH = r"loss|gradient|matvec|matrix-vector"  # no per-batch comparison
FIXED_ORDER_DATA_MATCH = r"\bX\b|input|prediction"  # per-batch comparison of X first


@pytest.mark.parametrize("cls", ALL_OPERATORS)
def test_nondeterministic_model(cls):
    c = make_case("mlp_bce")
    c.model = WithDropout(c.model).train()
    match = ORDER_FREE_MATCH if cls in SQUARE_EXACT else r"prediction|loss|gradient"
    with pytest.raises(RuntimeError, match=match):
        build(cls, c)
    build(cls, c, check_deterministic=False)  # no check, no error


@pytest.mark.parametrize("cls", ALL_OPERATORS)
def test_nondeterministic_data(cls):
    c = make_case("mlp_ce", "sum")
    c.data = ChangingData(c.data)
    match = ORDER_FREE_MATCH if cls in SQUARE_EXACT else FIXED_ORDER_DATA_MATCH
    with pytest.raises(RuntimeError, match=match):
        build(cls, c)


def test_nondeterministic_bare_base_class():
    """Steps 1-3 of the check run before the product: RuntimeError, not NotImplementedError."""
    c = make_case("mlp_bce")
    c.model = WithDropout(c.model).train()
    with pytest.raises(RuntimeError, match=ORDER_FREE_MATCH) as info:
        CurvatureLinearOperator(*c.tensors())
    assert not isinstance(info.value, NotImplementedError)
    c = make_case("mlp_ce")
    c.data = ChangingData(c.data)
    with pytest.raises(RuntimeError, match=ORDER_FREE_MATCH) as info:
        CurvatureLinearOperator(*c.tensors())
    assert not isinstance(info.value, NotImplementedError)


@pytest.mark.parametrize("cls", [FisherMCLinearOperator] + JACOBIANS)
def test_shuffled_data_fixed_order_operators(cls):
    c = make_case("mlp_ce", "sum")
    c.data = ShuffledData(c.data)
    with pytest.raises(RuntimeError, match=FIXED_ORDER_DATA_MATCH):
        build(cls, c)


@pytest.mark.parametrize(
    "cls, kind",
    [(HessianLinearOperator, "hessian"), (GGNLinearOperator, "ggn"), (EFLinearOperator, "ef")],
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_shuffled_data_allowed_for_order_free_operators(cls, kind, reduction):
    c = make_case("mlp_ce", reduction)
    c.data = ShuffledData(c.data)
    op = build(cls, c)
    assert_close(densify(op), cached_reference(kind, "mlp_ce", reduction))


def test_dataloader_as_data():
    """A DataLoader (re-iterable, fixed order, unequal last batch) works like a list."""
    c = make_case("mlp_ce", "mean")
    X = torch.cat([X for X, _ in c.data])
    y = torch.cat([y for _, y in c.data])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4)
    H = HessianLinearOperator(c.model, c.loss_func, c.params, loader)
    assert H._N_data == 9
    assert_close(densify(H), cached_reference("hessian", "mlp_ce", "mean"))
    J = JacobianLinearOperator(c.model, c.params, loader)
    assert_close(densify(J), cached_reference("jacobian", "mlp_ce"))


class RepartitionedData:
    """Re-iterable yielding the same examples, re-partitioned into batches on every pass."""

    def __init__(self, X, y, sizes=(3, 2, 4)):
        self.X, self.y, self.sizes = X, y, sizes
        self.num_passes = 0

    def __iter__(self):
        perm = torch.randperm(self.X.shape[0], generator=_gen(self.num_passes))
        self.num_passes += 1
        start = 0
        for size in self.sizes:
            idx = perm[start : start + size]
            yield self.X[idx], self.y[idx]
            start += size


def test_shuffling_with_batchnorm_detected():
    """Train-mode BatchNorm couples examples within a batch: re-partitioning changes the loss."""
    c = make_case("mlp_ce", "mean")
    X = torch.cat([X for X, _ in c.data])
    y = torch.cat([y for _, y in c.data])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model = model.double().train()
    data = RepartitionedData(X, y)
    with pytest.raises(RuntimeError, match=ORDER_FREE_MATCH):
        HessianLinearOperator(model, c.loss_func, list(model.parameters()), data)
    # without the coupling, re-partitioning does not change the mean risk: accepted
    H = HessianLinearOperator(c.model, c.loss_func, c.params, RepartitionedData(X, y))
    assert_close(densify(H), cached_reference("hessian", "mlp_ce", "mean"))


class _ScaledHessian(HessianLinearOperator):
    """Sets its state after the base constructor, which the hooks below need."""

    def __init__(self, *args, scale: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._scale = scale  # after super(): the data pass and the check come later

    def _get_in_shape(self):
        assert self._scale == 3.0
        return super()._get_in_shape()

    def _prepare_batch(self, X, y, ad=None):
        multiply = super()._prepare_batch(X, y) if ad is None else super()._prepare_batch(X, y, ad)
        return lambda M: [self._scale * t for t in multiply(M)]


def test_subclass_state_set_after_base_constructor_is_seen_by_construction():
    """Measuring the data, the spaces and the determinism check run after the subclass's
    constructor, so a subclass may set its state in any order."""
    c = make_case("mlp_ce", "mean")
    data = list(c.data)
    H = _ScaledHessian(c.model, c.loss_func, c.params, data, scale=3.0)
    assert "_init_depth" not in vars(H)
    assert H._N_data == c.num_data
    M = torch.randn(H.shape[1], 2, dtype=DT)
    assert_close(H @ M, 3.0 * (cached_reference("hessian", "mlp_ce", "mean") @ M))


def test_construction_errors_surface_at_construction():
    """Deferred measuring still raises in the constructor, e.g. for data without points."""
    c = make_case("mlp_ce", "mean")
    empty = [(X[:0], y[:0]) for X, y in c.data]
    with pytest.raises(ValueError, match="num_data must be positive"):
        HessianLinearOperator(c.model, c.loss_func, c.params, empty)


@pytest.mark.parametrize("cls", [GGNLinearOperator, JacobianLinearOperator])
def test_one_batch_graph_alive_at_a_time(cls):
    """A product holds one batch's recorded graph at a time (peak memory of one batch)."""
    import weakref

    c = make_case("mlp_ce", "mean")
    args = (c.model, c.params, c.data) if cls is JacobianLinearOperator else c.tensors()
    A = cls(*args, check_deterministic=False)
    alive, prepare = [], A._prepare_batch

    def counting_prepare(X, y, *rest):
        assert all(ref() is None for ref in alive), "previous batch's multiply still alive"
        multiply = prepare(X, y, *rest)
        alive.append(weakref.ref(multiply))
        return multiply

    A._prepare_batch = counting_prepare
    A @ torch.randn(A.shape[1], dtype=DT)
    assert len(alive) == len(c.data) > 1


class _LegacyBatchIdentity(CurvatureLinearOperator):
    """A downstream subclass of the 3.0.1 contract: only ``_matmat_batch``, ``M`` per batch."""

    SELF_ADJOINT = True

    def _matmat_batch(self, X, y, M):
        return [m.clone() for m in M]


def test_subclass_with_matmat_batch_of_the_3_0_1_contract_still_multiplies():
    c = make_case("mlp_ce", "mean")
    A = _LegacyBatchIdentity(*c.tensors())  # the determinism check multiplies, too
    M = torch.randn(A.shape[1], 3, dtype=DT)
    assert_close(A @ M, M)  # sum_b (B_b / N) M
    with pytest.raises(NotImplementedError, match="_LegacyBatchIdentity"):
        A.cache()
