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

__all__ = ["ArgumentBinder", "call_signature", "forward_signature"]

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


_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class ArgumentBinder:
    """``signature.bind(*args, **kwargs).arguments`` as a dict, for a call made at every layer of every step: the
    common call (each argument once, by position or by name; extra names into ``**kwargs`` where the signature takes
    them; nothing for ``*args``) in a few dictionary operations, anything else through ``signature.bind`` (its
    errors included). Keys come in the call's order, not the signature's."""

    def __init__(self, signature: inspect.Signature):
        self.signature = signature
        parameters = list(signature.parameters.values())
        self._positional = tuple(p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self._names = frozenset(p.name for p in parameters if p.kind in _NAMED)
        self._required = frozenset(p.name for p in parameters if p.kind in _NAMED and p.default is p.empty)
        self._var_keyword = next((p.name for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        # (positional-only parameters: always the general path)
        self._simple = not any(p.kind is inspect.Parameter.POSITIONAL_ONLY for p in parameters)

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self._simple and len(args) <= len(self._positional):
            arguments = dict(zip(self._positional, args))
            extra = kwargs.keys() - self._names
            if not (kwargs.keys() & arguments.keys()) and (not extra or self._var_keyword is not None):
                if extra:
                    arguments.update((name, value) for name, value in kwargs.items() if name not in extra)
                    arguments[self._var_keyword] = {name: kwargs[name] for name in kwargs if name in extra}
                else:
                    arguments.update(kwargs)
                if self._required <= arguments.keys():
                    return arguments
        return dict(self.signature.bind(*args, **kwargs).arguments)
