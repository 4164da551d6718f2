"""What a model family adapter declares: plain descriptions, no mechanics.

A :class:`Family` says, for one denoiser architecture, which attention modules attend to text and with which
attention mechanism, how a guided call's inputs are extended with the negative conditioning (its ``layout``), and
which other modules get a hook (:class:`ModuleKind`, one regex each). A :class:`TextPath` is a block's text-only
path, which lets the fast paths run a block on the stock rows with the negative text beside them. A
:class:`PipelineSpec` says, for one pipeline class, which family its denoiser belongs to, its tuned defaults, and
what its ``encode_prompt`` returns. The hooks (``nag.hooks``) read these; the families (``nag.families``) fill them.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .settings import FamilyDefaults

__all__ = ["ModuleKind", "InSequence", "TextPath", "CausalPrefix", "Family", "PipelineSpec", "TEXT", "POOLED", "MASK"]


class ModuleKind(enum.Enum):
    """Modules other than attention that a family hooks, by what they are. Hooks are installed on a module in this
    order; the fast-path kinds only with ``fast=True``, and those that move the negative text beside the block only
    where the family has a :class:`TextPath`."""

    #: image-side modulation norms (joint layout): they take the stock rows of the conditioning embedding
    IMAGE_NORM = "image_norm"
    #: image-side modules all of whose inputs are per-row conditioning (Qwen-Image's ``img_mod(temb)``): stock rows
    IMAGE_MODULATION = "image_modulation"
    #: concat layout, double-stream blocks that run the image stream at the stock batch: their image argument and the
    #: per-row ``Family.stock_image_kwargs`` are cut to the stock rows, the negative text rows attend to the guided
    #: image, and the block's image output gets the guided rows' copies again for the model's later concatenation
    STOCK_IMAGE_BLOCK = "stock_image_block"
    #: concat layout, single-stream blocks whose input the model joined as ``[text, image]``: with the fast path the
    #: block runs on the stock rows and the negative rows' text takes the text path beside them
    JOINED_BLOCK = "joined_block"
    #: joint layout, blocks that concatenate ``[text, image]`` themselves (Flux single blocks): with the fast path the
    #: block runs on the stock rows, the negative text beside them; else one image row per negative text row
    CONCATENATING_BLOCK = "concatenating_block"
    #: concat layout, blocks over per-sample rows ``[image, text, padding]`` (``row_image_lengths`` and
    #: ``row_text_lengths`` give each row's spans; ``TextPath.text_first``: ``[text, image, padding]``): with the fast
    #: path the block runs on the stock rows (every per-row argument cut to them, every per-token one also to their
    #: longest valid length) and each negative row's text span takes the text path beside it. Without
    #: ``row_image_lengths`` each row's text ends it and its image is the rest (HiDream's single-stream blocks).
    SAMPLE_BLOCK = "sample_block"
    #: concat layout, fast path: modules that work on each row alone and whose output for the negative rows is never
    #: read: they run on the stock rows and their output gets the guided rows' copies for the negative rows
    STOCK_ROW_MODULE = "stock_row_module"
    #: concat layout, fast path: the module that takes the image at the model input (a patch embedding): when every
    #: text-attention wrapper can serve the negative rows beside the stock rows, it runs on the stock rows and the
    #: image stream stays at the stock batch from there on
    STOCK_IMAGE_ENTRY = "stock_image_entry"
    #: concat layout, fast path: blocks that take the image and the text separately and join them as ``[image,
    #: text]`` themselves, returning ``(image, text)``: the block runs on the stock rows and the negative rows' text
    #: takes the text path beside it (their other per-row arguments reach the attention wrapper with it). Also
    #: double-stream blocks whose one per-row modulation feeds both streams (HiDream's); without a
    #: ``STOCK_IMAGE_ENTRY`` the image comes to these blocks on whole rows and leaves them so.
    IMAGE_FIRST_BLOCK = "image_first_block"
    #: fast path: a module that maps each token of the denoiser's text alone to what the blocks read (a caption
    #: projection, a context embedder). Its output for the negative text (the cross layout's negative tokens where
    #: ``Family.static_text``; the joint and concat layouts' negative rows) is kept from the first guided call of a
    #: generation; later calls run it on the stock text alone and append what was kept
    TEXT_PROJECTION = "text_projection"
    #: fast path, concatenating blocks whose text path has ``in_sequence``: the block's modulation norm (a direct
    #: child of the block; output ``(normed, ...)`` over the block's sequence). Where the negative text rides in the
    #: sequence, its tokens of ``normed`` are replaced by the text path's own (modulated by the negative rows'
    #: conditioning)
    SEQUENCE_NORM = "sequence_norm"
    #: ... and the block's output projection (token-wise, a direct child too): its output for the negative tokens is
    #: kept for ``InSequence.finish``. Where either is no longer the module hooked (a LoRA added while NAG is applied
    #: wraps it), the block takes the text path beside the stock rows
    SEQUENCE_PROJECTION = "sequence_projection"


@dataclass(frozen=True)
class InSequence:
    """A concatenating block's text path where the negative text rides in the block's own sequence: the block gets
    ``[text, negative text]`` as its text (each row's negative after its stock text) and runs its token-wise layers
    once over ``[text, negative text, image]``; what depends on the row's conditioning is the negative rows' own.

    Attributes:
        start: ``(block, text, modulation) -> (normed, saved)``: the negative text modulated by its rows'
            conditioning (what the block's ``SEQUENCE_NORM`` module gives the negative tokens), ``saved`` whatever
            ``finish`` needs.
        finish: ``(block, saved, projected) -> text``: the block's output for the negative text from its output
            projection's (``SEQUENCE_PROJECTION``) output for those tokens (gates, residuals).
    """

    start: Callable[[torch.nn.Module, torch.Tensor, Any], tuple[torch.Tensor, Any]]
    finish: Callable[[torch.nn.Module, Any, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TextPath:
    """A block's text-only path for the negative rows, around its attention (which the fast path computes for them
    beside the stock rows).

    Attributes:
        start: ``(block, text, modulation) -> (normed, saved)``: the block's work on the text before attention; the
            modulated text ``normed`` is the attention's input, ``saved`` whatever ``finish`` needs.
        finish: ``(block, saved, attention) -> text``: the block's work after attention (gates, residuals, MLP).
        modulation: the block's per-row modulation argument (given to ``start``).
        mask: joined blocks: the block's ``(rows, tokens)`` mask argument over ``[text, image]``; the rows are split
            only when the attention wrapper's ``takes_split_mask(call, mask)`` accepts the mask.
        rotary: sample blocks: the rotary-table argument whose text spans go with the negative text.
        text_first: sample blocks over per-sample rows ``[text, image, padding]`` (each row's text starts it);
            without ``row_image_lengths`` every row's image is as long as the longest row's tokens after its text.
        in_sequence: concatenating blocks: the path taken where every row is guided (see :class:`InSequence`).
    """

    start: Callable[[torch.nn.Module, torch.Tensor, Any], tuple[torch.Tensor, Any]]
    finish: Callable[[torch.nn.Module, Any, torch.Tensor], torch.Tensor]
    modulation: str = "temb"
    mask: str | None = None
    rotary: str | None = None
    text_first: bool = False
    in_sequence: InSequence | None = None


@dataclass(frozen=True)
class CausalPrefix:
    """Layout ``"prefix"``: a single-stream model whose sequence is ``[text (with condition images), target image]``
    under a causal mask, so the text never attends to the target image (Qwen-Image 2.1).

    The negative prompt's prefix is run through the model in a call of its own (with the smallest target image:
    the prefix never attends to it), laid out as the pipeline lays out its classifier-free-guidance call; every
    text-attention layer keeps that call's prefix keys/values. In a guided call the stock rows run as stock, and in
    every layer the guided rows' target-image queries also attend to ``[negative prefix, target image]`` (target keys
    from the same image tokens, at the negative layout's positions): that is ``Z-``, combined with the stock ``Z+``
    before the output projection.

    Attributes:
        prefill_call: ``(call arguments, negative conditioning, guided rows) -> arguments`` of the negative prompt's
            own denoiser call for the guided rows (its target image may be the smallest the model takes).
        target_rotary: ``(denoiser, call arguments, negative conditioning, guided rows) -> table``: the target image's
            rotary table at the negative layout's positions.
        target_tokens: ``call arguments -> tokens`` of the target image, the last tokens of the sequence.
        step_independent: ``denoiser -> bool``: the prefix does not depend on the timestep (prefilled once per
            generation) rather than on every step.
    """

    prefill_call: Callable[[dict[str, Any], dict[str, torch.Tensor], torch.Tensor], dict[str, Any]]
    target_rotary: Callable[[torch.nn.Module, dict[str, Any], dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
    target_tokens: Callable[[dict[str, Any]], int]
    step_independent: Callable[[torch.nn.Module], bool]


@dataclass(frozen=True)
class Family:
    """How NAG plugs into one denoiser architecture.

    Attributes:
        name: short family name.
        denoisers: class names of the denoisers this family covers.
        attention: ``(regex on the module's qualified name, mechanism)`` pairs; the mechanism
            (``nag.attention.Mechanism``) names the straightforward and the fast NAG wrapper of the module's processor.
        layout: ``"cross"``: the negative context is appended to the positive one along the
            token axis; ``"joint"``: negative text rows are appended along the batch axis and
            carried through the text stream with their own modulation; ``"concat"``: for models
            whose forward joins text and image itself, whole negative rows ``[negative text,
            image]`` are appended along the batch axis from the model input on (the image part a
            copy of the conditional row's); every text-attention layer substitutes the guided
            rows' image tokens for the copy, and the model output drops the negative rows; ``"prefix"``: for causal
            single-stream models, the negative prompt's prefix runs in a call of its own and the guided rows'
            image queries attend to its keys/values in every layer (see :class:`CausalPrefix`).
        text_kwarg / mask_kwarg / timestep_kwarg / image_kwarg: the denoiser's argument names.
        negative_keys: conditioning a negative prompt supplies (denoiser argument names).
        row_kwargs: per-row arguments (timestep, guidance) repeated for the negative rows from their conditional rows.
        text_ids_kwarg: unbatched text position ids, padded for the longer branch.
        modules: the other modules that get a hook, as ``{ModuleKind: regex on the module's qualified name}``.
        text_path: the blocks' text-only path for the negative rows (fast paths of the block kinds that need it).
        stock_image_kwargs: per-row arguments of ``STOCK_IMAGE_BLOCK`` and ``STOCK_ROW_MODULE`` modules (image-side
            modulation) cut to the stock rows with the image.
        static_text: the model's text preprocessing does not depend on the timestep, so projected negative
            keys/values can be reused across steps (cross layout).
        refuse: ``denoiser -> reason or None``: configurations of the architecture NAG cannot
            guide, refused with the reason when attaching.
        mask_covers_image: the mask argument spans ``[text, image]`` (Chroma), not the text only.
        text_prefix: ``denoiser -> tokens`` the model puts before the text inside its blocks
            (AuraFlow's register tokens).
        text_length: ``denoiser -> tokens or None``: the text length the model requires (CogVideoX
            with positional embeddings over ``[text, image]``); both branches are padded to it.
        row_text_lengths: ``extended arguments -> per-row text lengths``, for models that join each
            sample's ``[text, image]`` at its own text length (Lumina2).
        row_image_lengths: ``extended arguments -> per-row image token counts``, for models whose samples
            start with the image (Z-Image).
        causal_prefix: layout ``"prefix"``: how the negative prompt's own call is made (:class:`CausalPrefix`).
        control_hints_kwarg: the denoiser argument taking a control model's per-row output (Z-Image's ControlNet
            hints): the negative rows need it for their own text, which only a pipeline-level control attachment
            (``nag.control``) provides; a guided call carrying it without one is refused with a clear error.
        batch_dims: ``(argument, axis)`` pairs for conditioning whose batch axis is not the first
            (HiDream's stacked Llama-3 states, ``(layers, batch, tokens, width)``): negative rows are
            counted, repeated and appended along that axis.
        equal_text_lengths: the model joins the text with further streams and attends to all of it
            without a mask (HiDream): padding cannot be cut out again, so positive and negative text
            must have the same length (a clear error otherwise).
        context_parallel: NAG is exact for this family under diffusers' context parallelism
            (``enable_parallelism`` with a ``ContextParallelConfig``, Ulysses or ring), checked against one process
            by ``tests/test_context_parallel.py``; under context parallelism every other family is refused.
        context_parallel_refusal: why this family cannot be exact under context parallelism (a family not marked
            ``context_parallel``), said in the refusal instead of "not checked yet".
    """

    name: str
    denoisers: tuple[str, ...]
    attention: tuple[tuple[str, Any], ...]
    layout: str
    text_kwarg: str = "encoder_hidden_states"
    mask_kwarg: str | None = None
    timestep_kwarg: str = "timestep"
    image_kwarg: str = "hidden_states"
    negative_keys: tuple[str, ...] = ("encoder_hidden_states",)
    row_kwargs: tuple[str, ...] = ()
    text_ids_kwarg: str | None = None
    modules: Mapping[ModuleKind, str] = field(default_factory=dict)
    text_path: TextPath | None = None
    stock_image_kwargs: tuple[str, ...] = ()
    static_text: bool = True
    refuse: Callable[[torch.nn.Module], str | None] | None = None
    mask_covers_image: bool = False
    text_prefix: Callable[[torch.nn.Module], int] | None = None
    text_length: Callable[[torch.nn.Module], int | None] | None = None
    row_text_lengths: Callable[[dict[str, Any]], list[int]] | None = None
    row_image_lengths: Callable[[dict[str, Any]], list[int]] | None = None
    causal_prefix: CausalPrefix | None = None
    control_hints_kwarg: str | None = None
    batch_dims: tuple[tuple[str, int], ...] = ()
    equal_text_lengths: bool = False
    context_parallel: bool = False
    context_parallel_refusal: str | None = None

    def batch_dim(self, key: str) -> int:
        """The batch axis of the conditioning ``key`` (0 unless ``batch_dims`` says otherwise)."""
        return dict(self.batch_dims).get(key, 0)

    def attention_role(self, name: str, module: torch.nn.Module) -> Any:
        """The attention mechanism of the module named ``name``, or None where NAG leaves it alone."""
        if not has_processor(module):
            return None
        for pattern, mechanism in self.attention:
            if re.fullmatch(pattern, name):
                return mechanism
        return None

    def module_kinds(self, name: str) -> list[ModuleKind]:
        """The kinds of hooked module the module named ``name`` is, in installation order."""
        return [kind for kind, pattern in self._module_patterns if pattern.fullmatch(name)]

    @functools.cached_property
    def _module_patterns(self) -> list[tuple[ModuleKind, re.Pattern]]:
        """``modules`` in installation order, compiled (once: ``module_kinds`` runs for every module)."""
        return [(kind, re.compile(self.modules[kind])) for kind in ModuleKind if kind in self.modules]


def has_processor(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a diffusers attention module (it has a processor, a plain object or a module). Read from
    the instance's dicts: ``hasattr`` on a module without it raises inside ``nn.Module.__getattr__``, slowly, and this
    runs for every module of a denoiser."""
    return "processor" in module.__dict__ or "processor" in module.__dict__.get("_modules", {})


@dataclass(frozen=True)
class PipelineSpec:
    """One pipeline class: its denoiser's family, tuned defaults and ``encode_prompt`` outputs.

    ``encode_outputs`` names each element of ``encode_prompt``'s returned tuple by the
    denoiser argument it feeds (None: not used by NAG); ``None`` altogether (pipelines without a
    spec of their own) means: the first output is the prompt embedding, and a following
    ``(batch, tokens)`` tensor is its attention mask. ``negative_overrides`` are
    ``encode_prompt`` arguments set when encoding the negative prompt.
    """

    pipeline: str
    family: str
    label: str
    defaults: FamilyDefaults
    encode_outputs: tuple[str | None, ...] | None
    denoiser_attr: str = "transformer"
    expert_attrs: tuple[str, ...] = ()  # further denoisers of the same family, guided alike when present
    few_step: bool = False
    negative_overrides: dict[str, Any] = field(default_factory=dict)
    # A pipeline component that turns encode_prompt's output into the denoiser's text (LTX-2's `connectors`):
    # the conditional rows are recognised in its output, and the negative prompt is run through it as well.
    text_connector: str | None = None
    # The names under which this pipeline's encode_prompt takes precomputed negative embeddings, mapped to the
    # conditioning they feed, where they differ from the common ones (HiDream: `negative_prompt_embeds_t5`, ...).
    negative_embed_names: dict[str, str] = field(default_factory=dict)
    # A pipeline component run before the denoiser whose output the denoiser adds to its text tokens too (Z-Image's
    # `controlnet`, see nag.control): NAG's negative rows get its output for their own text.
    control_model: str | None = None
    # Negative outputs of this pipeline's encode_prompt that its own call takes beside the embeddings but NAG does not
    # use (AuraFlow's mask, already applied to its embeddings; SDXL's pooled embedding, which stays the prompt's):
    # accepted by nag.apply so that encode_prompt's outputs can be passed unchanged, checked, and left out.
    unused_negative_names: tuple[str, ...] = ()
    # encode_prompt returns one tensor per prompt, of its own length, in a list (Z-Image): negatives may come so too.
    per_prompt_lists: bool = False

    def name_outputs(self, values: Any) -> dict[str, torch.Tensor]:
        """``encode_prompt``'s result as ``{denoiser argument: tensor}``."""
        values = values if isinstance(values, tuple) else (values,)
        if self.encode_outputs is not None:  # (a mask may be None: every token valid)
            return {
                name: value
                for name, value in zip(self.encode_outputs, values)
                if name is not None and value is not None
            }
        named = {"encoder_hidden_states": values[0]}
        mask = values[1] if len(values) > 1 else None
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape == values[0].shape[:2]:
            named["encoder_attention_mask"] = mask
        return named


#: the common names of ``encode_prompt`` outputs in :attr:`PipelineSpec.encode_outputs`
TEXT, POOLED, MASK = "encoder_hidden_states", "pooled_projections", "encoder_attention_mask"
