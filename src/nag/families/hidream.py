"""HiDream-I1: double- and single-stream blocks over [image, text] with fresh Llama-3 states per block."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..attention import Mechanism
from ..attention.base import BesideStockRows, NAGProcessor
from ..attention.lse import guided_image_and_text
from ..settings import FamilyDefaults
from ..spec import TEXT, Family, ModuleKind, PipelineSpec, TextPath
from ..state import GuidedCall, NegativeText

# -- attention: HiDream's own processors ------------------------------------------------------------------------------


class HiDreamJointAttentionNAG(NAGProcessor):
    """HiDream's double-stream attention on whole negative rows (layout ``"concat"``): ``HiDreamAttnProcessor``
    joins ``[image, text]`` with separate text projections, and its output projections are single linear layers,
    ``attn.to_out`` for the image tokens and ``attn.to_out_t`` for the text. Its per-row inputs, the image key mask
    ``hidden_states_masks`` and the rotary tables over ``[image, text]``, have a row for every row of the call.

    The stock processor runs once on the stock rows and once on the negative rows, whose image tokens, key mask
    and rotary tables are the guided rows': the negative text attends to ``[guided image, negative text]``. ``Z-``
    is captured at ``attn.to_out`` and the guided rows' ``Z+`` combined there; the negative rows' image output is
    the guided rows'. Positive and negative text have the same length (``Family.equal_text_lengths``).
    """

    per_row_arguments = ("hidden_states_masks", "image_rotary_emb")

    def per_row_inputs(self, call: GuidedCall, arguments: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The per-row arguments for the stock rows and for the negative rows (the guided rows' own)."""
        total = arguments["hidden_states"].shape[0]
        positive, negative = {}, {}
        for name in self.per_row_arguments:
            value = arguments.get(name)
            if isinstance(value, torch.Tensor) and value.shape[0] == total:
                positive[name], negative[name] = value[: call.batch], value[call.cond_rows]
            elif name in arguments:  # None, or one row for all
                positive[name] = negative[name] = value
        return positive, negative

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        b, rows = call.batch, call.cond_rows
        image, text = arguments["hidden_states"][:b], arguments["encoder_hidden_states"]
        positive_inputs, negative_inputs = self.per_row_inputs(call, arguments)

        def run_negative(view: Any) -> Any:
            return self.run_stock(
                view, arguments, hidden_states=image[rows], encoder_hidden_states=text[b:], **negative_inputs
            )

        def run_positive(view: Any) -> Any:
            return self.run_stock(
                view, arguments, hidden_states=image, encoder_hidden_states=text[:b], **positive_inputs
            )

        negative, positive = self.guided_projection_inputs(attn, call, run_negative, run_positive)
        image_out = positive[0]
        return torch.cat([image_out, image_out[rows]]), torch.cat([positive[1], negative[1]])


class HiDreamSingleAttentionNAG(HiDreamJointAttentionNAG):
    """HiDream's single-stream attention on whole negative rows: the block's stream ``[image, text]`` (joined by
    the model, ``call.text_lengths`` text tokens per row) with shared projections and one output projection
    ``attn.to_out`` over all tokens; the key mask covers the whole stream.

    The negative rows' stream is ``[guided image, negative text]``, with the guided rows' key mask and rotary
    tables; ``Z-`` is captured at the output projection and the guided rows' image tokens (the first ones) are
    combined there; the negative rows' image output is the guided rows'."""

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        b, rows = call.batch, call.cond_rows
        stream = arguments["hidden_states"]
        image_len = stream.shape[1] - call.text_lengths[0]
        negative_stream = torch.cat([stream[:b][rows, :image_len], stream[b:, image_len:]], dim=1)
        positive_inputs, negative_inputs = self.per_row_inputs(call, arguments)
        negative, positive = self.guided_projection_inputs(
            attn,
            call,
            lambda view: self.run_stock(view, arguments, hidden_states=negative_stream, **negative_inputs),
            lambda view: self.run_stock(view, arguments, hidden_states=stream[:b], **positive_inputs),
            image_len=image_len,
        )
        return torch.cat([positive, torch.cat([positive[rows, :image_len], negative[:, image_len:]], dim=1)])


