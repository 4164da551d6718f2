"""A Gradio web UI for NAG: ``nag ui`` (needs the ``ui`` extra: ``pip install "nag-diffusion[ui]"``).

One page: model, prompt, negative prompt, NAG and sampling controls, the NAG result beside the
unguided one (same seed), a gallery of past results and a few examples. Loaded models are kept
in memory, so only the first generation with a model pays for loading it.
"""

from __future__ import annotations

import os
from typing import Any

from nag import session
from nag.session import BUILTIN_NAG, DEFAULT_MODEL, Loaded, NagCLIError

__all__ = ["build_app", "launch"]

EXAMPLES = [
    ["a large star on a gray background", "red"],
    ["a large circle on a black background", "red"],
    ["two squares on a white background", "pink"],
]


class _Models:
    """Loaded pipelines by model id (one device/dtype for the whole UI)."""

    def __init__(self, device: str | None, dtype: str | None, offload: bool) -> None:
        self.device = session.resolve_device(device)
        self.dtype = session.resolve_dtype(dtype, self.device)
        self.offload = offload
        self._loaded: dict[str, Loaded] = {}

    def get(self, model: str) -> Loaded:
        if model not in self._loaded:
            self._loaded[model] = session.load_model(model, self.device, self.dtype, self.offload)
        return self._loaded[model]


def generate(models: _Models, model: str, prompt: str, negative: str, scale: float, tau: float, alpha: float,
             end: float, steps: int, guidance: float, seed: int, history: list) -> tuple[Any, Any, list, list]:
    """Unguided and NAG images for one prompt and seed; the pair is prepended to ``history``."""
    import gradio as gr

    model = (model or DEFAULT_MODEL).strip()
    if not prompt.strip():
        raise gr.Error("Type a prompt first.")
    try:
        unguided, guided = _pair(models, model, prompt, negative, scale, tau, alpha, end, steps, guidance, seed)
    except NagCLIError as exc:
        raise gr.Error(f"{exc.title}: {exc.message}") from exc
    except Exception as exc:
        if not session.is_oom(exc):
            raise
        err = session.oom_error(exc)
        raise gr.Error(f"{err.title}: {err.message}") from exc
    if warning := session.vocabulary_warning(models.get(model), prompt, negative):
        gr.Warning(warning)
    nag_text = "NAG off: no negative prompt" if session.negative_is_off(negative) else f"NAG {scale:g}"
    caption = f'"{prompt}" - "{negative}" ({nag_text}, seed {int(seed)})'
    history = [(guided, caption), (unguided, f'"{prompt}" (no guidance, seed {int(seed)})')] + list(history)
    return unguided, guided, history, history


def _pair(models: _Models, model: str, prompt: str, negative: str, scale: float, tau: float, alpha: float,
          end: float, steps: int, guidance: float, seed: int) -> tuple[Any, Any]:
    """The unguided and the NAG image (the same one when the negative prompt is empty: NAG off)."""
    session.check_settings(model, scale=scale, tau=tau, alpha=alpha, end=end)
    loaded = models.get(model)
    if loaded.is_video:
        raise NagCLIError("Video model", f"{model!r} makes videos; the web UI shows images. Use "
                          "`nag generate` or `nag compare` for video.")
    call = session.sampling_kwargs(loaded, int(steps), float(guidance), None, None, None)
    unguided = session.run_pipeline(loaded, prompt, [int(seed)], **call)[0]
    if session.negative_is_off(negative):
        return unguided, unguided
    settings = session.nag_settings(loaded, scale=scale, tau=tau, alpha=alpha, end=end)
    with session.guide(loaded.pipe, negative, settings):
        return unguided, session.run_pipeline(loaded, prompt, [int(seed)], **call)[0]


def build_app(model: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
              offload: bool = False) -> Any:
    """The Gradio ``Blocks`` app (not launched)."""
    import gradio as gr

    models = _Models(device, dtype, offload)
    choices = list(dict.fromkeys([model, "builtin:fewstep", "builtin:multistep"]))
    with gr.Blocks(title="NAG: Normalized Attention Guidance") as demo:
        gr.Markdown("# Normalized Attention Guidance\nA negative prompt that works, also on few-step models. "
                    "Left: the prompt alone; right: the same seed with NAG steering away from the negative prompt.")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                model_box = gr.Dropdown(choices, value=model, label="Model", allow_custom_value=True,
                                        info="builtin:fewstep, builtin:multistep, a local directory or a Hub id",
                                        elem_id="model")
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
                with gr.Accordion("NAG", open=True):
                    scale = gr.Slider(1, 15, value=BUILTIN_NAG["scale"], step=0.5, label="scale (1 = off)")
                    tau = gr.Slider(0.5, 10, value=BUILTIN_NAG["tau"], step=0.1, label="tau")
                    alpha = gr.Slider(0, 1, value=BUILTIN_NAG["alpha"], step=0.05, label="alpha")
                    end = gr.Slider(0.05, 1, value=1.0, step=0.05, label="end (fraction of steps guided)")
                with gr.Accordion("Sampling", open=False):
                    steps = gr.Slider(1, 50, value=4, step=1, label="steps")
                    guidance = gr.Slider(0, 10, value=0, step=0.5, label="CFG guidance scale (0 = off)")
                    seed = gr.Number(value=0, precision=0, label="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                with gr.Row():
                    unguided = gr.Image(label="no guidance", type="pil", elem_id="unguided")
                    guided = gr.Image(label="NAG", type="pil", elem_id="nag-result")
                gallery = gr.Gallery(label="Past results", columns=6, elem_id="gallery")
        gr.Examples(EXAMPLES, inputs=[prompt, negative])
        inputs = [model_box, prompt, negative, scale, tau, alpha, end, steps, guidance, seed, history]

        def run(*args: Any) -> tuple[Any, Any, list, list]:
            return generate(models, *args)

        button.click(run, inputs, [unguided, guided, gallery, history])
    return demo


def launch(model: str = DEFAULT_MODEL, host: str = "127.0.0.1", port: int = 7860, device: str | None = None,
           dtype: str | None = None, offload: bool = False) -> None:
    """Build and serve the UI until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    build_app(model, device, dtype, offload).launch(server_name=host, server_port=port, inbrowser=False,
                                                     show_error=True)
