"""The one registry of methods: short name -> Explainer subclass."""
from __future__ import annotations

import inspect
import warnings

import torch

from saliency_audit.explainers.core.base import Explainer

_REGISTRY: dict[str, type[Explainer]] = {}
_METHODS_PACKAGE = "saliency_audit.explainers."  # the built-in methods' modules, which register as they load
_complete = False  # every method module imported (they load on the first look-up, not with the package)


def register(cls: type[Explainer]) -> type[Explainer]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} has no name")
    if not cls.__module__.startswith(_METHODS_PACKAGE):
        # a method of the caller's: the built-ins first, so a name of theirs taken is refused here, not by a
        # built-in module's import at the first look-up (which then failed every look-up after)
        _methods()
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"method {cls.name!r} is already registered by {_REGISTRY[cls.name].__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _methods() -> dict[str, type[Explainer]]:
    """The registry with every method module imported (explainers._import_methods): each registers
    its classes on import."""
    global _complete
    if not _complete:
        from saliency_audit.explainers import _import_methods
        _import_methods()
        _complete = True
    return _REGISTRY


def list_methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_methods())


def explainer_class(name: str) -> type[Explainer]:
    try:
        return _methods()[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(list_methods())}") from None


def method_parameters(name: str) -> dict[str, object]:
    """The options a method accepts, with their defaults."""
    params = inspect.signature(explainer_class(name).__init__).parameters
    return {k: p.default for k, p in params.items() if k not in ("self", "model")}


def asset_options() -> list:
    """The files the registered methods need, as run options (each name once: methods may share one)."""
    options = {}
    for cls in _methods().values():
        for option in cls.assets:
            options.setdefault(option.name, option)
    return list(options.values())


def get_explainer(name: str, model: torch.nn.Module, **options) -> Explainer:
    """Build the explainer registered as ``name`` for ``model`` with ``options``.

    Raises ValueError for an unknown method or an option the method does not take.
    """
    cls = explainer_class(name)
    accepted = method_parameters(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"method {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        )
    _warn_if_training(name, model)
    return cls(model, **options)


# Layers whose answer depends on the mode: in training mode dropout draws a new mask on every call and
# batch norm normalises with the batch's statistics. (Not model.training: a torch.export graph says
# True whatever mode it was exported in, and refuses eval().)
_MODE_DEPENDENT = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)


def _warn_if_training(name: str, model) -> None:
    """A model handed over in training mode gives maps that change from call to call and with the
    batch, silently: say so (the job puts every model in eval mode; the Python API leaves it to the caller)."""
    modes = [m.training for m in model.modules() if isinstance(m, _MODE_DEPENDENT)] if isinstance(
        model, torch.nn.Module) else []
    if any(modes):
        warnings.warn(f"{name}: the model's dropout or batch norm layers are in training mode, so its maps change "
                      f"from call to call and with the batch; call model.eval() first", stacklevel=3)
