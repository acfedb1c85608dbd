r"""Hyper-parameter checks and checkpoints of the Kronecker-factored operators.

:class:`KFACStateMixin` gives :class:`~curvlinops.KFACLinearOperator` (and EKFAC) the
contract's ``state_dict`` / ``load_state_dict`` / ``from_state_dict``: everything is validated
(a dry run of the model's strict ``load_state_dict`` included) before anything changes.
"""

import warnings
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional

from torch import Tensor, nn

from curvlinops._losses import check_positive_integer, check_seed


def check_numeric_arguments(seed, mc_samples, num_per_example_loss_terms):
    """Range checks of the numeric constructor arguments.

    Raises:
        ValueError: If ``seed`` is not an integer seed, ``mc_samples`` is not a positive
            integer, or ``num_per_example_loss_terms`` is neither ``None`` nor a positive
            integer.
    """
    check_seed(seed)
    check_positive_integer(
        mc_samples, "mc_samples", "It is the number of Monte-Carlo samples per loss term."
    )
    if num_per_example_loss_terms is not None:
        check_positive_integer(
            num_per_example_loss_terms,
            "num_per_example_loss_terms",
            "It is the number of loss terms (output rows) per data point; pass None to "
            "infer it from the labels.",
        )


#: Checkpoint entries installed as they are, each into the attribute ``_<key>`` (``num_data``
#: into ``_N_data``).
_INSTALLED_KEYS = (
    "progressbar",
    "seed",
    "fisher_type",
    "mc_samples",
    "kfac_approx",
    "num_per_example_loss_terms",
    "separate_weight_and_bias",
    "num_data",
    "trace",
    "det",
    "logdet",
    "frobenius_norm",
)


