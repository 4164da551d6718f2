"""Run the pipeline tests and write ``docs/support.md``: which pipelines NAG supports, and what
each supported pipeline was shown to do, from the tests' outcomes (nothing is typed by hand).

    python scripts/support_matrix.py            # runs the tests (~1-2 minutes on 2 cores), writes the file
    python scripts/support_matrix.py --check    # exit 1 if the file would change

A cell is "yes" when every test behind it passed, "FAILED" when one failed, and "-" when the
pipeline has no such mode (no classifier-free guidance, no text mask, not a video model).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "support.md"
TEST_FILES = ["tests/test_pipelines.py", "tests/test_flux_variants.py", "tests/test_generic.py",
              "tests/test_families_video.py", "tests/test_families_joint.py", "tests/test_families_concat.py",
              "tests/test_families_more.py", "tests/test_families_last.py",
              "tests/test_families_flux2.py", "tests/test_families_zimage.py", "tests/test_wan_i2v.py",
              "tests/test_families_hunyuan.py", "tests/test_families_qwen_more.py", "tests/test_families_ltx2.py",
              "tests/test_families_qwen21.py", "tests/test_families_hidream.py",
              "tests/test_families_image_conditioned.py"]

# Columns: the tests whose outcomes decide them (test function name prefixes).
COLUMNS = {
    "invariants": (
        "test_off_is_bit_identical",
        "test_negative_equal_to_positive_is_unguided",
        "test_removal_restores_everything",
        "test_exception_inside_a_generation_leaves_nothing_behind",
        "test_steps_outside_the_window_are_stock",
        "test_invariants",
        "test_generic_cross_attention_path",
    ),
    "NAG alone": (
        "test_fast_path_never_calls_the_stock_processor",
        "test_negative_prompt_changes_the_output",
        "test_invariants",
        "test_generic_cross_attention_path",
        "test_guided_without_cfg_on_its_attention_path",
    ),
    "CFG + NAG": ("test_cfg_unconditional_branch_is_untouched",),
    "matches the naive reference": (
        "test_agrees_with_naive_implementation",
        "test_generic_cross_attention_path",
        "test_wan_vace_batch_of_two_agrees_with_naive_implementation",
        "test_batch_with_one_guided_row_agrees_with_naive_implementation",
        "test_edit_plus_two_images_per_prompt_agrees_with_naive_implementation",
    ),
    "conditioning unguided": (
        "test_conditioning_frame_is_left_as_the_pipeline_sets_it",
        "test_conditioning_is_left_unguided",
    ),
}


class Collector:
    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":
            previous = self.outcomes.get(report.nodeid)
            if previous in (None, "passed"):
                self.outcomes[report.nodeid] = report.outcome


def _subjects(nodeid: str) -> tuple[str, str, list[str]]:
    """(file, test function, parameter ids) of a test id."""
    path, _, name = nodeid.partition("::")
    match = re.fullmatch(r"([^\[]+)(?:\[(.*)\])?", name)
    return Path(path).stem, match.group(1), (match.group(2) or "").split("-")


def _pipelines() -> dict[str, dict]:
    """Test configuration name -> pipeline class, family, and what it has (built from the factories)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_pipelines as tp  # noqa: E402
    from test_families_concat import STRAIGHTFORWARD_ONLY as CONCAT_STRAIGHTFORWARD  # noqa: E402
    from test_families_flux2 import STRAIGHTFORWARD_ONLY as FLUX2_STRAIGHTFORWARD  # noqa: E402
    from test_families_hidream import STRAIGHTFORWARD_ONLY as HIDREAM_STRAIGHTFORWARD  # noqa: E402
    from test_families_hunyuan import STRAIGHTFORWARD_ONLY as HUNYUAN_STRAIGHTFORWARD  # noqa: E402
    from test_families_image_conditioned import STRAIGHTFORWARD_ONLY as IMAGE_STRAIGHTFORWARD  # noqa: E402
    from test_families_joint import STRAIGHTFORWARD_ONLY  # noqa: E402
    from test_families_last import STRAIGHTFORWARD_ONLY as LAST_STRAIGHTFORWARD  # noqa: E402
    from test_families_ltx2 import STRAIGHTFORWARD_ONLY as LTX2_STRAIGHTFORWARD  # noqa: E402
    from test_families_more import STRAIGHTFORWARD_ONLY as MORE_STRAIGHTFORWARD  # noqa: E402
    from test_families_qwen_more import STRAIGHTFORWARD_ONLY as QWEN_MORE_STRAIGHTFORWARD  # noqa: E402
    from test_families_zimage import STRAIGHTFORWARD_ONLY as ZIMAGE_STRAIGHTFORWARD  # noqa: E402
    from test_flux_variants import VARIANTS, variant  # noqa: E402
    from test_generic import img2img  # noqa: E402

    from nag.families import FAMILIES, pipeline_spec  # noqa: E402

    rows = {}
    pipes = {name: factory() for name, factory in tp.FACTORIES.items()}
    pipes.update({f"flux_{name}": variant(name) for name in VARIANTS})
    pipes["generic_sd_img2img"] = img2img(custom_denoiser=False)
    pipes["generic_custom_unet"] = img2img(custom_denoiser=True)
    pipes.update({name: factory() for name, factory in tp.FAMILY_FACTORIES.items()})
    pipes["wan_i2v"] = tp.wan_i2v()  # tests/test_wan_i2v.py (not in the factory tables: its own tests)
    for name, pipe in pipes.items():
        spec = pipeline_spec(pipe)
        family = FAMILIES[spec.family]
        info = tp.CFG_INFO.get(name, {})
        denoiser = getattr(pipe, spec.denoiser_attr)
        rows[name] = {
            "pipeline": type(pipe).__name__,
            "family": spec.family,
            "layout": family.layout,
            # (cfg_by_guider: CFG set by the pipeline's guider component, tested with one in the family's file;
            # cfg_batch_one: CFG that runs one prompt only, tested so in the family's file)
            "cfg": True
            if name == "wan_i2v"
            else bool(info.get("mode") or info.get("cfg_by_guider") or info.get("cfg_batch_one"))
            if name in tp.CFG_INFO
            else None,
            "mask": family.mask_kwarg is not None and "none" not in str(info.get("text_mask", "none")),
            "video": "3D" in type(denoiser).__name__,
            # layout "prefix": no duplicated rows; the negative prefix's keys/values are computed once per generation
            "fast": "cached negative prefix"
            if family.layout == "prefix"
            else not any(
                name in table
                for table in (
                    STRAIGHTFORWARD_ONLY,
                    CONCAT_STRAIGHTFORWARD,
                    MORE_STRAIGHTFORWARD,
                    LAST_STRAIGHTFORWARD,
                    FLUX2_STRAIGHTFORWARD,
                    ZIMAGE_STRAIGHTFORWARD,
                    HUNYUAN_STRAIGHTFORWARD,
                    QWEN_MORE_STRAIGHTFORWARD,
                    LTX2_STRAIGHTFORWARD,
                    HIDREAM_STRAIGHTFORWARD,
                    IMAGE_STRAIGHTFORWARD,
                )
            ),
            "batch": 1 if name in tp.SINGLE_PROMPT else 2,
            "defaults": spec.defaults,
        }
    return rows


