"""PyTorch workarounds that the exact meta-gradient needs (private).

:mod:`auxgen.meta` takes its Jacobian-vector product by forward-mode AD or by a double
backward. Some PyTorch kernels have neither derivative formula, and PyTorch names a missing
formula only in the text of an error. The workarounds below change no value: each runs the
same function with ops that have both formulas, or reads which op was missing.

* **Attention** (:func:`exact_kernels`): the fused kernels of
  ``F.scaled_dot_product_attention`` have neither a forward-AD nor a double-backward
  formula, so both exact modes run attention with the math kernel (``SDPBackend.MATH``).
  This needs ``torch.nn.attention.sdpa_kernel`` (torch >= 2.3); on older torch, attention
  keeps its default kernel.
* **EmbeddingBag** (:class:`decomposed_ops`, :func:`_embedding_bag`): ``_embedding_bag``,
  the op behind ``F.embedding_bag`` and ``nn.EmbeddingBag`` (and its
  ``_embedding_bag_forward_only`` variant), has no forward-AD formula, and its backward ops
  (``_embedding_bag_backward``, ``_embedding_bag_dense_backward``, ...) none for a double
  backward, in torch 2.14 (the version tested). Within :class:`decomposed_ops` it runs as
  ``F.embedding`` plus a masked sum, mean or max over each bag (same values).
  ``scale_grad_by_freq`` and ``sparse`` only change how the gradient is stored and are
  ignored; calls with ``max_norm`` (an in-place renormalisation), with more than three
  positional arguments, or on a nested tensor are left to PyTorch.
* **RNNs** (:class:`decomposed_ops`, :func:`_cell_by_cell_rnns`): ``nn.LSTM``, ``nn.GRU``
  and ``nn.RNN`` run in fused kernels: oneDNN's ``mkldnn_rnn_layer`` on the CPU, cuDNN's
  ``_cudnn_rnn`` or, on ROCm, MIOpen's ``miopen_rnn`` on the GPU, which (with their
  backward ops) have neither formula in torch 2.14 (the version tested). For the duration of
  each ``torch.lstm`` / ``torch.gru`` / ``torch.rnn_tanh`` / ``torch.rnn_relu`` call within
  :class:`decomposed_ops`, the process-wide flags ``torch.backends.cudnn.enabled`` (which
  also governs MIOpen) and ``torch.backends.mkldnn.enabled`` are switched off, so that ATen
  runs the layer cell by cell with ops that have both formulas; they are restored as soon
  as the call returns.
* **Which op is missing** (:func:`missing_derivative`): PyTorch reports a missing formula
  as a ``NotImplementedError`` whose text names the op: "Trying to use forward AD with <op>
  that does not support it" (forward AD) or "the derivative for '<op>' is not implemented"
  (backward). For a custom ``autograd.Function`` without ``jvp`` the message (which contains
  "custom autograd.Function" and "jvp") does not name the Function, so
  :func:`_function_in_traceback` finds it in the frames of ``Function.apply`` /
  ``apply_jvp`` on the traceback. These are the messages of torch 2.14 (the version
  tested); an error worded otherwise is not recognised and propagates unchanged.
* **A backward that is not differentiable** (:func:`double_backward_error`): a custom
  ``autograd.Function`` whose backward detaches or is ``@once_differentiable`` leaves the
  double backward's dummy cotangent out of the graph, and autograd's ``RuntimeError`` does
  not name the Function; :func:`_custom_functions` finds the custom Functions in the graph,
  and the error becomes a ``NotImplementedError`` that :func:`missing_derivative` reads.
* **Autocast queries** (:func:`autocast_settings`): ``torch.is_autocast_enabled`` and
  ``torch.get_autocast_dtype`` take a device type from torch 2.4; older torch raises
  ``TypeError`` there and has per-device functions instead.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = [
    "DECOMPOSED_OPS",
    "autocast_settings",
    "decomposed_ops",
    "double_backward_error",
    "exact_kernels",
    "missing_derivative",
]

#: Ops without a forward-AD (or double-backward) formula that :class:`decomposed_ops`
#: replaces by exact compositions of ops that have one (names as PyTorch's errors spell them).
DECOMPOSED_OPS = frozenset(
    {
        "mkldnn_rnn_layer",
        "mkldnn_rnn_layer_backward",
        "_cudnn_rnn",
        "_cudnn_rnn_backward",
        "miopen_rnn",
        "miopen_rnn_backward",
        "_embedding_bag",
        "_embedding_bag_forward_only",
        "_embedding_bag_backward",
        "_embedding_bag_dense_backward",
        "_embedding_bag_sparse_backward",
        "_embedding_bag_per_sample_weights_backward",
    }
)


def autocast_settings(device_type: str) -> tuple[bool, torch.dtype]:
    """Whether autocast is on for ``device_type``, and its low-precision dtype."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4
        cpu = device_type == "cpu"
        on = torch.is_autocast_cpu_enabled() if cpu else torch.is_autocast_enabled()
        low = torch.get_autocast_cpu_dtype() if cpu else torch.get_autocast_gpu_dtype()
        return on, low