class KFACStateMixin:
    """Checkpointing of a Kronecker-factored operator (see the module docstring)."""

    def state_dict(self) -> Dict:
        """Everything needed to restore the operator (model parameters included).

        Enum hyper-parameters are stored as their string values, so that the checkpoint only
        holds tensors and plain Python values and ``torch.load`` reads it with its default
        ``weights_only=True``.

        Returns:
            The state dict (see the contract for its keys).
        """
        return {
            "model_func_state_dict": self._model_func.state_dict(),
            "loss_type": type(self._loss_func).__name__,
            "loss_reduction": self._loss_func.reduction,
            "progressbar": bool(self._progressbar),
            "seed": int(self._seed),
            "fisher_type": self._fisher.value,
            "mc_samples": int(self._mc_samples),
            "kfac_approx": self._approx.value,
            "num_per_example_loss_terms": int(self._num_per_example_loss_terms),
            "separate_weight_and_bias": bool(self._separate_weight_and_bias),
            "num_data": int(self._N_data),
            "input_covariances": self._input_covariances,
            "gradient_covariances": self._gradient_covariances,
            "trace": self._trace,
            "det": self._det,
            "logdet": self._logdet,
            "frobenius_norm": self._frobenius_norm,
            **self._fallback_state(),
        }

    def _fallback_state(self) -> Dict:
        """The keys of ``fallback="diagonal"`` (none otherwise, as in 3.0.1)."""
        if getattr(self, "_fallback", "error") != "diagonal":
            return {}
        return {"fallback": "diagonal", "fallback_diagonals": self._fallback_diagonals}

    def _check_fallback_state(self, state_dict: Dict):
        """Raise if the checkpoint's fallback diagonals do not fit this operator."""
        theirs = state_dict.get("fallback", "error")
        if theirs != getattr(self, "_fallback", "error"):
            raise ValueError(
                f"The checkpoint has fallback={theirs!r}, this operator "
                f"fallback={getattr(self, '_fallback', 'error')!r}. Build it with the same "
                "fallback."
            )
        diagonals = state_dict.get("fallback_diagonals", {})
        if not diagonals:
            return
        expected = {name: self._params[i].shape for i, name in self._fallback_names.items()}
        if (
            not isinstance(diagonals, dict)
            or {k: v.shape for k, v in diagonals.items()} != expected
        ):
            raise ValueError(
                "The checkpoint's fallback diagonals do not match this operator's fallback "
                f"parameters {list(expected)} (names or shapes differ)."
            )

    def _check_keys(self, factors: Dict, what: str, input_side: bool):
        """Raise if a non-empty factor dict does not belong to this operator's layers."""
        expected = {n for n, e in self._mapping.items() if "weight" in e or not input_side}
        if not isinstance(factors, dict):
            raise ValueError(f"The checkpoint's {what} must be a dict, got {type(factors)}.")
        if factors and set(factors) != expected:
            raise ValueError(
                f"The checkpoint's {what} have keys {sorted(factors)}, but this operator "
                f"expects {sorted(expected)}: the checkpoint is from another model or "
                "parameter selection."
            )

    def _check_factor_shapes(self, factors: Dict, what: str, input_side: bool, separate: bool):
        """Raise if a factor does not have the size of its layer (checkpoint of other params)."""
        for name, factor in factors.items():
            entry = self._mapping[name]
            units = getattr(self, "_units", {})
            embedding = name in units and units[name].kind == "embedding"
            if input_side:
                weight = self._params[entry["weight"]]
                dim = weight[0].numel() + (0 if separate or "bias" not in entry else 1)
            else:
                dim = self._params[next(iter(entry.values()))].shape[0]
            expected = (dim, dim)
            if embedding:  # diagonal input factor [vocab], gradient factor [d, d]
                table = self._params[entry["weight"]]
                expected = (table.shape[0],) if input_side else (table.shape[1],) * 2
            if not isinstance(factor, Tensor) or tuple(factor.shape) != expected:
                shape = list(factor.shape) if isinstance(factor, Tensor) else type(factor)
                raise ValueError(
                    f"The checkpoint's {what} of module {name!r} has shape {shape}, but this "
                    f"operator's parameters need {list(expected)}: the checkpoint is from other "
                    "parameters or another separate_weight_and_bias setting."
                )

    def _check_model_state_dict(self, model_state: Dict):
        """Dry run of the model's strict ``load_state_dict``: keys and shapes, nothing copied.

        Raises:
            RuntimeError: With torch's wording ("Error(s) in loading state_dict for ...") if
                keys are missing or unexpected, or shapes differ.
        """
        if not isinstance(model_state, Mapping):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self._model_func).__name__}: "
                f"model_func_state_dict must be a mapping, got {type(model_state).__name__}."
            )
        current = self._model_func.state_dict()
        errors = []
        unexpected = [k for k in model_state if k not in current]
        missing = [k for k in current if k not in model_state]
        if unexpected:
            keys = ", ".join(f'"{k}"' for k in unexpected)
            errors.append(f"Unexpected key(s) in state_dict: {keys}. ")
        if missing:
            keys = ", ".join(f'"{k}"' for k in missing)
            errors.append(f"Missing key(s) in state_dict: {keys}. ")
        for key, value in model_state.items():
            if key not in current or not isinstance(current[key], Tensor):
                continue
            if not isinstance(value, Tensor):
                errors.append(
                    f'While copying the parameter named "{key}", expected torch.Tensor from '
                    f"checkpoint but received {type(value)}"
                )
            elif value.shape != current[key].shape:
                errors.append(
                    f"size mismatch for {key}: copying a param with shape {value.shape} from "
                    f"checkpoint, the shape in current model is {current[key].shape}."
                )
        if errors:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self._model_func).__name__}:\n\t"
                + "\n\t".join(errors)
                + "\nThe checkpoint is from another model; nothing was changed."
            )

    def _warn_overwrite(self, stacklevel: int = 3):
        warnings.warn(
            "Loading a KFAC state dict will overwrite the parameters of the model.",
            UserWarning,
            stacklevel=stacklevel,
        )

    def _validate_state_dict(self, state_dict: Dict):
        """All checks of :meth:`load_state_dict`, in the contract's order; changes nothing.

        Raises:
            ValueError: Missing keys, loss or reduction mismatch, invalid hyper-parameters,
                factors of other layers or sizes.
            RuntimeError: If the model's state dict does not fit the model.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}.")
        missing = sorted(set(KFACStateMixin.state_dict(self)) - set(state_dict))
        if missing:
            raise ValueError(f"The checkpoint is missing the keys {missing}.")
        self._check_model_state_dict(state_dict["model_func_state_dict"])
        if type(self._loss_func).__name__ != state_dict["loss_type"]:
            raise ValueError(
                f"Loss function mismatch: the checkpoint's loss is {state_dict['loss_type']}, "
                f"this operator's loss is {type(self._loss_func).__name__}. Load it into an "
                "operator built with the same loss."
            )
        if self._loss_func.reduction != state_dict["loss_reduction"]:
            raise ValueError(
                f"Loss reduction mismatch: the checkpoint's loss reduction is "
                f"{state_dict['loss_reduction']!r}, this operator's reduction is "
                f"{self._loss_func.reduction!r}. Load it into an operator whose loss has the "
                "same reduction."
            )
        fisher_type, kfac_approx = state_dict["fisher_type"], state_dict["kfac_approx"]
        if fisher_type not in self._SUPPORTED_FISHER_TYPE:
            raise ValueError(f"The checkpoint's fisher_type {fisher_type!r} is not supported.")
        if kfac_approx not in self._SUPPORTED_KFAC_APPROX:
            raise ValueError(f"The checkpoint's kfac_approx {kfac_approx!r} is not supported.")
        check_numeric_arguments(
            state_dict["seed"], state_dict["mc_samples"], state_dict["num_per_example_loss_terms"]
        )
        if state_dict["mc_samples"] != 1 and fisher_type != "mc":
            raise ValueError(
                f"The checkpoint's mc_samples={state_dict['mc_samples']} needs "
                f"fisher_type='mc', got {getattr(fisher_type, 'value', fisher_type)!r}."
            )
        check_positive_integer(state_dict["num_data"], "The checkpoint's num_data")
        separate = state_dict["separate_weight_and_bias"]
        self._check_keys(state_dict["input_covariances"], "input covariances", True)
        self._check_keys(state_dict["gradient_covariances"], "gradient covariances", False)
        self._check_factor_shapes(
            state_dict["input_covariances"], "input covariance", True, separate
        )
        self._check_factor_shapes(
            state_dict["gradient_covariances"], "gradient covariance", False, separate
        )
        self._check_fallback_state(state_dict)

    def _install_state_dict(self, state_dict: Dict):
        """Load the model's parameters and install the (validated) checkpoint."""
        self._model_func.load_state_dict(state_dict["model_func_state_dict"])
        for key in _INSTALLED_KEYS:
            setattr(self, "_N_data" if key == "num_data" else f"_{key}", state_dict[key])
        self._input_covariances = dict(state_dict["input_covariances"])
        self._gradient_covariances = dict(state_dict["gradient_covariances"])
        if "fallback_diagonals" in state_dict:
            self._fallback_diagonals = dict(state_dict["fallback_diagonals"])

    def load_state_dict(self, state_dict: Dict):
        """Restore a checkpoint (overwrites the model's parameters).

        Everything is checked before anything changes (a dry run of the model's strict
        ``load_state_dict`` included): on an error, the model and the operator are left as
        they were. Checkpoints written before enums were stored as strings load as well.

        Args:
            state_dict: A dict from :meth:`state_dict`.

        Raises:
            RuntimeError: If the model's state dict does not fit the model.
            ValueError: If loss, reduction, hyper-parameters or factors do not match this
                operator.
        """
        self._warn_overwrite()
        self._validate_state_dict(state_dict)
        self._install_state_dict(state_dict)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Dict,
        model_func: nn.Module,
        params: List[Tensor],
        data,
        check_deterministic: bool = True,
        batch_size_fn: Optional[Callable] = None,
    ) -> "KFACStateMixin":
        """Build an operator from a checkpoint.

        Args:
            state_dict: A dict from :meth:`state_dict`.
            model_func: The network (its parameters are overwritten).
            params: The parameters.
            data: The data.
            check_deterministic: Run the determinism check after loading.
            batch_size_fn: Number of data points of a batch input.

        Returns:
            The restored operator (of class ``cls``).
        """
        loss_classes = {c.__name__: c for c in cls._SUPPORTED_LOSSES}
        if state_dict.get("loss_type") not in loss_classes:
            raise ValueError(
                f"The checkpoint's loss_type {state_dict.get('loss_type')!r} is not one of "
                f"{sorted(loss_classes)}."
            )
        loss_func = loss_classes[state_dict["loss_type"]](reduction=state_dict["loss_reduction"])
        # the stored hyper-parameters are the constructor's keyword arguments of that name
        hyperparameters = {key: state_dict[key] for key in _INSTALLED_KEYS[:8]}
        op = cls(
            model_func,
            loss_func,
            params,
            data,
            check_deterministic=False,
            batch_size_fn=batch_size_fn,
            **hyperparameters,
            **({"fallback": "diagonal"} if state_dict.get("fallback") == "diagonal" else {}),
        )
        op.load_state_dict(state_dict)
        if check_deterministic:
            op._check_deterministic()
        return op
