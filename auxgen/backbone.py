"""Find the classifier of a user's model, by capability rather than by name.

auxgen needs two things from the user's model: the module that produces the primary
logits (the *classifier*) and the width of the features that feed it. A forward hook on
the classifier captures those features during the model's own forward, so the model runs
exactly as the user wrote it (``labeler(x)`` is ``model(x)``) and no functional copy of
the network is ever written.

Search order: an explicit ``classifier=`` (a name or a module); timm's
``get_classifier()``; torchvision's ``fc`` / ``classifier`` / ``heads`` / ``head``
attributes; otherwise the last ``nn.Linear`` registered in the model.
"""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

__all__ = ["find_classifier", "feature_dim_of", "replace_module"]

_HEAD_ATTRS = ("fc", "classifier", "heads", "head", "last_linear")


def _last_linear(module: nn.Module) -> Optional[nn.Module]:
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


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
    """Width of the features that feed ``classifier``.

    ``nn.Linear`` knows it (``in_features``); otherwise ``feature_dim=`` or timm's
    ``num_features`` must say it.
    """
    inferred = getattr(classifier, "in_features", None)
    if inferred is None:
        inferred = getattr(model, "num_features", None)
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