# HiDream-I1 fast paths (``HiDreamAttnProcessor``): the blocks run on the stock rows and the negative text beside them
# (``ModuleKind.IMAGE_FIRST_BLOCK`` for the double-stream blocks, ``ModuleKind.SAMPLE_BLOCK`` for the single-stream
# ones).
_HIDREAM_PROCESSORS = {"HiDreamAttnProcessor"}


def _hidream_qkv(attn: Any, x: torch.Tensor, key_mask: torch.Tensor | None = None, text: bool = False):
    """Queries, keys and values of ``x`` (heads split) as ``HiDreamAttnProcessor`` builds them: RMS-normed queries
    and keys (the ``*_t`` projections for a double-stream block's text), keys multiplied by the ``(rows, tokens)``
    key mask."""
    suffix = "_t" if text else ""
    dtype = x.dtype
    q = getattr(attn, "q_rms_norm" + suffix)(getattr(attn, "to_q" + suffix)(x)).to(dtype=dtype)
    k = getattr(attn, "k_rms_norm" + suffix)(getattr(attn, "to_k" + suffix)(x)).to(dtype=dtype)
    v = getattr(attn, "to_v" + suffix)(x)
    q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v))
    if key_mask is not None:
        k = k * key_mask[:, :, None, None]
    return q, k, v


def _hidream_rope(q: torch.Tensor, k: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HiDream's rotary embedding of some tokens (``table``: their rows of the tables, which act on each token
    alone): every feature of a head, or the first half when the tables cover half a head, as the processor does."""
    from diffusers.models.transformers.transformer_hidream_image import apply_rope

    if q.shape[-1] == table.shape[-3] * 2:
        return apply_rope(q, k, table)
    (q1, q2), (k1, k2) = q.chunk(2, dim=-1), k.chunk(2, dim=-1)
    q1, k1 = apply_rope(q1, k1, table)
    return torch.cat([q1, q2], dim=-1), torch.cat([k1, k2], dim=-1)


def _guided_rows_of(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The guided rows of a per-row table (a table of one row serves every row)."""
    return table if table.shape[0] == 1 else table[rows]


class FastHiDreamJointAttentionNAG(BesideStockRows, HiDreamJointAttentionNAG):
    """HiDream double-stream fast path: the block runs on the stock rows only (``ModuleKind.IMAGE_FIRST_BLOCK``); the
    negative text's modulated input arrives through ``runtime.text_path`` (set by the block hook) and its attention
    output (after ``attn.to_out_t``) leaves the same way. Every image token is projected once: image->image
    attention is computed once and merged by log-sum-exp with image->positive-text attention (``Z+``) and
    image->negative-text attention (``Z-``); the negative text attends to ``[guided image, negative text]`` with the
    guided rows' key mask and rotary tables (as the straightforward path gives them)."""

    split_text_processors = fast_processors = frozenset(_HIDREAM_PROCESSORS)

    def guided_beside(
        self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any], path: NegativeText
    ) -> Any:
        image, text = arguments["hidden_states"], arguments["encoder_hidden_states"]
        mask, rotary = arguments.get("hidden_states_masks"), arguments["image_rotary_emb"]
        rows, image_len = call.cond_rows, image.shape[1]
        qi, ki, vi = _hidream_qkv(attn, image, mask)
        qt, kt, vt = _hidream_qkv(attn, text, text=True)
        qn, kn, vn = _hidream_qkv(attn, path.normed, text=True)
        qi, ki = _hidream_rope(qi, ki, rotary[:, :image_len])
        qt, kt = _hidream_rope(qt, kt, rotary[:, image_len:])
        qn, kn = _hidream_rope(qn, kn, _guided_rows_of(rotary, rows)[:, image_len:])
        # (the blocks' text, T5 and Llama-3 tokens, has the same length in both branches: no padding to cut)
        lengths = dataclasses.replace(call, positive_text_len=text.shape[1], negative_text_len=text.shape[1])
        z, text_positive, text_negative = guided_image_and_text(self, lengths, (qi, ki, vi), (qt, kt, vt), (qn, kn, vn))
        path.attention = attn.to_out_t(text_negative.to(image.dtype))
        return attn.to_out(z.to(image.dtype)), attn.to_out_t(text_positive.to(image.dtype))


