"""Attention pieces for the fast paths: attention that also returns its log-sum-exp, and the
merge of two attentions over disjoint key sets.

Layout everywhere: ``(batch, tokens, heads, head_dim)`` (the diffusers dispatcher's layout).
For queries ``q`` and key/value sets ``K1``, ``K2``::

    Attn(q, [K1, K2]) = (e^l1 * Attn(q, K1) + e^l2 * Attn(q, K2)) / (e^l1 + e^l2)

where ``l`` is the log-sum-exp of the scaled scores over each key set. The joint-attention fast
path computes image->image attention once and merges it with image->positive-text and
image->negative-text attention.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .combine import records_gradient

__all__ = ["attention", "attention_with_lse", "attention_with_lse_over_valid_keys", "attention_with_lse_and_key_bias",
           "merge_attention", "LSE_KERNELS", "reset_lse_checks"]

logger = logging.getLogger("nag")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention, ``(B, L, H, D)`` in and out. ``mask`` is additive or boolean, broadcastable
    to ``(B, H, Lq, Lk)``."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _lse_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
    return out, lse


def _cpu_flash(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)[:2]


def _cudnn(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (query, key, value, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask); LSE (B, H, L, 1)
    return torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, False, False)[:2]


def _flash(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]


def _efficient(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (query, key, value, attn_bias, compute_log_sumexp); its log-sum-exp may be padded past the query count
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
    return out, lse[..., : qt.shape[2]]


_HALF = frozenset({torch.float16, torch.bfloat16})
LseKernel = tuple[str, Callable[..., tuple[torch.Tensor, torch.Tensor]], "frozenset[torch.dtype] | None"]
# The fused kernels that return the log-sum-exp, tried in order per device type; the math is the last resort.
# (name, kernel, the dtypes it takes or None for any.) Each takes and returns the (B, H, L, D) layout, the
# log-sum-exp as natural log, (B, H, L) or (B, H, L, 1).
LSE_KERNELS: dict[str, tuple[LseKernel, ...]] = {
    "cpu": (("cpu flash", _cpu_flash, None),),
    # (the memory-efficient kernel also takes float32, where the others take none: without it float32 takes the math,
    # which holds every score)
    "cuda": (("cuDNN", _cudnn, _HALF), ("flash", _flash, _HALF), ("memory-efficient", _efficient, None)),
}
# (kernel name, device, dtype, head size) -> whether the kernel agreed with the math on the self-check
_CHECKED: dict[tuple[str, str, torch.dtype, int], bool] = {}


def reset_lse_checks() -> None:
    """Forget the self-checks of :data:`LSE_KERNELS` (each kernel is checked again on its next use)."""
    _CHECKED.clear()


def _self_check(name: str, kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                dtype: torch.dtype, head_dim: int) -> bool:
    """Run ``kernel`` and the math on a small input (2 heads, 24 queries, 40 keys) of this device, dtype and head
    size; whether both outputs and log-sum-exps agree. Logs one warning line if not."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, head_dim, generator=g).to(device, dtype).transpose(1, 2) for n in (24, 40, 40))
    problem = ""
    try:
        out, lse = kernel(q, k, v)
        expected_out, expected_lse = _lse_math(q, k, v)
        tolerance = max(1e-4, 8 * torch.finfo(dtype).eps)
        out_error = float((out.float() - expected_out.float()).abs().max())
        lse_error = float((lse.reshape(q.shape[:3]).float() - expected_lse).abs().max())
        if not (out_error <= tolerance and lse_error <= tolerance * 4):  # (also catches NaN)
            problem = f"disagrees with the math (output off by {out_error:.3g}, log-sum-exp by {lse_error:.3g})"
    except Exception as error:  # noqa: BLE001 - any failure means: do not use this kernel here
        problem = f"failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    if problem:
        logger.warning("nag: the %s attention kernel %s for %s %s, head size %d; using another kernel",
                       name, problem, device, str(dtype).replace("torch.", ""), head_dim)
    return not problem


def _kernel_is_good(name: str, kernel: Callable[..., Any], q: torch.Tensor) -> bool:
    """Whether ``kernel`` passed (or, checked now, passes) its self-check for ``q``'s device, dtype and head size.
    Inside a ``torch.compile`` trace nothing is run: a kernel not yet checked is trusted there."""
    key = (name, str(q.device), q.dtype, q.shape[-1])
    if key not in _CHECKED:
        if torch.compiler.is_compiling():
            return True
        _CHECKED[key] = _self_check(name, kernel, q.device, q.dtype, q.shape[-1])
    return _CHECKED[key]


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its natural-log log-sum-exp: ``(B, L, H, D)`` and ``(B, L, H)`` (float32).

    Uses the first kernel of :data:`LSE_KERNELS` for the device that passed its self-check (once per device, dtype
    and head size, against the math on a small input; a kernel that disagrees or fails there is not used again and
    logs one warning) and runs on these inputs; else, and while autograd records an input's gradient, the math."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = lse = None
    # (while autograd records, the math: the fused kernels' backward passes take no gradient through the log-sum-exp,
    # which the merge weights depend on)
    kernels = () if records_gradient(q, k, v) else LSE_KERNELS.get(q.device.type, ())
    for name, kernel, dtypes in kernels:
        if (dtypes is not None and q.dtype not in dtypes) or not _kernel_is_good(name, kernel, qt):
            continue
        try:
            out, lse = kernel(qt, kt, vt)
            break
        except RuntimeError:  # (e.g. a shape this kernel does not take: the next one, silently)
            out = None
    if out is None:
        out, lse = _lse_math(qt, kt, vt)
    if lse.dim() != 3:  # (cuDNN's (B, H, L, 1))
        lse = lse.reshape(qt.shape[:3])
    if lse.dtype != torch.float32:
        lse = lse.float()
    return out.transpose(1, 2), lse.transpose(1, 2)


