"""Compiled versions of NAG's elementwise work, with the eager code as fallback and reference.

The combine (and the log-sum-exp merge before it on the joint-attention paths) is a chain of
elementwise operations and per-token reductions: memory-bound, so eager PyTorch spends most of
its time writing and re-reading intermediates. ``torch.compile`` (inductor: C++ on the CPU,
Triton on CUDA) fuses the chain into a few passes over the data.

:class:`CompiledFunction` wraps an eager function:

* it compiles on first use (once per process; ``dynamic=True``, so new token counts and batch
  sizes reuse the compiled code instead of recompiling);
* it calls the eager function instead when ``NAG_EAGER`` is set to ``1``/``true``/``yes``/``on``,
  when the caller is itself being traced by ``torch.compile`` (the user's compile then fuses the
  eager code into its own graph; compiling inside it would nest two compilers), or when
  compiling or running the compiled code failed before for the same device type and dtypes;
* a failure logs one warning (logger ``nag``) per function, device type and dtypes, and the
  call returns the eager result.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable

import torch

__all__ = ["CompiledFunction", "eager_forced"]

logger = logging.getLogger("nag")

_TRUE = {"1", "true", "yes", "on"}


def eager_forced() -> bool:
    """Whether ``NAG_EAGER`` asks for the eager code everywhere (read on every call, so that it can be
    changed at run time)."""
    return os.environ.get("NAG_EAGER", "").strip().lower() in _TRUE


def _signature(args: tuple[Any, ...]) -> tuple[str, ...]:
    """The device types and dtypes of the tensors among ``args`` (nested in lists/tuples too; 0-d ones left out):
    what a failure is remembered by."""
    found: list[str] = []
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.dim() > 0:  # (0-d tensors are the scalar settings)
            found.append(f"{arg.device.type}:{arg.dtype}")
        elif isinstance(arg, (list, tuple)):
            found.extend(_signature(tuple(arg)))
    return tuple(found)


class CompiledFunction:
    """``eager`` compiled on first use, with ``eager`` itself as the fallback (see the module's docstring).

    ``options`` are passed to ``torch.compile``. Calling the object takes ``eager``'s arguments.
    """

    def __init__(self, eager: Callable[..., Any], name: str, **options: Any) -> None:
        self.eager = eager
        self.name = name
        self.options = {"dynamic": True, "fullgraph": True, **options}
        self._compiled: Callable[..., Any] | None = None
        self._failed: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()

    def use_compiled(self, args: tuple[Any, ...]) -> bool:
        """Whether a call with these arguments goes to the compiled code."""
        if eager_forced() or torch.compiler.is_compiling():
            return False
        return _signature(args) not in self._failed

    def compiled(self) -> Callable[..., Any]:
        """The compiled function (created once; inductor compiles on its first call)."""
        with self._lock:
            if self._compiled is None:
                self._compiled = torch.compile(self.eager, **self.options)
            return self._compiled

    def __call__(self, *args: Any) -> Any:
        if not self.use_compiled(args):
            return self.eager(*args)
        try:
            return self.compiled()(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure must leave the eager result
            key = _signature(args)
            if key not in self._failed:
                self._failed.add(key)
                logger.warning("nag: compiling %s failed for %s (%s: %s); using the eager code instead",
                               self.name, ", ".join(key), type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            return self.eager(*args)

    def reset(self) -> None:
        """Forget the compiled function and the remembered failures (after ``torch._dynamo.reset()``)."""
        with self._lock:
            self._compiled = None
            self._failed.clear()
