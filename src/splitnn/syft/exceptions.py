"""Errors of the PySyft facade, named as in PySyft 0.2 so ``except`` clauses keep working."""

from __future__ import annotations

from splitnn.errors import SplitNNError, WorkerError

#: How a place that is not a worker is named: a tensor or module that was never sent.
LOCAL = "local"

_ADVICE = "Use a combination of .move(), .get(), and/or .send() to co-locate them to the same machine."


class TensorsNotCollocatedException(WorkerError):
    """An operation mixed tensors (or a module and a tensor) that live at different places.

    ``first`` and ``second`` are the two places: a worker's id, or ``"local"``
    for a tensor or module that was never sent (it is at the researcher).
    """

    def __init__(self, message: str, first: str, second: str) -> None:
        self.first, self.second = first, second
        super().__init__(f"{message} {_ADVICE}")

    @classmethod
    def for_call(cls, operation: str, first: str, second: str) -> TensorsNotCollocatedException:
        """Two tensors given to one operation (``nll_loss``, ``__add__``...) live at different places."""
        tried = f"call {operation} involving two tensors which are"
        return cls._apart(tried, "One tensor is on {} while the other tensor is on {}.", first, second)

    @classmethod
    def for_module(cls, module: str, module_at: str, tensor_at: str) -> TensorsNotCollocatedException:
        """A sent module was applied to a tensor somewhere else."""
        tried = f"apply a module ({module}) to a tensor which is"
        return cls._apart(tried, "The module is on {} while the tensor is on {}.", module_at, tensor_at)

    @classmethod
    def _apart(cls, tried: str, places: str, first: str, second: str) -> TensorsNotCollocatedException:
        message = f"You tried to {tried} not on the same machine! {places.format(where(first), where(second))}"
        return cls(message, first, second)


class UnsupportedFeatureError(SplitNNError, NotImplementedError):
    """A PySyft 0.2 feature that the facade does not provide; the message says what to use instead.

    Raised where the feature is asked for, so that code written for PySyft never
    trains differently without saying so. ``feature`` names it (``"sy.Plan"``,
    ``"send(..., inplace=True)"``); ``instead`` is the advice.
    """

    def __init__(self, feature: str, instead: str) -> None:
        self.feature, self.instead = feature, instead
        super().__init__(f"{feature}: a PySyft 0.2 feature that splitnn.syft does not provide; {instead}")


class UnsupportedAttributeError(UnsupportedFeatureError, AttributeError):
    """A PySyft 0.2 attribute (``sy.Plan``, ``ptr.share``) the facade does not provide.

    Also an ``AttributeError``, so ``hasattr`` and ``getattr(obj, name, default)``
    keep working.
    """


def where(place: str) -> str:
    """``worker 'alice'``, or the researcher for :data:`LOCAL`."""
    return "the researcher (local, never sent)" if place == LOCAL else f"worker {place!r}"
