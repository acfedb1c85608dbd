r"""One data pass over the supported layers, shared by KFAC, EKFAC and the exact diagonals.

Per batch, one forward pass with hooks on the chosen ``nn.Linear`` and ``nn.Conv1d/2d/3d``
layers: a forward pre-hook hands each layer's (detached) input to a consumer callback right
away (e.g. to turn it into rows, or straight into a factor contribution), and a forward hook
keeps the *gradient edge* of the layer's output (:class:`OutputNode`), not the output
itself: its values are not kept alive, and in-place activations (``ReLU(inplace=True)``)
that later overwrite it leave the edge pointing at the layer (no copy is needed). Then *one*
call of ``torch.autograd.grad`` from the flattened output ``[R, C]`` to all layer outputs
backpropagates all the consumer's vectors ``[V, R, C]`` at once (``is_grads_batched``, in
chunks of at most ``max_columns``, written into one result per layer; the last chunk frees
the graph's saved tensors). Parameter ``.grad`` fields are never touched.

Memory of a batch: the forward graph, the consumer's per-layer quantities and the output
gradients of all layers, and one chunk of backward temporaries.

Layouts (the conventions every consumer relies on):

- layer *rows*: a ``Linear`` input ``[B, *S, d_in]`` becomes ``[B, prod(S), d_in]``; a
  convolution input becomes its patches ``[B, prod(O), (C_in/groups) prod(K)]`` (output
  locations row-major, patch entries ordered like the flattened weight);
- output-gradient rows: ``[V, B, prod(S), d_out]`` (a convolution's channels moved last).
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from curvlinops._autodiff import guarded_models
from curvlinops.kfac_utils import (
    _extract_averaged_patches_nd,
    _extract_patches_nd,
    _symmetric_padding,
)

CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Layer types whose weight and bias the Kronecker approximations (and the layer-wise exact
#: diagonals) support; 1-d and 3-d convolutions share the patch maths of 2-d ones.
LAYER_MODULES = (nn.Linear, *CONV_MODULES)

#: Computes the output-space vectors of a batch: ``vectors(X, y, output, f_flat, y_flat)``
#: returns ``[V, R, C]`` (already scaled), or ``None`` to skip the backward pass of the batch.
VectorFn = Callable[[object, Tensor, Tensor, Tensor, Tensor], Optional[Tensor]]


def is_supported_layer(module: nn.Module) -> bool:
    """Whether the layer pass supports ``module`` (Linear/Conv with zero padding)."""
    # patches assume zero padding
    return isinstance(module, LAYER_MODULES) and getattr(module, "padding_mode", "zeros") == (
        "zeros"
    )


def layer_rows(module: nn.Module, x: Tensor, reduce: bool) -> Tensor:
    """A layer input as rows ``[B, S, d_in]`` (``S = 1`` if ``reduce``: mean over positions).

    Args:
        module: The layer (Linear or convolution).
        x: Its input.
        reduce: Average over the positions sharing the weight.

    Returns:
        The rows (see the module docstring for the layout).
    """
    if isinstance(module, CONV_MODULES):
        args = (x, module.kernel_size, module.stride, module.padding, module.dilation)
        if reduce:
            return _extract_averaged_patches_nd(*args, module.groups).unsqueeze(1)
        return _extract_patches_nd(*args, module.groups)
    rows = rearrange(x, "b ... d -> b (...) d")
    return rows.mean(1, keepdim=True) if reduce else rows


def conv2d_patches_channels_first(module: nn.Conv2d, x: Tensor) -> Tensor:
    """A ``Conv2d`` input's patches per example, ``[B, d_in, L]`` (``F.unfold``'s layout).

    Avoids the transposing copy of all patches that :func:`layer_rows` makes (``L`` is the
    number of output locations).
    """
    if module.groups > 1:  # one input factor shared by the groups: average their channels
        x = rearrange(x, "b (g c) ... -> b g c ...", g=module.groups).mean(1)
    padding = _symmetric_padding(module.padding, module.kernel_size, module.dilation)
    return torch.nn.functional.unfold(
        x, module.kernel_size, module.dilation, padding, module.stride
    )


def output_gradient_rows(module: nn.Module, g: Tensor) -> Tensor:
    """Output gradients ``[V, B, *out]`` as rows ``[V, B, S, d_out]``."""
    if isinstance(module, CONV_MODULES):
        return rearrange(g, "v b c ... -> v b (...) c")
    return rearrange(g, "v b ... d -> v b (...) d")


@dataclass(eq=False)
class OutputNode:
    """A layer output as a target of differentiation, without its values.

    Holds the output's gradient edge (its ``grad_fn`` and output index), which stays valid
    when an in-place operation later overwrites the output, and its metadata for zero
    gradients of outputs the loss does not depend on.

    Attributes:
        edge: The ``torch.autograd.graph.GradientEdge`` of the output.
        shape: The output's shape.
        dtype: The output's dtype.
        device: The output's device.
    """

    edge: object
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, output: Tensor):
        """The node of ``output``, or ``output`` itself if it has no gradient edge."""
        if not output.requires_grad or output.grad_fn is None:
            return output
        return cls(get_gradient_edge(output), output.shape, output.dtype, output.device)


def backpropagate(
    f_flat: Tensor, nodes: List, cotangents: Tensor, max_columns: int, free_graph: bool = True
) -> List[Tensor]:
    """``[V, *node.shape]`` gradients of all vectors ``[V, R, C]`` for every node.

    The vectors go in chunks of at most ``max_columns`` (batched calls); each chunk's
    gradients are written into one preallocated result per node, so only one chunk of
    temporaries is alive besides the results. With ``free_graph``, the last chunk releases the
    graph's saved tensors.

    Args:
        f_flat: The flattened output ``[R, C]`` (a node of the graph).
        nodes: :class:`OutputNode` entries or tensors.
        cotangents: The vectors ``[V, R, C]``.
        max_columns: Most vectors per batched call.
        free_graph: Free the graph with the last chunk.

    Returns:
        The gradients, one per node (zeros for nodes the output does not depend on).
    """
    chunks = cotangents.split(max_columns)
    results: Optional[List[Tensor]] = None
    start = 0
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        grads = chunk_gradients(f_flat, nodes, chunk, not (last and free_graph))
        if len(chunks) == 1:
            return grads
        if results is None:
            results = [g.new_empty(cotangents.shape[0], *g.shape[1:]) for g in grads]
        for result, g in zip(results, grads):
            result[start : start + chunk.shape[0]].copy_(g)
        del grads
        start += chunk.shape[0]
    return results


@dataclass
class LayerBatch:
    """What the layer pass hands over for one batch.

    Attributes:
        X: The batch input.
        y: The batch labels.
        inputs: ``{name: input_fn(name, layer input)}`` for the requested layers.
        grads: ``{name: [V, B, S, d_out]}`` output-gradient rows of every hooked layer, or
            ``None`` if no vectors were backpropagated.
        reused: Names of hooked layers called more than once in the forward pass.
    """

    X: object
    y: Tensor
    inputs: Dict[str, Tensor] = field(default_factory=dict)
    grads: Optional[Dict[str, Tensor]] = None
    reused: List[str] = field(default_factory=list)


def _note_reuse(batch: LayerBatch, name: str):
    if name not in batch.reused:
        batch.reused.append(name)


class LayerPass:
    """The data pass over a model's supported layers (see the module docstring).

    Attributes:
        model: The network.
        layers: ``{name: module}`` of the layers whose outputs are differentiated.
        to_rows: Maps a batch output to its rows ``[R, C]`` (the loss strategy's view).
        flatten_labels: Maps labels to the rows' labels.
        max_columns: Most vectors backpropagated in one batched ``autograd.grad`` call.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Dict[str, nn.Module],
        to_rows: Callable[[Tensor], Tensor],
        flatten_labels: Callable[[Tensor], Tensor],
        max_columns: int,
    ):
        """Store the set-up; nothing runs yet."""
        self.model, self.layers = model, layers
        self.to_rows, self.flatten_labels = to_rows, flatten_labels
        self.max_columns = max_columns

    def run(
        self,
        batches: Iterable,
        input_names: List[str],
        input_fn: Callable[[str, Tensor], Tensor],
        vectors: Optional[VectorFn],
    ) -> Iterator[LayerBatch]:
        """One pass over ``batches``, yielding a :class:`LayerBatch` per batch.

        The model is locked and its buffers (e.g. BatchNorm's running statistics) restored
        after the pass, even on errors or when the consumer stops early.

        Args:
            batches: The ``(X, y)`` batches (e.g. an operator's data loop).
            input_names: Layers whose inputs are handed to ``input_fn``.
            input_fn: Maps a layer name and its detached input to what is kept.
            vectors: The output-space vectors to backpropagate, or ``None`` for a
                forward-only pass.

        Yields:
            The batch's layer quantities.
        """
        with guarded_models([self.model]):
            for X, y in batches:
                batch = LayerBatch(X, y)
                output, outputs = self._forward(batch, input_names, input_fn, vectors is not None)
                if vectors is not None and outputs:
                    batch.grads = self._backward(batch, output, outputs, vectors)
                elif vectors is not None:  # no hooked layer ran (consumers report it)
                    batch.grads = {}
                del output, outputs  # not kept alive while the consumer works on the batch
                yield batch

    def _forward(
        self, batch: LayerBatch, input_names, input_fn, need_grads: bool
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The hooked forward pass; returns the output and the kept layer outputs."""
        outputs: Dict[str, OutputNode] = {}

        def store_input(name):
            def hook(module, args):
                if len(args) != 1:
                    raise ValueError(
                        f"KFAC expects one positional input for module {name!r} "
                        f"({type(module).__name__}), got {len(args)}."
                    )
                if name in batch.inputs:
                    _note_reuse(batch, name)
                else:
                    batch.inputs[name] = input_fn(name, args[0].detach())

            return hook

        def store_output(name):
            def hook(module, args, layer_output):
                if name in outputs:
                    _note_reuse(batch, name)
                    return None
                # the edge, not the output: its values are not kept alive, and in-place
                # operations on it leave the edge at the layer
                outputs[name] = OutputNode.of(layer_output)
                return None

            return hook

        handles = []
        try:
            for name in input_names:
                handles.append(self.layers[name].register_forward_pre_hook(store_input(name)))
            if need_grads:
                for name, module in self.layers.items():
                    handles.append(module.register_forward_hook(store_output(name)))
            with torch.set_grad_enabled(need_grads):
                output = self.model(batch.X)
        finally:
            for handle in handles:
                handle.remove()
        return output, outputs

    def _backward(
        self, batch: LayerBatch, output: Tensor, outputs: Dict[str, OutputNode], vectors: VectorFn
    ) -> Optional[Dict[str, Tensor]]:
        """Backpropagate the batch's vectors to all layer outputs, in column chunks.

        The gradient rows of a convolution are a view of its channels-first gradients.
        """
        with torch.enable_grad():
            f_flat = self.to_rows(output)
            cotangents = vectors(batch.X, batch.y, output, f_flat, self.flatten_labels(batch.y))
            if cotangents is None:
                return None
            names = list(outputs)
            grads = backpropagate(f_flat, [outputs[n] for n in names], cotangents, self.max_columns)
        outputs.clear()
        return {n: output_gradient_rows(self.layers[n], g) for n, g in zip(names, grads)}


def chunk_gradients(
    f_flat: Tensor, nodes: List, chunk: Tensor, retain_graph: bool = True
) -> List[Tensor]:
    """``[V', *node.shape]`` gradients of one chunk of vectors (zeros if unused).

    ``nodes`` holds :class:`OutputNode` entries or tensors.
    """
    batched = chunk.shape[0] > 1
    grads = torch.autograd.grad(
        f_flat,
        [n.edge if isinstance(n, OutputNode) else n for n in nodes],
        chunk if batched else chunk[0],
        retain_graph=retain_graph,
        allow_unused=True,
        is_grads_batched=batched,
    )
    return [
        _zeros(node).expand(chunk.shape[0], *node.shape)
        if g is None
        else (g if batched else g.unsqueeze(0)).detach()
        for node, g in zip(nodes, grads)
    ]


def _zeros(node) -> Tensor:
    """Zeros shaped like a node (an :class:`OutputNode` or a tensor)."""
    if isinstance(node, OutputNode):
        return torch.zeros(node.shape, dtype=node.dtype, device=node.device)
    return torch.zeros_like(node)


def partition_parameters(
    params: List[Tensor], model_func: nn.Module
) -> Tuple[Dict[str, Dict[str, int]], List[int]]:
    """Map supported layers to the positions of their weight/bias in ``params``.

    Parameters are matched by object identity, like everywhere in the package.

    Args:
        params: The parameters.
        model_func: The network.

    Returns:
        ``{module_name: {"weight": position, "bias": position}}`` (present entries only), in
        the order of ``model_func.named_modules()``, and the positions of the parameters that
        belong to no supported layer.
    """
    positions = {id(p): i for i, p in enumerate(params)}
    mapping: Dict[str, Dict[str, int]] = {}
    for name, module in model_func.named_modules():
        if not is_supported_layer(module):
            continue
        entry = {}
        for kind in ("weight", "bias"):
            p = getattr(module, kind, None)
            if p is not None and id(p) in positions:
                entry[kind] = positions[id(p)]
        if entry:
            mapping[name] = entry
    found = {i for entry in mapping.values() for i in entry.values()}
    return mapping, [i for i in range(len(params)) if i not in found]


def map_parameters(params: List[Tensor], model_func: nn.Module) -> Dict[str, Dict[str, int]]:
    """:func:`partition_parameters`, requiring every parameter to belong to a supported layer.

    Raises:
        NotImplementedError: If a parameter is not the weight or bias of a supported layer
            (the message names the layer and its type).
    """
    mapping, missing = partition_parameters(params, model_func)
    if missing:
        raise_unsupported(params, model_func, missing, [c.__name__ for c in LAYER_MODULES])
    return mapping


def raise_unsupported(params: List[Tensor], model_func: nn.Module, missing: List[int], supported):
    """Raise the error naming the parameters at ``missing`` positions and their modules.

    Raises:
        NotImplementedError: Always.
    """
    missing_ids = {id(params[i]) for i in missing}
    owners = []
    for name, module in model_func.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in missing_ids:
                mode = getattr(module, "padding_mode", "zeros")
                detail = "" if mode == "zeros" else f", padding_mode={mode!r}"
                owners.append(f"{name}.{p_name} ({type(module).__name__}{detail})")
    where = ", ".join(owners) if owners else f"positions {missing} (not in the model)"
    raise NotImplementedError(
        f"KFAC supports parameters of {supported} (zero padding) only; unsupported: {where}. "
        "Remove these from params."
    )


def has_symmetric_padding(module: nn.Module) -> bool:
    """Whether a convolution's padding is symmetric (``'same'`` can need asymmetric padding)."""
    if not isinstance(module, CONV_MODULES) or module.padding != "same":
        return True
    return all(d * (k - 1) % 2 == 0 for k, d in zip(module.kernel_size, module.dilation))