def render(outcomes: dict[str, str]) -> str:
    pipelines = _pipelines()
    results: dict[tuple[str, str], list[str]] = defaultdict(list)
    for nodeid, outcome in outcomes.items():
        module, test, params = _subjects(nodeid)
        names = [p for p in params if p in pipelines]
        if test == "test_wan_vace_batch_of_two_agrees_with_naive_implementation":
            names = ["wan_vace"]
        if test == "test_edit_plus_two_images_per_prompt_agrees_with_naive_implementation":
            names = ["qwenimage_edit_plus"]
        if module == "test_flux_variants":
            names = [f"flux_{p}" for p in params if f"flux_{p}" in pipelines]
        if module == "test_families_zimage":  # one pipeline: its tests are not parametrized by name
            names = ["zimage"]
        if module == "test_families_qwen21" and test == "test_conditioning_is_left_unguided":
            names = ["qwenimage21_condition_image"]
        if module == "test_wan_i2v":  # one pipeline: its tests are not parametrized by name
            names = ["wan_i2v"]
            if test == "test_agrees_with_naive_implementation":  # CFG on: the unconditional calls match stock
                results[("wan_i2v", "CFG + NAG")].append(outcome)
        if module == "test_generic" and "-".join(params) == "known-denoiser":
            names = ["generic_sd_img2img"]
        if module == "test_generic" and "-".join(params) == "unknown-denoiser":
            names = ["generic_custom_unet"]
        for name in names:
            for column, tests in COLUMNS.items():
                if test in tests:
                    results[(name, column)].append(outcome)

    def cell(name: str, column: str, applicable: bool = True) -> str:
        if not applicable:
            return "-"
        got = [o for o in results.get((name, column), []) if o != "skipped"]
        if not got:
            return "not tested"
        return "yes" if all(o == "passed" for o in got) else "FAILED"

    lines = [
        "# Supported pipelines",
        "",
        "Generated by `scripts/support_matrix.py` from the outcomes of `tests/test_pipelines.py`,",
        "`tests/test_flux_variants.py`, `tests/test_generic.py`, `tests/test_families_video.py`,",
        "`tests/test_families_joint.py`, `tests/test_families_concat.py`, `tests/test_families_more.py`,",
        "`tests/test_families_last.py`, `tests/test_families_flux2.py`, `tests/test_families_zimage.py`,",
        "`tests/test_wan_i2v.py`, `tests/test_families_hunyuan.py`,",
        "`tests/test_families_qwen_more.py`, `tests/test_families_ltx2.py`, `tests/test_families_qwen21.py`,",
        "`tests/test_families_hidream.py` and `tests/test_families_image_conditioned.py`",
        "(tiny random-weight pipelines).",
        "",
        "- **invariants**: scale 1 / no negative is bit-identical to stock, a negative equal to the positive",
        "  gives the unguided result, removal (also after an exception) leaves the pipeline as it was, steps",
        "  outside `[start, end)` are stock.",
        "- **NAG alone**: guides every step without classifier-free guidance.",
        "- **CFG + NAG**: with CFG on, the unconditional branch is untouched and the conditional one guided.",
        "- **matches the naive reference**: every denoiser call agrees with `tests/naive_nag.py` to 1e-5, with",
        "  negatives of a different length (and masks where the family has them), fast and straightforward paths.",
        "- **fast path**: `fast=True` (the default) runs NAG-aware attention that never calls the stock",
        '  processor in guided calls; "straightforward": the family has no fast path yet and `fast=True` runs',
        "  the straightforward wrappers (each stock processor once per branch; correct, slower).",
        "- **conditioning unguided**: the image/video conditioning of image-to-video pipelines (the",
        "  conditioning frame, the encoded image's latent channels or embeddings), the reference-image tokens of",
        "  editing pipelines, the starting latents (and kept region) of image-to-image and inpainting pipelines",
        "  and the control image of ControlNet pipelines (with the ControlNet's hints) reach the denoiser and come",
        '  out as the pipeline sets them; "-": not such a pipeline or not tested there.',
        "- **batch**: prompts per test generation (`WanVACEPipeline` takes one prompt per call; its batch of",
        "  two is checked on the denoiser against the naive reference; `QwenImageEditPlusPipeline` puts every",
        "  reference image into every prompt, so one prompt, and two images per prompt against the naive reference;",
        "  `HunyuanVideoImageToVideoPipeline`'s true CFG encodes the negative prompts with one black image, so its",
        "  CFG + NAG check runs one prompt).",
        "- **layout**: `cross` (negative context appended along the tokens), `joint` (negative text rows carried",
        "  through the text stream), `concat` (models that join text and image themselves: whole negative rows",
        "  `[negative text, image]` whose image tokens every attention layer replaces by the guided ones),",
        "  `prefix` (causal single-stream models: the negative prompt's prefix runs in a call of its own and the",
        '  guided image queries attend to its keys/values in every layer; "cached negative prefix" in the fast',
        "  path column: computed once per generation when the text ignores the timestep, no duplicated rows).",
        "",
        "| pipeline | family | scale / tau / alpha | invariants | NAG alone | CFG + NAG | text masks | video | batch "
        "| fast path | matches the naive reference | conditioning unguided |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in pipelines.items():
        label = row["pipeline"] + (" (generic path)" if name.startswith("generic") else "")
        if name == "generic_custom_unet":
            label = row["pipeline"] + " with an unknown denoiser class (generic path)"
        if name in ("flux_dev", "sd35"):
            label += " (dev-style)" if name == "flux_dev" else " (SD3.5 dual attention)"
        if name == "ltx2_adaln":
            label += " (cross-attention AdaLN, LTX-2.3 style; gated attention)"
        if name == "qwenimage21_timestep_text":
            label += " (text modulated by the timestep)"
        if name == "qwenimage21_condition_image":
            label += " (condition image)"
        if name in ("hunyuanvideo_i2v", "hunyuanvideo_i2v_token_replace"):
            label += " (token_replace)" if name.endswith("token_replace") else " (latent_concat)"
        d = row["defaults"]
        lines.append(
            f"| `{label}` | {row['family']} ({row['layout']}) | {d.scale:g} / {d.tau:g} / {d.alpha:g} | "
            f"{cell(name, 'invariants')} | {cell(name, 'NAG alone')} | {cell(name, 'CFG + NAG', bool(row['cfg']))} | "
            f"{'yes' if row['mask'] else '-'} | {'yes' if row['video'] else '-'} | {row['batch']} | "
            f"{row['fast'] if isinstance(row['fast'], str) else 'yes' if row['fast'] else 'straightforward'} | "
            f"{cell(name, 'matches the naive reference')} | "
            f"{cell(name, 'conditioning unguided') if results.get((name, 'conditioning unguided')) else '-'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/support.md would change")
    args = parser.parse_args(argv)
    collector = Collector()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *[str(ROOT / f) for f in TEST_FILES]], plugins=[collector])
    text = render(collector.outcomes)
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        print("docs/support.md is up to date" if current == text else "docs/support.md is stale")
        return 0 if current == text else 1
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}; pytest exit code {int(code)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
