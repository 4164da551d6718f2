"""The typed state of one attachment: what the hooks record for the attention wrappers, per call and per block.

Everything here is plain data. The denoiser hook fills a :class:`GuidedCall` for each guided denoiser call; block
hooks that take the negative rows' text out of a block leave it in :class:`NegativeText` for that block's attention
fast path; the causal-prefix layout records the negative prefix's keys/values in :class:`PrefixRecording` and keeps
them as :class:`NegativePrefix`. :class:`NAGRuntime` holds them all, with the settings and the negative conditioning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .settings import NAGSettings

logger = logging.getLogger("nag")

__all__ = [
    "GuidedCall",
    "NegativeText",
    "PrefixKeysValues",
    "PrefixRecording",
    "NegativePrefix",
    "NAGRuntime",
    "inert_copy",
]


def inert_copy(cls: type, attributes: dict[str, Any]) -> Any:
    """What a NAG object that hooks a model becomes in ``copy.deepcopy`` or ``torch.save`` of that model: an instance
    of its class with only ``attributes`` (an empty :class:`NAGRuntime`), whose hooks pass every call through.

    A copy of a guided model therefore generates stock: NAG's state (the negative conditioning, the pipeline's
    generation, a thread lock) belongs to the one attachment ``nag.apply`` made, and ``nag.apply`` on the copy
    guides it independently."""
    copy = cls.__new__(cls)
    copy.__dict__.update(attributes)
    return copy



@dataclass
class GuidedCall:
    """What the attention wrappers need to know about the current guided denoiser call."""

    batch: int  # image rows (the stock batch)
    cond_rows: torch.Tensor  # indices of the guided (conditional) rows
    positive_text_len: int
    negative_text_len: int
    padded_text_len: int  # joint families: common length of positive and negative text rows
    static_negative: bool = False  # the negative context reaching attention is the same every step
    # Tokens the model puts before the text inside its blocks (AuraFlow's register tokens): the
    # attention modules see ``[prefix, text, image]`` with the prefix shared by both branches.
    text_prefix: int = 0
    # Per-sample text lengths of every row of the extended call (models that join each sample's own
    # ``[text, image]`` with the text at its own length: Lumina2).
    text_lengths: list[int] | None = None
    # Per-row image token counts of the extended call, for models whose samples start with the image
    # (Z-Image: ``[image, caption, padding]`` per sample, the image span padded by the model itself).
    image_lengths: list[int] | None = None

    # Filled from ``cond_rows`` when the call is made (not lazily: the attention wrappers read them inside a
    # ``torch.compile`` trace of the user's, where reading a tensor's values or a cached property's lock breaks it):
    guided_rows: list[int] = None  # type: ignore[assignment]  # ``cond_rows`` as a list
    # the guided rows as an index of the first axis: a slice where they are consecutive (indexing with it gives views,
    # no copy; with no CFG every row is guided), else ``cond_rows``. Reading it must not be written to.
    row_index: slice | torch.Tensor = None  # type: ignore[assignment]
    # ``negative_work_context()`` at the call (read by the denoiser hook, outside any compile trace, which cannot
    # read the inference mode): what the generation's kept negative work may be reused under, None for nothing
    kept_under: bool | None = None

    def __post_init__(self) -> None:
        if self.guided_rows is None:  # (dataclasses.replace passes both on)
            self.guided_rows = self.cond_rows.tolist()
        if self.row_index is None:
            rows = self.guided_rows
            consecutive = rows and rows == list(range(rows[0], rows[0] + len(rows)))
            self.row_index = slice(rows[0], rows[0] + len(rows)) if consecutive else self.cond_rows


@dataclass
class NegativeText:
    """The negative rows' text that a block hook took out of its block (the block runs on the stock rows): the
    block's attention fast path attends with it beside the stock rows and leaves its output in ``attention``; the
    family's text path finishes the block for it from ``saved``."""

    normed: torch.Tensor  # the block's modulated text: the attention's input for the negative rows
    saved: Any  # what the family's text path keeps for after attention (its own business)
    attention: torch.Tensor | None = None  # the attention fast path's output for the negative text
    mask: torch.Tensor | None = None  # joined blocks: the negative rows' ``(rows, tokens)`` mask
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # image-first blocks: the negative rows' arguments
    spans: list[tuple[int, int]] | None = None  # sample blocks: each negative row's text ``(start, length)``
    rotary: Any = None  # sample blocks: the text spans' rotary tables
    stream: torch.Tensor | None = None  # sample blocks: the block's whole input, every row
    whole_image_rows: bool = False  # image-first blocks: the image came (and leaves) on whole rows
    # in-sequence blocks: the negative text's tokens ``(start, stop)`` in the block's sequence, whether the block's
    # norm gave them the path's ``normed``, and its output projection's output for them
    sequence: tuple[int, int] | None = None
    spliced: bool = False
    projected: torch.Tensor | None = None


class PrefixKeysValues:
    """One layer's prefix keys and values, filled by the stock processor (``store``) and read back (``get``)
    in the shape the model's own per-layer key/value cache has."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None or self.values is None:
            raise RuntimeError("NAG's negative prefix has no keys/values for this layer")
        return self.keys, self.values


@dataclass
class PrefixRecording:
    """Filled by the causal-prefix wrappers while the negative prompt's own call runs."""

    layers: dict[torch.nn.Module, PrefixKeysValues] = field(default_factory=dict)
    key_valid: torch.Tensor | None = None  # the prefix's key mask, from the first layer
    key_valid_recorded: bool = False


