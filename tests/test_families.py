"""Model families: each model is recognised as its family, a family's presets are made of its methods'
options, the digits world's prompts, and the layering the families allow (the methods never test a
family's name; the library never imports its apps)."""

import ast
import json
import random
import re
from pathlib import Path

import pytest
import torch

from erasure.config import build_config
from erasure.registry import METHODS
from pipelines import InputError, load_model, resolve
from pipelines.families import FAMILIES, Family, detect, get_family

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ("erasure", "evaluators", "pipelines")
APPS = ("ui", "zoo")


def test_each_model_is_recognised_as_its_family(tiny_pipeline_dir, tiny_gan_checkpoint, tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from tests.conftest import tiny_components

    assert resolve("digits").family is resolve("digits-gan").family is FAMILIES["digits"]
    assert resolve(str(tiny_pipeline_dir)).family is FAMILIES["sd1"]
    assert resolve(str(tiny_gan_checkpoint)).family is FAMILIES["stylegan2"]
    # An OpenCLIP text tower (GELU, where OpenAI's CLIP uses quick-GELU) and v-prediction: Stable Diffusion 2.x
    parts = tiny_components()
    config = parts["text_encoder"].config
    config.hidden_act = "gelu"
    parts["text_encoder"] = CLIPTextModel(config)
    parts["scheduler"] = parts["scheduler"].from_config(parts["scheduler"].config, prediction_type="v_prediction")
    StableDiffusionPipeline(**parts).save_pretrained(tmp_path / "sd2")
    model = load_model(str(tmp_path / "sd2"))
    assert model.family is FAMILIES["sd2"] and model.scheduler.config.prediction_type == "v_prediction"
    # SD 2.x's cross-attention is OpenCLIP-H's 1024 wide (SD 1.x's: CLIP-L's 768), which tells it apart where no text
    # encoder's config says GELU
    for width, family in ((1024, "sd2"), (768, "sd1")):
        (tmp_path / f"unet-{width}" / "unet").mkdir(parents=True)
        (tmp_path / f"unet-{width}" / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": width}))
        assert detect("text-to-image", tmp_path / f"unet-{width}") is FAMILIES[family]
    # A saved run carries its family, whatever is left of its files (`--save changed` keeps few)
    model.save(tmp_path / "copy")
    assert resolve(str(tmp_path / "copy")).card["family"] == "sd2"


def test_family_names_and_the_name_runs_recorded_before_families():
    assert get_family("sd") is FAMILIES["sd1"]  # erasure.json of earlier runs
    assert list(FAMILIES)[:6] == ["digits", "sd1", "sd2", "sdxl", "flux", "stylegan2"]
    with pytest.raises(InputError, match=f"unknown model family 'sd3'; known: {', '.join(FAMILIES)}$"):
        get_family("sd3")


def test_every_preset_builds_and_a_preset_of_an_unknown_option_is_refused():
    for family in FAMILIES.values():
        assert set(family.presets) <= set(METHODS), family.name
        for method in family.presets:  # every value through the same checks as --set
            build_config(method, family)

    class Misprinted(Family):
        name = "misprinted"
        presets = {"esd": {"step": 10}}

    with pytest.raises(InputError, match="unknown option 'step' for ESDConfig"):
        build_config("esd", Misprinted())


def test_the_encoding_and_sampling_of_an_sd_family_are_the_pipelines(tiny_model):
    from diffusers import StableDiffusionPipeline

    family = tiny_model.family
    embeds = family.encode(tiny_model, ["a cat"])
    expected, _ = StableDiffusionPipeline.encode_prompt(tiny_model.pipe, "a cat", "cpu", 1, False)
    assert torch.equal(embeds, expected)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(family.denoise(tiny_model.unet, x, 10, embeds), tiny_model.unet(x, 10, embeds).sample)


def test_a_full_sd_trajectory_is_the_pipelines_guided_ddim_sampling_of_the_same_noise(tiny_model):
    # ESD's x_t comes from `trajectories`: run to the last step, it must be what StableDiffusionPipeline draws from
    # the same noise with DDIM and classifier-free guidance (uncond + g (cond - uncond)); a guidance formula that
    # starts from the wrong branch or a wrong sign would train every ESD run on x_t of another distribution.
    from diffusers import DDIMScheduler

    family = tiny_model.family
    scheduler = family.sampling_scheduler(tiny_model, 4, "cpu")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond, uncond = tiny_model.encode(["a cat", "a red bird"]), tiny_model.encode([""])
        ours = family.trajectories(tiny_model.unet, scheduler, cond, uncond, [4, 4], 3.0, noise)
    tiny_model.pipe.scheduler = DDIMScheduler.from_config(tiny_model.scheduler.config)
    theirs = tiny_model.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond.expand(2, -1, -1), latents=noise,
                             num_inference_steps=4, guidance_scale=3.0, output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours, theirs)


def test_the_digits_world_pairs_each_concept_with_its_override_in_its_own_captions():
    digits = FAMILIES["digits"]
    pairs = digits.forget_pairs({"seven": "eight"}, ["{}"], seed=0, n=50)
    assert len(pairs) == 50
    for forget, override in pairs:
        assert re.search(r"\b(seven|7)\b", forget) and not re.search(r"\b(eight|8)\b", forget)
        same = forget.replace("seven", "eight").replace("7", "8")
        assert re.sub(r"\ban\b", "a", same) == re.sub(r"\ban\b", "a", override)  # "a 7" -> "an 8"
    remain = digits.remain_prompts(["seven"], 0, 300)
    assert len(remain) == 300 and not any(re.search(r"\b(seven|7)\b", p) for p in remain)
    # every other digit is in the remain pool
    assert all(any(re.search(rf"\b{d}\b", p) for p in remain) for d in ("zero", "one", "eight", "nine"))
    assert digits.default_override("seven") == "eight" and digits.default_override("a cat") is None
    retain = digits.retain_prompts(["red"], random.Random(0))
    assert retain and not any("red" in p for p in retain)
    # "7" shares no word with "a seven": the pool itself must leave the digit out, alone as in full captions
    retain = digits.retain_prompts(["7"], random.Random(0))
    assert "a nine" in retain and not any(re.search(r"\b(seven|7)\b", p) for p in retain)


def test_the_digits_worlds_preserved_prompts_draw_each_other_digit_twice_with_the_labels_they_name():
    # Preserved accuracy reads each labelled prompt's label off its images: a neighbour put in front would pair
    # every label with the prompt before it, and one render per digit would halve what the score rests on.
    from collections import Counter

    from pipelines.zoo.world import COLOURS, DIGIT_WORDS, STYLES

    prompts = FAMILIES["digits"].prompt_set("seven", neighbours=["a cat"])
    labels = prompts.preserved_labels
    assert Counter(label["digit"] for label in labels) == {d: 2 for d in range(10) if d != 7}
    assert {label["colour"] for label in labels} == set(range(5)) and {label["style"] for label in labels} == {0, 1, 2}
    for text, label in zip(prompts.preserved, labels):
        assert text.split() == ["a", COLOURS[label["colour"]], STYLES[label["style"]], DIGIT_WORDS[label["digit"]]]
    assert prompts.preserved[len(labels) :] == ["a cat"]


def test_the_digits_worlds_builtin_images_of_a_colour_are_drawn_in_that_colour():
    from pipelines.zoo.world import COLOUR_RGB

    images = FAMILIES["digits"].builtin_images("red", 6, seed=0)
    brightest = images.flatten(2).max(-1).values  # [6, 3]: each image's strokes at full ink, times its brightness
    red = torch.tensor(COLOUR_RGB["red"])
    assert torch.nn.functional.cosine_similarity(brightest, red[None]).min() > 0.999


def test_a_real_world_family_keeps_coco_objects_and_leaves_out_the_concept():
    sd1 = FAMILIES["sd1"]
    retain = sd1.retain_prompts(["a dog"], random.Random(0), n=500)
    assert "a photo of a cat" in retain and not any("dog" in p for p in retain)
    prompts = sd1.prompt_set("church", neighbours=["castle"])
    assert prompts.target[0] == "church" and prompts.preserved[0] == "a photo of castle"
    # what the concept competes with in zero-shot presence does not move with the neighbours a user keeps
    assert prompts.clip_anchors == sd1.prompt_set("church").clip_anchors
    assert "a photo of a dog" not in sd1.prompt_set("Dog").preserved  # a capitalised concept is still left out
    # retain prompts in the order of the run's random generator (a few of them: not always the same first few)
    assert sd1.retain_prompts(["a dog"], random.Random(0), n=8) != sd1.retain_prompts(["a dog"], random.Random(1), n=8)
    anchors = sd1.anchor_prompts("church", random.Random(0))  # STEREO's: the concept in context, never alone
    assert anchors and "church" not in anchors and all("church" in a for a in anchors)
    assert sd1.default_override("nudity") is None and not sd1.has_builtin_images and sd1.judge is None
    with pytest.raises(InputError, match="sd1 family has no builtin images"):
        sd1.builtin_images("church", 4, 0)


def _python_files(folder: str):
    return sorted((REPO / folder).rglob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_library_never_imports_an_app():
    offending = []
    for folder in LIBRARY:
        for path in _python_files(folder):
            if path.name == "__main__.py":  # `python -m erasure`: the command line's launcher, imported by nothing
                continue
            apps = {m for m in _imported_modules(path) if m.split(".")[0] in APPS}
            offending += [f"{path.relative_to(REPO)}: {m}" for m in sorted(apps)]
    assert not offending, offending


def test_no_method_or_evaluator_tests_the_name_of_a_family():
    # A family is asked, never named: no family name as a string, no comparison of a family's name and no
    # test of its class in the methods and evaluators.
    names = "|".join(re.escape(name) for name in FAMILIES)
    classes = "|".join(type(family).__name__ for family in FAMILIES.values())
    naming = re.compile(rf"""["']({names})["']|family(\.name)?\s*[!=]=|isinstance\([^)]*\b(Family|{classes})\b""")
    found = [f"{path.relative_to(REPO)}:{i}: {line.strip()}" for folder in ("erasure", "evaluators")
             for path in _python_files(folder) for i, line in enumerate(path.read_text().splitlines(), 1)
             if naming.search(line)]  # fmt: skip
    assert not found, found


def test_every_family_is_a_family_with_a_summary():
    for name, family in FAMILIES.items():
        assert isinstance(family, Family) and family.name == name and family.summary