# ------------------------------------------------------------------------- kernels
try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def _math_attention() -> contextlib.AbstractContextManager[None]:
        return sdpa_kernel([SDPBackend.MATH])

except ImportError:  # pragma: no cover - older torch: attention keeps its default kernel

    def _math_attention() -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@contextlib.contextmanager
def exact_kernels(decompose: bool) -> Iterator[None]:
    """Math attention kernel, and the op decompositions when ``decompose``.

    Args:
        decompose: also enter :class:`decomposed_ops`.
    """
    with _math_attention(), decomposed_ops() if decompose else contextlib.nullcontext():
        yield


def _embedding_bag(
    input: Tensor,
    weight: Tensor,
    offsets: Optional[Tensor] = None,
    max_norm: Optional[float] = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: Optional[Tensor] = None,
    include_last_offset: bool = False,
    padding_idx: Optional[int] = None,
) -> Tensor:
    """``F.embedding_bag`` as ``F.embedding`` plus a masked reduction (same values).

    Bags of a 1-D input are laid out as rows of a padded ``(bags, longest)`` index matrix.
    ``scale_grad_by_freq`` and ``sparse`` change only how the backward is stored, not the
    function, so they are ignored; ``max_norm`` (an in-place renormalisation) is not
    supported here.
    """
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    psw = per_sample_weights
    if input.dim() == 2:
        idx = input
        valid = torch.ones_like(idx, dtype=torch.bool)
    else:
        assert offsets is not None
        n = input.numel()
        bags = offsets.numel() - (1 if include_last_offset else 0)
        starts = offsets[:bags]
        if include_last_offset:
            ends = offsets[1 : bags + 1]
        else:
            ends = torch.cat([offsets[1:bags], offsets.new_tensor([n])])
        lengths = ends - starts
        longest = int(lengths.max()) if bags > 0 else 0
        steps = torch.arange(longest, device=input.device)
        valid = steps[None, :] < lengths[:, None]
        pos = (starts[:, None] + steps[None, :]).clamp(0, max(n - 1, 0))
        if n == 0:
            return weight.new_zeros(bags, weight.shape[1])
        idx = input[pos]
        if psw is not None:
            psw = psw[pos]
    mask = valid if padding_idx is None else valid & (idx != padding_idx)
    e = F.embedding(idx, weight)
    m = mask.unsqueeze(-1).to(e.dtype)
    if mode == "sum":
        return (e * (m if psw is None else m * psw.unsqueeze(-1).to(e.dtype))).sum(1)
    if mode == "mean":
        return (e * m).sum(1) / m.sum(1).clamp(min=1)
    peak = e.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
    return torch.where(mask.any(1, keepdim=True), peak, torch.zeros_like(peak))


_RNNS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


@contextlib.contextmanager
def _cell_by_cell_rnns() -> Iterator[None]:
    """RNN layers without the fused oneDNN/cuDNN kernels: ATen then runs them cell by
    cell, with ops that have forward-AD and double-backward formulas."""
    cudnn, mkldnn = torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled
    torch.backends.cudnn.enabled = torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled = cudnn, mkldnn