class FastHiDreamSingleAttentionNAG(BesideStockRows, HiDreamSingleAttentionNAG):
    """HiDream single-stream fast path: the block runs on the stock rows only, each ``[image, text]``
    (``ModuleKind.SAMPLE_BLOCK``); the negative text's modulated input arrives through ``runtime.text_path`` (set by the
    block hook) and its attention output (after ``attn.to_out``) leaves the same way. Every image token is projected
    once, image->image attention computed once and merged by log-sum-exp with each branch's image->text attention."""

    split_text_processors = fast_processors = frozenset(_HIDREAM_PROCESSORS)

    def guided_beside(
        self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any], path: NegativeText
    ) -> Any:
        stream = arguments["hidden_states"]
        mask, rotary = arguments.get("hidden_states_masks"), arguments["image_rotary_emb"]
        rows = call.cond_rows
        negative = path.normed
        image_len = stream.shape[1] - negative.shape[1]
        q, k, v = _hidream_qkv(attn, stream, mask)
        q, k = _hidream_rope(q, k, rotary)
        qn, kn, vn = _hidream_qkv(
            attn, negative, _guided_rows_of(mask, rows)[:, image_len:] if mask is not None else None
        )
        qn, kn = _hidream_rope(qn, kn, _guided_rows_of(rotary, rows)[:, image_len:])
        lengths = dataclasses.replace(call, positive_text_len=negative.shape[1], negative_text_len=negative.shape[1])
        z, text_positive, text_negative = guided_image_and_text(
            self,
            lengths,
            (q[:, :image_len], k[:, :image_len], v[:, :image_len]),
            (q[:, image_len:], k[:, image_len:], v[:, image_len:]),
            (qn, kn, vn),
        )
        path.attention = attn.to_out(text_negative.to(stream.dtype))
        return attn.to_out(torch.cat([z, text_positive], dim=1).to(stream.dtype))


HIDREAM_JOINT = Mechanism("hidream_joint", HiDreamJointAttentionNAG, FastHiDreamJointAttentionNAG)
HIDREAM_SINGLE = Mechanism(
    "hidream_single", HiDreamSingleAttentionNAG, FastHiDreamSingleAttentionNAG, ("hidden_states",)
)


# -- the family -------------------------------------------------------------------------------------------------------


def _hidream_text_lengths(arguments: dict[str, Any]) -> list[int]:
    """HiDream: the text every block attends to, per row: the T5 tokens, the last Llama-3 layer's tokens (carried
    from block to block) and the block's own Llama-3 layer's tokens."""
    t5, llama = arguments["encoder_hidden_states_t5"], arguments["encoder_hidden_states_llama3"]
    return [t5.shape[1] + 2 * llama.shape[2]] * t5.shape[0]


