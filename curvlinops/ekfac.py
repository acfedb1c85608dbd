r"""Eigenvalue-corrected KFAC (EKFAC; George et al., 2018).

KFAC's block :math:`\mathbf{G} \otimes \mathbf{A}` has the eigenbasis :math:`\mathbf{Q}_G
\otimes \mathbf{Q}_A` and eigenvalues :math:`\lambda_G \lambda_A^\top`. EKFAC keeps the basis
and replaces the eigenvalues by the second moments of the per-example gradients rotated into
it, the Frobenius-optimal diagonal in that basis:

.. math::
    \boldsymbol{\Lambda} = \kappa \sum_n \big(\mathbf{Q}_G^\top \boldsymbol{\Gamma}_n
    \mathbf{Q}_A\big)^{\odot 2},\qquad
    \mathbf{V} \mapsto \mathbf{Q}_G \big((\mathbf{Q}_G^\top \mathbf{V} \mathbf{Q}_A) \odot
    \boldsymbol{\Lambda}\big) \mathbf{Q}_A^\top,

with per-example gradients :math:`\boldsymbol{\Gamma}_n = \sum_s \mathbf{g}_{n,s}
\mathbf{a}_{n,s}^\top` built from the same backpropagated vectors (and scaling
:math:`\kappa`) as KFAC's :math:`\mathbf{G}`; biases use :math:`\mathbf{Q}_G^\top \sum_s
\mathbf{g}_{n,s}`. Same-sized factors are decomposed in one batched ``eigh`` call (with a
float64 and then a damped fallback), and the correction takes one further pass over the data
(the same layer pass as KFAC's factors). Only 2-d model outputs (one loss term per datum) are
supported. The operator is the block-diagonal composition of one
:class:`~curvlinops._blocks.EigenbasisBlock` per layer, built from the live eigenvector and
eigenvalue dicts.
"""

from math import sqrt
from typing import Dict, List, Tuple, Union

import torch
from torch import Tensor, nn

from curvlinops import _distributed
from curvlinops._blocks import Block, EigenbasisBlock
from curvlinops._ekfac_correction import (
    batched_eigh,
    compute_eigenvalue_correction_linear_weight_sharing,
    eigenbasis_from_rows,
)
from curvlinops.kfac import FisherType, KFACLinearOperator, KFACType

__all__ = [
    "EKFACLinearOperator",
    "compute_eigenvalue_correction_linear_weight_sharing",
    "FisherType",
    "KFACType",
    "KFACLinearOperator",
]


