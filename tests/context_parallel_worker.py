"""Two CPU processes (gloo) running NAG on a tiny denoiser under diffusers' context parallelism, compared with the
same NAG call in one process. Run by ``tests/test_context_parallel.py``::

    python tests/context_parallel_worker.py OUT.json CASE [CASE ...]

A case is ``family:mode:negative_len:order`` (``flux:ring:4:after``; the order ``straightforward`` is ``after`` with
NAG's straightforward wrappers, ``fast=False``); each prints one line of ``OUT.json`` with the
largest absolute difference from the single-process output, or the error NAG raised. ``negative_len`` may be
``pipeline`` (``nag.apply`` on the whole tiny pipeline) or ``stock`` (no NAG: what stock diffusers does alone).

The two CPU workarounds stock diffusers needs here live in this file only (never in the library):
``enable_parallelism`` picks the rank's device modulo ``torch.accelerator.device_count()`` (0 without an
accelerator), and ring attention asks the attention op for its log-sum-exp, which the native op refuses.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))

WORLD = 2
BATCH = 4  # [unconditional x 2, conditional x 2]
POSITIVE_LEN = 8


def cpu_workarounds() -> None:
    """Make stock diffusers' context parallelism run on CPU processes (see the module docstring)."""
    from diffusers.models import attention_dispatch

    torch.accelerator.device_count = lambda: 1
    stock = attention_dispatch._native_attention_forward_op

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):  # fmt: skip
        if not return_lse:
            return stock(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False,
                         _save_ctx, _parallel_config)  # fmt: skip
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if attn_mask is not None:
            scores = (
                scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
            )
        lse = scores.logsumexp(-1)
        out = torch.softmax(scores, dim=-1) @ v
        return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)

    attention_dispatch._native_attention_forward_op = forward_op


