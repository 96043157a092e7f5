"""A restricted unpickler for CompVis / Lightning ``.ckpt`` files, used as ``torch.load``'s ``pickle_module``.

Lightning checkpoints pickle more than tensors: callback objects, hyper-parameter namespaces, numpy scalars.
``torch.load(weights_only=True)`` refuses the whole file over them; a plain unpickler would import and run
whatever they name. Here :meth:`Unpickler.find_class` admits only what tensors and their containers are made of
(torch's tensor and parameter rebuild functions, storages, dtypes, ``torch.Size``, ``OrderedDict``, plain
builtins containers); any other global becomes a fresh :class:`Skipped` stub. The named module is never
imported, the named callable never called: a ``__reduce__`` that would run ``os.system`` only builds a stub
holding its arguments, and a pickled callback's state lands in a stub's ``__dict__``.
"""

from __future__ import annotations

import collections
import pickle
from typing import Any

import torch

_TORCH_UTILS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                "_rebuild_parameter_with_state", "_rebuild_meta_tensor_no_storage")  # fmt: skip
ALLOWED: dict[tuple[str, str], Any] = {
    **{
        ("torch._utils", name): getattr(torch._utils, name)
        for name in _TORCH_UTILS
        if hasattr(torch._utils, name)
    },
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Tensor"): torch.Tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}


class Skipped:
    """Stands in for a pickled object of a class (or a call of a function) we do not admit: it accepts any
    arguments and state and keeps them as data."""

    origin = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<skipped {self.origin}>"


def stub(module: str, name: str) -> type:
    """A new stub class standing for ``module.name`` (a class per name, so pickled class keys stay distinct)."""
    return type(f"Skipped[{module}.{name}]", (Skipped,), {"origin": f"{module}.{name}"})


class Unpickler(pickle.Unpickler):
    """Admits tensors, storages and plain containers; every other global is a :class:`Skipped` stub."""

    def find_class(self, module: str, name: str) -> Any:
        module = (
            "builtins" if module == "__builtin__" else module
        )  # protocol 2 (torch.save) writes Python 2 names
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return stub(module, name)


def load(file, **kwargs: Any) -> Any:
    """``pickle.load`` with the restricted :class:`Unpickler` (torch's legacy format reads headers this way)."""
    return Unpickler(file, **kwargs).load()


def load_checkpoint(path) -> Any:
    """A ``.ckpt`` / ``.pt`` file through the restricted unpickler (no code from the file runs)."""
    import sys

    return torch.load(path, map_location="cpu", pickle_module=sys.modules[__name__], weights_only=False)
