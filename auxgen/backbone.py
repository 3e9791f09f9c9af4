"""Find the classifier of a user's model, by capability rather than by name.

auxgen needs two things from the user's model: the module that produces the primary
logits (the *classifier*) and the width of the features that feed it. A forward hook on
the classifier captures those features during the model's own forward, so the model runs
exactly as the user wrote it (``labeler(x)`` is ``model(x)``) and no functional copy of
the network is ever written.

Search order: an explicit ``classifier=`` (a name or a module); timm's
``get_classifier()``; torchvision's ``fc`` / ``classifier`` / ``heads`` / ``head``
attributes; otherwise the last ``nn.Linear`` registered in the model. A head container
resolves to its last ``nn.Linear``; one without any (torchvision SqueezeNet's Dropout, 1x1
``Conv2d``, ReLU, global pool) is hooked as a whole, and its input is a feature map
``(N, C, H, W)`` that the labeler pools globally.

The model's output need not be a tensor: :func:`primary_logits` finds the logits in a
``logits`` attribute or key (Hugging Face ``ModelOutput``, a dict) or the first element of
a tuple (torchvision GoogLeNet/Inception in training mode return named tuples).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "FeatureTap",
    "LogitsLocator",
    "OutputSpec",
    "check_output_spec",
    "classifier_out_features",
    "feature_dim_of",
    "find_classifier",
    "num_classes_of",
    "primary_logits",
    "replace_module",
]

#: How to pick the primary logits out of a model's output: ``None`` (by capability), a
#: key or attribute name, a tuple index, or a callable ``output -> logits``.
OutputSpec = Union[None, str, int, Callable[[Any], Tensor]]

_HEAD_ATTRS = ("fc", "classifier", "heads", "head", "last_linear")


def _last_linear(module: nn.Module) -> Optional[nn.Module]:
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


def _weighted_layers(module: nn.Module) -> list[nn.Module]:
    """The ``nn.Linear`` and convolution layers of ``module``, in registration order."""
    return [m for m in module.modules() if isinstance(m, (nn.Linear, _ConvNd))]


def classifier_out_features(classifier: nn.Module) -> Optional[int]:
    """Number of logits the classifier produces: its ``out_features`` (``nn.Linear`` and
    look-alikes), else the output width of the last ``Linear``/convolution inside it
    (``None`` if it has none).
    """
    own = getattr(classifier, "out_features", None)
    if isinstance(own, int) and not isinstance(own, bool):
        return own
    layers = _weighted_layers(classifier)
    if not layers:
        return None
    last = layers[-1]
    return int(last.out_features if isinstance(last, nn.Linear) else last.out_channels)


def _resolve(module: nn.Module) -> Optional[nn.Module]:
    """A head container (Sequential, timm ClassifierHead) resolves to its last Linear."""
    if isinstance(module, nn.Linear):
        return module
    if isinstance(module, nn.Identity):
        return None
    inner = _last_linear(module)
    return inner if inner is not None else module


def find_classifier(
    model: nn.Module, classifier: Union[str, nn.Module, None] = None
) -> tuple[str, nn.Module]:
    """Return ``(qualified_name, module)`` of the layer that produces the primary logits.

    Args:
        model: the user's classifier.
        classifier: optional explicit choice: a submodule or its qualified name
            (``"head.fc"``).

    Raises:
        ValueError: if no classifier can be found, saying what to pass instead.
    """
    names = {id(m): n for n, m in model.named_modules()}
    if classifier is not None:
        if isinstance(classifier, str):
            try:
                mod = model.get_submodule(classifier)
            except AttributeError:
                raise ValueError(
                    f"classifier={classifier!r} is not a submodule of the model; expected a "
                    "qualified name such as 'fc' or 'head.fc'"
                ) from None
            return classifier, mod
        if isinstance(classifier, nn.Module):
            if id(classifier) not in names:
                raise ValueError(
                    "classifier must be a submodule of the model (or its qualified name), got a "
                    f"{type(classifier).__name__} that is not part of it"
                )
            return names[id(classifier)], classifier
        raise TypeError(
            "classifier must be a module name (str) or an nn.Module, got "
            f"{type(classifier).__name__}"
        )
    candidates = []
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            head = get_classifier()
        except TypeError:  # a custom get_classifier that needs arguments: not timm's contract
            head = None
        if isinstance(head, nn.Identity):
            raise ValueError(
                f"{type(model).__name__}.get_classifier() is nn.Identity: the model has no "
                "classifier (created with num_classes=0?). Create it with num_classes=len(psi) "
                "or pass classifier= and feature_dim="
            )
        candidates.append(head)
    candidates += [getattr(model, a, None) for a in _HEAD_ATTRS]
    for cand in candidates:
        if isinstance(cand, nn.Module):
            mod = _resolve(cand)
            if mod is not None and id(mod) in names:
                return names[id(mod)], mod
    mod = _last_linear(model)
    if mod is not None:
        return names[id(mod)], mod
    raise ValueError(
        f"could not find the classifier of {type(model).__name__}: it has no nn.Linear, no "
        "timm get_classifier() and no fc/classifier/heads/head attribute. Pass classifier= "
        "(the name of the module that maps features to the primary logits) and feature_dim= "
        "(its input width), or append an nn.Linear head to a feature extractor"
    )


def feature_dim_of(model: nn.Module, classifier: nn.Module, feature_dim: Optional[int]) -> int:
    """Width (channels) of the features that feed ``classifier``.

    In order: ``feature_dim=`` when given; the classifier's own ``in_features``
    (``nn.Linear`` and look-alikes); the ``in_features`` / ``in_channels`` of the first
    ``nn.Linear`` or convolution in it; timm's ``head_hidden_size``, then ``num_features``.
    """
    layers = _weighted_layers(classifier)
    own = getattr(classifier, "in_features", None)
    inferred: Optional[int] = own if isinstance(own, int) and not isinstance(own, bool) else None
    if inferred is None and layers:
        first = layers[0]
        inferred = int(first.in_features if isinstance(first, nn.Linear) else first.in_channels)
    for attr in ("head_hidden_size", "num_features"):
        if inferred is None:
            value = getattr(model, attr, None)
            inferred = value if isinstance(value, int) and not isinstance(value, bool) else None
    if feature_dim is not None:
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim <= 0:
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        if isinstance(classifier, nn.Linear) and classifier.in_features != feature_dim:
            raise ValueError(
                f"feature_dim={feature_dim} does not match the classifier's in_features="
                f"{classifier.in_features}"
            )
        return feature_dim
    if inferred is None:
        raise ValueError(
            f"cannot infer the feature width of classifier {type(classifier).__name__}; "
            "pass feature_dim= (the size of the features that feed it)"
        )
    return int(inferred)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace submodule ``name`` (a qualified name) of ``root`` by ``new``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def check_output_spec(output: Any) -> OutputSpec:
    """Validate ``output=``: ``None``, a key (str), an index (int) or a callable."""
    if output is None or callable(output):
        return output
    if isinstance(output, str) or (isinstance(output, int) and not isinstance(output, bool)):
        return output
    raise TypeError(
        "output must be None, a key or attribute name (str), a tuple index (int) or a callable "
        f"mapping the model's output to the primary logits, got {type(output).__name__}"
    )


def _pick(out: Any, output: Union[str, int]) -> Any:
    if isinstance(output, str):
        if isinstance(out, Mapping):
            if output in out:
                return out[output]
        elif hasattr(out, output):
            return getattr(out, output)
        raise ValueError(
            f"output={output!r}: the model's output ({type(out).__name__}) has no such key or "
            "attribute"
        )
    try:
        return out[output]
    except (TypeError, IndexError, KeyError):
        raise ValueError(
            f"output={output!r}: cannot index the model's output ({type(out).__name__}) with it"
        ) from None


def primary_logits(out: Any, output: OutputSpec = None) -> Tensor:
    """The primary logits in a model's output.

    Args:
        out: what the model returned.
        output: ``None`` finds them by capability: ``out`` itself if it is a tensor, else its
            ``logits`` attribute or key, else the first element of a tuple or list (named
            tuples included); the rest of the output is ignored. A str picks that key or
            attribute, an int that element, a callable is applied to ``out``.

    Raises:
        TypeError: if no tensor is found, naming the type received and what to pass.

    Example:
        >>> import torch
        >>> z = torch.zeros(2, 3)
        >>> primary_logits({"logits": z, "hidden": None}) is z
        True
        >>> primary_logits((z, "aux")) is z
        True
        >>> primary_logits({"scores": z}, output="scores") is z
        True
    """
    if output is not None:
        picked = output(out) if callable(output) else _pick(out, output)
        if isinstance(picked, Tensor):
            return picked
        raise TypeError(
            f"output={output!r} picked a {type(picked).__name__} out of the model's output "
            f"({type(out).__name__}); it must give a Tensor of primary logits"
        )
    if isinstance(out, Tensor):
        return out
    found: Any = None
    if isinstance(out, Mapping):
        found = out.get("logits")
    elif hasattr(out, "logits"):
        found = out.logits
    elif isinstance(out, (tuple, list)) and len(out) > 0:
        found = out[0]
    if isinstance(found, Tensor):
        return found
    raise TypeError(
        f"the model returned a {type(out).__name__}, not a Tensor of primary logits, and none "
        "was found in it (a 'logits' attribute or key, or the first element of a tuple); pass "
        "output= (a key, an index or a callable mapping the model's output to the logits)"
    )


class FeatureTap:
    """The classifier's input, captured by a forward hook during forwards run through it.

    The hook exists only during :meth:`run`: nothing is left on the user's model (a whole
    ``torch.save(model)`` loads where auxgen is not installed, and wrapping a model twice
    does not stack hooks), and a user's own ``model(x)`` call never leaves its features
    (and their autograd graph) referenced here. A feature map ``(N, C,
    *spatial)`` with ``C == feature_dim`` is average-pooled globally; other shapes are
    flattened.

    Args:
        classifier: the module whose input is captured.
        name: its qualified name (for error messages).
        feature_dim: the expected width of the features.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> tap = FeatureTap(model[2], "2", feature_dim=3)
        >>> out, h = tap.run(lambda: model(torch.randn(5, 4)))
        >>> tuple(out.shape), tuple(h.shape)
        ((5, 2), (5, 3))
    """

    def __init__(
        self,
        classifier: nn.Module,
        name: str,
        feature_dim: int,
        locator: Optional[LogitsLocator] = None,
    ) -> None:
        self.name = name
        self.feature_dim = feature_dim
        self.features: Optional[Tensor] = None
        self.output: Any = None
        self.classifier = classifier
        self.locator = locator

    def _capture(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        self.features, self.output = inputs[0], output

    def run(self, forward: Callable[[], Any]) -> tuple[Any, Tensor]:
        """Run ``forward()`` (a forward of the model); return its output and the features."""
        self.features = None
        handle = self.classifier.register_forward_hook(self._capture)
        try:
            out = forward()
        finally:
            handle.remove()
        h, cls_out, self.features, self.output = self.features, self.output, None, None
        if h is None:
            raise RuntimeError(
                f"the classifier '{self.name}' was not called during the model's forward; "
                "pass classifier= naming the module that produces the primary logits"
            )
        if self.locator is not None:
            self.locator.verify(out, cls_out)
        if h.dim() > 2:
            if h.shape[1] == self.feature_dim:  # a (N, C, *spatial) feature map: global pool
                h = h.mean(dim=tuple(range(2, h.dim())))
            else:
                h = h.flatten(1)
        if h.shape[1] != self.feature_dim:
            raise ValueError(
                f"the classifier's input has {h.shape[1]} features, expected feature_dim="
                f"{self.feature_dim}"
            )
        return out, h


def num_classes_of(
    name: str,
    classifier: nn.Module,
    num_classes: Optional[int],
    hints: Sequence[Optional[int]] = (),
) -> int:
    """The number of primary classes: ``num_classes=`` (checked against the classifier), else
    the classifier's outputs, else the first of ``hints`` (the tasks' ``len(psi)``).

    Example:
        >>> num_classes_of("fc", nn.Linear(4, 3), None)
        3
    """
    out_features = classifier_out_features(classifier)
    if num_classes is not None and out_features is not None and out_features != num_classes:
        raise ValueError(
            f"num_classes={num_classes} does not match the classifier '{name}' "
            f"({out_features} outputs)"
        )
    found = num_classes if num_classes is not None else out_features
    for hint in hints:
        found = found if found is not None else hint
    if found is None:
        raise ValueError(
            f"cannot tell the number of primary classes from the classifier '{name}': pass "
            "num_classes="
        )
    return int(found)


# ----------------------------------------------------------- which tensor is the logits
Path = tuple[Union[str, int], ...]


def _tensors(out: Any, path: Path = (), depth: int = 2) -> list[tuple[Path, Tensor]]:
    """Every tensor in a model's output: itself, or inside tuples, lists, mappings (HF's
    ``ModelOutput``), named tuples and dataclasses, to ``depth`` levels."""
    if isinstance(out, Tensor):
        return [(path, out)]
    if depth == 0:
        return []
    items: list[tuple[Union[str, int], Any]] = []
    if isinstance(out, Mapping):
        items = [(k, v) for k, v in out.items() if isinstance(k, (str, int))]
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    elif isinstance(out, (tuple, list)):
        items = list(enumerate(out))
    return [found for k, v in items for found in _tensors(v, (*path, k), depth - 1)]


def _follow(out: Any, path: Path) -> Any:
    for key in path:
        if isinstance(key, str) and not isinstance(out, Mapping):
            out = getattr(out, key)
        else:
            out = out[key]
    return out


def _same(a: Tensor, b: Tensor) -> bool:
    """``a`` is ``b`` or a view of the same memory (a flatten, a squeeze)."""
    return a is b or (a.numel() == b.numel() and a.data_ptr() == b.data_ptr() != 0)


def _derived(a: Tensor, b: Tensor, limit: int = 20_000) -> Optional[bool]:
    """Whether ``a`` was computed from ``b`` (its autograd graph reaches ``b``'s node);
    ``None`` when there is no graph to tell."""
    if a.grad_fn is None or b.grad_fn is None:
        return None
    target, seen, stack = b.grad_fn, set(), [a.grad_fn]
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is target:
            return True
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return False


def _shapes(cands: Sequence[tuple[Path, Tensor]]) -> str:
    return ", ".join(f"{list(p) or 'output'}: {tuple(t.shape)}" for p, t in cands)


class LogitsLocator:
    """Find the primary logits in a model's output, and check that they are the classifier's.

    Used as an ``output=`` spec (a callable ``output -> logits``). At the labeler's first
    forwards it :meth:`verify` what it picks against the output of the module treated as the
    classifier (captured by :class:`FeatureTap`): the logits must be that output (or a view
    of it) or be computed from it, with ``num_classes`` columns. A structured output
    (tuple, list, dict, ``ModelOutput``, named tuple, dataclass) is searched for that
    tensor, and the place found is used from then on. Afterwards only the width is checked.

    Args:
        output: the user's ``output=`` (``None``: search).
        classifier_name: the classifier's qualified name, for messages.
        num_classes: the number of primary classes.

    Example:
        >>> import torch
        >>> fc = nn.Linear(4, 3)
        >>> h = torch.randn(2, 4)
        >>> z = fc(h)
        >>> locator = LogitsLocator(None, "fc", 3)
        >>> locator.verify((h, z), z)  # a model returning (features, logits)
        >>> locator((h, z)) is z, locator.path
        (True, (1,))
    """

    def __init__(self, output: OutputSpec, classifier_name: str, num_classes: int) -> None:
        self.output = output
        self.classifier_name = classifier_name
        self.num_classes = num_classes
        self.path: Optional[Path] = None
        self.verified = False

    def __call__(self, out: Any) -> Tensor:
        if self.output is not None or self.path is None or isinstance(out, Tensor):
            return primary_logits(out, self.output)
        return _follow(out, self.path)

    def check_width(self, z: Tensor) -> None:
        """The logits must be ``(N, num_classes)`` (or ``(..., num_classes)``)."""
        if z.dim() < 2 or z.shape[-1] != self.num_classes:
            how = f"output={self.output!r}" if self.output is not None else "auxgen"
            raise ValueError(
                f"the primary logits that {how} found in the model's output have shape "
                f"{tuple(z.shape)}, expected (N, {self.num_classes}) (num_classes); pass "
                "output= (where the logits are in the model's output) or classifier= (the "
                "module that produces them)"
            )

    def verify(self, out: Any, cls_out: Any) -> None:
        """Check (and, for a structured output, locate) the logits against ``cls_out``."""
        if self.verified or not isinstance(cls_out, Tensor):
            if self.path is not None or self.output is not None or isinstance(out, Tensor):
                self.check_width(self(out))
            return
        if self.output is None and not isinstance(out, Tensor):
            self.path = self._locate(out, cls_out)
        z = self(out)
        self.check_width(z)
        if _same(z, cls_out):
            self.verified = True
            return
        derived = _derived(z, cls_out)
        if derived is None:  # no autograd graph (no_grad): check at a later forward
            return
        if not derived:
            raise ValueError(
                f"the primary logits (shape {tuple(z.shape)}) are not computed from the output "
                f"of '{self.classifier_name}', the module auxgen treats as the classifier "
                f"(shape {tuple(cls_out.shape)}): pass classifier= (the module that produces "
                "the logits) or output= (where they are in the model's output)"
            )
        self.verified = True

    def _locate(self, out: Any, cls_out: Tensor) -> Path:
        cands = _tensors(out)
        same = [p for p, t in cands if _same(t, cls_out)]
        if len(same) == 1:
            return same[0]
        fits = [(p, t) for p, t in cands if t.dim() >= 2 and t.shape[-1] == self.num_classes]
        derived = [p for p, t in fits if _derived(t, cls_out)]
        if len(derived) == 1:
            return derived[0]
        why = "several tensors" if len(same) > 1 or len(derived) > 1 else "no tensor"
        raise ValueError(
            f"cannot tell which part of the model's output ({type(out).__name__}) is the "
            f"primary logits: {why} of it come from the classifier '{self.classifier_name}' "
            f"(output shape {tuple(cls_out.shape)}); saw {_shapes(cands) or 'no tensors'}. "
            "Pass output= (a key, an index or a callable) or classifier="
        )
