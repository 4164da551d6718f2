"""Joint-attention families beyond Flux and SD3: Qwen-Image text-to-image and inpainting.

Every configuration runs the invariant checks of ``test_pipelines`` (tiny random-weight pipelines,
batch 2, CFG on, negatives shorter and longer than the positive with partial masks) and agrees with
the naive reference block by block. The negative text is carried through the text stream with its own
mask, rotary table and modulation; the image stream is the single
guided one.
"""

from __future__ import annotations

import pytest
import test_pipelines as tpl

NAMES = ["qwenimage", "qwenimage_inpaint"]
# (Qwen-Image has a fast path: masked joint attention with every token projected once.)
STRAIGHTFORWARD_ONLY: dict[str, str] = {}


test_invariants = tpl.each_configuration(tpl.check_invariants, NAMES)
test_cfg_unconditional_branch_is_untouched = tpl.each_configuration(
    tpl.check_cfg_unconditional_branch_is_untouched, NAMES
)
test_agrees_with_naive_implementation = tpl.each_configuration_and_path(
    tpl.check_agrees_with_naive_implementation, NAMES
)
test_guided_without_cfg_on_its_attention_path = tpl.each_configuration(
    tpl.check_fast_path_never_calls_the_stock_processor, NAMES, straightforward_only=STRAIGHTFORWARD_ONLY
)


def test_qwen_zero_cond_t_is_refused_clearly():
    """Qwen-Image-Edit-2511-style models stack timestep-0 rows for the reference image: refused, nothing left."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    import nag

    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
        zero_cond_t=True,
    )
    processors = [id(m.processor) for m in model.modules() if hasattr(m, "processor")]
    with pytest.raises(NotImplementedError, match="zero_cond_t"):
        nag.apply_to_denoiser(model, {"encoder_hidden_states": torch.zeros(1, 3, 32)}, scale=3.0)
    assert [id(m.processor) for m in model.modules() if hasattr(m, "processor")] == processors
    assert not any(m._forward_pre_hooks for m in model.modules())
