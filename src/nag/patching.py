"""What NAG puts on a pipeline instance besides its hooks, and how it comes off: wrapped methods that a copy of the
pipeline does not inherit, the progress bar that tells NAG a generation ended, tokenizer state kept as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["PatchedMethod", "MISSING", "Missing", "ClosingProgressBar", "tokenizer_state_kept"]


class PatchedMethod:
    """One of the pipeline methods NAG wraps (``_PATCHED_METHODS``), as an instance attribute. A deep copy or a saved
    copy of the pipeline gets the pipeline's own method back instead (what it had before ``apply``): the copy is
    stock and never calls into the original pipeline."""

    def __init__(self, wrapper: Any, pipe: Any, name: str, previous: Any):
        self._wrapper = wrapper
        self._pipe = pipe
        self._name = name
        self._previous = previous

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapper(*args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> tuple:
        return _unpatched, (self._pipe, self._name, self._previous)


def _unpatched(pipe: Any, name: str, previous: Any) -> Any:
    """The method ``name`` of a copied pipeline as it was before ``nag.apply``."""
    return getattr(type(pipe), name).__get__(pipe) if isinstance(previous, Missing) else previous


class Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING = Missing()


class ClosingProgressBar:
    """A pipeline's progress bar that calls ``on_close`` when its ``with`` block (or iteration) ends."""

    def __init__(self, bar: Any, on_close: Any):
        self._bar = bar
        self._on_close = on_close

    def __enter__(self) -> Any:
        return self._bar.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self._bar.__exit__(*exc)
        finally:
            self._on_close()

    def __iter__(self) -> Any:
        try:
            yield from self._bar
        finally:
            self._on_close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


@contextlib.contextmanager
def tokenizer_state_kept(pipe: Any) -> Iterator[None]:
    """Restore the padding/truncation state of the pipeline's fast tokenizers afterwards.

    A fast tokenizer keeps the settings of its last call, and ``save_pretrained`` writes them into
    ``tokenizer.json``: without this, encoding the negative prompt would make a pipeline that used
    NAG save different files from one that never did.
    """
    saved = []
    for component in getattr(pipe, "components", {}).values():
        backend = getattr(component, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "truncation") and hasattr(backend, "padding"):
            saved.append((backend, backend.truncation, backend.padding))
    try:
        yield
    finally:
        for backend, truncation, padding in saved:
            if truncation is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(**truncation)
            if padding is None:
                backend.no_padding()
            else:
                backend.enable_padding(**padding)
