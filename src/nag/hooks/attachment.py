"""Installing NAG on a denoiser, and removing it: the hooking mechanics in one place.

``attach(denoiser, family, runtime)`` installs:

* a NAG wrapper around the processor of every attention module that attends to text (the family names the
  mechanism; ``fast`` picks its fast or straightforward wrapper);
* a forward pre-hook on the denoiser that decides, for each call, whether it is guided (NAG enabled, a negative
  available, the step inside ``[start, end)``, the call carrying the conditional rows) and, if so, extends the call's
  inputs with the negative conditioning (``nag.hooks.inputs``) and records the :class:`~nag.state.GuidedCall`;
  a forward hook drops the negative rows from the output again (layout ``"concat"``);
* the block hooks of the family's other modules (``nag.hooks.blocks.HOOKS``), which keep the image stream at its
  stock batch;
* for causal single-stream families (layout ``"prefix"``), the negative prompt's prefix runs in a denoiser call of
  its own before the first guided call (or before every guided call when the prefix depends on the timestep).

``Attachment.detach()`` restores every processor and removes every hook. When a call is not guided, the hooks pass
the stock arguments through unchanged, so the output is bit-identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..attention import NAGProcessor, wrap_processor
from ..signatures import forward_signature
from ..spec import Family
from ..state import NAGRuntime, NegativePrefix, PrefixRecording, inert_copy, negative_work_context
from .blocks import HOOKS, BlockHooks
from .inputs import conditional_rows, extend_inputs, rows_for, to_device
from .parallel import refusal, text_shards

__all__ = ["Attachment", "attach", "unwrap_compiled"]


def unwrap_compiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``torch.compile`` wrapper (hooks go there; compiled calls run them)."""
    return getattr(module, "_orig_mod", module)