def _hidream_text_start(
    block: torch.nn.Module, text: torch.Tensor, temb: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """HiDream block (double- or single-stream), negative text rows, before attention: the text's modulated norm.
    A double-stream block's text has its own norms, modulation chunks (6-11 of 12), output projection and
    feed-forward; a single-stream block's text shares the image's (chunks 0-5 of 6, the mixture-of-experts
    feed-forward)."""
    single = block.attn1.single
    chunks = block.adaLN_modulation(temb)[:, None].chunk(6 if single else 12, dim=-1)
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = chunks[:6] if single else chunks[6:]
    normed = (block.norm1_i if single else block.norm1_t)(text).to(dtype=text.dtype) * (1 + scale) + shift
    return normed, {"residual": text, "gate": gate, "mlp": (shift_mlp, scale_mlp, gate_mlp)}


def _hidream_text_finish(block: torch.nn.Module, saved: dict[str, Any], attention: torch.Tensor) -> torch.Tensor:
    """... after attention (its output projection included): the gated residuals of attention and feed-forward."""
    single = block.attn1.single
    norm3, ff = (block.norm3_i, block.ff_i) if single else (block.norm3_t, block.ff_t)
    text = saved["gate"] * attention + saved["residual"]
    shift, scale, gate = saved["mlp"]
    normed = norm3(text).to(dtype=text.dtype) * (1 + scale) + shift
    return gate * ff(normed) + text


FAMILIES = (
    # HiDream-I1: double-stream blocks over [image, text] (separate text projections, an image-only output
    # projection), then single-stream blocks over the [image, text] stream the model joins itself (shared
    # projections, one output projection over all tokens); every block's text is [T5, last Llama-3 layer
    # (carried through the blocks), the block's own Llama-3 layer (fresh)]; the modulation includes the pooled
    # CLIP embeddings; mixture-of-experts feed-forwards route every token on its own (extra rows change no
    # other row's routing). Whole negative rows carry the negative T5 states, Llama-3 states (batch axis 1)
    # and pooled embeddings; no text mask, so both branches' texts must have the same length (the pipeline
    # pads both to max_sequence_length).
    Family(
        name="hidream",
        denoisers=("HiDreamImageTransformer2DModel",),
        attention=(
            (r"double_stream_blocks\.\d+\.block\.attn1", HIDREAM_JOINT),
            (r"single_stream_blocks\.\d+\.block\.attn1", HIDREAM_SINGLE),
        ),
        layout="concat",
        text_kwarg="encoder_hidden_states_t5",
        timestep_kwarg="timesteps",
        negative_keys=("encoder_hidden_states", "encoder_hidden_states_llama3", "pooled_embeds"),
        row_kwargs=("timesteps", "img_ids", "img_sizes", "hidden_states_masks"),
        static_text=False,
        row_text_lengths=_hidream_text_lengths,
        batch_dims=(("encoder_hidden_states_llama3", 1),),
        equal_text_lengths=True,
        stock_image_kwargs=("temb",),
        # fast path: the double-stream blocks run on the stock rows with the negative text beside them (its own
        # rows' modulation; the image side the stock rows'), the single-stream blocks likewise (the stream ends
        # with the text, so its image is the rest), the final layer on the stock rows
        modules={
            ModuleKind.IMAGE_FIRST_BLOCK: r"double_stream_blocks\.\d+\.block",
            ModuleKind.SAMPLE_BLOCK: r"single_stream_blocks\.\d+\.block",
            ModuleKind.STOCK_ROW_MODULE: r"final_layer",
        },
        text_path=TextPath(_hidream_text_start, _hidream_text_finish),
    ),
)


PIPELINES = (
    # HiDream-I1 (full / dev / fast; CFG batched as [uncond, cond]): no published NAG defaults; FLUX.1's (the
    # closest published flow-matching image DiT) are used. encode_prompt returns T5, Llama-3 (all layers,
    # batch on axis 1) and pooled CLIP embeddings, each followed by its CFG negative.
    PipelineSpec(
        "HiDreamImagePipeline",
        "hidream",
        "HiDream-I1",
        FamilyDefaults(5.0, 2.5, 0.25),
        (TEXT, None, "encoder_hidden_states_llama3", None, "pooled_embeds", None),
        negative_embed_names={
            "negative_prompt_embeds_t5": TEXT,
            "negative_prompt_embeds_llama3": "encoder_hidden_states_llama3",
            "negative_pooled_prompt_embeds": "pooled_embeds",
        },
    ),
)