def _prefix_lengths(valid: torch.Tensor) -> list[int] | None:
    """Each row's count of valid keys where a ``(B, Lk)`` boolean mask keeps a prefix of every row, else None."""
    lengths = valid.sum(dim=1)
    positions = torch.arange(valid.shape[1], device=valid.device)
    return lengths.tolist() if torch.equal(valid, positions[None, :] < lengths[:, None]) else None


def attention_with_lse_over_valid_keys(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_with_lse` over the keys ``key_mask`` (``(B, Lk)``, true/nonzero = attend) keeps. A query
    with no key left gets a zero output and a log-sum-exp of ``-inf`` (it then adds nothing when merged). Rows whose
    valid keys are a prefix (a tokenizer's padding at the end) run :func:`attention_with_lse` on that prefix;
    other masks, and every mask inside a ``torch.compile`` trace, the explicit math."""
    if key_mask is None:
        return attention_with_lse(q, k, v)
    valid = key_mask.bool()
    # (inside a torch.compile trace the mask's values cannot choose the kernel: the explicit math, which fuses)
    lengths = None if torch.compiler.is_compiling() else _prefix_lengths(valid)
    if lengths is not None:
        outs, lses = [], []
        for row, length in enumerate(lengths):
            if length == 0:
                outs.append(q.new_zeros(1, q.shape[1], q.shape[2], v.shape[3]))
                lses.append(q.new_full((1, q.shape[1], q.shape[2]), float("-inf"), dtype=torch.float32))
                continue
            out, lse = attention_with_lse(q[row : row + 1], k[row : row + 1, :length], v[row : row + 1, :length])
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)
    qt, kt, vt = q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float()
    scores = torch.matmul(qt, kt.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.nan_to_num(torch.exp(scores - lse.unsqueeze(-1)), nan=0.0)
    out = torch.matmul(weights, vt).to(q.dtype)
    return out.transpose(1, 2), lse.transpose(1, 2)


def attention_with_lse_and_key_bias(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None, max_runs: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_with_lse` with an additive per-key bias ``key_bias`` (``(B, Lk)``, added to the scaled
    scores of every query of its row, as SDPA adds a float mask; ``-inf`` drops the key). A query with no key left
    gets a zero output and a log-sum-exp of ``-inf`` (it then adds nothing when merged).

    Each row's keys are cut into runs of equal bias; a run's attention is :func:`attention_with_lse` over its keys
    with the bias added to its log-sum-exp, and the runs are merged (a tokenizer's 0/1 mask gives one or two runs).
    Rows with more than ``max_runs`` runs take the explicit math."""
    if key_bias is None:
        return attention_with_lse(q, k, v)
    bias = key_bias.float()
    outs, lses = [], []
    for row in range(q.shape[0]):
        qr, kr, vr = q[row : row + 1], k[row : row + 1], v[row : row + 1]
        values, counts = torch.unique_consecutive(bias[row], return_counts=True)
        if len(values) > max_runs:
            out, lse = _lse_math_with_bias(qr, kr, vr, bias[row : row + 1])
        else:
            out = lse = None
            start = 0
            for value, count in zip(values.tolist(), counts.tolist()):
                stop = start + count
                if value != float("-inf"):
                    run, run_lse = attention_with_lse(qr, kr[:, start:stop], vr[:, start:stop])
                    run_lse = run_lse + value
                    if out is None:
                        out, lse = run, run_lse
                    else:
                        out, lse = merge_attention(out, lse, run, run_lse), torch.logaddexp(lse, run_lse)
                start = stop
            if out is None:
                out = q.new_zeros(1, q.shape[1], q.shape[2], v.shape[3])
                lse = q.new_full((1, q.shape[1], q.shape[2]), float("-inf"), dtype=torch.float32)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _lse_math_with_bias(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit attention with an additive ``(B, Lk)`` key bias and its log-sum-exp, ``(B, L, H, D)`` layout."""
    qt, kt, vt = q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float()
    scores = torch.matmul(qt, kt.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + key_bias[:, None, None, :]
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.nan_to_num(torch.exp(scores - lse.unsqueeze(-1)), nan=0.0)
    out = torch.matmul(weights, vt).to(q.dtype)
    return out.transpose(1, 2), lse.transpose(1, 2)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from the attentions over each."""
    weight_a = torch.sigmoid(lse_a - lse_b).unsqueeze(-1)
    return torch.lerp(out_b.float(), out_a.float(), weight_a).to(out_a.dtype)  # (one pass: out_b + w * (out_a - out_b))
