"""Signatures of the callables NAG binds arguments to, read once per class.

``inspect.signature`` costs tens of microseconds; NAG binds a block's arguments at every block call and checks every
attention processor at ``nag.apply``. Functions defined on a class are read once per function; anything else (a
``forward`` replaced on the instance, a callable that is not a Python class's method) is read at each call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["call_signature", "forward_signature"]

_SIGNATURES: dict[Callable, inspect.Signature] = {}  # a class's function -> the signature of it, bound (self dropped)


def _bound_signature(function: Callable, bound: Callable) -> inspect.Signature:
    signature = _SIGNATURES.get(function)
    if signature is None:
        signature = _SIGNATURES[function] = inspect.signature(bound)
    return signature


def call_signature(obj: Any) -> inspect.Signature:
    """The signature of ``obj(...)`` (an attention processor)."""
    call = inspect.getattr_static(type(obj), "__call__", None)
    if not inspect.isfunction(call):
        return inspect.signature(obj.__call__)
    return _bound_signature(call, obj.__call__)


def forward_signature(module: torch.nn.Module) -> inspect.Signature:
    """The signature of ``module.forward`` (the class's, unless the instance replaced it)."""
    forward = module.forward
    function = getattr(forward, "__func__", None)
    if function is None or getattr(forward, "__self__", None) is not module or "forward" in module.__dict__:
        return inspect.signature(forward)
    return _bound_signature(function, forward)
