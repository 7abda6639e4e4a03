"""The flat registry of erasure methods: key -> what it is, where it lives, which paper it follows.

Modules are named by import path and loaded only when used, so listing methods (and
`erasure --help`) never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from pipelines.errors import InputError
from pipelines.zoo.models import DEFAULT_MODELS


@dataclass(frozen=True)
class Paper:
    title: str
    authors: str
    venue: str
    url: str
    bibtex: str


@dataclass(frozen=True)
class Method:
    key: str
    summary: str
    paper: Paper
    patches: str  # the component(s) the method changes
    model_kind: str  # "text-to-image" or "gan"
    module: str  # "erasure.esd" holds CONFIG (its MethodConfig), erase() and TEST_SETTINGS

    @property
    def config(self) -> type:
        """The method's config dataclass (a MethodConfig)."""
        return importlib.import_module(self.module).CONFIG

    @property
    def entry(self) -> Any:
        """`erase(model, concepts, config, run) -> ErasureResult`."""
        return importlib.import_module(self.module).erase

    @property
    def test_settings(self) -> dict:
        """Options that make the method run in seconds on the embedded models, for the test matrix
        (tests/test_methods.py): the model of the method's kind, a few steps, small batches."""
        return importlib.import_module(self.module).TEST_SETTINGS


ESD = Paper(
    "Erasing Concepts from Diffusion Models",
    "Gandikota, Materzynska, Fiotto-Kaufman, Bau",
    "ICCV 2023",
    "https://arxiv.org/abs/2303.07345",
    "@inproceedings{gandikota2023erasing,\n  title={Erasing Concepts from Diffusion Models},\n"
    "  author={Gandikota, Rohit and Materzynska, Joanna and Fiotto-Kaufman, Jaden and Bau, David},\n"
    "  booktitle={ICCV},\n  year={2023}\n}",
)
ADVUNLEARN = Paper(
    "Defensive Unlearning with Adversarial Training for Robust Concept Erasure in Diffusion Models",
    "Zhang, Chen, Jia, Zhang, Fan, Liu, Hong, Ding, Liu",
    "NeurIPS 2024",
    "https://arxiv.org/abs/2405.15234",
    "@inproceedings{zhang2024defensive,\n  title={Defensive Unlearning with Adversarial Training for Robust "
    "Concept Erasure in Diffusion Models},\n  author={Zhang, Yimeng and Chen, Xin and Jia, Jinghan and Zhang, "
    "Yihua and Fan, Chongyu and Liu, Jiancheng and Hong, Mingyi and Ding, Ke and Liu, Sijia},\n"
    "  booktitle={NeurIPS},\n  year={2024}\n}",
)
FEWSHOT = Paper(
    "Erasing Concepts from Text-to-Image Diffusion Models with Few-shot Unlearning",
    "Fuchi, Takagi",
    "BMVC 2024",
    "https://arxiv.org/abs/2405.07288",
    "@inproceedings{fuchi2024erasing,\n  title={Erasing Concepts from Text-to-Image Diffusion Models with "
    "Few-shot Unlearning},\n  author={Fuchi, Masane and Takagi, Tomohiro},\n  booktitle={BMVC},\n  year={2024}\n}",
)
SFD = Paper(
    "Score Forgetting Distillation: A Swift, Data-Free Method for Machine Unlearning in Diffusion Models",
    "Chen, Zhang, Zhou",
    "ICLR 2025",
    "https://arxiv.org/abs/2409.11219",
    "@inproceedings{chen2025score,\n  title={Score Forgetting Distillation: A Swift, Data-Free Method for "
    "Machine Unlearning in Diffusion Models},\n  author={Chen, Tianqi and Zhang, Shujian and Zhou, Mingyuan},\n"
    "  booktitle={ICLR},\n  year={2025}\n}",
)
TEXT2UNLEARN = Paper(
    "Prompting Forgetting: Unlearning in GANs via Textual Guidance",
    "Nagasubramaniam et al.",
    "arXiv 2025",
    "https://arxiv.org/abs/2504.01218",
    "@article{nagasubramaniam2025prompting,\n  title={Prompting Forgetting: Unlearning in GANs via Textual "
    "Guidance},\n  author={Nagasubramaniam, Piyush and others},\n  journal={arXiv:2504.01218},\n  year={2025}\n}",
)
ADAPT_UNLEARN = Paper(
    "Adapt then Unlearn: Exploring Parameter Space Semantics for Unlearning in Generative Adversarial Networks",
    "Tiwary, Guha, Panda, Bhattacharya, Biswas",
    "TMLR 2025",
    "https://arxiv.org/abs/2309.14054",
    "@article{tiwary2025adapt,\n  title={Adapt then Unlearn: Exploring Parameter Space Semantics for Unlearning "
    "in Generative Adversarial Networks},\n  author={Tiwary, Piyush and Guha, Atri and Panda, Subhodip and "
    "Bhattacharya, Prathosh and Biswas, Sourav},\n  journal={TMLR},\n  year={2025}\n}",
)

