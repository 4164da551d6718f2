"""The NAG attention wrapper and what every mechanism shares.

Each wrapper holds the module's stock processor and, when the current denoiser call is guided,
calls it twice: once with the negative context for the guided rows (capturing the image queries'
attention output ``Z-`` just before the output projection) and once as stock with the positive
context, where the image queries' output ``Z+`` is replaced by ``nag_combine(Z+, Z-)`` before the
projection. The stock processor does all attention math (projections, norms, RoPE, masks,
backends), so every processor a family uses keeps working. When the call is not guided the stock
processor runs with the stock arguments, untouched.

The fast paths (subclasses in the mechanism modules) do the attention math themselves for the stock processors they
know, with the helpers at the end of this module: projections per head, rotary tables, output projections.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from ..combine import nag_combine
from ..fused import merge_and_combine
from ..kernels import attention
from ..signatures import ArgumentBinder, call_signature
from ..state import GuidedCall, NAGRuntime, NegativeText
from .placement import AttentionPlacement, backend_name, fast_placement


class StandIn:
    """Stands in for ``target``, with the attributes ``replaced``; every other attribute is the target's (read
    through the instance's ``__dict__``: ``torch.compile`` traces that, also where the user compiles with
    ``fullgraph=True``)."""

    def __init__(self, target: Any, /, **replaced: Any):
        self._target = target
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_target"], name)


class ProjectionTap(StandIn):
    """The output projection as a processor sees it: calls go through ``fn``; attributes
    (``weight``, ``bias``, ...) are the real layer's."""

    def __init__(self, layer: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(layer, _fn=fn)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self._fn(z)


class OutputProjectionView(StandIn):
    """Stands in for an attention module, routing its ``to_out[0]`` through ``project``."""

    def __init__(self, module: torch.nn.Module, project: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(module, to_out=[ProjectionTap(module.to_out[0], project), *list(module.to_out)[1:]])


def split_rows(mask: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    if mask is None or mask.shape[0] == 1:
        return mask
    return mask[rows]


def slice_text_rotary(rotary: Any, text_len: int, padded_text_len: int) -> Any:
    """Rotary tables for ``[text[:text_len], image]`` out of tables built for ``[text[:padded], image]``."""
    if rotary is None or text_len == padded_text_len:
        return rotary
    if isinstance(rotary, (tuple, list)):
        return type(rotary)(slice_text_rotary(r, text_len, padded_text_len) for r in rotary)
    return torch.cat([rotary[:text_len], rotary[padded_text_len:]], dim=0)


def rotary_for(
    arguments: dict[str, Any], name: str, text_len: int, padded_text_len: int, split: bool = False
) -> dict[str, Any]:
    """The rotary-table argument for a branch whose text is ``text_len`` long (empty if the call has none).

    ``split``: the tables come as ``(image, text)`` (Qwen-Image) rather than one table over
    ``[text, image]``; text positions start at the same place for every length.
    """
    if name not in arguments:
        return {}
    rotary = arguments[name]
    if split and rotary is not None:
        image, text = rotary
        return {name: (image, text[:text_len])}
    return {name: slice_text_rotary(rotary, text_len, padded_text_len)}


def pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], dim=1)


class NAGProcessor:
    """Base wrapper: binds the stock processor's arguments by name and dispatches."""

    def __init__(self, stock: Any, runtime: NAGRuntime):
        self.stock = stock
        self.stock_kind = type(stock).__name__  # decides which fast path applies
        self.runtime = runtime
        self._signature = call_signature(stock)
        self._binder = ArgumentBinder(self._signature)
        self._var_positional = tuple(
            name for name, p in self._signature.parameters.items() if p.kind is inspect.Parameter.VAR_POSITIONAL
        )
        # A stock processor with weights of its own (an IP-Adapter's) leaves the module tree while the wrapper is
        # installed (diffusers' set_processor), so `pipe.to(...)` and offloading no longer move it: it follows the
        # attention module's weights at each call instead.
        self._stock_weight = next(stock.parameters(), None) if isinstance(stock, torch.nn.Module) else None

    def __reduce_ex__(self, protocol: Any) -> Any:
        """``copy.deepcopy`` and ``torch.save`` of a guided model see the stock processor: the copy is stock."""
        return _itself, (self.stock,)

    # diffusers' ``set_attention_backend`` configures a module's processor: pass it to the stock one.
    @property
    def _attention_backend(self) -> Any:
        return getattr(self.stock, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.stock._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return getattr(self.stock, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.stock._parallel_config = value

    #: Stock processor kinds whose blocks a hook may run on the stock rows, the negative text beside them (the
    #: wrapper's fast path serves that text); none for the straightforward wrappers.
    split_text_processors: frozenset[str] = frozenset()
    #: Stock processor kinds whose math the wrapper's fast path reproduces (None: the fast path reuses the stock
    #: processor's own math, so it serves any); the straightforward wrappers have none.
    fast_processors: frozenset[str] | None = frozenset()

    #: Whether the fast path computes its attention through :meth:`placement`, so that it also runs under context
    #: parallelism (inside diffusers' parallel attention); the others take the straightforward path there.
    fast_under_parallelism: bool = False

    def placement(self) -> AttentionPlacement | None:
        """Where the fast path computes attention with NAG's kernels for this call, or None: take the straightforward
        path (:func:`~nag.attention.placement.fast_placement`)."""
        return fast_placement(self.stock, self.fast_under_parallelism)

    def takes_split_text(self) -> bool:
        """Whether a block hook may take the negative rows out of the block: this wrapper's fast path serves them
        (its stock processor is one it knows, on an attention backend it can stand in for)."""
        return self.stock_kind in self.split_text_processors and self.placement() is not None

    def follow_module(self, attn: torch.nn.Module) -> None:
        """Move the stock processor's own weights to the attention module's device and dtype where they differ."""
        reference = getattr(getattr(attn, "to_q", None), "weight", None)
        weight = self._stock_weight
        if reference is not None and (weight.device != reference.device or weight.dtype != reference.dtype):
            self.stock.to(device=reference.device, dtype=reference.dtype)
            self._stock_weight = next(self.stock.parameters())

    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self._stock_weight is not None:
            self.follow_module(attn)
        call = self.runtime.call
        if call is None:
            return self.stock(attn, *args, **kwargs)
        return self.guided(attn, call, self._binder.bind(attn, *args, **kwargs))

    def run_stock(self, attn: Any, arguments: dict[str, Any], **changes: Any) -> Any:
        arguments = {**arguments, **changes}
        arguments.pop("attn", None)
        for name in self._var_positional:  # (processors taking `*args` get none from NAG)
            arguments.pop(name, None)
        extra = arguments.pop("kwargs", {}) if "kwargs" in self._signature.parameters else {}
        return self.stock(attn, **arguments, **extra)

    def combine(self, call: GuidedCall, z_positive: torch.Tensor, z_negative: torch.Tensor) -> torch.Tensor:
        s = self.runtime.settings
        return nag_combine(z_positive, z_negative, s.scale, s.tau, s.alpha, norm=s.norm, eps=s.eps)

    def merge_and_combine(self, positive: list[tuple[torch.Tensor, torch.Tensor]],
                          negative: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """NAG on attention given in parts over disjoint key sets (``(out, lse)`` each, per branch), merged and
        combined in one pass (``nag.fused.merge_and_combine``): the guided rows' output, heads flattened. Each
        branch's first part is the image queries' attention over the image keys, which has a key for every query."""
        s = self.runtime.settings
        return merge_and_combine(
            positive, negative, s.scale, s.tau, s.alpha, norm=s.norm, eps=s.eps, first_complete=True
        )

    def guided_projection_inputs(
        self,
        attn: torch.nn.Module,
        call: GuidedCall,
        run_negative: Callable[[Any], Any],
        run_positive: Callable[[Any], Any],
        positive_image_start: int = 0,
        negative_image_start: int = 0,
        image_len: int | None = None,
    ) -> tuple[Any, Any]:
        """Run the negative pass capturing ``Z-`` at the output projection, then the positive pass
        with the guided rows' ``Z+`` replaced by the NAG combination.

        When the projection also sees text tokens (single-stream processors that project
        ``[text, image]`` together), the image tokens start at ``positive_image_start`` /
        ``negative_image_start`` in each pass (and are ``image_len`` long; None: to the end); only they are
        combined. The output projection is ``attn.to_out[0]``, or ``attn.to_out`` where that is one layer."""
        captured: dict[str, torch.Tensor] = {}
        single_layer = isinstance(attn.to_out, torch.nn.Linear)
        project = attn.to_out if single_layer else attn.to_out[0]
        view = FusedOutputView if single_layer else OutputProjectionView

        def tokens(start: int) -> slice:
            return slice(start, None if image_len is None else start + image_len)

        def capture(z: torch.Tensor) -> torch.Tensor:
            captured["z"] = z
            return project(z)

        def combine(z: torch.Tensor) -> torch.Tensor:
            z = z.clone()
            positive_tokens = tokens(positive_image_start)
            z[call.row_index, positive_tokens] = self.combine(
                call, z[call.row_index, positive_tokens], captured["z"][:, tokens(negative_image_start)]
            )
            return project(z)

        negative = run_negative(view(attn, capture))
        if "z" not in captured:
            raise RuntimeError(
                f"NAG cannot guide {type(attn).__name__} with {self.stock_kind}: the processor never calls "
                "attn.to_out, where NAG combines the attention outputs. Restore diffusers' processor "
                "(e.g. pipe.transformer.set_default_attn_processor()) or remove NAG."
            )
        positive = run_positive(view(attn, combine))
        return negative, positive

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        raise NotImplementedError


class BesideStockRows:
    """Mixin of the fast paths that serve a block run on the stock rows with the negative text beside it: a block
    hook took that text out of the block and left it in ``runtime.text_path``. Without it (another processor or
    backend elsewhere in the block, whole rows), the straightforward wrapper's path."""

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        path = self.runtime.text_path
        if path is None:
            return self.straightforward(attn, call, arguments)
        return self.guided_beside(attn, call, arguments, path)

    def straightforward(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        """The straightforward wrapper's path (the class after this mixin in the method resolution order)."""
        return super().guided(attn, call, arguments)

    def _placed(self) -> AttentionPlacement:
        """Where this call's attention runs: the block hook took the negative text out because it runs somewhere
        (:meth:`NAGProcessor.takes_split_text`)."""
        placement = self.placement()  # type: ignore[attr-defined]
        if placement is None:
            raise RuntimeError("NAG's block hook split the text for an attention its fast path cannot compute")
        return placement

    def guided_beside(
        self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any], path: NegativeText
    ) -> Any:
        raise NotImplementedError


def _itself(processor: Any) -> Any:
    """Rebuilds a copied or saved NAG wrapper as its stock processor (a copy of it, deep-copied or unpickled)."""
    return processor


def wrap_processor(cls: type[NAGProcessor], stock: Any, runtime: NAGRuntime) -> NAGProcessor:
    """Wrap ``stock`` so that modules which inspect their processor's signature (to filter
    keyword arguments) see the stock signature."""
    stock_call = type(stock).__call__
    sub = _WRAPPER_CLASSES.get((cls, stock_call))
    if sub is None:

        def __call__(self: NAGProcessor, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            return cls.__call__(self, attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(stock_call)  # type: ignore[attr-defined]
        sub = type(f"{cls.__name__}[{type(stock).__name__}]", (cls,), {"__call__": __call__})
        _WRAPPER_CLASSES[(cls, stock_call)] = sub
    return sub(stock, runtime)


_WRAPPER_CLASSES: dict[tuple[type, Any], type] = {}


class FusedOutputView(StandIn):
    """Stands in for an attention module whose ``to_out`` is one linear layer over ``[attention, MLP]``
    (Flux2's parallel single blocks), routing that layer's calls through ``project``."""

    def __init__(self, module: torch.nn.Module, project: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(module, to_out=ProjectionTap(module.to_out, project))


def branch_mask(mask: torch.Tensor, rows: slice, text_len: int, padded_text_len: int) -> torch.Tensor:
    """One branch's rows of a mask over ``[padded text, image]`` (keys on the last axis, queries
    on the one before when it has that length), restricted to ``[text[:text_len], image]``."""
    if mask.shape[0] > 1:
        mask = mask[rows]
    if text_len == padded_text_len:
        return mask
    length = mask.shape[-1]
    keep = torch.cat([torch.arange(text_len), torch.arange(padded_text_len, length)]).to(mask.device)
    mask = mask.index_select(-1, keep)
    if mask.ndim >= 3 and mask.shape[-2] == length:
        mask = mask.index_select(-2, keep)
    return mask


def default_backend(stock: Any) -> bool:
    """Whether the stock processor would run diffusers' default (native) attention on this process's tokens alone (no
    context parallelism): only then may a fast path that cannot run under parallelism compute with its own kernels."""
    return fast_placement(stock, under_parallelism=False) is not None


def native_backend(stock: Any) -> bool:
    """Whether the stock processor's attention backend is diffusers' default (native) one (its own, or the
    process-wide one where it has none)."""
    return backend_name(stock) == "native"


def backend_attention(
    stock: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
    parallel: bool = False,
) -> torch.Tensor:
    """Softmax attention ``(B, L, H, D)`` on the stock processor's attention backend: NAG's kernel on the native
    backend, diffusers' dispatcher with the processor's backend otherwise (flash, cuDNN, flex, ...). ``parallel``:
    under the stock processor's context parallelism, if it has one (each rank's queries attend to every rank's keys,
    as the stock processor's own call does); else on this process's keys alone (keys every process holds whole)."""
    config = getattr(stock, "_parallel_config", None) if parallel else None
    if config is None and native_backend(stock):
        return attention(q, k, v, mask)
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    backend = getattr(stock, "_attention_backend", None)
    return dispatch_attention_fn(q, k, v, attn_mask=mask, backend=backend, parallel_config=config)


def split_heads(attn: Any, x: torch.Tensor, norm: Any, flat_norm: bool) -> torch.Tensor:
    """``(B, L, H*D)`` -> ``(B, L, H, D)`` with the module's q/k norm where the stock processor puts it."""
    if norm is not None and flat_norm:
        x = norm(x)
    x = x.unflatten(-1, (attn.heads, -1))
    if norm is not None and not flat_norm:
        x = norm(x)
    return x


def qkv(attn: Any, x: torch.Tensor, fused: str, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """The projections ``names`` of ``x`` (heads not split): from the fused projection ``fused`` where the module's
    projections are fused (``fuse_qkv_projections``, which diffusers' fused processors project with), else each."""
    if getattr(attn, "fused_projections", False) and getattr(attn, fused, None) is not None:
        return getattr(attn, fused)(x).chunk(len(names), dim=-1)
    return tuple(getattr(attn, name)(x) for name in names)


def image_qkv(attn: Any, x: torch.Tensor, norms: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The image tokens' queries, keys and values ``(B, L, H, D)``, with the module's q/k norms (``norms=False``:
    without them, as diffusers' ``FusedJointAttnProcessor2_0`` computes them)."""
    q, k, v = qkv(attn, x, "to_qkv", ("to_q", "to_k", "to_v"))
    return (
        split_heads(attn, q, attn.norm_q if norms else None, False),
        split_heads(attn, k, attn.norm_k if norms else None, False),
        v.unflatten(-1, (attn.heads, -1)),
    )


def text_qkv(attn: Any, x: torch.Tensor, norms: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The text tokens' queries, keys and values through the added projections (see :func:`image_qkv`)."""
    q, k, v = qkv(attn, x, "to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))
    return (
        split_heads(attn, q, attn.norm_added_q if norms else None, False),
        split_heads(attn, k, attn.norm_added_k if norms else None, False),
        v.unflatten(-1, (attn.heads, -1)),
    )


def rotate(x: torch.Tensor, rotary: Any, start: int, stop: int | None) -> torch.Tensor:
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = rotary
    return apply_rotary_emb(x, (cos[start:stop], sin[start:stop]), sequence_dim=1)


def rows_of(mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """A ``(1 or rows, L)`` mask with ``rows`` rows."""
    return mask.expand(rows, -1) if mask is not None and mask.shape[0] == 1 else mask


def rotate_complex(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotary embedding from a complex table ``(B, L, D/2)`` (Z-Image's ``freqs_cis``), as its processor applies it."""
    with torch.amp.autocast("cuda", enabled=False):
        rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * table.unsqueeze(2)
        return torch.view_as_real(rotated).flatten(3).type_as(x)


def unguided_ranges(rows: int, guided: Any) -> list[slice]:
    """The rows ``range(rows)`` not in ``guided``, as runs of consecutive rows (slices: no index tensor to copy)."""
    runs: list[slice] = []
    start = None
    for row in range(rows + 1):
        if row < rows and row not in guided:
            start = row if start is None else start
        elif start is not None:
            runs.append(slice(start, row))
            start = None
    return runs


def project_out(attn: Any, z: torch.Tensor) -> torch.Tensor:
    """An attention module's output projection (and its dropout, when it has one)."""
    out = attn.to_out[0](z)
    return attn.to_out[1](out) if len(attn.to_out) > 1 else out
