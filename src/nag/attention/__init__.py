"""NAG attention mechanisms, grouped by how a layout carries the negative text.

Every module that attends to text gets a wrapper around its stock processor. A :class:`Mechanism` pairs the
straightforward wrapper (the stock processor once per branch: works with any processor and backend) with the fast
one (NAG-aware math for the stock processors in its ``fast_processors``: image tokens projected and attended once,
negative keys/values cached; anything else falls back to the straightforward path, per call). Families name a
mechanism for each text-attention module; ``processor_table()`` lists which stock processor gets which wrapper.

Modules, in import order: ``placement`` (where a fast path's attention runs: this process, or inside diffusers'
parallel attention under context parallelism), ``base`` (the wrapper and shared helpers), ``lse`` (the log-sum-exp
merge of joint attention), ``cross``, ``joint``, ``single``, ``rows`` (shared rows of concatenating models),
``per_sample`` and ``prefix`` (causal prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import NAGProcessor, pad_tokens, wrap_processor
from .cross import CrossAttentionNAG, FastCrossAttentionNAG
from .joint import FastJointAttentionNAG, JointAttentionNAG
from .per_sample import (
    FastRowsPerSampleAttentionNAG,
    FastRowsPerSampleImageFirstAttentionNAG,
    RowsPerSampleAttentionNAG,
    RowsPerSampleImageFirstAttentionNAG,
)
from .prefix import CausalPrefixAttentionNAG, FastCausalPrefixAttentionNAG
from .rows import (
    FastOuterMaskJointAttentionNAG,
    FastRowsImageFirstAttentionNAG,
    FastRowsJointAttentionNAG,
    FastRowsSharedAttentionNAG,
    RowsImageFirstAttentionNAG,
    RowsJointAttentionNAG,
    RowsSharedAttentionNAG,
)
from .single import (
    FastFusedSingleAttentionNAG,
    FastOuterMaskSingleAttentionNAG,
    FastSingleProjectedAttentionNAG,
    FastSingleStreamAttentionNAG,
    FusedSingleAttentionNAG,
    SingleProjectedAttentionNAG,
    SingleStreamAttentionNAG,
)

__all__ = ["Mechanism", "MECHANISMS", "NAGProcessor", "pad_tokens", "processor_table", "wrap_processor"]


@dataclass(frozen=True)
class Mechanism:
    """One kind of text attention: its straightforward and its fast NAG wrapper, and the stock processor's
    parameters the wrappers bind by name (a processor without them cannot be driven: refused at ``apply``)."""

    name: str
    straightforward: type[NAGProcessor]
    fast: type[NAGProcessor]
    binds: tuple[str, ...] = ("hidden_states", "encoder_hidden_states")

    def wrapper(self, fast: bool) -> type[NAGProcessor]:
        return self.fast if fast else self.straightforward


#: cross-attention to text (UNet, PixArt, Sana, Wan, LTX): the negative context after the positive one
CROSS = Mechanism("cross", CrossAttentionNAG, FastCrossAttentionNAG)
#: joint attention with separate text projections, negative text rows along the text batch (Flux, SD3, Qwen-Image)
JOINT = Mechanism("joint", JointAttentionNAG, FastJointAttentionNAG)
#: attention over a block's own [text, image] with no output projection in the processor (Flux single blocks)
SINGLE = Mechanism("single", SingleStreamAttentionNAG, FastSingleStreamAttentionNAG, ("hidden_states",))
#: ... with the output projection over [text, image] in the processor (AuraFlow single blocks)
SINGLE_PROJECTED = Mechanism(
    "single_projected", SingleProjectedAttentionNAG, FastSingleProjectedAttentionNAG, ("hidden_states",)
)
#: ... ending in one projection over [attention, MLP] (FLUX.2 parallel single blocks)
SINGLE_FUSED = Mechanism("single_fused", FusedSingleAttentionNAG, FastFusedSingleAttentionNAG, ("hidden_states",))
#: ... under the outer product of the model's (rows, text + image) mask (Chroma single blocks)
SINGLE_OUTER_MASK = Mechanism(
    "single_outer_mask", SingleStreamAttentionNAG, FastOuterMaskSingleAttentionNAG, ("hidden_states",)
)
#: joint attention on whole negative rows (concat layout: AuraFlow joint blocks)
JOINT_ROWS = Mechanism("joint_rows", RowsJointAttentionNAG, FastRowsJointAttentionNAG)
#: ... under the outer product of the model's mask (Chroma double blocks)
JOINT_ROWS_OUTER_MASK = Mechanism("joint_rows_outer_mask", RowsJointAttentionNAG, FastOuterMaskJointAttentionNAG)
#: ... with shared projections over [text, image], output projection included (CogView4, CogVideoX)
JOINT_ROWS_SHARED = Mechanism("joint_rows_shared", RowsSharedAttentionNAG, FastRowsSharedAttentionNAG)
#: ... over [image, text] (the Hunyuan models' double and single blocks)
JOINT_ROWS_IMAGE_FIRST = Mechanism("joint_rows_image_first", RowsImageFirstAttentionNAG, FastRowsImageFirstAttentionNAG)
#: self-attention over per-sample [text, image, padding] rows (Lumina2)
JOINT_ROWS_PER_SAMPLE = Mechanism("joint_rows_per_sample", RowsPerSampleAttentionNAG, FastRowsPerSampleAttentionNAG)
#: ... over per-sample [image, text, padding] rows (Z-Image)
JOINT_ROWS_PER_SAMPLE_IMAGE_FIRST = Mechanism(
    "joint_rows_per_sample_image_first",
    RowsPerSampleImageFirstAttentionNAG,
    FastRowsPerSampleImageFirstAttentionNAG,
    ("hidden_states",),
)
#: block-causal single-stream attention with the negative prefix recorded in a call of its own (Qwen-Image 2.1)
CAUSAL_PREFIX = Mechanism(
    "causal_prefix",
    CausalPrefixAttentionNAG,
    FastCausalPrefixAttentionNAG,
    (
        "hidden_states",
        "attention_mask",
        "rotary_emb",
        "layer_cache",
        "kv_cache_mode",
        "cache_write_slice",
        "segments",
        "key_valid",
    ),
)

MECHANISMS: dict[str, Mechanism] = {
    m.name: m
    for m in (
        CROSS,
        JOINT,
        SINGLE,
        SINGLE_PROJECTED,
        SINGLE_FUSED,
        SINGLE_OUTER_MASK,
        JOINT_ROWS,
        JOINT_ROWS_OUTER_MASK,
        JOINT_ROWS_SHARED,
        JOINT_ROWS_IMAGE_FIRST,
        JOINT_ROWS_PER_SAMPLE,
        JOINT_ROWS_PER_SAMPLE_IMAGE_FIRST,
        CAUSAL_PREFIX,
    )
}


def processor_table(mechanisms: dict[str, Mechanism] | None = None) -> list[tuple[str, str, str, str]]:
    """``(mechanism, stock processor, straightforward wrapper, fast wrapper)`` rows: which NAG wrapper serves which
    stock processor. Processors not listed under a mechanism get its straightforward wrapper (``"*"``: any)."""
    rows = []
    for mechanism in (mechanisms or MECHANISMS).values():
        fast = mechanism.fast.fast_processors
        for kind in sorted(fast) if fast else ["*"]:
            served = mechanism.fast if fast is None or kind != "*" else mechanism.straightforward
            rows.append((mechanism.name, kind, mechanism.straightforward.__name__, served.__name__))
    return rows