STEREO = Paper(
    "STEREO: A Two-Stage Framework for Adversarially Robust Concept Erasing from Text-to-Image Diffusion Models",
    "Srivatsan, Shamshad, Naseer, Patel, Nandakumar",
    "CVPR 2025",
    "https://arxiv.org/abs/2408.16807",
    "@inproceedings{srivatsan2025stereo,\n  title={STEREO: A Two-Stage Framework for Adversarially Robust Concept "
    "Erasing from Text-to-Image Diffusion Models},\n  author={Srivatsan, Koushik and Shamshad, Fahad and Naseer, "
    "Muzammal and Patel, Vishal M. and Nandakumar, Karthik},\n  booktitle={CVPR},\n  year={2025}\n}",
)

ERASE_ANYTHING = Paper(
    "EraseAnything: Enabling Concept Erasure in Rectified Flow Transformers",
    "Gao, Lu, Walters, Zhou, et al.",
    "ICML 2025",
    "https://arxiv.org/abs/2412.20413",
    "@inproceedings{gao2025eraseanything,\n  title={EraseAnything: Enabling Concept Erasure in Rectified Flow "
    "Transformers},\n  author={Gao, Daiheng and Lu, Shilin and Walters, Shaw and Zhou, Wenbo and others},\n"
    "  booktitle={ICML},\n  year={2025}\n}",
)

# Papers a family's preset follows where it is not the method's own (a family's `preset_papers` names them).
PRESET_PAPERS = {"eraseanything": ERASE_ANYTHING}

_METHODS = [
    Method("esd", "negative-guidance fine-tuning of the UNet (ESD-x/ESD-u) or text encoder; the baseline",
           ESD, "unet or text_encoder", "text-to-image", "erasure.esd"),
    Method("advunlearn", "adversarial training of the text encoder against prompt attacks, plug-and-play",
           ADVUNLEARN, "text_encoder", "text-to-image", "erasure.advunlearn"),
    Method("fewshot", "gradient ascent on the text encoder from a few real images of the concept",
           FEWSHOT, "text_encoder", "text-to-image", "erasure.fewshot"),
    Method("sfd", "data-free forgetting distilled into a one-step generator (Score Forgetting Distillation)",
           SFD, "unet (one-step generator)", "text-to-image", "erasure.sfd"),
    Method("text2unlearn", "CLIP-guided directional unlearning of a GAN from a text prompt only",
           TEXT2UNLEARN, "generator", "gan", "erasure.text2unlearn"),
    Method("adapt-unlearn", "adapt a GAN to negative samples, then repel the original from it",
           ADAPT_UNLEARN, "generator and discriminator", "gan", "erasure.adapt_unlearn"),
    Method("stereo", "search the erased UNet for words that still draw the concept, then erase once against them",
           STEREO, "unet", "text-to-image", "erasure.stereo"),
]  # fmt: skip

METHODS: dict[str, Method] = {}
for _method in _METHODS:
    if _method.key in METHODS:
        raise RuntimeError(f"method key {_method.key!r} registered twice")
    METHODS[_method.key] = _method


def preset_paper(family, method_key: str) -> Paper | None:
    """The paper `family`'s preset of a method follows, when that is not the method's own paper."""
    name = getattr(family, "preset_papers", {}).get(method_key)
    return PRESET_PAPERS[name] if name else None


def default_model(key: str) -> str:
    """The embedded model `erasure erase --method KEY` erases from when no --model is given."""
    return DEFAULT_MODELS[get_method(key).model_kind]


def get_method(key: str) -> Method:
    if key not in METHODS:
        raise InputError(f"unknown method {key!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[key]
