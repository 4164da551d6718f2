"""Compiled versions of NAG's elementwise work, with the eager code as fallback and reference.

The combine (and the log-sum-exp merge before it on the joint-attention paths) is a chain of
elementwise operations and per-token reductions: memory-bound, so eager PyTorch spends most of
its time writing and re-reading intermediates. ``torch.compile`` (inductor: C++ on the CPU,
Triton on CUDA) fuses the chain into a few passes over the data.

:class:`CompiledFunction` wraps an eager function:

* it compiles on first use, once per process and input shape for the first few shapes (code for
  one shape is the fastest), then once more with dynamic shapes for all further ones;
* it calls the eager function (or a ``fallback`` with its result) instead for small inputs (fewer than
  :data:`MIN_ELEMENTS` in the largest tensor), when ``NAG_EAGER`` is set to ``1``/``true``/``yes``/``on``,
  when the caller is itself being traced by ``torch.compile`` (the user's compile then fuses the
  eager code into its own graph; compiling inside it would nest two compilers), or when
  compiling or running the compiled code failed before for the same device type and dtypes, or its
  result disagreed with the eager one;
* the first compiled call for each device type and dtypes checks itself: it also runs the eager code on
  the same inputs and keeps the compiled code only if the two agree (:func:`disagreement`), so that a
  compiler that miscompiles on a device never used before (a first GPU) costs one warning, not wrong images;
* Python floats among the arguments (settings) reach the compiled code as 0-d tensors, so that new
  values reuse it;
* a failure or a disagreement logs one warning (logger ``nag``) per function, device type and dtypes, and
  the call returns the eager result.
"""

from __future__ import annotations

import logging
import os
import threading
import types
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CompiledFunction", "disagreement", "eager_forced"]

logger = logging.getLogger("nag")

_TRUE = {"1", "true", "yes", "on"}
#: Calls whose largest tensor has fewer elements run the eager code: there a call takes about a millisecond
#: eager, and a compile (seconds) would not pay for itself within a generation (the shipped toy model, tests).
MIN_ELEMENTS = 1 << 18


def _largest(args: tuple[Any, ...]) -> int:
    """The number of elements of the largest tensor among ``args`` (nested in lists/tuples too)."""
    sizes = [arg.numel() if isinstance(arg, torch.Tensor) else _largest(tuple(arg)) if isinstance(arg, (list, tuple))
             else 0 for arg in args]
    return max(sizes, default=0)


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