def tiny_denoiser(name: str, text_width: int) -> tuple[torch.nn.Module, torch.Generator, torch.Tensor]:
    """The tiny pipeline ``name``'s denoiser, the case's seeded generator, and a text batch whose conditional rows
    (the second half) carry one prompt, as a classifier-free-guidance batch does."""
    import tiny_pipelines as tp

    transformer = {**tp.FACTORIES, **tp.FAMILY_FACTORIES}[name]().transformer
    g = torch.Generator().manual_seed(0)
    text = torch.randn(BATCH, POSITIVE_LEN, text_width, generator=g)
    text[BATCH // 2 :] = torch.randn(1, POSITIVE_LEN, text_width, generator=g)
    return transformer, g, text


def flux_case(negative_len: int) -> tuple[torch.nn.Module, dict[str, Any], dict[str, torch.Tensor]]:
    transformer, g, text = tiny_denoiser("flux", 32)
    side = 4
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).flatten(0, 1).float()
    inputs = dict(
        hidden_states=torch.randn(BATCH, side * side, 16, generator=g),
        encoder_hidden_states=text,
        pooled_projections=torch.randn(BATCH, 32, generator=g),
        timestep=torch.full((BATCH,), 0.5),
        img_ids=img_ids,
        txt_ids=torch.zeros(POSITIVE_LEN, 3),
        return_dict=False,
    )
    negative = dict(
        encoder_hidden_states=torch.randn(1, negative_len, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
    )
    return transformer, inputs, negative


def wan_case(negative_len: int) -> tuple[torch.nn.Module, dict[str, Any], dict[str, torch.Tensor]]:
    transformer, g, text = tiny_denoiser("wan", 32)
    inputs = dict(
        hidden_states=torch.randn(BATCH, 4, 2, 4, 4, generator=g),
        encoder_hidden_states=text,
        timestep=torch.full((BATCH,), 500.0),
        return_dict=False,
    )
    negative = dict(encoder_hidden_states=torch.randn(1, negative_len, 32, generator=g))
    return transformer, inputs, negative


def flux2_case(negative_len: int) -> tuple[torch.nn.Module, dict[str, Any], dict[str, torch.Tensor]]:
    """FLUX.2: text position ids ``(0, 0, 0, l)`` counting along the text, batched as its pipelines pass them."""
    transformer, g, text = tiny_denoiser("flux2_klein", 48)
    side = 4
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    zeros = torch.zeros_like(rows)
    img_ids = torch.stack([zeros, rows, cols, zeros], dim=-1).flatten(0, 1)
    txt_ids = torch.zeros(POSITIVE_LEN, 4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(POSITIVE_LEN)
    inputs = dict(
        hidden_states=torch.randn(BATCH, side * side, 16, generator=g),
        encoder_hidden_states=text,
        timestep=torch.full((BATCH,), 0.5),
        img_ids=img_ids.expand(BATCH, -1, -1),
        txt_ids=txt_ids.expand(BATCH, -1, -1),
        return_dict=False,
    )
    negative = dict(encoder_hidden_states=torch.randn(1, negative_len, 48, generator=g))
    return transformer, inputs, negative


def text_mask(rows: int, length: int, real: int) -> torch.Tensor:
    """A (rows, length) text mask: the first ``real`` tokens attended, the padding after not (as T5 pads)."""
    mask = torch.zeros(rows, length)
    mask[:, :real] = 1
    return mask


def ltx_case(negative_len: int) -> tuple[torch.nn.Module, dict[str, Any], dict[str, torch.Tensor]]:
    """LTX-Video: cross-attention to a masked text (the prompt's last 2 and the negative's last token padding)."""
    transformer, g, text = tiny_denoiser("ltx", 32)
    inputs = dict(
        hidden_states=torch.randn(BATCH, 2 * 4 * 4, 8, generator=g),
        encoder_hidden_states=text,
        timestep=torch.full((BATCH,), 500.0),
        encoder_attention_mask=text_mask(BATCH, POSITIVE_LEN, POSITIVE_LEN - 2),
        num_frames=2,
        height=4,
        width=4,
        return_dict=False,
    )
    negative = dict(
        encoder_hidden_states=torch.randn(1, negative_len, 32, generator=g),
        encoder_attention_mask=text_mask(1, negative_len, negative_len - 1),
    )
    return transformer, inputs, negative


def ltx_unmasked_case(negative_len: int) -> tuple[torch.nn.Module, dict[str, Any], dict[str, torch.Tensor]]:
    """LTX-Video called without text masks (stock diffusers' parallel attention cannot take its mask)."""
    transformer, inputs, negative = ltx_case(negative_len)
    inputs["encoder_attention_mask"] = None
    del negative["encoder_attention_mask"]
    return transformer, inputs, negative


CASES = {"flux": flux_case, "flux2": flux2_case, "wan": wan_case, "ltx": ltx_case, "ltx_unmasked": ltx_unmasked_case}


class StraightforwardCalls:
    """Counts, while active, the calls of the straightforward paths (the stock processor once per branch) of the
    wrappers NAG has fast paths for under context parallelism, by wrapper: none where the fast paths served every
    guided call."""

    def __enter__(self) -> StraightforwardCalls:
        from nag.attention.cross import CrossAttentionNAG
        from nag.attention.joint import JointAttentionNAG
        from nag.attention.single import FusedSingleAttentionNAG, SingleStreamAttentionNAG

        self.calls = {"cross": 0, "joint": 0, "single": 0, "single_fused": 0}
        self._originals = {}
        for name, cls in (("cross", CrossAttentionNAG), ("joint", JointAttentionNAG),
                          ("single", SingleStreamAttentionNAG), ("single_fused", FusedSingleAttentionNAG)):  # fmt: skip
            self._originals[cls] = original = cls.__dict__["guided"]
            cls.guided = self._counting(name, original)
        return self

    def _counting(self, name: str, original: Any) -> Any:
        def counting(processor: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return original(processor, *args, **kwargs)

        return counting

    def __exit__(self, *exc: Any) -> None:
        for cls, original in self._originals.items():
            cls.guided = original


def run_nag(
    transformer: torch.nn.Module, inputs: dict[str, Any], negative: dict[str, torch.Tensor], fast: bool = True
) -> torch.Tensor:
    import nag

    reference = inputs["encoder_hidden_states"][BATCH // 2 :]
    with torch.no_grad(), nag.apply_to_denoiser(
        transformer, negative, scale=3.0, positive_reference=reference, fast=fast
    ):
        return transformer(**inputs)[0]


def run_pipeline_case(family: str, config: Any) -> dict[str, Any]:
    """``nag.apply`` on the whole tiny pipeline (2 prompts, true CFG for Flux, CFG for Wan, 2 steps), then
    parallelism."""
    import tiny_pipelines as tp

    import nag

    pipe = {**tp.FACTORIES, **tp.FAMILY_FACTORIES}[family]()

    def generate(negative: str = "blurry, low quality") -> torch.Tensor:
        with nag.apply(pipe, negative):  # (an empty negative prompt: NAG off)
            out = pipe(
                prompt=["a red circle on a blue background", "a cat"],
                num_inference_steps=2,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
                **({"negative_prompt": "grey", "true_cfg_scale": 4.0} if family == "flux" else {"guidance_scale": 4.0}),
                **tp._BASE_KWARGS[family],  # the sizes the tiny models are built for
            )
        return tp.output_tensor(out)

    expected, stock = generate(), generate("")
    pipe.transformer.enable_parallelism(config=config)
    with StraightforwardCalls() as straightforward:
        got = generate()
    return {"nag_effect": (expected - stock).abs().max().item(), "max_abs_diff": (got - expected).abs().max().item(),
            "straightforward_calls": straightforward.calls}


def run_stock_case(family: str, config: Any) -> dict[str, Any]:
    """Stock diffusers alone (no NAG): the same call under parallelism against one process."""
    transformer, inputs, _ = CASES[family](4)
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        transformer.enable_parallelism(config=config)
        try:
            got = transformer(**inputs)[0]
        except RuntimeError as error:
            return {"error": f"{type(error).__name__}: {error}"}
    return {"max_abs_diff": (got - expected).abs().max().item()}


def run_case(case: str) -> dict[str, Any]:
    from diffusers import ContextParallelConfig

    import nag

    family, mode, negative_len, order = case.split(":")
    if negative_len == "pipeline":
        return {
            "case": case,
            **run_pipeline_case(family, ContextParallelConfig(**{f"{mode}_degree": WORLD})),
        }
    if negative_len == "stock":
        return {"case": case, **run_stock_case(family, ContextParallelConfig(**{f"{mode}_degree": WORLD}))}
    transformer, inputs, negative = CASES[family](int(negative_len))
    expected = run_nag(transformer, inputs, negative)
    with torch.no_grad():
        stock = transformer(**inputs)[0]
    config = ContextParallelConfig(**{f"{mode}_degree": WORLD})
    result: dict[str, Any] = {"case": case, "nag_effect": (expected - stock).abs().max().item()}
    try:
        with StraightforwardCalls() as straightforward:
            if order == "before":  # NAG applied first, parallelism enabled under it
                reference = inputs["encoder_hidden_states"][BATCH // 2 :]
                with nag.apply_to_denoiser(transformer, negative, scale=3.0, positive_reference=reference):
                    transformer.enable_parallelism(config=config)
                    with torch.no_grad():
                        got = transformer(**inputs)[0]
            else:  # "after"; "straightforward": after, with the straightforward wrappers (fast=False)
                transformer.enable_parallelism(config=config)
                got = run_nag(transformer, inputs, negative, fast=order != "straightforward")
        result["max_abs_diff"] = (got - expected).abs().max().item()
        result["straightforward_calls"] = straightforward.calls
    except (NotImplementedError, ValueError, RuntimeError) as error:
        result["error"] = f"{type(error).__name__}: {error}"
    return result


def worker(rank: int, store: str, out: str, cases: list[str]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    cpu_workarounds()
    try:
        results = [run_case(case) for case in cases]
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text("\n".join(json.dumps(r) for r in results) + "\n")


if __name__ == "__main__":
    target, *requested = sys.argv[1:]
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(worker, args=(os.path.join(folder, "store"), target, requested), nprocs=WORLD,
                           start_method="spawn")  # fmt: skip