class decomposed_ops(TorchFunctionMode):  # noqa: N801 - used as a context manager
    """Within this context, ``F.embedding_bag`` runs as :func:`_embedding_bag`, and RNN
    layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) cell by cell instead of in a fused
    oneDNN/cuDNN kernel: the same values, computed by ops that have forward-AD and
    double-backward formulas."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Optional[dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if name in _RNNS and func is getattr(torch._C._VariableFunctions, name, None):
            with _cell_by_cell_rnns():
                return func(*args, **kwargs)
        if func is F.embedding_bag and kwargs.get("max_norm") is None and len(args) <= 3:
            inp = args[0] if args else kwargs.get("input")
            if isinstance(inp, Tensor) and not inp.is_nested:
                return _embedding_bag(*args, **kwargs)
        return func(*args, **kwargs)


# ------------------------------------------------------------------ error messages
_FORWARD_AD = re.compile(r"forward AD with (\S+?) that does not support it")
_DERIVATIVE = re.compile(r"the derivative for '([^']+)' is not implemented")
_DOUBLE_BACKWARD = "double backward: "


def missing_derivative(exc: BaseException) -> Optional[str]:
    """The op whose missing derivative formula raised ``exc``, or ``None`` for other errors.

    Example:
        >>> missing_derivative(NotImplementedError(
        ...     "Trying to use forward AD with _embedding_bag that does not support it"))
        '_embedding_bag'
        >>> missing_derivative(ValueError("shapes do not match")) is None
        True
    """
    if not isinstance(exc, NotImplementedError):
        return None
    msg = str(exc)
    for pattern in (_FORWARD_AD, _DERIVATIVE):
        found = pattern.search(msg)
        if found:
            return found.group(1)
    if "custom autograd.Function" in msg and "jvp" in msg:
        name = _function_in_traceback(exc.__traceback__)
        return f"custom autograd.Function {name}" if name else "a custom autograd.Function"
    if msg.startswith(_DOUBLE_BACKWARD.rstrip()):
        return msg[len(_DOUBLE_BACKWARD) :].split(" is not differentiable")[0]
    return None


def _function_in_traceback(tb: Optional[TracebackType]) -> Optional[str]:
    """The custom ``autograd.Function`` whose (missing) ``jvp`` raised, from the frames of
    ``Function.apply`` / ``apply_jvp`` on the traceback."""
    name = None
    while tb is not None:
        for local in ("self", "ctx", "cls"):
            obj = tb.tb_frame.f_locals.get(local)
            fwd = getattr(obj, "_forward_cls", obj)
            if isinstance(fwd, type) and issubclass(fwd, torch.autograd.Function):
                name = fwd.__name__
        tb = tb.tb_next
    return name


def double_backward_error(out: Tensor, exc: RuntimeError) -> NotImplementedError:
    """The error to raise when the second backward of a double backward failed with ``exc``.

    A backward that autograd cannot differentiate (a custom ``autograd.Function`` whose
    backward detaches or is ``@once_differentiable``) leaves the dummy cotangent out of the
    graph; the message names the custom Functions in ``out``'s graph, in the form that
    :func:`missing_derivative` reads.

    Args:
        out: the output whose graph the first backward went through.
        exc: the error of the second backward.
    """
    names = _custom_functions(out)
    what = f"the backward of {', '.join(names)}" if names else "a backward"
    return NotImplementedError(f"{_DOUBLE_BACKWARD}{what} is not differentiable ({exc})")


def _custom_functions(out: Tensor, limit: int = 100_000) -> list[str]:
    """Names of the custom ``autograd.Function`` nodes in ``out``'s graph."""
    names: list[str] = []
    seen: set[int] = set()
    stack = [out.grad_fn]
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            fwd = getattr(type(node), "_forward_cls", None)
            name = fwd.__name__ if fwd is not None else type(node).__name__
            if name not in names:
                names.append(name)
        stack.extend(fn for fn, _ in node.next_functions)
    return names
