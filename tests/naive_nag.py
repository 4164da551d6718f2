"""Naive, independent reference implementation of Normalized Attention Guidance (NAG, arXiv 2505.21179).

This module is the ground truth the test suite compares the ``nag`` library against.  It deliberately imports
nothing from ``nag`` and is written plainly from the equations and from reading the diffusers 0.42.1 model code:

* ``naive_combine``                 - the NAG extrapolate / normalise / blend step.
* ``naive_attention``               - softmax attention written as explicit matmul + softmax.
* ``naive_cross_attention_forward`` - UNet2DConditionModel (SD1.5 / SDXL), PixArtTransformer2DModel,
                                      SanaTransformer2DModel, WanTransformer3DModel.  A naive processor is installed
                                      on every text cross-attention module (``attn2``) for the duration of one stock
                                      forward call and removed again afterwards.
* ``naive_flux_forward``            - FluxTransformer2DModel, re-implemented block by block.
* ``naive_sd3_forward``             - SD3Transformer2DModel (incl. SD3.5 dual attention), re-implemented block by block.
* ``naive_ltx2_forward``            - LTX2VideoTransformer3DModel: naive processors on the video stream's text cross
                                      attention, the negative text modulated like the positive in each block.
* ``naive_qwenimage21_forward``     - QwenImage21Transformer2DModel: the dense block-causal mask written out, a second
                                      sequence [negative text, guided target image] carried through every block.

Clarity over speed: every branch is computed separately and the negative text stream is carried alongside the
single (guided) image stream.

Conventions used throughout:
* ``rows`` / ``cond_rows``: the batch indices that are guided.  Rows not listed are computed exactly as the stock
  model would.  Negative tensors carry one row per guided row, in the order of ``rows``.
* q / k / v tensors are laid out (batch, tokens, heads, head_dim) unless stated otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------------
# NAG math
# ----------------------------------------------------------------------------------------------------------------------


def naive_combine(z_pos, z_neg, scale, tau, alpha, p=1, eps=1e-6):
    """NAG combination of the positive and negative attention outputs (before the output projection).

    z_tilde = scale * z_pos - (scale - 1) * z_neg
    r       = max(||z_tilde||_p, eps) / max(||z_pos||_p, eps)        (per token, over the whole last dim)
    z_hat   = z_tilde * min(r, tau) / r
    out     = alpha * z_hat + (1 - alpha) * z_pos

    Everything is computed in float32 and cast back to ``z_pos.dtype``.
    """
    out_dtype = z_pos.dtype
    zp = z_pos.float()
    zn = z_neg.float()

    z_tilde = scale * zp - (scale - 1.0) * zn

    norm_pos = torch.linalg.vector_norm(zp, ord=p, dim=-1, keepdim=True).clamp_min(eps)
    norm_tilde = torch.linalg.vector_norm(z_tilde, ord=p, dim=-1, keepdim=True).clamp_min(eps)
    ratio = norm_tilde / norm_pos

    capped_ratio = torch.minimum(ratio, torch.full_like(ratio, float(tau)))
    z_hat = z_tilde * capped_ratio / ratio

    out = alpha * z_hat + (1.0 - alpha) * zp
    return out.to(out_dtype)


def naive_attention(q, k, v, bias=None):
    """Plain softmax attention.

    q: (B, Sq, H, D), k / v: (B, Sk, H, D); bias: additive, broadcastable to (B, H, Sq, Sk).
    Scale is 1 / sqrt(D) (what F.scaled_dot_product_attention uses by default, i.e. what every stock processor
    touched here uses).  Computed in float32; returns (B, Sq, H * D) in q's dtype.
    """
    dtype = q.dtype
    head_dim = q.shape[-1]
    qh = q.transpose(1, 2).float()  # (B, H, Sq, D)
    kh = k.transpose(1, 2).float()
    vh = v.transpose(1, 2).float()

    scores = torch.matmul(qh, kh.transpose(-1, -2)) / math.sqrt(head_dim)  # (B, H, Sq, Sk)
    if bias is not None:
        scores = scores + bias.float()
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vh)  # (B, H, Sq, D)

    out = out.transpose(1, 2)  # (B, Sq, H, D)
    out = out.reshape(out.shape[0], out.shape[1], -1)
    return out.to(dtype)


def _guided_attention(q, k_pos, v_pos, bias_pos, k_neg, v_neg, bias_neg, rows, nag, head_gates=None):
    """Attention for all rows with the positive keys; for ``rows`` NAG-combine with the negative keys.

    q: (B, Sq, H, D); k_neg / v_neg have len(rows) rows; ``head_gates``: (B, Sq, H) factors on each head's output
    (both branches), applied before the combination.  Returns (B, Sq, H * D) (before the output projection).
    """

    def gated(z, gates):
        if gates is None:
            return z
        return (z.unflatten(-1, (gates.shape[-1], -1)) * gates.unsqueeze(-1)).flatten(-2)

    z_pos = gated(naive_attention(q, k_pos, v_pos, bias_pos), head_gates)
    if k_neg is None or len(rows) == 0:
        return z_pos
    z_neg = gated(naive_attention(q[rows], k_neg, v_neg, bias_neg), None if head_gates is None else head_gates[rows])
    out = z_pos.clone()
    out[rows] = naive_combine(z_pos[rows], z_neg, **nag)
    return out


def _rows_or_all(cond_rows, batch_size):
    if cond_rows is None:
        return list(range(batch_size))
    rows = [int(r) for r in cond_rows]
    if len(set(rows)) != len(rows) or any(r < 0 or r >= batch_size for r in rows):
        raise ValueError(f"bad cond_rows {cond_rows} for batch size {batch_size}")
    return rows


def _split_heads(x, heads):
    """(B, S, H * D) -> (B, S, H, D)."""
    return x.reshape(x.shape[0], x.shape[1], heads, x.shape[-1] // heads)


# ----------------------------------------------------------------------------------------------------------------------
# Cross-attention models: UNet (SD1.5 / SDXL), PixArt, Sana, Wan
# ----------------------------------------------------------------------------------------------------------------------

# Which stock processor each kind's ``attn2`` is expected to carry; the naive processor re-implements that one.
_EXPECTED_STOCK_PROCESSORS = {
    "unet": ("AttnProcessor2_0", "IPAdapterAttnProcessor2_0"),
    "pixart": ("AttnProcessor2_0",),
    "sana": ("SanaAttnProcessor2_0",),
    "wan": ("WanAttnProcessor",),
    "ltx": ("LTXVideoAttnProcessor",),
    "skyreels_v2": ("SkyReelsV2AttnProcessor",),
    "wan_vace": ("WanAttnProcessor",),  # attn2 of the main blocks and of the VACE blocks
}


def _mask_bias_4d(mask, key_len):
    """Additive bias as the stock processors shape it: (B, L) or (B, 1|Sq, L) -> broadcastable (B, 1, 1|Sq, L).

    (``Attention.prepare_attention_mask`` repeats the (B, 1, L) bias per head and views it as (B, H, 1, L); a
    broadcast over the head dimension is the same thing.)
    """
    if mask is None:
        return None
    if mask.shape[-1] != key_len:
        # stock prepare_attention_mask would zero-pad here; not a case the reference supports
        raise NotImplementedError(f"attention mask length {mask.shape[-1]} != key length {key_len}")
    if mask.ndim == 2:
        return mask[:, None, None, :]
    if mask.ndim == 3:
        return mask[:, None, :, :]
    return mask


class _NaiveCrossAttnProcessor:
    """Naive replacement for the stock processor of a text cross-attention module, with NAG on ``rows``.

    ``style`` picks which stock processor is re-implemented:
      "attn2_0" - diffusers AttnProcessor2_0 (UNet, PixArt)
      "sana"    - SanaAttnProcessor2_0 (q/k norms on the flat projections, rescale_output_factor, no residual)
      "wan"     - WanAttnProcessor (RMS q/k norms across heads before the heads split, no mask)
    The negative context (already run through the model's text preprocessing) and its additive bias are captured
    here before the forward call.
    """

    def __init__(self, style, neg_context, neg_bias, rows, nag):
        self.style = style
        self.neg_context = neg_context
        self.neg_bias = neg_bias
        self.rows = rows
        self.nag = nag

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if self.style == "attn2_0":
            return self._attn2_0(attn, hidden_states, encoder_hidden_states, attention_mask, kwargs.get("temb"))
        if self.style == "sana":
            return self._sana(attn, hidden_states, encoder_hidden_states, attention_mask)
        if self.style == "wan":
            return self._wan(attn, hidden_states, encoder_hidden_states, attention_mask)
        if self.style == "ltx":
            return self._ltx(attn, hidden_states, encoder_hidden_states, attention_mask)
        raise ValueError(self.style)

    def _guided(self, encoder_hidden_states):
        """Whether this call is a text cross-attention that gets NAG."""
        return encoder_hidden_states is not None and self.neg_context is not None and len(self.rows) > 0

    # -- diffusers AttnProcessor2_0 ------------------------------------------------------------------------------
    def _attn2_0(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, image_prompt=None):
        """``image_prompt``: ``(q -> term)`` added to the attention output before the output projection, unguided
        (an IP-Adapter's image-prompt attention)."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        guided = self._guided(encoder_hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states

        heads = attn.heads

        def project_kv(ctx):
            k = _split_heads(attn.to_k(ctx), heads)
            v = _split_heads(attn.to_v(ctx), heads)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            return k, v

        q = _split_heads(attn.to_q(hidden_states), heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        k, v = project_kv(context)
        bias = _mask_bias_4d(attention_mask, k.shape[1])

        k_neg = v_neg = bias_neg = None
        if guided:
            neg_context = self.neg_context
            if attn.norm_cross:
                neg_context = attn.norm_encoder_hidden_states(neg_context)
            k_neg, v_neg = project_kv(neg_context)
            bias_neg = _mask_bias_4d(self.neg_bias, k_neg.shape[1])

        out = _guided_attention(q, k, v, bias, k_neg, v_neg, bias_neg, self.rows if guided else [], self.nag)
        if image_prompt is not None:
            out = out + image_prompt(q)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        return out

    # -- SanaAttnProcessor2_0 --------------------------------------------------------------------------------------
    def _sana(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        guided = self._guided(encoder_hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        heads = attn.heads

        def project_kv(ctx):
            k = attn.to_k(ctx)
            if attn.norm_k is not None:
                k = attn.norm_k(k)  # Sana normalises the flat projection (before the heads split)
            return _split_heads(k, heads), _split_heads(attn.to_v(ctx), heads)

        q = attn.to_q(hidden_states)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        q = _split_heads(q, heads)
        k, v = project_kv(context)
        bias = _mask_bias_4d(attention_mask, k.shape[1])

        k_neg = v_neg = bias_neg = None
        if guided:
            k_neg, v_neg = project_kv(self.neg_context)
            bias_neg = _mask_bias_4d(self.neg_bias, k_neg.shape[1])

        out = _guided_attention(q, k, v, bias, k_neg, v_neg, bias_neg, self.rows if guided else [], self.nag)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        out = out / attn.rescale_output_factor
        return out

    # -- WanAttnProcessor (text-to-video cross attention) -------------------------------------------------------
    def _wan(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        guided = self._guided(encoder_hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        heads = attn.heads
        image_out = 0
        if attn.add_k_proj is not None:
            # Image-to-video: CLIP image tokens precede the 512 text tokens; their attention is added
            # after NAG (only the text branch is guided).
            image, context = context[:, : context.shape[1] - 512], context[:, context.shape[1] - 512 :]
            k_img = _split_heads(attn.norm_added_k(attn.add_k_proj(image)), heads)
            v_img = _split_heads(attn.add_v_proj(image), heads)
            q_img = _split_heads(attn.norm_q(attn.to_q(hidden_states)), heads)
            image_out = naive_attention(q_img, k_img, v_img)

        def project_kv(ctx):
            k = attn.norm_k(attn.to_k(ctx))  # RMS norm across all heads, before the heads split
            return _split_heads(k, heads), _split_heads(attn.to_v(ctx), heads)

        q = _split_heads(attn.norm_q(attn.to_q(hidden_states)), heads)
        k, v = project_kv(context)
        bias = _mask_bias_4d(attention_mask, k.shape[1])

        k_neg = v_neg = None
        if guided:
            k_neg, v_neg = project_kv(self.neg_context)

        out = _guided_attention(q, k, v, bias, k_neg, v_neg, None, self.rows if guided else [], self.nag)
        out = attn.to_out[0](out + image_out)
        out = attn.to_out[1](out)
        return out


    # -- LTXVideoAttnProcessor (cross attention: no rotary embedding) ------------------------------------------------
    def _ltx(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        guided = self._guided(encoder_hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        heads = attn.heads

        def project_kv(ctx):
            k = attn.norm_k(attn.to_k(ctx))  # RMS norm over the flat projection, before the heads split
            return _split_heads(k, heads), _split_heads(attn.to_v(ctx), heads)

        q = _split_heads(attn.norm_q(attn.to_q(hidden_states)), heads)
        k, v = project_kv(context)
        bias = _mask_bias_4d(attention_mask, k.shape[1])
        k_neg = v_neg = bias_neg = None
        if guided:
            k_neg, v_neg = project_kv(self.neg_context)
            bias_neg = _mask_bias_4d(self.neg_bias, k_neg.shape[1])
        out = _guided_attention(q, k, v, bias, k_neg, v_neg, bias_neg, self.rows if guided else [], self.nag)
        return attn.to_out[1](attn.to_out[0](out))


class _NaiveIPAdapterProcessor:
    """IPAdapterAttnProcessor2_0 written out, NAG on its text branch only: with the UNet's context ``(text, [image
    embeddings per adapter])``, ``out = to_out(NAG(Attn(q, K+, V+), Attn(q, K-, V-)) + sum_i scale_i * Attn(q,
    K_ip_i, V_ip_i))``: the image-prompt attention is added unguided (no IP masks; the processor applies no q/k
    norms). The adapter weights and scales are read from the module's own IP-Adapter processor."""

    def __init__(self, text, ip_processor):
        self.text = text
        self.ip = ip_processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, scale=1.0,
                 ip_adapter_masks=None):
        if ip_adapter_masks is not None:
            raise NotImplementedError("naive reference: IP-Adapter masks")
        text, image_embeds = encoder_hidden_states

        def image_prompt(q):
            total = 0
            for states, weight, to_k, to_v in zip(image_embeds, self.ip.scale, self.ip.to_k_ip, self.ip.to_v_ip):
                # (rows, images, tokens, width) or (rows, tokens, width): every image's tokens are keys of its row
                k = to_k(states).reshape(q.shape[0], -1, *q.shape[2:])
                v = to_v(states).reshape(q.shape[0], -1, *q.shape[2:])
                total = total + weight * naive_attention(q, k, v)
            return total

        return self.text._attn2_0(attn, hidden_states, text, attention_mask, temb, image_prompt)


def _preprocess_negative_context(model, kind, neg):
    """Apply to the negative text exactly the preprocessing the model applies to its ``encoder_hidden_states``."""
    if kind == "unet":
        # (an IP-Adapter's image projection works on the image embeddings, not the text)
        ip_adapter = model.config.encoder_hid_dim_type == "ip_image_proj"
        if getattr(model, "encoder_hid_proj", None) is not None and not ip_adapter:
            raise NotImplementedError("naive reference: UNet with encoder_hid_proj is not supported")
        return neg
    if kind == "pixart":
        if model.caption_projection is not None:
            neg = model.caption_projection(neg)
            neg = neg.view(neg.shape[0], -1, model.inner_dim)
        return neg
    if kind == "sana":
        neg = model.caption_projection(neg)
        neg = neg.view(neg.shape[0], -1, neg.shape[-1])
        neg = model.caption_norm(neg)
        return neg
    if kind in ("wan", "skyreels_v2", "wan_vace"):
        return model.condition_embedder.text_embedder(neg)
    if kind == "ltx":
        neg = model.caption_projection(neg)
        return neg.view(neg.shape[0], -1, neg.shape[-1])
    raise ValueError(f"unknown kind {kind!r}")


def _negative_bias(kind, neg_mask, dtype):
    """The model's mask treatment applied to the negative mask: 0/1 (B, L) -> additive (1 - m) * -10000, (B, 1, L)."""
    if neg_mask is None:
        return None
    if kind in ("wan", "skyreels_v2", "wan_vace"):
        raise ValueError(f"{kind} takes no encoder attention mask")
    if neg_mask.ndim == 2:
        bias = (1 - neg_mask.to(dtype)) * -10000.0
        return bias.unsqueeze(1)
    return neg_mask  # already a bias


def _text_cross_attention_modules(model):
    """Every ``attn2`` module (the text cross attention of the transformer blocks)."""
    modules = []
    for name, module in model.named_modules():
        if name.split(".")[-1] == "attn2" and hasattr(module, "processor"):
            modules.append((name, module))
    return modules


def naive_cross_attention_forward(
    model,
    kind,
    forward_kwargs,
    neg_encoder_hidden_states,
    neg_encoder_attention_mask=None,
    scale=1.0,
    tau=2.5,
    alpha=0.25,
    p=1,
    cond_rows=None,
):
    """Stock forward of a cross-attention model with naive NAG processors on every text cross attention.

    model: UNet2DConditionModel ("unet"), PixArtTransformer2DModel ("pixart"), SanaTransformer2DModel ("sana") or
    WanTransformer3DModel ("wan").  forward_kwargs: the stock model's forward kwargs.  The negative text
    (``neg_encoder_hidden_states``, raw, one row per guided row) and its 0/1 mask (or None) go through the same
    preprocessing as the positive.  ``neg_encoder_hidden_states=None`` gives the stock output (naive attention).
    Returns the output tensor.
    """
    if kind not in _EXPECTED_STOCK_PROCESSORS:
        raise ValueError(f"unknown kind {kind!r}")
    kwargs = dict(forward_kwargs)
    x = kwargs["sample"] if kind == "unet" else kwargs["hidden_states"]
    rows = _rows_or_all(cond_rows, x.shape[0])

    neg_context = neg_bias = None
    if neg_encoder_hidden_states is not None and len(rows) > 0:
        if neg_encoder_hidden_states.shape[0] != len(rows):
            raise ValueError("negative tensors must have one row per guided row")
        if neg_encoder_hidden_states.shape[1] == 0:
            raise ValueError("empty negative text")
        neg_context = _preprocess_negative_context(model, kind, neg_encoder_hidden_states)
        neg_bias = _negative_bias(kind, neg_encoder_attention_mask, x.dtype)

    style = {"unet": "attn2_0", "pixart": "attn2_0", "sana": "sana", "wan": "wan", "ltx": "ltx", "skyreels_v2": "wan",
             "wan_vace": "wan"}[kind]
    nag = dict(scale=scale, tau=tau, alpha=alpha, p=p)
    processor = _NaiveCrossAttnProcessor(style, neg_context, neg_bias, rows, nag)

    modules = _text_cross_attention_modules(model)
    if not modules:
        raise ValueError("model has no attn2 modules")
    for name, module in modules:
        stock_name = type(module.processor).__name__
        if stock_name not in _EXPECTED_STOCK_PROCESSORS[kind]:
            raise RuntimeError(
                f"{name} carries {stock_name}, expected {_EXPECTED_STOCK_PROCESSORS[kind]} "
                "(is something else installed?)"
            )

    originals = [(module, module.processor) for _, module in modules]
    try:
        for module, original in originals:
            if type(original).__name__ == "IPAdapterAttnProcessor2_0":
                module.set_processor(_NaiveIPAdapterProcessor(processor, original))
            else:
                module.set_processor(processor)
        kwargs["return_dict"] = False
        out = model(**kwargs)[0]
    finally:
        for module, original in originals:
            module.set_processor(original)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Shared pieces for the joint-attention models
# ----------------------------------------------------------------------------------------------------------------------


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def _ada_params(norm_module, temb, n):
    """AdaLayerNormZero / ...Single / SD35AdaLayerNormZeroX: linear(silu(temb)) chunked into n (B, dim) pieces."""
    return norm_module.linear(F.silu(temb)).chunk(n, dim=1)


def _ada_continuous(norm_module, x, temb):
    """AdaLayerNormContinuous: linear(silu(temb)) -> (scale, shift)  (note the order), then norm(x)*(1+scale)+shift."""
    scale, shift = norm_module.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)
    return _modulate(norm_module.norm(x), shift, scale)


def _per_row(t, batch_size, rows, name):
    """Select the guided rows of a per-sample conditioning tensor (timestep / guidance)."""
    t = t.reshape(-1)
    if t.numel() == 1:
        return t.expand(len(rows))
    if t.shape[0] != batch_size:
        raise ValueError(f"{name} has {t.shape[0]} entries for batch size {batch_size}")
    return t[rows]


# ----------------------------------------------------------------------------------------------------------------------
# Flux
# ----------------------------------------------------------------------------------------------------------------------


def _flux_rope(x, cos, sin):
    """Flux rotary embedding on (B, S, H, D) with tables (S, D): interleaved (real, imag) pairs."""
    x_pairs = x.reshape(*x.shape[:-1], -1, 2)
    x_real, x_imag = x_pairs[..., 0], x_pairs[..., 1]
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    cos = cos[None, :, None, :].to(x.device)
    sin = sin[None, :, None, :].to(x.device)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def _flux_image_qkv(attn, x):
    q = attn.norm_q(_split_heads(attn.to_q(x), attn.heads))
    k = attn.norm_k(_split_heads(attn.to_k(x), attn.heads))
    v = _split_heads(attn.to_v(x), attn.heads)
    return q, k, v


def _flux_text_qkv(attn, c):
    q = attn.norm_added_q(_split_heads(attn.add_q_proj(c), attn.heads))
    k = attn.norm_added_k(_split_heads(attn.add_k_proj(c), attn.heads))
    v = _split_heads(attn.add_v_proj(c), attn.heads)
    return q, k, v


def _flux_joint_attention(q_txt, k_txt, v_txt, q_img, k_img, v_img, rope):
    """Attention over [text, image] (Flux order) with RoPE; returns (text rows, image rows), before projections."""
    cos, sin = rope
    q = _flux_rope(torch.cat([q_txt, q_img], dim=1), cos, sin)
    k = _flux_rope(torch.cat([k_txt, k_img], dim=1), cos, sin)
    v = torch.cat([v_txt, v_img], dim=1)
    out = naive_attention(q, k, v).to(q.dtype)
    n_txt = q_txt.shape[1]
    return out[:, :n_txt], out[:, n_txt:]


def _flux_text_tail(block, txt, txt_attn, c_params):
    """Text path of a Flux double block after attention, with the text stream's own modulation params."""
    _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_params
    txt = txt + c_gate_msa[:, None] * txt_attn
    normed = _modulate(block.norm2_context(txt), c_shift_mlp, c_scale_mlp)
    txt = txt + c_gate_mlp[:, None] * block.ff_context(normed)
    if txt.dtype == torch.float16:
        txt = txt.clip(-65504, 65504)
    return txt


def _flux_image_prompt(attn, q_img, ip_hidden_states):
    """Flux IP-Adapter term: the image queries (normed, before RoPE) attend to each adapter's image-prompt tokens
    with the processor's ``to_k_ip``/``to_v_ip``, scaled by its scale and summed; no text involved."""
    processor = attn.processor
    term = 0
    for tokens, scale, to_k, to_v in zip(ip_hidden_states, processor.scale, processor.to_k_ip, processor.to_v_ip):
        # tokens: (B, images, tokens per image, width); every image's tokens are keys
        k = to_k(tokens).reshape(q_img.shape[0], -1, attn.heads, q_img.shape[-1])
        v = to_v(tokens).reshape(q_img.shape[0], -1, attn.heads, q_img.shape[-1])
        term = term + scale * naive_attention(q_img, k, v)
    return term


def _flux_double_block(block, img, txt, temb, rope, txt_neg, temb_neg, rope_neg, rows, nag, ip_hidden_states=None):
    attn = block.attn
    guided = txt_neg is not None

    # modulation: image and positive text with temb, negative text with temb_neg
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _ada_params(block.norm1, temb, 6)
    img_n = _modulate(block.norm1.norm(img), shift_msa, scale_msa)
    c_params = _ada_params(block.norm1_context, temb, 6)
    txt_n = _modulate(block.norm1_context.norm(txt), c_params[0], c_params[1])

    q_img, k_img, v_img = _flux_image_qkv(attn, img_n)
    q_txt, k_txt, v_txt = _flux_text_qkv(attn, txt_n)
    txt_attn, img_attn = _flux_joint_attention(q_txt, k_txt, v_txt, q_img, k_img, v_img, rope)

    if guided:
        cn_params = _ada_params(block.norm1_context, temb_neg, 6)
        txtn_n = _modulate(block.norm1_context.norm(txt_neg), cn_params[0], cn_params[1])
        qn_txt, kn_txt, vn_txt = _flux_text_qkv(attn, txtn_n)
        txtn_attn, img_attn_neg = _flux_joint_attention(
            qn_txt, kn_txt, vn_txt, q_img[rows], k_img[rows], v_img[rows], rope_neg
        )
        img_attn = img_attn.clone()
        img_attn[rows] = naive_combine(img_attn[rows], img_attn_neg, **nag)

    # image path
    img_attn = attn.to_out[1](attn.to_out[0](img_attn))
    img = img + gate_msa[:, None] * img_attn
    normed = _modulate(block.norm2(img), shift_mlp, scale_mlp)
    img = img + gate_mlp[:, None] * block.ff(normed)
    if ip_hidden_states is not None:  # the image prompt, added unguided after the MLP
        img = img + _flux_image_prompt(attn, q_img, ip_hidden_states)

    # text paths
    txt = _flux_text_tail(block, txt, attn.to_add_out(txt_attn), c_params)
    if guided:
        txt_neg = _flux_text_tail(block, txt_neg, attn.to_add_out(txtn_attn), cn_params)
    return img, txt, txt_neg


def _flux_single_block(block, img, txt, temb, rope, txt_neg, temb_neg, rope_neg, rows, nag):
    """Flux single-stream block.  Stock: x = cat([text, image]); norm; attn (no out proj) || MLP; proj_out(cat)."""
    attn = block.attn
    guided = txt_neg is not None
    n_txt = txt.shape[1]

    shift, scale, gate = _ada_params(block.norm, temb, 3)
    x = torch.cat([txt, img], dim=1)
    x_n = _modulate(block.norm.norm(x), shift, scale)
    txt_n, img_n = x_n[:, :n_txt], x_n[:, n_txt:]
    mlp = block.act_mlp(block.proj_mlp(x_n))

    q_txt, k_txt, v_txt = _flux_image_qkv(attn, txt_n)  # single blocks use to_q/k/v for all tokens
    q_img, k_img, v_img = _flux_image_qkv(attn, img_n)
    txt_attn, img_attn = _flux_joint_attention(q_txt, k_txt, v_txt, q_img, k_img, v_img, rope)

    if guided:
        shift_n, scale_n, gate_n = _ada_params(block.norm, temb_neg, 3)
        txtn_n = _modulate(block.norm.norm(txt_neg), shift_n, scale_n)
        qn_txt, kn_txt, vn_txt = _flux_image_qkv(attn, txtn_n)
        txtn_attn, img_attn_neg = _flux_joint_attention(
            qn_txt, kn_txt, vn_txt, q_img[rows], k_img[rows], v_img[rows], rope_neg
        )
        img_attn = img_attn.clone()
        img_attn[rows] = naive_combine(img_attn[rows], img_attn_neg, **nag)

    attn_out = torch.cat([txt_attn, img_attn], dim=1)
    x = x + gate[:, None] * block.proj_out(torch.cat([attn_out, mlp], dim=2))
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    txt, img = x[:, :n_txt], x[:, n_txt:]

    if guided:
        mlp_neg = block.act_mlp(block.proj_mlp(txtn_n))
        txt_neg = txt_neg + gate_n[:, None] * block.proj_out(torch.cat([txtn_attn, mlp_neg], dim=2))
        if txt_neg.dtype == torch.float16:
            txt_neg = txt_neg.clip(-65504, 65504)
    return img, txt, txt_neg


def naive_flux_forward(
    transformer,
    hidden_states,
    encoder_hidden_states,
    pooled_projections,
    timestep,
    img_ids,
    txt_ids,
    guidance,
    neg_encoder_hidden_states,
    neg_pooled_projections,
    neg_txt_ids,
    scale,
    tau,
    alpha,
    p=1,
    cond_rows=None,
    ip_hidden_states=None,
):
    """FluxTransformer2DModel forward with NAG, re-implemented block by block.

    Inputs as for ``transformer(...)`` (hidden_states (B, N, C) packed latents, txt_ids / img_ids (L, 3) or
    deprecated (B, L, 3)).  neg_*: one row per guided row; ``neg_txt_ids=None`` means zeros of the negative text
    length (what the Flux pipelines use).  ``neg_encoder_hidden_states=None`` gives the stock output.
    ``ip_hidden_states``: the projected image-prompt tokens (one tensor per IP-Adapter, at the batch) of a model whose
    double blocks carry ``FluxIPAdapterAttnProcessor``; their term is added to every row, unguided.
    Returns the model output (same as ``transformer(...).sample``).
    """
    tr = transformer
    batch_size = hidden_states.shape[0]
    rows = _rows_or_all(cond_rows, batch_size)
    guided = neg_encoder_hidden_states is not None and len(rows) > 0
    nag = dict(scale=scale, tau=tau, alpha=alpha, p=p)

    img = tr.x_embedder(hidden_states)
    dtype = img.dtype

    # conditioning: positive for every row, negative (own pooled embedding) for the guided rows
    t = timestep.to(dtype) * 1000
    g = guidance.to(dtype) * 1000 if guidance is not None else None
    if g is None:
        temb = tr.time_text_embed(t, pooled_projections)
    else:
        temb = tr.time_text_embed(t, g, pooled_projections)
    txt = tr.context_embedder(encoder_hidden_states)

    if txt_ids.ndim == 3:
        txt_ids = txt_ids[0]
    if img_ids.ndim == 3:
        img_ids = img_ids[0]
    rope = tr.pos_embed(torch.cat([txt_ids, img_ids], dim=0))

    txt_neg = temb_neg = rope_neg = None
    if guided:
        if neg_encoder_hidden_states.shape[0] != len(rows):
            raise ValueError("negative tensors must have one row per guided row")
        t_neg = _per_row(t, batch_size, rows, "timestep")
        if g is None:
            temb_neg = tr.time_text_embed(t_neg, neg_pooled_projections)
        else:
            temb_neg = tr.time_text_embed(t_neg, _per_row(g, batch_size, rows, "guidance"), neg_pooled_projections)
        txt_neg = tr.context_embedder(neg_encoder_hidden_states)
        if neg_txt_ids is None:
            neg_txt_ids = torch.zeros(
                neg_encoder_hidden_states.shape[1], txt_ids.shape[-1], dtype=txt_ids.dtype, device=txt_ids.device
            )
        if neg_txt_ids.ndim == 3:
            neg_txt_ids = neg_txt_ids[0]
        rope_neg = tr.pos_embed(torch.cat([neg_txt_ids, img_ids], dim=0))

    for block in tr.transformer_blocks:
        img, txt, txt_neg = _flux_double_block(
            block, img, txt, temb, rope, txt_neg, temb_neg, rope_neg, rows, nag, ip_hidden_states
        )
    for block in tr.single_transformer_blocks:
        img, txt, txt_neg = _flux_single_block(block, img, txt, temb, rope, txt_neg, temb_neg, rope_neg, rows, nag)

    img = _ada_continuous(tr.norm_out, img, temb)
    return tr.proj_out(img)


# ----------------------------------------------------------------------------------------------------------------------
# SD3 / SD3.5
# ----------------------------------------------------------------------------------------------------------------------


def _sd3_image_qkv(attn, x):
    q = _split_heads(attn.to_q(x), attn.heads)
    k = _split_heads(attn.to_k(x), attn.heads)
    v = _split_heads(attn.to_v(x), attn.heads)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


def _sd3_text_qkv(attn, c):
    q = _split_heads(attn.add_q_proj(c), attn.heads)
    k = _split_heads(attn.add_k_proj(c), attn.heads)
    v = _split_heads(attn.add_v_proj(c), attn.heads)
    if attn.norm_added_q is not None:
        q = attn.norm_added_q(q)
    if attn.norm_added_k is not None:
        k = attn.norm_added_k(k)
    return q, k, v


def _sd3_joint_attention(q_img, k_img, v_img, q_txt, k_txt, v_txt):
    """Attention over [image, text] (SD3 order); returns (image rows, text rows), before projections."""
    q = torch.cat([q_img, q_txt], dim=1)
    k = torch.cat([k_img, k_txt], dim=1)
    v = torch.cat([v_img, v_txt], dim=1)
    out = naive_attention(q, k, v)
    n_img = q_img.shape[1]
    return out[:, :n_img], out[:, n_img:]


def _sd3_context_norm(block, txt, temb):
    """Returns (normalised text, modulation params or None for the context_pre_only last block)."""
    if block.context_pre_only:
        return _ada_continuous(block.norm1_context, txt, temb), None
    c_params = _ada_params(block.norm1_context, temb, 6)
    return _modulate(block.norm1_context.norm(txt), c_params[0], c_params[1]), c_params


def _sd3_text_tail(block, txt, txt_attn, c_params):
    _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_params
    txt = txt + c_gate_msa[:, None] * block.attn.to_add_out(txt_attn)
    normed = _modulate(block.norm2_context(txt), c_shift_mlp, c_scale_mlp)
    return txt + c_gate_mlp[:, None] * block.ff_context(normed)


def _sd3_block(block, img, txt, temb, txt_neg, temb_neg, rows, nag):
    attn = block.attn
    guided = txt_neg is not None

    if block.use_dual_attention:
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2) = (
            _ada_params(block.norm1, temb, 9)
        )
        normed = block.norm1.norm(img)
        img_n = _modulate(normed, shift_msa, scale_msa)
        img_n2 = _modulate(normed, shift_msa2, scale_msa2)
    else:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _ada_params(block.norm1, temb, 6)
        img_n = _modulate(block.norm1.norm(img), shift_msa, scale_msa)

    txt_n, c_params = _sd3_context_norm(block, txt, temb)

    q_img, k_img, v_img = _sd3_image_qkv(attn, img_n)
    q_txt, k_txt, v_txt = _sd3_text_qkv(attn, txt_n)
    img_attn, txt_attn = _sd3_joint_attention(q_img, k_img, v_img, q_txt, k_txt, v_txt)

    if guided:
        txtn_n, cn_params = _sd3_context_norm(block, txt_neg, temb_neg)
        qn_txt, kn_txt, vn_txt = _sd3_text_qkv(attn, txtn_n)
        img_attn_neg, txtn_attn = _sd3_joint_attention(q_img[rows], k_img[rows], v_img[rows], qn_txt, kn_txt, vn_txt)
        img_attn = img_attn.clone()
        img_attn[rows] = naive_combine(img_attn[rows], img_attn_neg, **nag)

    # image path
    img = img + gate_msa[:, None] * attn.to_out[1](attn.to_out[0](img_attn))
    if block.use_dual_attention:
        # SD3.5 attn2: image-only self-attention, not guided
        attn2 = block.attn2
        q2, k2, v2 = _sd3_image_qkv(attn2, img_n2)
        out2 = attn2.to_out[1](attn2.to_out[0](naive_attention(q2, k2, v2)))
        img = img + gate_msa2[:, None] * out2
    normed = _modulate(block.norm2(img), shift_mlp, scale_mlp)
    img = img + gate_mlp[:, None] * block.ff(normed)

    # text paths
    if block.context_pre_only:
        return img, None, None
    txt = _sd3_text_tail(block, txt, txt_attn, c_params)
    if guided:
        txt_neg = _sd3_text_tail(block, txt_neg, txtn_attn, cn_params)
    return img, txt, txt_neg


def naive_sd3_forward(
    transformer,
    hidden_states,
    encoder_hidden_states,
    pooled_projections,
    timestep,
    neg_encoder_hidden_states,
    neg_pooled_projections,
    scale,
    tau,
    alpha,
    p=1,
    cond_rows=None,
):
    """SD3Transformer2DModel forward with NAG, re-implemented block by block (SD3 and SD3.5 incl. dual attention).

    hidden_states: (B, C, H, W) latents.  neg_*: one row per guided row.  ``neg_encoder_hidden_states=None`` gives
    the stock output.  Returns the model output (same as ``transformer(...).sample``).
    """
    tr = transformer
    batch_size = hidden_states.shape[0]
    rows = _rows_or_all(cond_rows, batch_size)
    guided = neg_encoder_hidden_states is not None and len(rows) > 0
    nag = dict(scale=scale, tau=tau, alpha=alpha, p=p)

    height, width = hidden_states.shape[-2:]
    img = tr.pos_embed(hidden_states).contiguous()  # patch embedding + cropped sin-cos positions
    temb = tr.time_text_embed(timestep, pooled_projections)
    txt = tr.context_embedder(encoder_hidden_states)

    txt_neg = temb_neg = None
    if guided:
        if neg_encoder_hidden_states.shape[0] != len(rows):
            raise ValueError("negative tensors must have one row per guided row")
        temb_neg = tr.time_text_embed(_per_row(timestep, batch_size, rows, "timestep"), neg_pooled_projections)
        txt_neg = tr.context_embedder(neg_encoder_hidden_states)

    for block in tr.transformer_blocks:
        img, txt, txt_neg = _sd3_block(block, img, txt, temb, txt_neg, temb_neg, rows, nag)

    img = _ada_continuous(tr.norm_out, img, temb)
    img = tr.proj_out(img)

    patch = tr.config.patch_size
    h, w = height // patch, width // patch
    img = img.reshape(img.shape[0], h, w, patch, patch, tr.out_channels)
    img = torch.einsum("nhwpqc->nchpwq", img)
    return img.reshape(img.shape[0], tr.out_channels, h * patch, w * patch)


# ----------------------------------------------------------------------------------------------------------------------
# Qwen-Image
# ----------------------------------------------------------------------------------------------------------------------


def _qwen_rope(x, freqs):
    """Qwen rotary embedding on (B, S, H, D) with complex tables (S, D / 2): consecutive pairs are (real, imag)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(3).to(x.dtype)


def _qwen_modulate(x, params):
    shift, scale, gate = params.chunk(3, dim=-1)
    return x * (1 + scale[:, None]) + shift[:, None], gate[:, None]


def _qwen_joint_attention(attn, txt_n, txt_mask, txt_freqs, q_img, k_img, v_img):
    """Attention over [text, image] (Qwen order); text padding masked out.  Returns (text rows, image rows)."""
    heads = attn.heads
    q_txt = _split_heads(attn.add_q_proj(txt_n), heads)
    k_txt = _split_heads(attn.add_k_proj(txt_n), heads)
    v_txt = _split_heads(attn.add_v_proj(txt_n), heads)
    if attn.norm_added_q is not None:
        q_txt = attn.norm_added_q(q_txt)
    if attn.norm_added_k is not None:
        k_txt = attn.norm_added_k(k_txt)
    q_txt, k_txt = _qwen_rope(q_txt, txt_freqs), _qwen_rope(k_txt, txt_freqs)
    bias = None
    if txt_mask is not None:
        keep = torch.cat([txt_mask.bool(), txt_mask.new_ones(txt_mask.shape[0], q_img.shape[1]).bool()], dim=1)
        bias = torch.zeros(keep.shape, dtype=torch.float32).masked_fill(~keep, float("-inf"))[:, None, None, :]
    out = naive_attention(
        torch.cat([q_txt, q_img], 1), torch.cat([k_txt, k_img], 1), torch.cat([v_txt, v_img], 1), bias
    )
    n_txt = q_txt.shape[1]
    return out[:, :n_txt], out[:, n_txt:]


def _qwen_text_tail(block, txt, txt_attn, gate1, mod2):
    txt = txt + gate1 * block.attn.to_add_out(txt_attn)
    normed, gate2 = _qwen_modulate(block.txt_norm2(txt), mod2)
    return txt + gate2 * block.txt_mlp(normed)


def _qwen_block(block, img, img_freqs, temb, text, text_neg, rows, nag):
    """One Qwen-Image dual-stream block.  ``text`` / ``text_neg``: (stream, mask, rotary table, temb) or None."""
    attn = block.attn
    img_mod1, img_mod2 = block.img_mod(temb).chunk(2, dim=-1)
    img_n, img_gate1 = _qwen_modulate(block.img_norm1(img), img_mod1)
    q_img = _split_heads(attn.to_q(img_n), attn.heads)
    k_img = _split_heads(attn.to_k(img_n), attn.heads)
    v_img = _split_heads(attn.to_v(img_n), attn.heads)
    if attn.norm_q is not None:
        q_img = attn.norm_q(q_img)
    if attn.norm_k is not None:
        k_img = attn.norm_k(k_img)
    q_img, k_img = _qwen_rope(q_img, img_freqs), _qwen_rope(k_img, img_freqs)

    def text_branch(branch, q, k, v):
        txt, mask, freqs, branch_temb = branch
        mod1, mod2 = block.txt_mod(branch_temb).chunk(2, dim=-1)
        txt_n, gate1 = _qwen_modulate(block.txt_norm1(txt), mod1)
        txt_attn, img_attn = _qwen_joint_attention(attn, txt_n, mask, freqs, q, k, v)
        return txt_attn, img_attn, gate1, mod2

    txt_attn, img_attn, gate1, mod2 = text_branch(text, q_img, k_img, v_img)
    if text_neg is not None:
        neg_attn, img_attn_neg, neg_gate1, neg_mod2 = text_branch(text_neg, q_img[rows], k_img[rows], v_img[rows])
        img_attn = img_attn.clone()
        img_attn[rows] = naive_combine(img_attn[rows], img_attn_neg, **nag)

    img = img + img_gate1 * attn.to_out[1](attn.to_out[0](img_attn))
    normed, img_gate2 = _qwen_modulate(block.img_norm2(img), img_mod2)
    img = img + img_gate2 * block.img_mlp(normed)

    text = (_qwen_text_tail(block, text[0], txt_attn, gate1, mod2), *text[1:])
    if text_neg is not None:
        text_neg = (_qwen_text_tail(block, text_neg[0], neg_attn, neg_gate1, neg_mod2), *text_neg[1:])
    return img, text, text_neg


def naive_qwen_forward(
    transformer,
    hidden_states,
    encoder_hidden_states,
    encoder_hidden_states_mask,
    timestep,
    img_shapes,
    neg_encoder_hidden_states,
    neg_encoder_hidden_states_mask,
    scale,
    tau,
    alpha,
    p=1,
    cond_rows=None,
):
    """QwenImageTransformer2DModel forward with NAG, re-implemented block by block (no guidance embedding,
    no zero_cond_t).  hidden_states: packed latents (B, N, C), image tokens of the edit pipelines included.
    The negative text (one row per guided row) runs its own text stream with its own mask and rotary table;
    the image stream is the single guided one.  ``neg_encoder_hidden_states=None`` gives the stock output."""
    tr = transformer
    if tr.config.zero_cond_t or tr.config.use_additional_t_cond:
        raise NotImplementedError("naive reference: zero_cond_t / additional_t_cond")
    batch_size = hidden_states.shape[0]
    rows = _rows_or_all(cond_rows, batch_size)
    guided = neg_encoder_hidden_states is not None and len(rows) > 0
    nag = dict(scale=scale, tau=tau, alpha=alpha, p=p)

    img = tr.img_in(hidden_states)
    t = timestep.to(img.dtype)
    temb = tr.time_text_embed(t, img)

    def text_stream(text, mask, branch_temb):
        freqs = tr.pos_embed(img_shapes, max_txt_seq_len=text.shape[1], device=img.device)
        return (tr.txt_in(tr.txt_norm(text)), mask, freqs[1], branch_temb), freqs[0]

    text, img_freqs = text_stream(encoder_hidden_states, encoder_hidden_states_mask, temb)
    text_neg = None
    if guided:
        if neg_encoder_hidden_states.shape[0] != len(rows):
            raise ValueError("negative tensors must have one row per guided row")
        temb_neg = tr.time_text_embed(_per_row(t, batch_size, rows, "timestep"), img)
        text_neg, _ = text_stream(neg_encoder_hidden_states, neg_encoder_hidden_states_mask, temb_neg)

    for block in tr.transformer_blocks:
        img, text, text_neg = _qwen_block(block, img, img_freqs, temb, text, text_neg, rows, nag)

    img = _ada_continuous(tr.norm_out, img, temb)
    return tr.proj_out(img)


# ----------------------------------------------------------------------------------------------------------------------
# Chroma
# ----------------------------------------------------------------------------------------------------------------------


def _chroma_bias(mask):
    """The model-level (B, L) mask over [text, image] as the stock blocks hand it to SDPA: the outer product
    mask[:, None, None, :] * mask[:, None, :, None]; a float mask is added to the scores, a boolean one masks."""
    if mask is None:
        return None
    outer = mask[:, None, None, :] * mask[:, None, :, None]
    if outer.dtype == torch.bool:
        return torch.zeros(outer.shape).masked_fill(~outer, float("-inf"))
    return outer.float()


def _rope_attention(q_txt, k_txt, v_txt, q_img, k_img, v_img, rope, bias):
    """Attention over [text, image] with Flux-style RoPE and an additive bias; (text rows, image rows)."""
    cos, sin = rope
    q = _flux_rope(torch.cat([q_txt, q_img], dim=1), cos, sin)
    k = _flux_rope(torch.cat([k_txt, k_img], dim=1), cos, sin)
    v = torch.cat([v_txt, v_img], dim=1)
    out = naive_attention(q, k, v, bias)
    if bias is not None:  # a query without any key (a boolean mask's masked text tokens): SDPA gives it zeros
        out = out.masked_fill(torch.isneginf(bias).all(-1).any(1)[..., None], 0.0)
    n_txt = q_txt.shape[1]
    return out[:, :n_txt], out[:, n_txt:]


def _chroma_double_block(block, img, txt, img_mod, txt_mod, rope, bias, neg, rows, nag):
    """neg: None or dict(txt, txt_mod, rope, bias) of the negative text stream (one row per guided row)."""
    attn = block.attn
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = img_mod.unbind(1)
    c_params = txt_mod.unbind(1)
    img_n = _modulate(block.norm1.norm(img), shift, scale)
    txt_n = _modulate(block.norm1_context.norm(txt), c_params[0], c_params[1])
    q_img, k_img, v_img = _flux_image_qkv(attn, img_n)
    txt_attn, img_attn = _rope_attention(*_flux_text_qkv(attn, txt_n), q_img, k_img, v_img, rope, bias)
    if neg is not None:
        cn_params = neg["txt_mod"].unbind(1)
        txtn_n = _modulate(block.norm1_context.norm(neg["txt"]), cn_params[0], cn_params[1])
        txtn_attn, img_attn_neg = _rope_attention(
            *_flux_text_qkv(attn, txtn_n), q_img[rows], k_img[rows], v_img[rows], neg["rope"], neg["bias"]
        )
        img_attn = img_attn.clone()
        img_attn[rows] = naive_combine(img_attn[rows], img_attn_neg, **nag)
    img = img + gate[:, None] * attn.to_out[1](attn.to_out[0](img_attn))
    img = img + gate_mlp[:, None] * block.ff(_modulate(block.norm2(img), shift_mlp, scale_mlp))
    txt = _flux_text_tail(block, txt, attn.to_add_out(txt_attn), c_params)
    if neg is not None:
        neg = {**neg, "txt": _flux_text_tail(block, neg["txt"], attn.to_add_out(txtn_attn), cn_params)}
    return img, txt, neg


def _chroma_single_block(block, img, txt, mod, rope, bias, neg, rows, nag):
    """Stock: x = [text, image]; norm; attention (no output projection) || MLP; proj_out(cat); here on the
    parts, the negative text attending to [negative text, guided image]."""
    attn = block.attn
    shift, scale, gate = mod.unbind(1)
    n_txt = txt.shape[1]
    x = torch.cat([txt, img], dim=1)
    x_n = _modulate(block.norm.norm(x), shift, scale)
    q_img, k_img, v_img = _flux_image_qkv(attn, x_n[:, n_txt:])
    txt_attn, img_attn = _rope_attention(*_flux_image_qkv(attn, x_n[:, :n_txt]), q_img, k_img, v_img, rope, bias)
    if neg is not None:
        txtn_n = _modulate(block.norm.norm(neg["txt"]), shift[rows], scale[rows])
        txtn_attn, img_attn_neg = _rope_attention(
            *_flux_image_qkv(attn, txtn_n), q_img[rows], k_img[rows], v_img[rows], neg["rope"], neg["bias"]
        )
        img_attn = img_attn.clone()
        img_attn[rows] = naive_combine(img_attn[rows], img_attn_neg, **nag)
    mlp = block.act_mlp(block.proj_mlp(x_n))
    x = x + gate[:, None] * block.proj_out(torch.cat([torch.cat([txt_attn, img_attn], dim=1), mlp], dim=2))
    if neg is not None:
        mlp_neg = block.act_mlp(block.proj_mlp(txtn_n))
        txt_neg = neg["txt"] + gate[rows][:, None] * block.proj_out(torch.cat([txtn_attn, mlp_neg], dim=2))
        neg = {**neg, "txt": txt_neg}
    return x[:, n_txt:], x[:, :n_txt], neg


def naive_chroma_forward(
    transformer,
    hidden_states,
    encoder_hidden_states,
    timestep,
    img_ids,
    txt_ids,
    attention_mask,
    neg_encoder_hidden_states,
    neg_attention_mask,
    scale,
    tau,
    alpha,
    p=1,
    cond_rows=None,
):
    """ChromaTransformer2DModel forward with NAG, block by block.

    ``attention_mask``: the model's (B, L_text + L_image) mask, as the pipeline passes it (diffusers 0.42.1's
    Chroma pipeline makes it float 0/1, which the blocks' SDPA adds to the scores; kept as is for each branch).
    ``neg_attention_mask``: (rows, L_neg) text mask of the negative prompt; its image part is the positive's.
    The modulation comes from the timestep alone, so the negative text stream takes its row's.
    """
    tr = transformer
    batch_size = hidden_states.shape[0]
    rows = _rows_or_all(cond_rows, batch_size)
    guided = neg_encoder_hidden_states is not None and len(rows) > 0
    nag = dict(scale=scale, tau=tau, alpha=alpha, p=p)

    img = tr.x_embedder(hidden_states)
    mod = tr.distilled_guidance_layer(tr.time_text_embed(timestep.to(img.dtype) * 1000))  # (B, n_mod, D)
    txt = tr.context_embedder(encoder_hidden_states)
    txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
    img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    rope = tr.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
    bias = _chroma_bias(attention_mask)

    neg = None
    if guided:
        txt_neg = tr.context_embedder(neg_encoder_hidden_states)
        n_neg = txt_neg.shape[1]
        neg_mask = None
        if attention_mask is not None:
            text_mask = neg_attention_mask if neg_attention_mask is not None else torch.ones(len(rows), n_neg)
            neg_mask = torch.cat([text_mask.to(attention_mask.dtype), attention_mask[rows, txt.shape[1] :]], dim=1)
        neg = dict(
            txt=txt_neg,
            bias=_chroma_bias(neg_mask),
            rope=tr.pos_embed(torch.cat([torch.zeros(n_neg, txt_ids.shape[-1]), img_ids], dim=0)),
        )

    n_single, n_double = len(tr.single_transformer_blocks), len(tr.transformer_blocks)
    img_offset, txt_offset = 3 * n_single, 3 * n_single + 6 * n_double
    for i, block in enumerate(tr.transformer_blocks):
        img_mod = mod[:, img_offset + 6 * i : img_offset + 6 * i + 6]
        txt_mod = mod[:, txt_offset + 6 * i : txt_offset + 6 * i + 6]
        if neg is not None:
            neg["txt_mod"] = txt_mod[rows]
        img, txt, neg = _chroma_double_block(block, img, txt, img_mod, txt_mod, rope, bias, neg, rows, nag)
    for i, block in enumerate(tr.single_transformer_blocks):
        img, txt, neg = _chroma_single_block(block, img, txt, mod[:, 3 * i : 3 * i + 3], rope, bias, neg, rows, nag)

    shift, scale_out = mod[:, -2], mod[:, -1]
    return tr.proj_out(_modulate(tr.norm_out.norm(img), shift, scale_out))


# ----------------------------------------------------------------------------------------------------------------------
# AuraFlow
# ----------------------------------------------------------------------------------------------------------------------


def _aura_attention(attn, q_txt, k_txt, v_txt, q_img, k_img, v_img):
    """Attention over [text, image] (AuraFlow order, scale attn.scale = 1/sqrt(D)); (text rows, image rows)."""
    out = naive_attention(torch.cat([q_txt, q_img], 1), torch.cat([k_txt, k_img], 1), torch.cat([v_txt, v_img], 1))
    return out[:, : q_txt.shape[1]], out[:, q_txt.shape[1] :]


def _aura_tail(norm2, ff, residual, attn_out, gate, shift_mlp, scale_mlp, gate_mlp):
    """AuraFlow's block tail: residual + gate_mlp * ff(modulate(norm2(residual + gate * attn_out)))."""
    x = _modulate(norm2(residual + gate[:, None] * attn_out), shift_mlp, scale_mlp)
    return residual + gate_mlp[:, None] * ff(x)


def _aura_joint_block(block, img, txt, temb, txt_neg, rows, nag):
    attn = block.attn
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = _ada_params(block.norm1, temb, 6)
    c = _ada_params(block.norm1_context, temb, 6)
    q_img, k_img, v_img = _sd3_image_qkv(attn, _modulate(block.norm1.norm(img), shift, scale))
    txt_attn, img_attn = _aura_attention(
        attn, *_sd3_text_qkv(attn, _modulate(block.norm1_context.norm(txt), c[0], c[1])), q_img, k_img, v_img
    )
    if txt_neg is not None:
        cn = [p[rows] for p in c]
        txtn_attn, img_attn_neg = _aura_attention(
            attn,
            *_sd3_text_qkv(attn, _modulate(block.norm1_context.norm(txt_neg), cn[0], cn[1])),
            q_img[rows],
            k_img[rows],
            v_img[rows],
        )
        img_attn = img_attn.clone()
        img_attn[rows] = naive_combine(img_attn[rows], img_attn_neg, **nag)
        txt_neg = _aura_tail(block.norm2_context, block.ff_context, txt_neg, attn.to_add_out(txtn_attn), *cn[2:])
    img = _aura_tail(block.norm2, block.ff, img, attn.to_out[0](img_attn), gate, shift_mlp, scale_mlp, gate_mlp)
    txt = _aura_tail(block.norm2_context, block.ff_context, txt, attn.to_add_out(txt_attn), *c[2:])
    return img, txt, txt_neg


def _aura_single_block(block, img, txt, temb, txt_neg, rows, nag):
    """Stock: x = [text, image]; one attention with shared projections and output projection over all tokens."""
    attn = block.attn
    params = _ada_params(block.norm1, temb, 6)
    shift, scale = params[0], params[1]
    q_txt, k_txt, v_txt = _sd3_image_qkv(attn, _modulate(block.norm1.norm(txt), shift, scale))
    q_img, k_img, v_img = _sd3_image_qkv(attn, _modulate(block.norm1.norm(img), shift, scale))
    txt_attn, img_attn = _aura_attention(attn, q_txt, k_txt, v_txt, q_img, k_img, v_img)
    if txt_neg is not None:
        q_n, k_n, v_n = _sd3_image_qkv(attn, _modulate(block.norm1.norm(txt_neg), shift[rows], scale[rows]))
        txtn_attn, img_attn_neg = _aura_attention(attn, q_n, k_n, v_n, q_img[rows], k_img[rows], v_img[rows])
        img_attn = img_attn.clone()
        img_attn[rows] = naive_combine(img_attn[rows], img_attn_neg, **nag)
        txt_neg = _aura_tail(block.norm2, block.ff, txt_neg, attn.to_out[0](txtn_attn), *[p[rows] for p in params[2:]])
    x = torch.cat([txt, img], dim=1)
    out = attn.to_out[0](torch.cat([txt_attn, img_attn], dim=1))
    x = _aura_tail(block.norm2, block.ff, x, out, *params[2:])
    return x[:, txt.shape[1] :], x[:, : txt.shape[1]], txt_neg


def naive_auraflow_forward(
    transformer,
    hidden_states,
    encoder_hidden_states,
    timestep,
    neg_encoder_hidden_states,
    scale,
    tau,
    alpha,
    p=1,
    cond_rows=None,
):
    """AuraFlowTransformer2DModel forward with NAG, block by block. The text is [register tokens, text] in every
    block; the modulation comes from the timestep alone, so the negative text stream takes its row's."""
    tr = transformer
    batch_size, _, height, width = hidden_states.shape
    rows = _rows_or_all(cond_rows, batch_size)
    nag = dict(scale=scale, tau=tau, alpha=alpha, p=p)
    img = tr.pos_embed(hidden_states)
    temb = tr.time_step_proj(tr.time_step_embed(timestep)).to(img.dtype)
    registers = tr.register_tokens.expand(batch_size, -1, -1)
    txt = torch.cat([registers, tr.context_embedder(encoder_hidden_states)], dim=1)
    txt_neg = None
    if neg_encoder_hidden_states is not None and rows:
        txt_neg = torch.cat([registers[rows], tr.context_embedder(neg_encoder_hidden_states)], dim=1)
    for block in tr.joint_transformer_blocks:
        img, txt, txt_neg = _aura_joint_block(block, img, txt, temb, txt_neg, rows, nag)
    for block in tr.single_transformer_blocks:
        img, txt, txt_neg = _aura_single_block(block, img, txt, temb, txt_neg, rows, nag)
    scale_out, shift_out = tr.norm_out.linear(F.silu(temb)).chunk(2, dim=1)
    img = tr.proj_out(_modulate(img, shift_out, scale_out))
    ps, c = tr.config.patch_size, tr.config.out_channels
    img = img.reshape(batch_size, height // ps, width // ps, ps, ps, c)
    return torch.einsum("nhwpqc->nchpwq", img).reshape(batch_size, c, height, width)


# ----------------------------------------------------------------------------------------------------------------------
# Shared-projection joint attention: CogView4, CogVideoX
# ----------------------------------------------------------------------------------------------------------------------


def _half_rope(x, cos, sin):
    """Rotary embedding on (B, S, H, D) with tables (S, D), halves as (real, imag) (CogView4's layout)."""
    x_real, x_imag = x.reshape(*x.shape[:-1], 2, -1).unbind(-2)
    x_rotated = torch.cat([-x_imag, x_real], dim=-1)
    return (x.float() * cos[None, :, None, :] + x_rotated.float() * sin[None, :, None, :]).to(x.dtype)


def _shared_attention(attn, txt, img, rope_img, bias):
    """Attention over [text, image] with one set of projections (to_q/to_k/to_v, q/k norms over the head
    dimension), the image tokens' q/k rotated by ``rope_img(x)``; returns the pre-projection outputs
    (text rows, image rows) and the image keys/values of this call."""
    n_txt = txt.shape[1]
    x = torch.cat([txt, img], dim=1)
    q = _split_heads(attn.to_q(x), attn.heads)
    k = _split_heads(attn.to_k(x), attn.heads)
    v = _split_heads(attn.to_v(x), attn.heads)
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    if rope_img is not None:
        q = torch.cat([q[:, :n_txt], rope_img(q[:, n_txt:])], dim=1)
        k = torch.cat([k[:, :n_txt], rope_img(k[:, n_txt:])], dim=1)
    out = naive_attention(q, k, v, bias)
    return out[:, :n_txt], out[:, n_txt:]


def _cogview4_bias(text_mask, image_len):
    """diffusers 0.42.1's CogView4 processor turns a (B, L_text) mask into the outer product of [text mask, ones]
    as float 0/1 and hands it to SDPA, which adds it to the scores; reproduced as is."""
    if text_mask is None:
        return None
    mix = torch.cat([text_mask.float(), torch.ones(text_mask.shape[0], image_len)], dim=1)
    return (mix[:, :, None] * mix[:, None, :] > 0).float()[:, None]


def _cogview4_block(block, img, txt, temb, rope, bias, neg, rows, nag):
    """neg: None or dict(txt, bias) for the negative text stream (one row per guided row)."""
    attn = block.attn1
    (
        shift,
        c_shift,
        scale,
        c_scale,
        gate,
        c_gate,
        shift_mlp,
        c_shift_mlp,
        scale_mlp,
        c_scale_mlp,
        gate_mlp,
        c_gate_mlp,
    ) = block.norm1.linear(temb).chunk(12, dim=1)
    img_n = _modulate(block.norm1.norm(img), shift, scale)
    txt_n = _modulate(block.norm1.norm_context(txt), c_shift, c_scale)
    txt_attn, img_attn = _shared_attention(attn, txt_n, img_n, rope, bias)
    if neg is not None:
        txtn_n = _modulate(block.norm1.norm_context(neg["txt"]), c_shift[rows], c_scale[rows])
        txtn_attn, img_attn_neg = _shared_attention(attn, txtn_n, img_n[rows], rope, neg["bias"])
        img_attn = img_attn.clone()
        img_attn[rows] = naive_combine(img_attn[rows], img_attn_neg, **nag)

    def tail(x, attn_out, g, s_mlp, sc_mlp, g_mlp, norm2):
        x = x + attn.to_out[0](attn_out) * g[:, None]
        return x + block.ff(_modulate(norm2(x), s_mlp, sc_mlp)) * g_mlp[:, None]

    img = tail(img, img_attn, gate, shift_mlp, scale_mlp, gate_mlp, block.norm2)
    txt = tail(txt, txt_attn, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp, block.norm2_context)
    if neg is not None:
        neg = {
            **neg,
            "txt": tail(
                neg["txt"],
                txtn_attn,
                c_gate[rows],
                c_shift_mlp[rows],
                c_scale_mlp[rows],
                c_gate_mlp[rows],
                block.norm2_context,
            ),
        }
    return img, txt, neg


def naive_cogview4_forward(
    transformer,
    hidden_states,
    encoder_hidden_states,
    timestep,
    original_size,
    target_size,
    crop_coords,
    attention_mask,
    neg_encoder_hidden_states,
    neg_attention_mask,
    scale,
    tau,
    alpha,
    p=1,
    cond_rows=None,
):
    """CogView4Transformer2DModel forward with NAG, block by block. Every block's processor joins [text, image]
    and projects both with the same weights; the modulation comes from the timestep and the size conditions,
    so the negative text stream takes its row's. ``attention_mask``: optional (B, L_text) text mask."""
    tr = transformer
    batch_size, _, height, width = hidden_states.shape
    rows = _rows_or_all(cond_rows, batch_size)
    nag = dict(scale=scale, tau=tau, alpha=alpha, p=p)
    cos, sin = tr.rope(hidden_states)
    rope = lambda x: _half_rope(x, cos, sin)  # noqa: E731
    img, txt = tr.patch_embed(hidden_states, encoder_hidden_states)
    temb = F.silu(tr.time_condition_embed(timestep, original_size, target_size, crop_coords, img.dtype))
    bias = _cogview4_bias(attention_mask, img.shape[1])
    neg = None
    if neg_encoder_hidden_states is not None and rows:
        txt_neg = tr.patch_embed.text_proj(neg_encoder_hidden_states)
        neg_mask = neg_attention_mask
        if neg_mask is None and attention_mask is not None:
            neg_mask = torch.ones(len(rows), txt_neg.shape[1])
        neg = dict(txt=txt_neg, bias=_cogview4_bias(neg_mask, img.shape[1]))
    for block in tr.transformer_blocks:
        img, txt, neg = _cogview4_block(block, img, txt, temb, rope, bias, neg, rows, nag)
    img = tr.proj_out(tr.norm_out(img, temb))
    ps = tr.config.patch_size
    img = img.reshape(batch_size, height // ps, width // ps, -1, ps, ps)
    return img.permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)


def _cogvideox_block(block, img, txt, temb, rope, neg, rows, nag):
    """neg: None or the negative text stream (one row per guided row)."""
    attn = block.attn1

    def norm_zero(norm, x_img, x_txt):
        shift, scale, gate, enc_shift, enc_scale, enc_gate = norm.linear(F.silu(temb)).chunk(6, dim=1)
        return (
            _modulate(norm.norm(x_img), shift, scale),
            _modulate(norm.norm(x_txt), enc_shift, enc_scale),
            gate,
            enc_gate,
        )

    img_n, txt_n, gate, enc_gate = norm_zero(block.norm1, img, txt)
    txt_attn, img_attn = _shared_attention(attn, txt_n, img_n, rope, None)
    if neg is not None:
        _, _, _, enc_shift, enc_scale, enc_gate_n = block.norm1.linear(F.silu(temb[rows])).chunk(6, dim=1)
        txtn_n = _modulate(block.norm1.norm(neg), enc_shift, enc_scale)
        txtn_attn, img_attn_neg = _shared_attention(attn, txtn_n, img_n[rows], rope, None)
        img_attn = img_attn.clone()
        img_attn[rows] = naive_combine(img_attn[rows], img_attn_neg, **nag)
        neg = neg + enc_gate_n[:, None] * attn.to_out[0](txtn_attn)
    img = img + gate[:, None] * attn.to_out[0](img_attn)
    txt = txt + enc_gate[:, None] * attn.to_out[0](txt_attn)
    img_n, txt_n, gate_ff, enc_gate_ff = norm_zero(block.norm2, img, txt)
    img = img + gate_ff[:, None] * block.ff(img_n)
    txt = txt + enc_gate_ff[:, None] * block.ff(txt_n)
    if neg is not None:
        _, _, _, enc_shift, enc_scale, enc_gate_ff_n = block.norm2.linear(F.silu(temb[rows])).chunk(6, dim=1)
        neg = neg + enc_gate_ff_n[:, None] * block.ff(_modulate(block.norm2.norm(neg), enc_shift, enc_scale))
    return img, txt, neg


def naive_cogvideox_forward(
    transformer,
    hidden_states,
    encoder_hidden_states,
    timestep,
    image_rotary_emb,
    neg_encoder_hidden_states,
    scale,
    tau,
    alpha,
    p=1,
    cond_rows=None,
    ofs=None,
):
    """CogVideoXTransformer3DModel forward with NAG, block by block. The model embeds [text, video] together
    (sincos positions, when present, are zero on the text part) and every block's processor attends over
    [text, video] with shared projections; the modulation comes from the timestep alone."""
    tr = transformer
    batch_size, frames, _, height, width = hidden_states.shape
    rows = _rows_or_all(cond_rows, batch_size)
    nag = dict(scale=scale, tau=tau, alpha=alpha, p=p)
    temb = tr.time_embedding(tr.time_proj(timestep).to(hidden_states.dtype))
    if tr.ofs_embedding is not None and ofs is not None:
        temb = temb + tr.ofs_embedding(tr.ofs_proj(ofs).to(hidden_states.dtype))
    n_txt = encoder_hidden_states.shape[1]
    joint = tr.patch_embed(encoder_hidden_states, hidden_states)
    txt, img = joint[:, :n_txt], joint[:, n_txt:]
    neg = None
    if neg_encoder_hidden_states is not None and rows:
        neg = tr.patch_embed.text_proj(neg_encoder_hidden_states)
    rope = None
    if image_rotary_emb is not None:
        cos, sin = image_rotary_emb
        rope = lambda x: _flux_rope(x, cos, sin)  # noqa: E731
    for block in tr.transformer_blocks:
        img, txt, neg = _cogvideox_block(block, img, txt, temb, rope, neg, rows, nag)
    img = tr.proj_out(tr.norm_out(tr.norm_final(img), temb=temb))
    ps = tr.config.patch_size
    out = img.reshape(batch_size, frames, height // ps, width // ps, -1, ps, ps)
    return out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)


# ----------------------------------------------------------------------------------------------------------------------
# HunyuanVideo
# ----------------------------------------------------------------------------------------------------------------------


def _hunyuan_bias(image_len, text_mask):
    """The model's key mask over [video, text]: the first ``image_len + sum(text_mask)`` keys (the valid text
    tokens are a prefix), as an additive (B, 1, 1, N) bias."""
    n = image_len + text_mask.shape[1]
    valid = image_len + text_mask.sum(dim=1, dtype=torch.int)
    keep = torch.arange(n)[None] < valid[:, None]
    return torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))[:, None, None]


def _hunyuan_attention(q_img, k_img, v_img, q_txt, k_txt, v_txt, bias):
    out = naive_attention(
        torch.cat([q_img, q_txt], 1), torch.cat([k_img, k_txt], 1), torch.cat([v_img, v_txt], 1), bias
    )
    return out[:, : q_img.shape[1]], out[:, q_img.shape[1] :]


def _hunyuan_qkv(attn, x, rope=None, added=False):
    names = ("add_q_proj", "add_k_proj", "add_v_proj") if added else ("to_q", "to_k", "to_v")
    norms = (attn.norm_added_q, attn.norm_added_k) if added else (attn.norm_q, attn.norm_k)
    q, k, v = (_split_heads(getattr(attn, n)(x), attn.heads) for n in names)
    q, k = norms[0](q), norms[1](k)
    if rope is not None:
        q, k = _flux_rope(q, *rope), _flux_rope(k, *rope)
    return q, k, v


def _hunyuan_image_params(norm, temb, n, img, replace):
    """The image stream's modulation: ``n`` (B, dim) pieces of ``linear(silu(temb))``, or, with ``replace = (token
    replace embedding, first-frame tokens)`` (HunyuanVideo-I2V ``token_replace``), per-token (B, tokens, dim)
    pieces whose first-frame tokens take the pieces of the token replace embedding (the timestep-0 one)."""
    params = _ada_params(norm, temb, n)
    if replace is None:
        return params
    tr_emb, first = replace
    tokens = img.shape[1]
    return tuple(
        torch.cat([t[:, None].expand(-1, first, -1), p[:, None].expand(-1, tokens - first, -1)], dim=1)
        for p, t in zip(params, _ada_params(norm, tr_emb, n))
    )


def _hunyuan_image_modulate(x, shift, scale):
    """``_modulate`` for (B, dim) or per-token (B, tokens, dim) pieces."""
    if shift.ndim == 2:
        return _modulate(x, shift, scale)
    return x * (1 + scale) + shift


def _hunyuan_gate(gate):
    return gate[:, None] if gate.ndim == 2 else gate


def _hunyuan_double_block(block, img, txt, temb, rope, bias, neg, rows, nag, replace=None):
    """neg: None or dict(txt, temb, bias) of the negative text stream (one row per guided row); replace: see
    ``_hunyuan_image_params``."""
    attn = block.attn
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = _hunyuan_image_params(block.norm1, temb, 6, img, replace)
    img_qkv = _hunyuan_qkv(attn, _hunyuan_image_modulate(block.norm1.norm(img), shift, scale), rope)

    def text_side(x, t, b, image_qkv):
        c = _ada_params(block.norm1_context, t, 6)
        txt_qkv = _hunyuan_qkv(attn, _modulate(block.norm1_context.norm(x), c[0], c[1]), added=True)
        img_attn, txt_attn = _hunyuan_attention(*image_qkv, *txt_qkv, b)
        x = x + c[2][:, None] * attn.to_add_out(txt_attn)
        x = x + c[5][:, None] * block.ff_context(_modulate(block.norm2_context(x), c[3], c[4]))
        return img_attn, x

    img_attn, txt = text_side(txt, temb, bias, img_qkv)
    if neg is not None:
        img_attn_neg, txt_neg = text_side(neg["txt"], neg["temb"], neg["bias"], tuple(t[rows] for t in img_qkv))
        img_attn = img_attn.clone()
        img_attn[rows] = naive_combine(img_attn[rows], img_attn_neg, **nag)
        neg = {**neg, "txt": txt_neg}
    img = img + _hunyuan_gate(gate) * attn.to_out[0](img_attn)
    img = img + _hunyuan_gate(gate_mlp) * block.ff(_hunyuan_image_modulate(block.norm2(img), shift_mlp, scale_mlp))
    return img, txt, neg


def _hunyuan_single_block(block, img, txt, temb, rope, bias, neg, rows, nag, replace=None):
    """Stock: x = [video, text]; norm; attention with shared projections (no output projection) || MLP;
    proj_out(cat); here on the parts, the negative text attending to [guided video, negative text]."""
    attn = block.attn
    shift, scale, gate = _hunyuan_image_params(block.norm, temb, 3, img, replace)
    img_n = _hunyuan_image_modulate(block.norm.norm(img), shift, scale)

    def text_side(x, t, b, image_qkv, image_mlp):
        s, sc, g = _ada_params(block.norm, t, 3)
        x_n = _modulate(block.norm.norm(x), s, sc)
        img_attn, txt_attn = _hunyuan_attention(*image_qkv, *_hunyuan_qkv(attn, x_n), b)
        return img_attn, x + g[:, None] * block.proj_out(torch.cat([txt_attn, block.act_mlp(block.proj_mlp(x_n))], 2))

    img_qkv = _hunyuan_qkv(attn, img_n, rope)
    img_mlp = block.act_mlp(block.proj_mlp(img_n))
    img_attn, txt = text_side(txt, temb, bias, img_qkv, img_mlp)
    if neg is not None:
        img_attn_neg, txt_neg = text_side(neg["txt"], neg["temb"], neg["bias"], tuple(t[rows] for t in img_qkv), None)
        img_attn = img_attn.clone()
        img_attn[rows] = naive_combine(img_attn[rows], img_attn_neg, **nag)
        neg = {**neg, "txt": txt_neg}
    img = img + _hunyuan_gate(gate) * block.proj_out(torch.cat([img_attn, img_mlp], dim=2))
    return img, txt, neg


def naive_hunyuanvideo_forward(
    transformer,
    hidden_states,
    timestep,
    encoder_hidden_states,
    encoder_attention_mask,
    pooled_projections,
    guidance,
    neg_encoder_hidden_states,
    neg_attention_mask,
    neg_pooled_projections,
    scale,
    tau,
    alpha,
    p=1,
    cond_rows=None,
):
    """HunyuanVideoTransformer3DModel forward with NAG, block by block. The negative text goes through the
    model's token refiner with its own mask, and its modulation uses its own pooled embedding; it attends to
    [guided video, negative text] with its own key mask. ``token_replace`` models (HunyuanVideo-I2V): the first
    frame's video tokens are modulated by the timestep-0 embedding (with the row's pooled embedding), the text as
    usual."""
    tr = transformer
    batch_size, _, frames, height, width = hidden_states.shape
    rows = _rows_or_all(cond_rows, batch_size)
    nag = dict(scale=scale, tau=tau, alpha=alpha, p=p)
    rope = tr.rope(hidden_states)
    temb, tr_emb = tr.time_text_embed(timestep, pooled_projections, guidance)
    first = (height // tr.config.patch_size) * (width // tr.config.patch_size)
    replace = None if tr_emb is None else (tr_emb, first)
    img = tr.x_embedder(hidden_states)
    txt = tr.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)
    bias = _hunyuan_bias(img.shape[1], encoder_attention_mask)
    neg = None
    if neg_encoder_hidden_states is not None and rows:
        neg_mask = (
            neg_attention_mask if neg_attention_mask is not None else torch.ones(neg_encoder_hidden_states.shape[:2])
        )
        neg_mask = neg_mask.to(encoder_attention_mask.dtype)
        t_rows = timestep[rows] if timestep.ndim else timestep
        g_rows = None if guidance is None else (guidance[rows] if guidance.ndim else guidance)
        neg = dict(
            txt=tr.context_embedder(neg_encoder_hidden_states, t_rows, neg_mask),
            temb=tr.time_text_embed(t_rows, neg_pooled_projections, g_rows)[0],
            bias=_hunyuan_bias(img.shape[1], neg_mask),
        )
    for block in tr.transformer_blocks:
        img, txt, neg = _hunyuan_double_block(block, img, txt, temb, rope, bias, neg, rows, nag, replace)
    for block in tr.single_transformer_blocks:
        img, txt, neg = _hunyuan_single_block(block, img, txt, temb, rope, bias, neg, rows, nag, replace)
    img = tr.proj_out(tr.norm_out(img, temb))
    p_, pt = tr.config.patch_size, tr.config.patch_size_t
    img = img.reshape(batch_size, frames // pt, height // p_, width // p_, -1, pt, p_, p_)
    return img.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


# ----------------------------------------------------------------------------------------------------------------------
# HunyuanImage 2.1
# ----------------------------------------------------------------------------------------------------------------------


def _hunyuanimage_text(tr, text, mask, text_2, mask_2, timestep):
    """The model's text stream: the Qwen states through the token refiner (with their mask and the timestep), the
    byT5 states through their projection, joined per sample as [valid byT5, valid Qwen, the rest] (valid tokens
    first, each part in its own order); returns (text, (B, N) mask)."""
    mask = mask.bool()
    txt = tr.context_embedder(text, timestep, mask)
    if text_2 is None or tr.context_embedder_2 is None:
        return txt, mask
    txt_2, mask_2 = tr.context_embedder_2(text_2), mask_2.bool()
    joined, joined_mask = [], []
    for i in range(txt.shape[0]):
        keep_2, keep = mask_2[i].nonzero().flatten(), mask[i].nonzero().flatten()
        drop_2, drop = (~mask_2[i]).nonzero().flatten(), (~mask[i]).nonzero().flatten()
        joined.append(torch.cat([txt_2[i, keep_2], txt[i, keep], txt_2[i, drop_2], txt[i, drop]]))
        valid = len(keep_2) + len(keep)
        joined_mask.append(torch.arange(txt.shape[1] + txt_2.shape[1]) < valid)
    return torch.stack(joined), torch.stack(joined_mask)


def naive_hunyuanimage_forward(
    transformer,
    hidden_states,
    timestep,
    encoder_hidden_states,
    encoder_attention_mask,
    encoder_hidden_states_2,
    encoder_attention_mask_2,
    neg_encoder_hidden_states,
    neg_attention_mask,
    neg_encoder_hidden_states_2,
    neg_attention_mask_2,
    scale,
    tau,
    alpha,
    p=1,
    cond_rows=None,
    guidance=None,
    timestep_r=None,
):
    """HunyuanImageTransformer2DModel forward with NAG, block by block (the blocks are HunyuanVideo's). The negative
    Qwen text goes through the token refiner with its own mask and the guided rows' timestep, its byT5 text is joined
    with it as the model joins the positive ones, at the negative's own lengths; the modulation is the guided rows'
    (timestep and guidance only); the negative text attends to [guided image, negative text] with its own key mask."""
    tr = transformer
    batch_size, _, height, width = hidden_states.shape
    rows = _rows_or_all(cond_rows, batch_size)
    nag = dict(scale=scale, tau=tau, alpha=alpha, p=p)
    rope = tr.rope(hidden_states)
    temb = tr.time_guidance_embed(timestep, guidance=guidance, timestep_r=timestep_r)
    img = tr.x_embedder(hidden_states)
    txt, mask = _hunyuanimage_text(
        tr, encoder_hidden_states, encoder_attention_mask, encoder_hidden_states_2, encoder_attention_mask_2, timestep
    )
    bias = _hunyuan_bias(img.shape[1], mask)
    neg = None
    if neg_encoder_hidden_states is not None and rows:
        t_rows = timestep[rows] if timestep.ndim else timestep
        neg_txt, neg_mask = _hunyuanimage_text(
            tr, neg_encoder_hidden_states, neg_attention_mask, neg_encoder_hidden_states_2, neg_attention_mask_2, t_rows
        )
        neg = dict(txt=neg_txt, temb=temb[rows], bias=_hunyuan_bias(img.shape[1], neg_mask))
    for block in tr.transformer_blocks:
        img, txt, neg = _hunyuan_double_block(block, img, txt, temb, rope, bias, neg, rows, nag)
    for block in tr.single_transformer_blocks:
        img, txt, neg = _hunyuan_single_block(block, img, txt, temb, rope, bias, neg, rows, nag)
    img = tr.proj_out(tr.norm_out(img, temb))
    ph, pw = tr.config.patch_size
    img = img.reshape(batch_size, height // ph, width // pw, -1, ph, pw)
    return img.permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)


# ----------------------------------------------------------------------------------------------------------------------
# Flux2 (FLUX.2 dev / klein)
# ----------------------------------------------------------------------------------------------------------------------


def _flux2_mod(linear, temb, sets):
    """Flux2Modulation: linear(silu(temb)) chunked into ``sets`` (shift, scale, gate) triples of (B, D)."""
    params = linear(F.silu(temb)).chunk(3 * sets, dim=-1)
    return [params[3 * i : 3 * i + 3] for i in range(sets)]


def _flux2_heads(attn, x):
    return x.reshape(x.shape[0], x.shape[1], -1, attn.head_dim)


def _flux2_double_block(block, img, txt, mod_img, mod_txt, rope, neg, rows, nag):
    """Stock: image and text modulated by the timestep alone; attention over [text, image] with separate text
    projections. Here the negative text attends to [negative text, guided image] with its own rope."""
    attn = block.attn
    (shift, scale, gate), (shift_mlp, scale_mlp, gate_mlp) = mod_img
    (c_shift, c_scale, c_gate), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = mod_txt
    img_n = _modulate(block.norm1(img), shift, scale)
    q_img = attn.norm_q(_flux2_heads(attn, attn.to_q(img_n)))
    k_img = attn.norm_k(_flux2_heads(attn, attn.to_k(img_n)))
    v_img = _flux2_heads(attn, attn.to_v(img_n))

    def text_qkv(t):
        t_n = _modulate(
            block.norm1_context(t),
            c_shift[: t.shape[0]] if t is txt else c_shift[rows],
            c_scale[: t.shape[0]] if t is txt else c_scale[rows],
        )
        return (
            attn.norm_added_q(_flux2_heads(attn, attn.add_q_proj(t_n))),
            attn.norm_added_k(_flux2_heads(attn, attn.add_k_proj(t_n))),
            _flux2_heads(attn, attn.add_v_proj(t_n)),
        )

    txt_attn, img_attn = _rope_attention(*text_qkv(txt), q_img, k_img, v_img, rope, None)
    if neg is not None:
        txtn_attn, img_attn_neg = _rope_attention(
            *text_qkv(neg["txt"]), q_img[rows], k_img[rows], v_img[rows], neg["rope"], None
        )
        img_attn = img_attn.clone()
        img_attn[rows] = naive_combine(img_attn[rows], img_attn_neg, **nag)
    img = img + gate[:, None] * attn.to_out[0](img_attn)
    img = img + gate_mlp[:, None] * block.ff(_modulate(block.norm2(img), shift_mlp, scale_mlp))

    def text_tail(t, t_attn, r):
        t = t + c_gate[r][:, None] * attn.to_add_out(t_attn)
        return t + c_gate_mlp[r][:, None] * block.ff_context(
            _modulate(block.norm2_context(t), c_shift_mlp[r], c_scale_mlp[r])
        )

    txt = text_tail(txt, txt_attn, slice(None))
    if neg is not None:
        neg = {**neg, "txt": text_tail(neg["txt"], txtn_attn, rows)}
    return img, txt, neg


def _flux2_single_block(block, img, txt, mod, rope, neg, rows, nag):
    """Stock: x = [text, image]; one fused projection to (q, k, v, MLP-in); attention || SwiGLU; one output
    projection over [attention, MLP]. Here on the parts: NAG on the image rows' attention columns."""
    attn = block.attn
    ((shift, scale, gate),) = mod
    n_txt = txt.shape[1]
    inner = attn.inner_dim

    def project(x_n):
        h = attn.to_qkv_mlp_proj(x_n)
        q, k, v = h[..., :inner], h[..., inner : 2 * inner], h[..., 2 * inner : 3 * inner]
        half = (h.shape[-1] - 3 * inner) // 2
        mlp_in = h[..., 3 * inner :]
        mlp = F.silu(mlp_in[..., :half]) * mlp_in[..., half:]
        return attn.norm_q(_flux2_heads(attn, q)), attn.norm_k(_flux2_heads(attn, k)), _flux2_heads(attn, v), mlp

    x = torch.cat([txt, img], dim=1)
    x_n = _modulate(block.norm(x), shift, scale)
    q, k, v, mlp = project(x_n)
    txt_attn, img_attn = _rope_attention(
        q[:, :n_txt], k[:, :n_txt], v[:, :n_txt], q[:, n_txt:], k[:, n_txt:], v[:, n_txt:], rope, None
    )
    if neg is not None:
        txtn_n = _modulate(block.norm(neg["txt"]), shift[rows], scale[rows])
        qn, kn, vn, mlp_neg = project(txtn_n)
        txtn_attn, img_attn_neg = _rope_attention(
            qn, kn, vn, q[rows, n_txt:], k[rows, n_txt:], v[rows, n_txt:], neg["rope"], None
        )
        img_attn = img_attn.clone()
        img_attn[rows] = naive_combine(img_attn[rows], img_attn_neg, **nag)
    x = x + gate[:, None] * attn.to_out(torch.cat([torch.cat([txt_attn, img_attn], dim=1), mlp], dim=2))
    if neg is not None:
        txt_neg = neg["txt"] + gate[rows][:, None] * attn.to_out(torch.cat([txtn_attn, mlp_neg], dim=2))
        neg = {**neg, "txt": txt_neg}
    return x[:, n_txt:], x[:, :n_txt], neg


def naive_flux2_forward(
    transformer,
    hidden_states,
    encoder_hidden_states,
    timestep,
    img_ids,
    txt_ids,
    guidance,
    neg_encoder_hidden_states,
    scale,
    tau,
    alpha,
    p=1,
    cond_rows=None,
):
    """Flux2Transformer2DModel forward with NAG, block by block. All modulation comes from the timestep (and
    guidance); text positions are (0, 0, 0, l) for the l-th token, so the negative text gets its own table."""
    tr = transformer
    batch_size = hidden_states.shape[0]
    rows = _rows_or_all(cond_rows, batch_size)
    nag = dict(scale=scale, tau=tau, alpha=alpha, p=p)
    dtype = hidden_states.dtype
    temb = tr.time_guidance_embed(timestep.to(dtype) * 1000, None if guidance is None else guidance.to(dtype) * 1000)
    mod_img = _flux2_mod(tr.double_stream_modulation_img.linear, temb, 2)
    mod_txt = _flux2_mod(tr.double_stream_modulation_txt.linear, temb, 2)
    mod_single = _flux2_mod(tr.single_stream_modulation.linear, temb, 1)
    img = tr.x_embedder(hidden_states)
    txt = tr.context_embedder(encoder_hidden_states)
    img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
    rope = tr.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
    neg = None
    if neg_encoder_hidden_states is not None and rows:
        n_neg = neg_encoder_hidden_states.shape[1]
        neg_ids = torch.zeros(n_neg, txt_ids.shape[-1], dtype=txt_ids.dtype)
        neg_ids[:, -1] = torch.arange(n_neg)
        neg = dict(
            txt=tr.context_embedder(neg_encoder_hidden_states), rope=tr.pos_embed(torch.cat([neg_ids, img_ids], dim=0))
        )
    for block in tr.transformer_blocks:
        img, txt, neg = _flux2_double_block(block, img, txt, mod_img, mod_txt, rope, neg, rows, nag)
    for block in tr.single_transformer_blocks:
        img, txt, neg = _flux2_single_block(block, img, txt, mod_single, rope, neg, rows, nag)
    return tr.proj_out(_ada_continuous(tr.norm_out, img, temb))


# ----------------------------------------------------------------------------------------------------------------------
# Lumina2
# ----------------------------------------------------------------------------------------------------------------------


def _complex_rope(x, freqs):
    """Rotary embedding with complex tables (S, D/2) on (B, S, H, D): consecutive pairs as complex numbers."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(3).to(x.dtype)


def _lumina2_qkv(attn, x_n, freqs):
    q, k, v = attn.to_q(x_n), attn.to_k(x_n), attn.to_v(x_n)
    head_dim = q.shape[-1] // attn.heads
    q = attn.norm_q(q.reshape(1, -1, attn.heads, head_dim))
    k = attn.norm_k(k.reshape(1, k.shape[1], -1, head_dim))
    v = v.reshape(1, v.shape[1], -1, head_dim)
    q, k = _complex_rope(q, freqs), _complex_rope(k, freqs)
    repeat = attn.heads // k.shape[2]
    return q, k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)


def _lumina2_block(block, x, freqs, temb, neg, nag):
    """One sample's [caption, image] (valid tokens only, so no mask). ``neg``: None or dict(x=[negative caption,
    image], freqs=its tables with the image part the guided sample's, n=negative caption length)."""
    attn = block.attn
    n_txt = x.shape[1] - neg["image_len"] if neg is not None else None
    x_n, gate_msa, scale_mlp, gate_mlp = block.norm1(x, temb)
    q, k, v = _lumina2_qkv(attn, x_n, freqs)
    z = naive_attention(q, k, v)
    if neg is not None:
        xn_n = block.norm1(neg["x"], temb)[0]
        xn_n = torch.cat([xn_n[:, : neg["n"]], x_n[:, n_txt:]], dim=1)  # the guided image tokens
        qn, kn, vn = _lumina2_qkv(attn, xn_n, neg["freqs"])
        z_neg = naive_attention(qn, kn, vn)
        z = z.clone()
        z[:, n_txt:] = naive_combine(z[:, n_txt:], z_neg[:, neg["n"] :], **nag)

    def tail(h, z_part):
        h = h + gate_msa.unsqueeze(1).tanh() * block.norm2(attn.to_out[1](attn.to_out[0](z_part)))
        mlp = block.feed_forward(block.ffn_norm1(h) * (1 + scale_mlp.unsqueeze(1)))
        return h + gate_mlp.unsqueeze(1).tanh() * block.ffn_norm2(mlp)

    x = tail(x, z)
    if neg is not None:
        text = tail(neg["x"][:, : neg["n"]], z_neg[:, : neg["n"]])
        neg = {**neg, "x": torch.cat([text, x[:, n_txt:]], dim=1)}
    return x, neg


def naive_lumina2_forward(
    transformer,
    hidden_states,
    timestep,
    encoder_hidden_states,
    encoder_attention_mask,
    neg_encoder_hidden_states,
    neg_attention_mask,
    scale,
    tau,
    alpha,
    p=1,
    cond_rows=None,
):
    """Lumina2Transformer2DModel forward with NAG, one sample at a time: each sample's sequence is [caption (its
    valid tokens, a prefix of the mask), image], the image positions following the caption's length. The negative
    caption (embedded and refined like the positive, with its own mask) attends to [negative caption, guided
    image] with the guided image tokens' queries, keys, values and rotary tables."""
    tr = transformer
    batch_size, _, height, width = hidden_states.shape
    rows = _rows_or_all(cond_rows, batch_size)
    nag = dict(scale=scale, tau=tau, alpha=alpha, p=p)
    temb, cap = tr.time_caption_embed(hidden_states, timestep, encoder_hidden_states)
    patches, cap_freqs, img_freqs, freqs, cap_lens, _ = tr.rope_embedder(hidden_states, encoder_attention_mask)
    img = tr.x_embedder(patches)
    for layer in tr.context_refiner:
        cap = layer(cap, encoder_attention_mask, cap_freqs)
    for layer in tr.noise_refiner:
        img = layer(img, None, img_freqs, temb)
    image_len = img.shape[1]
    negatives = {}
    if neg_encoder_hidden_states is not None and rows:
        neg_mask = (
            neg_attention_mask if neg_attention_mask is not None else torch.ones(neg_encoder_hidden_states.shape[:2])
        )
        neg_mask = neg_mask.to(encoder_attention_mask.dtype)
        neg_cap = tr.time_caption_embed.caption_embedder(neg_encoder_hidden_states)
        _, neg_cap_freqs, _, _, neg_lens, _ = tr.rope_embedder(hidden_states[rows], neg_mask)
        for layer in tr.context_refiner:
            neg_cap = layer(neg_cap, neg_mask, neg_cap_freqs)
        for j, r in enumerate(rows):
            n = int(neg_lens[j])
            negatives[r] = dict(
                n=n,
                image_len=image_len,
                x=torch.cat([neg_cap[j : j + 1, :n], img[r : r + 1]], dim=1),
                freqs=torch.cat([neg_cap_freqs[j, :n], freqs[r, cap_lens[r] : cap_lens[r] + image_len]]),
            )
    outputs = []
    ps = tr.config.patch_size
    for i in range(batch_size):
        c = int(cap_lens[i])
        x = torch.cat([cap[i : i + 1, :c], img[i : i + 1]], dim=1)
        neg = negatives.get(i)
        for block in tr.layers:
            x, neg = _lumina2_block(block, x, freqs[i, : c + image_len], temb[i : i + 1], neg, nag)
        x = tr.norm_out(x, temb[i : i + 1])[0, c:]
        outputs.append(x.view(height // ps, width // ps, ps, ps, -1).permute(4, 0, 2, 1, 3).flatten(3, 4).flatten(1, 2))
    return torch.stack(outputs)


# ---------------------------------------------------------------------------------------------
# Z-Image
# ---------------------------------------------------------------------------------------------

_ZIMAGE_MULTIPLE = 32


def _zimage_rope(x, freqs):
    """x: (1, L, H, D); freqs: (L, D / 2) complex; pairs of features rotated as complex numbers."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs[None, :, None]).flatten(3).type_as(x)


def _zimage_attention(attn, h, freqs):
    """Self-attention of one sequence (1, L, dim) before the output projection: (1, L, dim)."""
    q, k, v = (proj(h).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return naive_attention(_zimage_rope(q, freqs), _zimage_rope(k, freqs), v)


def _zimage_block(block, x, freqs, adaln, neg, nag):
    """One modulated main block on one sample's [image, caption]; ``neg``: its negative sequence [image (never
    read: the guided image's normalized tokens replace it), negative caption] with the guided image's tables."""
    scale_msa, gate_msa, scale_mlp, gate_mlp = block.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
    gate_msa, gate_mlp, scale_msa, scale_mlp = gate_msa.tanh(), gate_mlp.tanh(), 1.0 + scale_msa, 1.0 + scale_mlp

    def tail(stream, out):
        stream = stream + gate_msa * block.attention_norm2(out)
        return stream + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(stream) * scale_mlp))

    h = block.attention_norm1(x) * scale_msa
    z = _zimage_attention(block.attention, h, freqs)
    project = block.attention.to_out[0]
    if neg is None:
        return tail(x, project(z)), None
    n = neg["image_len"]
    hn = torch.cat([h[:, :n], (block.attention_norm1(neg["x"]) * scale_msa)[:, n:]], dim=1)
    zn = _zimage_attention(block.attention, hn, neg["freqs"])
    out = project(torch.cat([naive_combine(z[:, :n], zn[:, :n], **nag), z[:, n:]], dim=1))
    out_n = torch.cat([out[:, :n], project(zn)[:, n:]], dim=1)
    return tail(x, out), {**neg, "x": tail(neg["x"], out_n)}


def _zimage_caption(tr, cap):
    """A caption (tokens, width) embedded, padded to a multiple of 32 with the pad token, refined; its tables."""
    length = cap.shape[0]
    padded = length + (-length) % _ZIMAGE_MULTIPLE
    feats = tr.cap_embedder(cap)
    feats = torch.cat([feats, tr.cap_pad_token.expand(padded - length, -1)])[None]
    ids = torch.zeros(padded, 3, dtype=torch.int32)
    ids[:, 0] = torch.arange(1, padded + 1)
    freqs = tr.rope_embedder(ids)
    for layer in tr.context_refiner:
        feats = layer(feats, None, freqs[None])
    return feats, freqs, padded


def naive_zimage_forward(
    transformer,
    x,
    t,
    cap_feats,
    neg_cap_feats,
    scale,
    tau,
    alpha,
    p=1,
    cond_rows=None,
    patch_size=2,
    f_patch_size=1,
    controlnet=None,
    control_context=None,
    conditioning_scale=1.0,
):
    """ZImageTransformer2DModel forward (lists in, a list out) with NAG, one sample at a time, unpadded across the
    batch: each sample's sequence is [image (padded to a multiple of 32 with the pad token), caption (likewise)],
    the image positions following the padded caption's length. The negative caption (embedded and refined like
    the positive) attends to [guided image, negative caption] with the guided image tokens' queries, keys, values
    and rotary tables; ``neg_cap_feats`` has one entry per guided row.

    ``controlnet`` (a ZImageControlNetModel, run as stock on one sample at a time with ``control_context``): its
    hints are added to each sample's [image, caption] sequence after their layers; the negative sequence gets the
    hints the ControlNet gives for the guided row's latents and control with the negative caption."""
    tr = transformer

    def control_hints(i, caption):
        if controlnet is None:
            return {}
        return controlnet(
            [x[i]],
            t[i : i + 1],
            [caption],
            [control_context[i]],
            conditioning_scale=conditioning_scale,
            patch_size=patch_size,
            f_patch_size=f_patch_size,
        )

    rows = _rows_or_all(cond_rows, len(x))
    nag = dict(scale=scale, tau=tau, alpha=alpha, p=p)
    pf, ph, pw = f_patch_size, patch_size, patch_size
    outputs = []
    for i, image in enumerate(x):
        adaln = tr.t_embedder(t[i : i + 1] * tr.t_scale).type_as(image)
        channels, frames, height, width = image.shape
        grid = (frames // pf, height // ph, width // pw)
        patches = image.view(channels, grid[0], pf, grid[1], ph, grid[2], pw).permute(1, 3, 5, 2, 4, 6, 0)
        patches = patches.reshape(grid[0] * grid[1] * grid[2], -1)
        n_img = patches.shape[0]
        image_len = n_img + (-n_img) % _ZIMAGE_MULTIPLE
        cap, cap_freqs, cap_len = _zimage_caption(tr, cap_feats[i])
        img = tr.all_x_embedder[f"{patch_size}-{f_patch_size}"](patches)
        img = torch.cat([img, tr.x_pad_token.expand(image_len - n_img, -1)])[None]
        axes = [torch.arange(s, dtype=torch.int32) for s in grid]
        ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flatten(0, 2)
        ids[:, 0] += cap_len + 1
        ids = torch.cat([ids, torch.zeros(image_len - n_img, 3, dtype=torch.int32)])
        img_freqs = tr.rope_embedder(ids)
        for layer in tr.noise_refiner:
            img = layer(img, None, img_freqs[None], adaln)
        seq, freqs = torch.cat([img, cap], dim=1), torch.cat([img_freqs, cap_freqs])
        hints, neg_hints = control_hints(i, cap_feats[i]), {}
        neg = None
        if neg_cap_feats is not None and i in rows:
            neg_caption = neg_cap_feats[rows.index(i)].to(image.dtype)
            neg_cap, neg_freqs, _ = _zimage_caption(tr, neg_caption)
            neg = dict(image_len=image_len, x=torch.cat([img, neg_cap], dim=1), freqs=torch.cat([img_freqs, neg_freqs]))
            neg_hints = control_hints(i, neg_caption)
        for index, block in enumerate(tr.layers):
            seq, neg = _zimage_block(block, seq, freqs, adaln, neg, nag)
            if index in hints:
                seq = seq + hints[index]
            if neg is not None and index in neg_hints:
                neg = {**neg, "x": neg["x"] + neg_hints[index]}
        out = tr.all_final_layer[f"{patch_size}-{f_patch_size}"](seq, c=adaln)[0, :n_img]
        out = (
            out.view(*grid, pf, ph, pw, channels).permute(6, 0, 3, 1, 4, 2, 5).reshape(channels, frames, height, width)
        )
        outputs.append(out)
    return outputs


# ----------------------------------------------------------------------------------------------------------------------
# HunyuanVideo 1.5
# ----------------------------------------------------------------------------------------------------------------------


def _hunyuanvideo15_text(tr, text, mask, text_2, mask_2, image_embeds, timestep):
    """The model's text stream: the Qwen states through the token refiner (with their mask and the timestep), the
    byT5 states through their projection, the image embedding through its projection (all-zero embeddings: zeroed
    and masked), each plus its type embedding (0 text, 1 byT5, 2 image), joined per sample as [valid image, valid
    byT5, valid text, invalid image, zeros for invalid byT5, zeros for invalid text]; returns (text, (B, N) mask)."""
    mask, mask_2 = mask.bool(), mask_2.bool()
    txt = tr.context_embedder(text, timestep, mask)
    txt = txt + tr.cond_type_embed.weight[0]
    txt_2 = tr.context_embedder_2(text_2) + tr.cond_type_embed.weight[1]
    img = tr.image_embedder(image_embeds)
    if bool((image_embeds == 0).all()):
        img, mask_3 = img * 0.0, torch.zeros(img.shape[:2], dtype=torch.bool)
    else:
        mask_3 = torch.ones(img.shape[:2], dtype=torch.bool)
    img = img + tr.cond_type_embed.weight[2]
    joined, joined_mask = [], []
    for i in range(txt.shape[0]):
        parts_valid = [img[i][mask_3[i]], txt_2[i][mask_2[i]], txt[i][mask[i]]]
        parts_invalid = [img[i][~mask_3[i]], torch.zeros_like(txt_2[i][~mask_2[i]]), torch.zeros_like(txt[i][~mask[i]])]
        valid = sum(p.shape[0] for p in parts_valid)
        joined.append(torch.cat(parts_valid + parts_invalid))
        joined_mask.append(torch.arange(joined[-1].shape[0]) < valid)
    return torch.stack(joined), torch.stack(joined_mask)


def naive_hunyuanvideo15_forward(
    transformer,
    hidden_states,
    timestep,
    encoder_hidden_states,
    encoder_attention_mask,
    encoder_hidden_states_2,
    encoder_attention_mask_2,
    image_embeds,
    neg_encoder_hidden_states,
    neg_attention_mask,
    neg_encoder_hidden_states_2,
    neg_attention_mask_2,
    scale,
    tau,
    alpha,
    p=1,
    cond_rows=None,
    timestep_r=None,
):
    """HunyuanVideo15Transformer3DModel forward with NAG, block by block (double blocks only, HunyuanVideo's layout).
    The negative Qwen text goes through the token refiner with its own mask and the guided rows' timestep, and is
    joined with the negative byT5 text and the guided rows' image embedding as the model joins the positive ones, at
    the negative's own lengths; the modulation is the guided rows' (timestep only); the negative text attends to
    [guided video, negative text] with its own key mask."""
    tr = transformer
    batch_size, _, frames, height, width = hidden_states.shape
    rows = _rows_or_all(cond_rows, batch_size)
    nag = dict(scale=scale, tau=tau, alpha=alpha, p=p)
    rope = tr.rope(hidden_states)
    temb = tr.time_embed(timestep, timestep_r=timestep_r)
    img = tr.x_embedder(hidden_states)
    txt, mask = _hunyuanvideo15_text(
        tr,
        encoder_hidden_states,
        encoder_attention_mask,
        encoder_hidden_states_2,
        encoder_attention_mask_2,
        image_embeds,
        timestep,
    )
    bias = _hunyuan_bias(img.shape[1], mask)
    neg = None
    if neg_encoder_hidden_states is not None and rows:
        t_rows = timestep[rows] if timestep.ndim else timestep
        neg_mask = (
            neg_attention_mask if neg_attention_mask is not None else torch.ones(neg_encoder_hidden_states.shape[:2])
        )
        neg_txt, neg_mask = _hunyuanvideo15_text(
            tr,
            neg_encoder_hidden_states,
            neg_mask,
            neg_encoder_hidden_states_2,
            neg_attention_mask_2,
            image_embeds[rows],
            t_rows,
        )
        neg = dict(txt=neg_txt, temb=temb[rows], bias=_hunyuan_bias(img.shape[1], neg_mask))
    for block in tr.transformer_blocks:
        img, txt, neg = _hunyuan_double_block(block, img, txt, temb, rope, bias, neg, rows, nag)
    img = tr.proj_out(tr.norm_out(img, temb))
    p_, pt = tr.config.patch_size, tr.config.patch_size_t
    img = img.reshape(batch_size, frames // pt, height // p_, width // p_, -1, pt, p_, p_)
    return img.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


# ----------------------------------------------------------------------------------------------------------------------
# LTX-2 (LTX2VideoTransformer3DModel): the video stream's text cross attention only
# ----------------------------------------------------------------------------------------------------------------------


class _NaiveLTX2VideoTextProcessor:
    """Naive LTX2AudioVideoAttnProcessor for a block's ``attn2`` (video queries, text keys/values, no rotary
    embedding), with NAG on ``rows``; the block's modulated negative text is read from ``state``."""

    def __init__(self, state, rows, nag):
        self.state = state
        self.rows = rows
        self.nag = nag

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        query_rotary_emb=None,
        key_rotary_emb=None,
    ):
        heads = attn.heads
        gates = None  # per-head output gates (gated attention): 2 * sigmoid of a projection of the queries' input
        if getattr(attn, "to_gate_logits", None) is not None:
            gates = 2.0 * torch.sigmoid(attn.to_gate_logits(hidden_states))

        def project_kv(ctx):
            k = attn.norm_k(attn.to_k(ctx))  # RMS norm across heads, on the flat projection
            return _split_heads(k, heads), _split_heads(attn.to_v(ctx), heads)

        q = _split_heads(attn.norm_q(attn.to_q(hidden_states)), heads)
        k, v = project_kv(encoder_hidden_states)
        bias = None if attention_mask is None else attention_mask[:, None]  # (B, 1, T) -> (B, 1, 1, T)
        negative = self.state.get("context")
        k_neg = v_neg = bias_neg = None
        if negative is not None:
            k_neg, v_neg = project_kv(negative)
            bias_neg = None if self.state["bias"] is None else self.state["bias"][:, None]
        out = _guided_attention(
            q, k, v, bias, k_neg, v_neg, bias_neg, self.rows if negative is not None else [], self.nag, gates
        )
        return attn.to_out[1](attn.to_out[0](out))


def naive_ltx2_forward(
    model,
    forward_kwargs,
    neg_encoder_hidden_states,
    neg_encoder_attention_mask=None,
    scale=1.0,
    tau=2.5,
    alpha=0.5,
    p=1,
    cond_rows=None,
):
    """Stock LTX2VideoTransformer3DModel forward with naive NAG on the video stream's text cross attention.

    ``neg_encoder_hidden_states``: the negative video text as the model takes it (the pipeline's connector output),
    one row per guided row; ``neg_encoder_attention_mask``: its 0/1 mask or None. The negative text gets what the
    model does to the positive video text: the caption projection, then in each block the cross-attention AdaLN
    scale/shift of the guided row (when the block has it). The audio stream is left as it is.
    Returns ``(video output, audio output)``.
    """
    kwargs = dict(forward_kwargs)
    x = kwargs["hidden_states"]
    batch = x.shape[0]
    rows = _rows_or_all(cond_rows, batch)
    negative = None
    bias = None
    if neg_encoder_hidden_states is not None and rows:
        if neg_encoder_hidden_states.shape[0] != len(rows):
            raise ValueError("negative tensors must have one row per guided row")
        negative = neg_encoder_hidden_states.to(x.dtype)
        if model.config.use_prompt_embeddings:
            width = model.config.num_attention_heads * model.config.attention_head_dim
            negative = model.caption_projection(negative).view(negative.shape[0], -1, width)
        if neg_encoder_attention_mask is not None:
            bias = ((1 - neg_encoder_attention_mask.to(x.dtype)) * -10000.0).unsqueeze(1)
    state = {"context": None, "bias": bias}
    nag = dict(scale=scale, tau=tau, alpha=alpha, p=p)
    blocks = list(model.transformer_blocks)
    processor = _NaiveLTX2VideoTextProcessor(state, rows, nag)

    def before_block(block, args, block_kwargs):
        if negative is None:
            state["context"] = None
            return None
        context = negative
        if block.cross_attn_adaln:
            temb_prompt = block_kwargs.get("temb_prompt")
            table = block.prompt_scale_shift_table
            if temb_prompt is not None:
                ada = table[None, None].to(temb_prompt.device) + temb_prompt.reshape(batch, temb_prompt.shape[1], 2, -1)
                shift, scale_ = ada[:, :, 0][rows], ada[:, :, 1][rows]
            else:
                shift, scale_ = table[0].to(context.dtype), table[1].to(context.dtype)
            context = context * (1 + scale_) + shift
        state["context"] = context
        return None

    originals = [(block.attn2, block.attn2.processor) for block in blocks]
    for _, original in originals:
        if type(original).__name__ != "LTX2AudioVideoAttnProcessor":
            raise RuntimeError(f"attn2 carries {type(original).__name__}, expected LTX2AudioVideoAttnProcessor")
    hooks = []
    try:
        for block in blocks:
            block.attn2.set_processor(processor)
            hooks.append(block.register_forward_pre_hook(before_block, with_kwargs=True))
        kwargs["return_dict"] = False
        out = model(**kwargs)
    finally:
        for hook in hooks:
            hook.remove()
        for module, original in originals:
            module.set_processor(original)
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------------------
# Qwen-Image 2.1: one block-causal sequence [text with condition-image slots, target image]
# ----------------------------------------------------------------------------------------------------------------------


def _qwen21_layout(tr, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, img_shapes, img_mask):
    """The joint sequence, its rotary table, target-token mask and additive attention bias, as the model builds
    them: text projected, each image slot expanded to 4 latent tokens, the block-causal mask written out as a
    dense (query, key) matrix (causal, except that each image block sees itself whole), padded text keys dropped."""
    b = hidden_states.shape[0]
    img = tr.img_in(hidden_states)
    txt = tr.txt_in(encoder_hidden_states)
    slots = img_mask[0].bool()
    repeats = torch.where(slots, 4, 1)
    is_image = torch.repeat_interleave(slots, repeats)
    target = math.prod(img_shapes[0][-1])
    joint = torch.cat([txt, txt.new_zeros(b, target // 4, txt.shape[2])], dim=1).repeat_interleave(repeats, dim=1)
    joint[:, is_image] = img
    length = joint.shape[1]
    rope = tr.pos_embed(img_shapes[0], is_image, device=joint.device)
    block = torch.full((length,), -1, dtype=torch.long)
    positions = is_image.nonzero(as_tuple=True)[0].tolist()
    sizes = [math.prod(s) for s in img_shapes[0]]
    cursor = 0
    for index, size in enumerate(sizes):
        for p in positions[cursor : cursor + size]:
            block[p] = index
        cursor += size
    is_target = torch.zeros(length, dtype=torch.bool)
    is_target[positions[-sizes[-1] :]] = True
    q_idx, k_idx = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = (q_idx >= k_idx) | ((block[:, None] == block[None, :]) & (block[:, None] >= 0))
    allowed = allowed[None].expand(b, -1, -1).clone()
    if encoder_hidden_states_mask is not None:
        valid = torch.ones(b, length, dtype=torch.bool)
        text_positions = (~is_image).nonzero(as_tuple=True)[0]
        text_slots = ~slots[: encoder_hidden_states_mask.shape[1]]
        valid[:, text_positions] = encoder_hidden_states_mask.bool()[:, text_slots]
        allowed &= valid[:, None, :]
    bias = torch.zeros(b, 1, length, length).masked_fill(~allowed[:, None], float("-inf"))
    return joint, rope, is_target.to(joint.device), bias.to(joint.device)


def _qwen21_modulation_rows(params, is_target, causal_condition):
    """(rows, tokens, dim): target tokens take their row's timestep, the others the t = 0 row (causal_condition)."""
    if not causal_condition:
        return params[:, None]
    return torch.where(is_target.view(1, -1, 1), params[:-1, None], params[-1:, None])


def _qwen21_attention_z(attn, x, rope, bias):
    """The attention output before the output projection, (rows, tokens, heads * head_dim)."""
    head_dim = attn.inner_dim // attn.heads
    q = attn.norm_q(attn.to_q(x).unflatten(-1, (-1, head_dim)))
    k = attn.norm_k(attn.to_k(x).unflatten(-1, (-1, head_dim)))
    v = attn.to_v(x).unflatten(-1, (-1, head_dim))

    def rotate(t):
        pairs = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * rope.unsqueeze(1)).flatten(3).type_as(t)

    return naive_attention(rotate(q), rotate(k), v, bias)


def _qwen21_block(block, x, mod, rope, bias, is_target, causal_condition, z_edit=None):
    """One block; ``z_edit(z) -> z`` may change the attention output before the output projection."""
    mod1, mod2 = mod.chunk(2, dim=-1)
    scale1, gate1 = (_qwen21_modulation_rows(p, is_target, causal_condition) for p in mod1.chunk(2, dim=-1))
    z = _qwen21_attention_z(block.attn, block.img_norm1(x) * (1 + scale1), rope, bias)
    if z_edit is not None:
        z = z_edit(z)
    x = x + gate1.tanh() * block.attn.to_out[0](z)
    scale2, gate2 = (_qwen21_modulation_rows(p, is_target, causal_condition) for p in mod2.chunk(2, dim=-1))
    return x + gate2.tanh() * block.img_mlp(block.img_norm2(x) * (1 + scale2)), z


def _qwen21_output(tr, x, temb, is_target, causal_condition):
    scale = tr.norm_out.linear(tr.norm_out.silu(temb).to(x.dtype))
    return tr.proj_out(tr.norm_out.norm(x) * (1 + _qwen21_modulation_rows(scale, is_target, causal_condition)))


def naive_qwenimage21_forward(
    tr,
    forward_kwargs,
    neg_encoder_hidden_states,
    neg_encoder_hidden_states_mask=None,
    neg_img_mask=None,
    scale=1.0,
    tau=2.5,
    alpha=0.25,
    p=1,
    cond_rows=None,
):
    """QwenImage21Transformer2DModel with NAG, block by block.

    Every guided row carries a second sequence: the negative prompt's own layout ``[negative text (with its
    condition-image slots), target image]``; at every block its target tokens are the guided row's current target
    tokens. ``Z-`` is that sequence's attention output at the target tokens (under the same block-causal mask), and
    the negative text evolves through the blocks as in the negative prompt's own call (it never sees the target).
    ``neg_img_mask`` is the negative's text-slot mask (no target slots; None: text only). Without a negative the
    model runs unguided (an independent re-implementation of the stock forward). Returns the whole sequence's output.
    """
    kw = forward_kwargs
    x, t = kw["hidden_states"], kw["timestep"]
    b = x.shape[0]
    rows = [] if neg_encoder_hidden_states is None else _rows_or_all(cond_rows, b)
    causal = bool(tr.config.causal_condition)
    pos, rope, is_target, bias = _qwen21_layout(
        tr, x, kw["encoder_hidden_states"], kw.get("encoder_hidden_states_mask"), kw["img_shapes"], kw["img_mask"]
    )
    if not rows:
        temb = tr.time_text_embed((torch.cat([t, t.new_zeros(1)]) if causal else t).to(x.dtype), x)
        mod = tr.modulation(temb)
        for block in tr.transformer_blocks:
            pos, _ = _qwen21_block(block, pos, mod, rope, bias, is_target, causal)
        return _qwen21_output(tr, pos, temb, is_target, causal)
    target_slots = kw["img_mask"].shape[1] - kw["encoder_hidden_states"].shape[1]
    n = len(rows)
    if neg_img_mask is None:
        neg_img_mask = torch.zeros(n, neg_encoder_hidden_states.shape[1], dtype=torch.bool)
    neg_img_mask = torch.cat([neg_img_mask.bool(), torch.ones(n, target_slots, dtype=torch.bool)], dim=1)
    neg_x, neg_shapes = x[rows], [kw["img_shapes"][0]] * n  # every sample has sample 0's layout
    if not bool(neg_img_mask[0, :-target_slots].any()):  # a text-only negative: its sequence has no condition images
        neg_x, neg_shapes = neg_x[:, -math.prod(neg_shapes[0][-1]) :], [shapes[-1:] for shapes in neg_shapes]
    neg, neg_rope, neg_is_target, neg_bias = _qwen21_layout(
        tr, neg_x, neg_encoder_hidden_states, neg_encoder_hidden_states_mask, neg_shapes, neg_img_mask
    )

    def modulation(timestep):
        steps = torch.cat([timestep, timestep.new_zeros(1)]) if causal else timestep
        temb = tr.time_text_embed(steps.to(x.dtype), x)
        return temb, tr.modulation(temb)

    temb, mod = modulation(t)
    _, neg_mod = modulation(t[rows])
    for block in tr.transformer_blocks:
        neg = neg.clone()
        neg[:, neg_is_target] = pos[rows][:, is_target]
        neg_next, z_neg = _qwen21_block(block, neg, neg_mod, neg_rope, neg_bias, neg_is_target, causal)

        def guide(z, z_neg=z_neg):
            z = z.clone()
            for j, r in enumerate(rows):
                z[r, is_target] = naive_combine(z[r, is_target], z_neg[j, neg_is_target], scale, tau, alpha, p)
            return z

        pos, _ = _qwen21_block(block, pos, mod, rope, bias, is_target, causal, guide)
        neg = neg_next
    return _qwen21_output(tr, pos, temb, is_target, causal)


# HiDream-I1
# ----------------------------------------------------------------------------------------------------------------------


def _hidream_rope(x, freqs):
    """HiDream's rotary embedding on (B, S, H, D): tables (B, S, 1, W/2, 2, 2) rotate the (2i, 2i + 1) feature
    pairs of the first W features of every head (W = D, or D / 2 when the tables cover half a head)."""
    width = freqs.shape[-3] * 2
    rotated, kept = x[..., :width], x[..., width:]
    pairs = rotated.float().reshape(*rotated.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]
    return torch.cat([out.reshape(rotated.shape).to(x.dtype), kept], dim=-1)


def _hidream_qkv(attn, x, rope, key_mask=None, text=False):
    """Queries, keys (RMS-normed, masked, rotated) and values of ``x`` with the image (or ``text``) projections."""
    suffix = "_t" if text else ""
    q = _split_heads(getattr(attn, "q_rms_norm" + suffix)(getattr(attn, "to_q" + suffix)(x)), attn.heads)
    k = _split_heads(getattr(attn, "k_rms_norm" + suffix)(getattr(attn, "to_k" + suffix)(x)), attn.heads)
    v = _split_heads(getattr(attn, "to_v" + suffix)(x), attn.heads)
    if key_mask is not None:
        k = k * key_mask[:, :, None, None]
    return _hidream_rope(q, rope), _hidream_rope(k, rope), v


def _hidream_attention(image_qkv, text_qkv):
    """Attention over [image, text]; returns the image and the text tokens' outputs (before the projections)."""
    q, k, v = (torch.cat([i, t], dim=1) for i, t in zip(image_qkv, text_qkv))
    out = naive_attention(q, k, v)
    image_len = image_qkv[0].shape[1]
    return out[:, :image_len], out[:, image_len:]


def _hidream_block(block, img, txt, temb, rope, img_mask, neg, rows, nag):
    """One HiDream block. Double-stream blocks give the text its own norms, projections, output projection and
    feed-forward (modulation chunks 6-11); single-stream blocks run the text through the image's (chunks 0-5, the
    mixture-of-experts feed-forward over every token). Either way the image tokens come first in the rotary
    tables. neg: None or dict(txt, temb, rope) of the negative stream (one row per guided row), attending to
    [guided image, negative text]."""
    attn = block.attn1
    single = attn.single
    image_len = img.shape[1]
    m = block.adaLN_modulation(temb)[:, None].chunk(6 if single else 12, dim=-1)
    image_qkv = _hidream_qkv(attn, block.norm1_i(img) * (1 + m[1]) + m[0], rope[:, :image_len], img_mask)
    first = 0 if single else 6  # the text's modulation chunks
    norm1, norm3, ff, out = (
        (block.norm1_i, block.norm3_i, block.ff_i, attn.to_out)
        if single
        else (block.norm1_t, block.norm3_t, block.ff_t, attn.to_out_t)
    )

    def text_side(x, mods, qkv, text_rope):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods[first : first + 6]
        text_qkv = _hidream_qkv(attn, norm1(x) * (1 + scale) + shift, text_rope, text=not single)
        img_attn, txt_attn = _hidream_attention(qkv, text_qkv)
        x = x + gate * out(txt_attn)
        return img_attn, x + gate_mlp * ff(norm3(x) * (1 + scale_mlp) + shift_mlp)

    img_attn, txt = text_side(txt, m, image_qkv, rope[:, image_len:])
    if neg is not None:
        mods = block.adaLN_modulation(neg["temb"])[:, None].chunk(6 if single else 12, dim=-1)
        img_attn_neg, txt_neg = text_side(
            neg["txt"], mods, tuple(t[rows] for t in image_qkv), neg["rope"][:, image_len:]
        )
        img_attn = img_attn.clone()
        img_attn[rows] = naive_combine(img_attn[rows], img_attn_neg, **nag)
        neg = {**neg, "txt": txt_neg}
    img = img + m[2] * attn.to_out(img_attn)
    img = img + m[5] * block.ff_i(block.norm3_i(img) * (1 + m[4]) + m[3])
    return img, txt, neg


def naive_hidream_forward(
    transformer,
    hidden_states,
    timesteps,
    encoder_hidden_states_t5,
    encoder_hidden_states_llama3,
    pooled_embeds,
    neg_encoder_hidden_states_t5,
    neg_encoder_hidden_states_llama3,
    neg_pooled_embeds,
    scale,
    tau,
    alpha,
    p=1,
    cond_rows=None,
):
    """HiDreamImageTransformer2DModel forward (latents (B, C, H, W)) with NAG, block by block.

    Every block attends over [image, T5, last Llama-3 layer (carried from block to block), the block's own Llama-3
    layer (fresh)]. The negative text stream (its own T5 and Llama-3 states, ``neg_encoder_hidden_states_llama3``
    shaped (layers, guided rows, tokens, width)) is carried alongside with the modulation of the guided rows'
    timestep and the negative pooled embedding, and attends to [guided image, negative text]. The image's key
    mask (non-square latents, padded to the model's maximum) applies to the image keys."""
    tr = transformer
    batch = hidden_states.shape[0]
    rows = _rows_or_all(cond_rows, batch)
    nag = dict(scale=scale, tau=tau, alpha=alpha, p=p)
    latents, img_mask, img_sizes, img_ids = tr.patchify(hidden_states)
    img = tr.x_embedder(latents)
    layers = tr.config.llama_layers

    def text_stream(t5, llama, image_ids):
        """The projected Llama-3 layer of every block, the carried text [T5, last Llama-3 layer], and the rotary
        tables over [image, carried text, one block's Llama-3 layer] (every text position is 0)."""
        per_block = [projection(llama[k]) for projection, k in zip(tr.caption_projection[:-1], layers)]
        carried = torch.cat([tr.caption_projection[-1](t5), per_block[-1]], dim=1)
        text_ids = image_ids.new_zeros(len(image_ids), carried.shape[1] + per_block[0].shape[1], 3)
        return per_block, carried, tr.pe_embedder(torch.cat([image_ids, text_ids], dim=1))

    temb = tr.t_embedder(timesteps, hidden_states.dtype) + tr.p_embedder(pooled_embeds)
    per_block, carried, rope = text_stream(encoder_hidden_states_t5, encoder_hidden_states_llama3, img_ids)
    neg = neg_per_block = None
    if neg_encoder_hidden_states_t5 is not None and rows:
        neg_temb = tr.t_embedder(timesteps[rows], hidden_states.dtype) + tr.p_embedder(neg_pooled_embeds)
        neg_per_block, neg_carried, neg_rope = text_stream(
            neg_encoder_hidden_states_t5, neg_encoder_hidden_states_llama3, img_ids[rows]
        )
        neg = dict(txt=neg_carried, temb=neg_temb, rope=neg_rope)
    carried_len = carried.shape[1]
    blocks = [b.block for b in tr.double_stream_blocks] + [b.block for b in tr.single_stream_blocks]
    for index, block in enumerate(blocks):
        txt = torch.cat([carried, per_block[index]], dim=1)
        if neg is not None:
            neg = {**neg, "txt": torch.cat([neg["txt"], neg_per_block[index]], dim=1)}
        img, txt, neg = _hidream_block(block, img, txt, temb, rope, img_mask, neg, rows, nag)
        carried = txt[:, :carried_len]
        if neg is not None:
            neg = {**neg, "txt": neg["txt"][:, :carried_len]}
    out = tr.final_layer(img, temb)
    return tr.unpatchify(out, img_sizes, False)