class EKFACLinearOperator(KFACLinearOperator):
    r"""Eigenvalue-corrected Kronecker-factored approximation of the Fisher/GGN.

    Same constructor as :class:`~curvlinops.KFACLinearOperator` (``FisherType.FORWARD_ONLY``
    excluded). After the computation the eigenvectors live in
    ``_input_covariances_eigenvectors`` / ``_gradient_covariances_eigenvectors`` and the
    corrected eigenvalues in ``_corrected_eigenvalues`` (per module: a ``[d_out, d_in + 1]``
    tensor for a joint weight and bias, else ``{param_position: tensor}``); the raw factors
    are dropped to save memory.

    Attributes:
        SELF_ADJOINT: ``True``.
    """

    _SUPPORTED_FISHER_TYPE = (FisherType.TYPE2, FisherType.MC, FisherType.EMPIRICAL)
    _FACTOR_DAMPING = False
    #: EKFAC's correction pass sees modules only (module hooks): no call units.
    _CALL_UNITS = False

    def _initialize_storage(self):
        """KFAC's storage plus eigenvectors, corrected eigenvalues and cached activations."""
        super()._initialize_storage()
        self._input_covariances_eigenvectors: Dict[str, Tensor] = {}
        self._gradient_covariances_eigenvectors: Dict[str, Tensor] = {}
        self._corrected_eigenvalues: Dict[str, Union[Tensor, Dict[int, Tensor]]] = {}
        self._cached_activations: Dict[str, Tensor] = {}
        # scaled input rows of Linear layers whose factor rank is limited by the data
        self._rank_limited_rows: Dict[str, List[Tensor]] = {}

    # ----------------------------------------------------------------- computation
    def _vectors(self, X, y: Tensor, output: Tensor, f_flat: Tensor, y_flat: Tensor) -> Tensor:
        """KFAC's vectors, for 2-d outputs with 1-d or 2-d labels only.

        Raises:
            ValueError: For other outputs or labels.
        """
        if output.ndim != 2 or y.ndim not in (1, 2):
            raise ValueError(
                "Only 2d output with 1-d or 2-d labels is supported by EKFACLinearOperator, "
                f"got output {list(output.shape)} and labels {list(y.shape)}. Flatten sequence "
                "outputs inside the model, or use KFACLinearOperator."
            )
        return super()._vectors(X, y, output, f_flat, y_flat)

    def compute_kronecker_factors(self):
        """Compute KFAC's factors; the eigenbases and corrections are recomputed lazily."""
        self._input_covariances_eigenvectors.clear()
        self._gradient_covariances_eigenvectors.clear()
        self._corrected_eigenvalues.clear()
        self._rank_limited_rows = {
            name: []
            for name, entry in self._mapping.items()
            if "weight" in entry and isinstance(self._modules[name], nn.Linear)
        }
        super().compute_kronecker_factors()

    def _input_factor(self, name: str, x: Tensor) -> Tensor:
        """KFAC's input factor; also keeps the rows while fewer than half the dimension."""
        stash = self._rank_limited_rows.get(name)
        if stash is not None:
            rows = self._layer_rows(name, x, self._approx == KFACType.REDUCE)
            flat = rows.reshape(-1, rows.shape[-1]) * sqrt(1.0 / (self._N_data * rows.shape[1]))
            if sum(r.shape[0] for r in stash) + flat.shape[0] <= flat.shape[1] // 2:
                stash.append(flat)
            else:
                del self._rank_limited_rows[name]
        return super()._input_factor(name, x)

    def _unit_input_factor(self, name, uses, batch_size, row_mask=None):
        """KFAC's unit factor; a batch whose rows skip the stash ends the layer's stash."""
        if row_mask is not None or len(uses) != 1 or not uses[0].batch_first:
            # the rows of this batch do not pass _input_factor: the stash would be partial
            self._rank_limited_rows.pop(name, None)
        return super()._unit_input_factor(name, uses, batch_size, row_mask)

    def _compute_eigenbases(self):
        """Decompose all factors (same sizes batched) and drop the raw factors."""
        self._maybe_compute_kronecker_factors()
        # A factor of rank <= half its size (few data): its eigenbasis from the Gram matrix
        low_rank = {
            name: torch.cat(rows)
            for name, rows in self._rank_limited_rows.items()
            if rows and name in self._input_covariances
        }
        if self._process_group is not None:  # the stashed rows are this rank's only
            low_rank = {}
        self._rank_limited_rows = {}
        for name, rows in low_rank.items():
            self._input_covariances_eigenvectors[name] = eigenbasis_from_rows(rows)
        matrices = {("A", k): v for k, v in self._input_covariances.items() if k not in low_rank}
        matrices.update({("G", k): v for k, v in self._gradient_covariances.items()})
        decompositions = batched_eigh(matrices)
        for (side, name), (_, evecs) in decompositions.items():
            target = (
                self._input_covariances_eigenvectors
                if side == "A"
                else self._gradient_covariances_eigenvectors
            )
            target[name] = evecs
        _distributed.broadcast_dict_(  # bit-identical eigenbases on all ranks: rank 0's
            {
                "A": self._input_covariances_eigenvectors,
                "G": self._gradient_covariances_eigenvectors,
            },
            self._process_group,
            "Broadcasting eigenbases",
        )
        self._input_covariances.clear()
        self._gradient_covariances.clear()

    def compute_eigenvalue_correction(self):
        """Compute the corrected eigenvalues with one pass over the data."""
        self._reset_properties()
        if not self._gradient_covariances_eigenvectors:
            self._compute_eigenbases()
        self._corrected_eigenvalues.clear()
        input_names = [n for n, e in self._mapping.items() if "weight" in e]
        totals: Dict[Tuple[str, str], Tensor] = {}
        try:
            with _distributed.agreement(self._process_group, "The eigenvalue correction"):
                self._accumulate_corrections(input_names, totals)
        finally:  # activations are only cached during a batch, also after an error
            self._cached_activations = {}
        _distributed.all_reduce_dict_(totals, self._process_group, "Summing the correction")
        for name, kind, positions in self._layout():
            value = totals[(name, kind)]
            if kind == "joint":
                self._corrected_eigenvalues[name] = value
            else:
                self._corrected_eigenvalues.setdefault(name, {})[positions[0]] = value

    def _accumulate_corrections(self, input_names: List[str], totals: Dict):
        """The correction pass: sums the corrected eigenvalues per block into ``totals``."""
        layout = self._layout()
        for batch in self._layer_pass(
            input_names,
            lambda name, x: self._layer_rows(name, x, reduce=False),
            "compute_eigenvalue_correction",
        ):
            self._cached_activations = batch.inputs
            for name, kind, _ in layout:
                value = self._block_correction(
                    name, kind, batch.inputs.get(name), batch.grads[name]
                )
                key = (name, kind)
                totals[key] = value if key not in totals else totals[key] + value
            self._cached_activations = {}

    def _block_correction(self, name: str, kind: str, a, grads: Tensor) -> Tensor:
        """One batch's corrected eigenvalues of a block from rows ``a`` and gradients."""
        g = grads.reshape(-1, *grads.shape[2:])  # [V * B, S, d_out]
        Q_G = self._gradient_covariances_eigenvectors[name]
        if kind == "bias":
            return compute_eigenvalue_correction_linear_weight_sharing(g, Q_G, None, None)
        num_vectors = grads.shape[0]
        a = a.unsqueeze(0).expand(num_vectors, *a.shape).reshape(-1, *a.shape[1:])
        return compute_eigenvalue_correction_linear_weight_sharing(
            g, Q_G, a, self._input_covariances_eigenvectors[name]
        )

    def _maybe_compute_ekfac(self):
        """Compute eigenbases and corrected eigenvalues if missing."""
        if not self._corrected_eigenvalues:
            self.compute_eigenvalue_correction()

    def _block_eigenvalues(self, name: str, kind: str, positions: Tuple[int, ...]) -> Tensor:
        """Corrected eigenvalues of a block as ``[d_out, n]`` (``n = 1`` for a bias)."""
        stored = self._corrected_eigenvalues[name]
        value = stored if kind == "joint" else stored[positions[0]]
        return value.unsqueeze(-1) if kind == "bias" else value

    # ----------------------------------------------------------------- blocks
    def _layer_blocks(self) -> Dict[str, Block]:
        """One :class:`~curvlinops._blocks.EigenbasisBlock` per module (live eigenvalues)."""
        self._maybe_compute_ekfac()
        eigenvalues: Dict[str, Dict[str, Tensor]] = {name: {} for name in self._mapping}
        for name, kind, positions in self._layout():
            eigenvalues[name][kind] = self._block_eigenvalues(name, kind, positions)
        return {
            name: EigenbasisBlock(
                name,
                self._gradient_covariances_eigenvectors[name],
                self._input_covariances_eigenvectors.get(name),
                values,
            )
            for name, values in eigenvalues.items()
        }

    # ----------------------------------------------------------------- determinism
    def _has_factors(self) -> bool:
        return bool(self._corrected_eigenvalues) or super()._has_factors()

    def _factor_snapshot(self) -> Dict[str, Tensor]:
        self._maybe_compute_ekfac()
        return {
            f"corrected eigenvalues {n} ({k})": self._block_eigenvalues(n, k, p).clone()
            for n, k, p in self._layout()
        }

    def _recompute(self):
        self.compute_kronecker_factors()
        self._maybe_compute_ekfac()

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict:
        """KFAC's state dict plus eigenvectors, cached activations and eigenvalues.

        Returns:
            The state dict.
        """
        state = super().state_dict()
        state.update(
            {
                "input_covariances_eigenvectors": self._input_covariances_eigenvectors,
                "gradient_covariances_eigenvectors": self._gradient_covariances_eigenvectors,
                "cached_activations": self._cached_activations,
                "corrected_eigenvalues": self._corrected_eigenvalues,
            }
        )
        return state

    _EKFAC_KEYS = (
        "input_covariances_eigenvectors",
        "gradient_covariances_eigenvectors",
        "cached_activations",
        "corrected_eigenvalues",
    )

    def _validate_state_dict(self, state_dict: Dict):
        """KFAC's checks, then the EKFAC entries' keys and shapes; changes nothing.

        Raises:
            ValueError: See :meth:`KFACLinearOperator.load_state_dict`, or EKFAC entries of
                other layers or sizes.
        """
        super()._validate_state_dict(state_dict)
        missing = [key for key in self._EKFAC_KEYS if key not in state_dict]
        if missing:
            raise ValueError(f"The checkpoint is missing the EKFAC keys {missing}.")
        separate = state_dict["separate_weight_and_bias"]
        for key, what, input_side in (
            ("input_covariances_eigenvectors", "input eigenvectors", True),
            ("gradient_covariances_eigenvectors", "gradient eigenvectors", False),
        ):
            self._check_keys(state_dict[key], what, input_side)
            self._check_factor_shapes(state_dict[key], what, input_side, separate)
        if not isinstance(state_dict["cached_activations"], dict):
            raise ValueError(
                "The checkpoint's cached_activations must be a dict, got "
                f"{type(state_dict['cached_activations']).__name__}."
            )
        corrected = state_dict["corrected_eigenvalues"]
        if not isinstance(corrected, dict) or (corrected and set(corrected) != set(self._mapping)):
            raise ValueError(
                "The checkpoint's corrected eigenvalues have keys "
                f"{sorted(corrected) if isinstance(corrected, dict) else type(corrected)}, but "
                f"this operator expects {sorted(self._mapping)}: the checkpoint is from another "
                "model or parameter selection."
            )
        if corrected:
            self._check_corrected_eigenvalues(corrected, separate)

    def _check_corrected_eigenvalues(self, corrected: Dict, separate: bool):
        """Raise unless the corrected eigenvalues fit this operator's blocks and positions."""
        for name, entry in self._mapping.items():
            shapes = {}
            for kind, position in entry.items():
                param = self._params[position]
                shapes[position] = (
                    (param.shape[0], param[0].numel()) if kind == "weight" else (param.shape[0],)
                )
            value = corrected[name]
            if "weight" in entry and "bias" in entry and not separate:
                d_out, d_in = shapes[entry["weight"]]
                expected, actual = (d_out, d_in + 1), getattr(value, "shape", type(value))
                fits = isinstance(value, Tensor) and tuple(value.shape) == expected
            else:
                expected = shapes
                actual = (
                    {k: tuple(getattr(v, "shape", ())) for k, v in value.items()}
                    if isinstance(value, dict)
                    else type(value)
                )
                fits = isinstance(value, dict) and actual == expected
            if not fits:
                raise ValueError(
                    f"The checkpoint's corrected eigenvalues of module {name!r} are {actual}, "
                    f"but this operator needs {expected} (keyed by parameter position): the "
                    "checkpoint is from another parameter selection or order."
                )

    def _install_state_dict(self, state_dict: Dict):
        """KFAC's installation plus eigenvectors, cached activations and eigenvalues."""
        super()._install_state_dict(state_dict)
        self._input_covariances_eigenvectors = dict(state_dict["input_covariances_eigenvectors"])
        self._gradient_covariances_eigenvectors = dict(
            state_dict["gradient_covariances_eigenvectors"]
        )
        self._cached_activations = dict(state_dict["cached_activations"])
        self._corrected_eigenvalues = dict(state_dict["corrected_eigenvalues"])