def _shapes(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What static compiled code is specialised to: each tensor's shape, dtype and device, and the other arguments
    (0-d tensors, the scalar settings, are data: left out)."""
    key: list[Any] = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            if arg.dim() > 0:
                key.append((tuple(arg.shape), arg.dtype, arg.device))
        elif isinstance(arg, (list, tuple)):
            key.append(_shapes(tuple(arg)))
        else:
            key.append(arg)
    return tuple(key)


def disagreement(out: Any, expected: Any) -> str:
    """How a compiled result differs from the eager one beyond rounding ("" where it does not): another shape or
    dtype, non-finite values elsewhere, or a difference above 1e-3 (float32 / float64) or 5e-2 (half precision) of
    the eager result's largest entry. What rounding and another order of operations give stays far below; a wrong
    kernel does not."""
    if not isinstance(out, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return ""
    if out.shape != expected.shape or out.dtype != expected.dtype:
        return f"shape {tuple(out.shape)} {out.dtype} against {tuple(expected.shape)} {expected.dtype}"
    got, want = out.detach().float(), expected.detach().float()  # (float32: half the memory of float64)
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)):
        return "non-finite values where the eager result has none, or the reverse"
    if not bool(finite.any()):
        return ""
    largest = float(want[finite].abs().max())
    error = float((got[finite] - want[finite]).abs().max())
    relative = 1e-3 if expected.dtype in (torch.float32, torch.float64) else 5e-2
    return f"largest difference {error:.3g}, largest entry {largest:.3g}" if error > relative * largest else ""


def _renamed(function: Callable[..., Any], suffix: str) -> Callable[..., Any]:
    """A copy of ``function`` with its own code object: torch.compile keeps its compiled entries, and counts them
    against its recompile limit, per code object, so the static and the dynamic code do not share one count."""
    code = function.__code__.replace(co_name=f"{function.__code__.co_name}_{suffix}")
    copy = types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


class CompiledFunction:
    """``eager`` compiled on first use, with ``eager`` itself as the fallback (see the module's docstring).

    The first ``static_shapes`` distinct input shapes (and dtypes) of the process get code compiled for exactly
    that shape (on the CPU inductor vectorises it several times better than code for any token count; a pipeline
    calls the combine with the same few shapes in every step); further shapes share one dynamic-shape compile.
    Calling the object takes ``eager``'s arguments. ``fallback`` (default: ``eager``) is what runs instead of the
    compiled code: a function with ``eager``'s result that may branch on the data, which compiled code cannot.
    """

    def __init__(
        self, eager: Callable[..., Any], name: str, static_shapes: int = 4, fallback: Callable[..., Any] | None = None
    ) -> None:
        self.eager = eager
        self.fallback = fallback or eager
        self.name = name
        self.static_shapes = static_shapes  # (below torch.compile's default limit of 8 entries per function)
        self._static: Callable[..., Any] | None = None
        self._dynamic: Callable[..., Any] | None = None
        self._static_keys: set[tuple[Any, ...]] = set()
        self._failed: set[tuple[str, ...]] = set()
        self._checked: set[tuple[str, ...]] = set()  # (devices and dtypes whose compiled result matched the eager one)
        self._lock = threading.Lock()

    def use_compiled(self, args: tuple[Any, ...]) -> bool:
        """Whether a call with these arguments goes to the compiled code."""
        return self.wanted(_largest(args)) and _signature(args) not in self._failed

    @staticmethod
    def wanted(largest: int) -> bool:
        """Whether a call whose largest tensor has ``largest`` elements is one for the compiled code (unless compiling
        failed for its devices and dtypes): a caller that knows the size skips the call's bookkeeping otherwise."""
        return largest >= MIN_ELEMENTS and not eager_forced() and not torch.compiler.is_compiling()

    def compiled(self, args: tuple[Any, ...]) -> Callable[..., Any]:
        """The compiled function for these arguments: static-shape code while there is room for their shapes,
        else the dynamic-shape code (each created once; inductor compiles on a call it has no code for)."""
        key = _shapes(args)
        with self._lock:
            if key in self._static_keys or len(self._static_keys) < self.static_shapes:
                self._static_keys.add(key)
                if self._static is None:
                    self._static = torch.compile(self.eager, dynamic=False, fullgraph=True)
                return self._static
            if self._dynamic is None:
                self._dynamic = torch.compile(_renamed(self.eager, "dynamic"), dynamic=True, fullgraph=True)
            return self._dynamic

    def __call__(self, *args: Any) -> Any:
        if not self.use_compiled(args):
            return self.fallback(*args)
        # Python floats reach the compiled code as 0-d tensors: a tensor's value is data to the compiler, while a
        # float may be baked into the code (without a guard for some operations, so that a later call with another
        # value would silently reuse the first). The eager fallback gets the floats themselves.
        data = tuple(torch.tensor(arg, dtype=torch.float64) if isinstance(arg, float) else arg for arg in args)
        key = _signature(args)
        try:
            out = self.compiled(data)(*data)
        except Exception as error:  # noqa: BLE001 - any compiler failure must leave the eager result
            first_line = str(error).splitlines()[0] if str(error) else ""
            self._give_up(key, f"compiling it failed ({type(error).__name__}: {first_line})")
            return self.fallback(*args)
        if key not in self._checked:  # (first use for these devices and dtypes: the compiled code checks itself)
            expected = self.fallback(*args)
            problem = disagreement(out, expected)
            if problem:
                self._give_up(key, f"its compiled code disagrees with the eager code ({problem})")
                return expected
            self._checked.add(key)
        return out

    def _give_up(self, key: tuple[str, ...], why: str) -> None:
        """Use the eager code from now on for these devices and dtypes, with one warning line."""
        if key not in self._failed:
            self._failed.add(key)
            logger.warning("nag: %s for %s: %s; using the eager code instead", self.name, ", ".join(key), why)

    def reset(self) -> None:
        """Forget the compiled functions, the shapes and the remembered failures (after ``torch._dynamo.reset()``)."""
        with self._lock:
            self._static = self._dynamic = None
            self._static_keys.clear()
            self._failed.clear()
            self._checked.clear()
