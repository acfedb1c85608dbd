r"""KFAC's Kronecker units and their factors (a mixin of :class:`~curvlinops.KFACLinearOperator`).

The units (see :mod:`curvlinops._calls`) are found by the calls that use a weight; the
factors come from one :class:`~curvlinops._calls.CallPass` over the data (formulas in
:mod:`curvlinops._kfac_factors`); parameters without a unit get the diagonal fallback
(:mod:`curvlinops._fallback`) when ``fallback="diagonal"``.
"""

from typing import Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn

from curvlinops import _distributed
from curvlinops._calls import CallBatch, CallPass, Unit, Use, find_units, probe_units
from curvlinops._fallback import parameter_names
from curvlinops._kfac_factors import (
    accumulate,
    embedding_input_factor,
    unit_gradient_factor,
    unit_input_factor,
)
from curvlinops._layer_pass import CONV_MODULES
from curvlinops._losses import loss_strategy


class KFACUnitsMixin:
    """Units, the data pass and the factor computation of KFAC (and EKFAC)."""

    def _set_up_units(self, params: List[Tensor], model_func: nn.Module, fallback: str):
        """Set ``_mapping``, ``_modules``, ``_fallback_names`` and ``_units``.

        Raises:
            NotImplementedError: With ``fallback="error"``, if a parameter has no unit.
        """
        self._fallback = fallback
        self._modules = dict(model_func.named_modules())
        if fallback == "diagonal":
            self._mapping, missing = self._partition(params, model_func)
        else:
            self._mapping, missing = self.compute_parameter_mapping(params, model_func), []
        self._fallback_names = parameter_names(params, model_func, missing)
        self._units = self._find_units(params, model_func)

    @classmethod
    def _partition(cls, params: List[Tensor], model_func: nn.Module):
        """``(mapping, positions without Kronecker unit)`` for ``fallback="diagonal"``.

        A tied embedding table counts as without unit (its uses act on transposed sides).
        Without call units (EKFAC), only layers called through their own module forward
        keep theirs (not embeddings, attention projections or an attention's ``out_proj``).
        """
        mapping, units, missing = find_units(params, model_func, untie_embeddings=True)
        if cls._CALL_UNITS:
            return mapping, missing
        functional = {
            id(m.out_proj) for m in model_func.modules() if isinstance(m, nn.MultiheadAttention)
        }
        kept = {}
        for name, entry in mapping.items():
            module = units[name].module
            if units[name].kind == "embedding" or id(module) in functional:
                missing.extend(entry.values())
            elif isinstance(module, (nn.Linear, *CONV_MODULES)):
                kept[name] = entry
            else:
                missing.extend(entry.values())
        return kept, sorted(missing)

    def _demote_units(self):
        """Move units whose calls have no Kronecker factor to the diagonal fallback.

        One forward pass on the first batch shows the calls (a tied head used through
        ``F.linear``, slices of a packed projection, ...), see :func:`probe_units`.
        """
        batches = self._loop_over_data(desc="fallback probe")
        try:
            X, _ = next(batches)
        finally:
            batches.close()
        demoted = probe_units(self._model_func, self._units, X)
        positions = list(self._fallback_names)
        for name in demoted:
            positions.extend(self._mapping.pop(name).values())
            del self._units[name]
        self._fallback_names = parameter_names(self._params, self._model_func, sorted(positions))

    def _find_units(self, params: List[Tensor], model_func: nn.Module) -> Dict[str, Unit]:
        """The :class:`~curvlinops._calls.Unit` of every ``_mapping`` entry."""
        units = find_units(params, model_func, untie_embeddings=self._fallback == "diagonal")[1]
        for name, entry in self._mapping.items():
            if name not in units:  # modules-only mapping: a module sharing a tied tensor
                module = self._modules[name]
                kind = "conv" if isinstance(module, CONV_MODULES) else "linear"
                units[name] = Unit(name, kind, module)
                for role, position in entry.items():
                    setattr(units[name], role, params[position])
        return {name: units[name] for name in self._mapping}

    def _call_pass(self, desc: str) -> Iterator[CallBatch]:
        """One pass over the data collecting every use of every unit (see ``_calls``)."""
        forward_only = self._fisher == "forward-only"
        if not forward_only:
            self._start_pass()
        strategy = loss_strategy(self._loss_func)
        call_pass = CallPass(
            self._model_func,
            self._units,
            strategy.to_rows,
            strategy.flatten_labels,
            self.MAX_COLUMNS_PER_CHUNK,
            [self._params[i] for i in self._fallback_names],
        )
        vectors = None if forward_only else self._vectors
        yield from call_pass.run_calls(self._loop_over_data(desc=desc), vectors)

    def _unit_input_factor(
        self, name: str, uses: List[Use], batch_size: int, row_mask: Optional[Tensor] = None
    ) -> Optional[Tensor]:
        """A batch's input-factor contribution of a unit (``None`` without weight).

        ``row_mask`` (``[B, S]``) marks the output rows the loss counts (``ignore_index``).
        """
        unit = self._units[name]
        if unit.weight is None:
            return None
        reduce = self._approx == "reduce"
        if unit.kind == "embedding":
            if reduce:
                raise NotImplementedError(
                    f"nn.Embedding {name!r} supports kfac_approx='expand' only (averaged "
                    "one-hot inputs would give a dense vocabulary-sized factor)."
                )
            return embedding_input_factor(unit, uses, self._N_data, batch_size, row_mask)
        if len(uses) == 1 and uses[0].batch_first and row_mask is None:
            return self._input_factor(name, uses[0].x)
        joint = self._joint(name)
        return unit_input_factor(unit, uses, reduce, joint, self._N_data, batch_size, row_mask)

    def _row_mask(self, y: Tensor, batch_size: int) -> Optional[Tensor]:
        """``[B, S]`` mask of the output rows the loss counts, ``None`` if it counts all."""
        strategy = loss_strategy(self._loss_func)
        mask = strategy.counted_rows(strategy.flatten_labels(y))
        return None if mask is None else mask.reshape(batch_size, -1)

    def compute_kronecker_factors(self):
        """Compute the Kronecker factors with one pass over the data (resets the properties)."""
        self._reset_properties()
        self._input_covariances.clear()
        self._gradient_covariances.clear()
        self._fallback_diagonals.clear()
        A: Dict[str, Tensor] = {}
        G: Dict[str, Tensor] = {}
        D: Dict[str, Tensor] = {}
        reduce = self._approx == "reduce"
        with _distributed.agreement(self._process_group, "Computing Kronecker factors"):
            for batch in self._call_pass("compute_kronecker_factors"):
                if batch.fallback_squares is not None:
                    squares = dict(zip(self._fallback_names.values(), batch.fallback_squares))
                    accumulate(D, squares)
                batch_size = self._batch_size_fn(batch.X)
                row_mask = self._row_mask(batch.y, batch_size)
                for name, uses in batch.uses.items():
                    a = self._unit_input_factor(name, uses, batch_size, row_mask)
                    if a is not None:
                        accumulate(A, {name: a})
                    if batch.backpropagated:
                        unit = self._units[name]
                        g = unit_gradient_factor(unit, uses, reduce, self._joint(name))
                        accumulate(G, {name: g})
        _distributed.all_reduce_dict_(
            {"A": A, "G": G, "D": D}, self._process_group, "Summing factors"
        )
        if self._fisher == "forward-only":
            for name, entry in self._mapping.items():
                param = self._params[next(iter(entry.values()))]
                d_out = param.shape[1] if self._units[name].kind == "embedding" else param.shape[0]
                G[name] = torch.eye(d_out, dtype=self.dtype, device=self.device)
        missing = [
            n for n, e in self._mapping.items() if n not in G or ("weight" in e and n not in A)
        ]
        if missing:
            raise RuntimeError(
                f"The layers {missing} hold parameters in params but no call used them in the "
                "forward pass (their forward was never called), so KFAC cannot see their "
                "inputs and outputs. Remove their parameters from params."
            )
        self._input_covariances.update(A)
        self._gradient_covariances.update(G)
        for i, name in self._fallback_names.items():  # unused by the model: zero curvature
            self._fallback_diagonals[name] = D.get(name, torch.zeros_like(self._params[i]))