class Attachment:
    """Everything installed on one denoiser; ``detach()`` removes it all. ``hooks`` names each installed hook."""

    def __init__(
        self,
        denoiser: torch.nn.Module,
        family: Family,
        runtime: NAGRuntime,
        fast: bool = True,
        modules: list[tuple[str, torch.nn.Module]] | None = None,
    ):
        denoiser = unwrap_compiled(denoiser)
        self.denoiser = denoiser
        #: the denoiser's ``named_modules()`` at installation (one walk; the per-generation checks read it)
        self.modules = list(denoiser.named_modules()) if modules is None else modules
        self.family = family
        self.runtime = runtime
        self.fast = fast
        self.live = True  # False in copies of the model (deepcopy, torch.save): their hooks pass calls through
        # (name, module, its stock processor, the NAG wrapper installed) of every wrapped attention module
        self._installed: list[tuple[str, torch.nn.Module, Any, Any]] = []
        self.hooks: list[tuple[str, torch.utils.hooks.RemovableHandle]] = []
        self._blocks = BlockHooks(family, runtime, self._installed)
        self._forward_signature = forward_signature(denoiser)
        try:
            self._install()
        except BaseException:
            self.detach()
            raise

    def __reduce_ex__(self, protocol: Any) -> tuple:
        """The hooks a deep copy or a saved copy of the denoiser carries pass every call through (``inert_copy``)."""
        return inert_copy, (type(self), {"runtime": NAGRuntime(self.runtime.settings), "live": False})

    # -- installation -------------------------------------------------------------------------
    def _install(self) -> None:
        family = self.family
        reason = family.refuse(self.denoiser) if family.refuse is not None else None
        reason = reason or refusal(self.denoiser, family)
        if reason:
            raise NotImplementedError(f"NAG cannot guide this {type(self.denoiser).__name__}: {reason}")
        before, after = EagerHook(self._before_denoiser), EagerHook(self._after_denoiser)
        self._register("denoiser", self.denoiser.register_forward_pre_hook(before, with_kwargs=True, prepend=True))
        self._register("denoiser", self.denoiser.register_forward_hook(after, always_call=True))
        for name, module in self.modules:
            mechanism = family.attention_role(name, module)
            if mechanism is not None:
                self._wrap(name, module, mechanism)
            for kind in family.module_kinds(name):
                self._hook(name, module, kind)
        if not self._installed:
            raise RuntimeError(
                f"found no text attention modules in {type(self.denoiser).__name__} for family {family.name!r}"
            )

    def _wrap(self, name: str, module: torch.nn.Module, mechanism: Any) -> None:
        stock = module.processor
        wrapper = wrap_processor(mechanism.wrapper(self.fast), stock, self.runtime)
        module.set_processor(wrapper)
        self._installed.append((name, module, stock, wrapper))

    def _hook(self, name: str, module: torch.nn.Module, kind: Any) -> None:
        hook = HOOKS[kind]
        if not hook.applies(self.fast, self.family):
            hook = hook.otherwise
        if hook is None:
            return
        if hook.pre:
            pre = getattr(self._blocks, hook.pre)
            self._register(f"{name}:{hook.pre}", module.register_forward_pre_hook(pre, with_kwargs=True))
        if hook.post:
            self._register(f"{name}:{hook.post}", module.register_forward_hook(getattr(self._blocks, hook.post)))
        self._blocks.installed(module, kind)

    def _register(self, name: str, handle: torch.utils.hooks.RemovableHandle) -> None:
        self.hooks.append((f"nag:{name}", handle))

    def replaced_processors(self) -> list[tuple[str, Any]]:
        """``(module name, processor)`` of the text-attention modules whose NAG wrapper something replaced since
        installation (``set_attn_processor``, another attention tool)."""
        return [
            (name, module.processor) for name, module, _, wrapper in self._installed if module.processor is not wrapper
        ]

    def detach(self) -> None:
        for _, hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        for _, module, stock, _ in reversed(self._installed):
            # a processor set after NAG's (by the user or another tool) stays: restoring would undo their change
            current = module.processor
            if isinstance(current, NAGProcessor) and current.runtime is self.runtime:
                module.set_processor(stock)
        self._installed.clear()
        self.runtime.call = None

    @contextlib.contextmanager
    def stock_processors(self) -> Iterator[None]:
        """The stock processors in place for a while, NAG's wrappers back afterwards (also on an exception): for
        diffusers code that finds processors by their class and changes them in place (``set_ip_adapter_scale``)."""
        wrappers = [(module, module.processor, stock) for _, module, stock, _ in self._installed]
        try:
            for module, _, stock in wrappers:
                module.set_processor(stock)
            yield
        finally:
            for module, wrapper, _ in wrappers:
                module.set_processor(wrapper)

    # -- denoiser hooks (installed as EagerHook: run outside a torch.compile trace) ----------------------------
    def _before_denoiser(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        runtime = self.runtime
        if not self.live or (runtime.owns_call is not None and not runtime.owns_call()):
            return None  # a copy of the model, or a call from a pipeline sharing the denoiser: stock
        runtime.call = None
        runtime.denoiser_calls += 1
        family = self.family
        bound = self._forward_signature.bind_partial(*args, **kwargs)
        arguments = bound.arguments
        timestep = arguments.get(family.timestep_kwarg)
        runtime.advance(timestep)
        if not runtime.settings.enabled or runtime.negative is None or not runtime.step_in_window(timestep):
            return None
        text = arguments.get(family.text_kwarg)
        if text is None:
            return None
        cond_rows = conditional_rows(text, runtime.positive_reference)
        if cond_rows is None:
            return None
        hints = family.control_hints_kwarg
        if hints and arguments.get(hints) is not None and not runtime.control_attached:
            raise ValueError(
                f"NAG on a bare {type(module).__name__} cannot give its negative rows `{hints}` (a control model's "
                f"output for the negative text); apply NAG to the pipeline (nag.apply), which runs the control model "
                f"for them, or call the denoiser without `{hints}`"
            )
        device = cond_rows.device
        per_sample = isinstance(text, (list, tuple))  # list inputs (Z-Image): negative tensors become per-row lists
        negative = {
            key: to_device(
                rows_for(
                    list(value) if per_sample and isinstance(value, torch.Tensor) else value,
                    len(cond_rows),
                    key,
                    family.batch_dim(key),
                ),
                device,
            )
            for key, value in runtime.negative.items()
        }
        pad_to = (family.text_length(module) or 0) if family.text_length is not None else 0
        # (context parallelism may have been enabled after NAG was applied: checked on every guided call)
        shards = text_shards(module, family)
        call, changes = extend_inputs(family, arguments, negative, cond_rows, pad_to, shards)
        call.kept_under = negative_work_context()
        if family.layout == "prefix":
            self._prefill_negative(module, arguments, negative, cond_rows, call.kept_under)
            runtime.call = call
            runtime.guided_calls += 1
            return None
        if family.text_prefix is not None:
            call.text_prefix = family.text_prefix(module)
        arguments.update(changes)
        if family.row_text_lengths is not None:
            call.text_lengths = family.row_text_lengths(arguments)
        if family.row_image_lengths is not None:
            call.image_lengths = family.row_image_lengths(arguments)
        runtime.call = call
        runtime.guided_calls += 1
        return self._in_callers_convention(args, kwargs, changes)

    def _in_callers_convention(self, args: tuple, kwargs: dict, changes: dict) -> tuple[tuple, dict]:
        """The call's arguments with ``changes`` made, each where the caller put it: a keyword stays a keyword and
        a positional argument stays positional, so other forward pre-hooks (which run after NAG's) read the call
        as the pipeline made it. An argument the caller left at its default becomes a keyword."""
        args, kwargs = list(args), dict(kwargs)
        names = list(self._forward_signature.parameters)
        for name, value in changes.items():
            index = names.index(name) if name in names else len(args)
            if index < len(args) and name not in kwargs:
                args[index] = value
            else:
                kwargs[name] = value
        return tuple(args), kwargs

    def _prefill_negative(
        self, module: torch.nn.Module, arguments: dict, negative: dict, cond_rows: torch.Tensor, context: bool | None
    ) -> None:
        """Layout ``"prefix"``: run the negative prompt's own call for the guided rows, recording every layer's prefix
        keys/values (once per generation when the prefix does not depend on the timestep, else at every step; reused
        only under the ``context``, :func:`~nag.state.negative_work_context`, it was recorded in)."""
        prefix = self.family.causal_prefix
        rows = cond_rows.tolist()
        recorded = self.runtime.negative_prefix
        if (
            recorded is not None and recorded.rows == rows and recorded.context == context and context is not None
            and prefix.step_independent(module)
        ):
            return
        recording = self.runtime.prefix_recording = PrefixRecording()
        try:  # `forward`, not the module: hooks watching the denoiser's calls see only the pipeline's
            module.forward(**prefix.prefill_call(arguments, negative, cond_rows))
        finally:
            self.runtime.prefix_recording = None
        key_valid = recording.key_valid
        if key_valid is not None:  # every target key is valid
            key_valid = torch.cat([key_valid, key_valid.new_ones(len(rows), prefix.target_tokens(arguments))], dim=1)
        self.runtime.negative_prefix = NegativePrefix(
            rows=rows,
            context=context,
            layers=recording.layers,
            key_valid=key_valid,
            rotary=prefix.target_rotary(module, arguments, negative, cond_rows),
        )

    def _after_denoiser(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        call, self.runtime.call = self.runtime.call, None
        if call is None or output is None or self.family.layout != "concat":  # (None: the call raised)
            return None
        return _stock_rows_of_output(output, call.batch)


class EagerHook:
    """A denoiser hook that runs outside any ``torch.compile`` trace of the denoiser (a graph break at the call):
    NAG's denoiser hooks keep its per-generation state in Python objects and look at the calling thread, which the
    compiler would otherwise trace, warn about and break the graph at anyway. A class, not a wrapped function, so that
    a model saved with the hook in place still pickles (the bound method by name)."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self.method = method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _untraced_call()(self.method, *args, **kwargs)


_UNTRACED_CALL: Callable[..., Any] | None = None


def _untraced_call() -> Callable[..., Any]:
    """``function(*args, **kwargs)`` outside the compiler, made at the first call (``torch.compiler.disable`` imports
    the compiler: by then diffusers has imported it)."""
    global _UNTRACED_CALL
    if _UNTRACED_CALL is None:
        _UNTRACED_CALL = torch.compiler.disable(_call)
    return _UNTRACED_CALL


def _call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return function(*args, **kwargs)


def _stock_rows_of_output(output: Any, rows: int) -> Any:
    """A denoiser output (tuple or ``...Output`` dataclass) without the negative rows."""
    if isinstance(output, (torch.Tensor, list)):
        return output[:rows]
    if isinstance(output, tuple):
        return (output[0][:rows], *output[1:])
    sample = getattr(output, "sample", None)
    if isinstance(sample, (torch.Tensor, list)):  # (Z-Image: a list of per-sample tensors)
        output.sample = sample[:rows]  # diffusers' BaseOutput keeps the mapping in step with the attribute
        return output
    raise TypeError(f"NAG cannot trim the negative rows from a denoiser output of type {type(output).__name__}")


def attach(
    denoiser: torch.nn.Module,
    family: Family,
    runtime: NAGRuntime,
    fast: bool = True,
    modules: list[tuple[str, torch.nn.Module]] | None = None,
) -> Attachment:
    """Install NAG on ``denoiser`` for ``family``; returns the attachment to ``detach()``.

    ``fast=False`` uses the straightforward wrappers everywhere (each stock processor called once
    per branch); the fast paths must agree with them. ``modules``: the denoiser's ``named_modules()``, where the
    caller has listed them.
    """
    return Attachment(denoiser, family, runtime, fast, modules)
