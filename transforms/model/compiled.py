"""--compile: the model through torch.compile for the methods that allow it (``Explainer.compiles``:
not the ones that hook layers), and back to eager, in one warning line, when compilation fails.

Compilation is lazy (the first call of each input shape compiles, 1-2 minutes for a ResNet-50 on
a CPU), so it is tried on the workers' first batch, not in preflight; a failure there, in the
forward or in the backward graph, switches this worker to the eager model for good and reruns
what failed. Only errors raised by torch's compiler count as a compilation failure: an input the
model itself refuses fails in eager too and is the image's error, as without --compile.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("saliency_audit")
BACKEND = "inductor"  # torch.compile's backend (a test swaps in one that fails)
_COMPILER_MODULES = ("torch._dynamo", "torch._inductor", "torch._functorch")


def compile_failure(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) comes from torch's compiler stack."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__module__.startswith(_COMPILER_MODULES):
            return True
        error = error.__cause__ or error.__context__
    return False


class CompiledModel(nn.Module):
    """``model`` through torch.compile, until compilation fails; then ``model`` itself.

    The eager model is held, not registered, so this module's names and parameters are none of
    its own (the methods that read layer names never get it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "eager", model)
        self.failure: str | None = None
        try:
            object.__setattr__(self, "compiled", torch.compile(model, backend=BACKEND))
        except Exception as e:  # noqa: BLE001 - torch.compile unsupported here (a Python torch does not support)
            self.fall_back(e)

    @property
    def active(self) -> bool:
        return self.failure is None

    def fall_back(self, error: BaseException) -> bool:
        """Use the eager model from now on, with one warning line; False if it already was."""
        if self.failure is not None:
            return False
        root = error  # the compiler's own error, which torch wraps (BackendCompilerFailed's inner_exception)
        while (getattr(root, "inner_exception", None) or root.__cause__) is not None:
            root = getattr(root, "inner_exception", None) or root.__cause__
        first = (str(root).strip().splitlines() or [""])[0][:200]
        self.failure = f"{type(error).__name__}" + (f" ({type(root).__name__}: {first})" if root is not error
                                                     else f": {first}")
        log.warning("--compile: torch.compile failed (%s); running the model eagerly", self.failure)
        return True

    def forward(self, *args, **kwargs):
        if self.failure is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:
                if not compile_failure(e):
                    raise
                self.fall_back(e)
        return self.eager(*args, **kwargs)