def negative_work_context() -> bool | None:
    """Under what values computed once from the negative may be kept and reused by a generation's later calls: None
    while autograd records (a kept value would carry no gradient to weights that may require one by the next call,
    or a graph backpropagated twice: each call computes its own), else whether inference mode is on (an inference
    tensor cannot enter a computation outside it). A kept value is used only under the context it was made in."""
    if torch.is_grad_enabled():
        return None
    return torch.is_inference_mode_enabled()


@dataclass
class NegativePrefix:
    """The recorded negative prefix of one generation (layout ``"prefix"``)."""

    rows: list[int]  # the guided rows it was recorded for
    context: bool | None  # the negative_work_context() it was recorded under
    layers: dict[torch.nn.Module, PrefixKeysValues]
    key_valid: torch.Tensor | None  # ``(rows, prefix + target)`` valid keys, or None: all valid
    rotary: torch.Tensor  # the target image's rotary table at the negative layout's positions


@dataclass
class NAGRuntime:
    """Mutable state shared by the hooks of one attachment.

    ``negative`` maps the denoiser's keyword names (``encoder_hidden_states``,
    ``pooled_projections``, ``encoder_attention_mask``, ...) to tensors with one row per row of
    ``positive_reference`` (or one row, broadcast). ``positive_reference`` is the text tensor the
    conditional rows carry; when it is None every row of a call is guided.
    """

    settings: NAGSettings
    negative: dict[str, torch.Tensor] | None = None
    positive_reference: torch.Tensor | None = None
    # (the call's timestep, the steps counted so far) -> fraction of the full schedule done when the step began
    progress: Callable[[Any, int], float | None] | None = None
    sigma: Callable[[Any], float | None] | None = None  # the current step's noise level (for `min_sigma`)
    call: GuidedCall | None = None
    step_index: int = -1
    last_timestep: torch.Tensor | None = None
    guided_calls: int = 0
    denoiser_calls: int = 0
    # whether a denoiser call belongs to the generation this runtime serves (None: every call does); a pipeline
    # sharing the denoiser (``from_pipe``) makes calls that do not, and they run stock
    owns_call: Callable[[], bool] | None = None
    control_attached: bool = False  # a control model's hints are extended for the negative rows (nag.control)
    # per generation: the projected negative keys/values of each cross-attention module (fast path)
    negative_kv: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    # per generation: the output of each text projection (``ModuleKind.TEXT_PROJECTION``) for the negative text
    negative_text_outputs: dict[tuple, torch.Tensor] = field(default_factory=dict)
    negative_prefix: NegativePrefix | None = None  # per generation (layout "prefix")
    # per block
    prefix_recording: PrefixRecording | None = None  # set while the negative prefix's own call runs
    text_path: NegativeText | None = None  # the negative text a block hook took out of the current block
    whole_rows_block: bool = False  # the current concatenating block runs on whole rows (no fast path)

    def __reduce_ex__(self, protocol: Any) -> tuple:
        """Copies and saves carry the settings only: no negative, so nothing is guided (see :func:`inert_copy`)."""
        return NAGRuntime, (self.settings,)

    def begin_generation(
        self, negative: dict[str, torch.Tensor] | None, positive_reference: torch.Tensor | None
    ) -> None:
        if self.negative is not None and self.denoiser_calls and not self.guided_calls and self.settings.enabled:
            logger.warning(
                "NAG guided none of the %d denoiser calls of the previous generation: no call carried the "
                "encoded positive prompt (was the prompt embedding changed between encode_prompt and the "
                "denoiser?) or no step fell inside [start=%s, end=%s)",
                self.denoiser_calls,
                self.settings.start,
                self.settings.end,
            )
        self.negative = negative
        self.positive_reference = positive_reference
        self.step_index = -1
        self.last_timestep = None
        self.call = None
        self.guided_calls = 0
        self.denoiser_calls = 0
        self.release_negative_work()
        self.prefix_recording = None
        self.text_path = None
        self.whole_rows_block = False

    def release_negative_work(self) -> None:
        """Free what the generation computed once from its negative and kept for its later calls: the cross-attention
        keys/values, the text projections' outputs, the causal prefix (recomputed at the next guided call)."""
        self.negative_kv.clear()
        self.negative_text_outputs.clear()
        self.negative_prefix = None

    def advance(self, timestep: Any) -> None:
        """Count steps: a call whose timestep differs from the previous call's starts a new step (what the window
        falls back on where the scheduler does not say where a call stands)."""
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.detach()
            same = (
                self.last_timestep is not None
                and isinstance(self.last_timestep, torch.Tensor)
                and self.last_timestep.shape == timestep.shape
                and torch.equal(self.last_timestep, timestep)
            )
        else:
            same = self.last_timestep is not None and self.last_timestep == timestep
        if not same:
            self.step_index += 1
            self.last_timestep = timestep

    def step_in_window(self, timestep: Any = None) -> bool:
        """Whether the step the current call (at ``timestep``) belongs to lies inside ``[start, end)`` and its sigma
        is at least ``min_sigma`` (read only when that bound is set)."""
        progress = self.progress(timestep, self.step_index) if self.progress is not None else None
        bounded = self.settings.min_sigma > 0.0 and self.sigma is not None
        return self.settings.in_window(progress, self.sigma(timestep) if bounded else None)
