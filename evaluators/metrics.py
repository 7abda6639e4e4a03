"""The metrics' math, on plain tensors: CLIP score, CLIP zero-shot presence, FID, KID."""

from __future__ import annotations

import warnings

import numpy as np
import torch

CLIP_SCORE_FORMULA = "100 * max(cos(E_I(image), E_T(prompt)), 0), averaged (Hessel et al. 2021 with w=100)"


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, float]:
    """Mean CLIP score of matched (image, text) pairs; both inputs L2-normalised, same length."""
    cos = (image_features * text_features).sum(-1)
    return {"clip_score": float(100 * cos.clamp(min=0).mean()), "clip_cosine": float(cos.mean())}


def zero_shot_presence(image_features: torch.Tensor, concept: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Per image: True when the concept text is closer than every anchor text.

    `concept` [D] (or [P, D], averaged as a prompt ensemble), `anchors` [A, D]: the neutral or
    neighbour prompts the concept competes with.
    """
    if concept.ndim == 2:
        concept = torch.nn.functional.normalize(concept.mean(0), dim=-1)
    concept_sim = image_features @ concept
    anchor_sim = image_features @ anchors.T
    return concept_sim > anchor_sim.max(dim=1).values


FID_MIN_SET = 2  # a covariance needs two images


def frechet_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (FID when D is Inception's).

    Raises ValueError below FID_MIN_SET rows in either set, where the distance is undefined.
    """
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = min(len(a), len(b))
    if n < FID_MIN_SET:  # checked first: scipy's sqrtm takes minutes over the NaN covariance of one row, then fails
        raise ValueError(f"FID needs at least {FID_MIN_SET} images per set, got {n}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # Rank-deficient covariances are normal for small sets or features with dead units; the
        # non-finite case is handled below and the tiny imaginary part is dropped.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product: regularise, as pytorch-fid does
        offset = np.eye(cov_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = covmean.real
    distance = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
    return max(distance, 0.0)  # a set against itself comes out at -1e-5 or so: sqrtm's rounding, not a distance


def fid_warning(n: int, dim: int) -> str | None:
    """The caveat of an FID of `n` images per set on `dim`-d features, or None for sets large enough."""
    if n < FID_MIN_SET:
        return f"{n} image(s) in a set: FID needs at least {FID_MIN_SET} per set"
    if n <= dim:
        return (f"{n} images per set for {dim}-d features: FID is dominated by its bias at this size; compare it "
                "only with FIDs of the same size")  # fmt: skip
    return None


PRESENCE_MIN_SHOWN = 20  # below this many base images showing the concept, a drop in presence rests on too few


def presence_warning(before: float, images: int) -> str | None:
    """The caveat of a before/after presence of `images` samples each whose base shows the concept in a share
    `before` of them: a drop means little when the base showed it in a handful (one sample, `--samples 1`, reads
    as "erased" from 100% to 0%), and nothing when in none."""
    shown = round(before * images)
    if shown == 0:
        return f"the base model shows the concept in none of these {images} samples: there was nothing to erase"
    if shown < PRESENCE_MIN_SHOWN:
        return (f"the base model shows the concept in {shown} of {images} samples: a drop measured on so few means "
                f"little (at least {PRESENCE_MIN_SHOWN} wanted)")  # fmt: skip
    return None


KID_MIN_IMAGES = 50  # below this many images per set, KID's subsets are too small to mean much
KID_MIN_SET = 4  # the unbiased estimator needs subsets of 2, hence sets of 4


def kernel_inception_distance(
    a: torch.Tensor | np.ndarray,
    b: torch.Tensor | np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> dict:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3,
    torchmetrics' implementation, averaged over random subsets of the two sets.

    `a` and `b` must be independent samples (e.g. drawn with different seeds): the estimator is
    unbiased only then. A subset never exceeds half of the smaller set, so that the subsets differ
    and their spread (`kid_std`) means something; the settings used come back with the values.
    """
    from torchmetrics.image.kid import poly_mmd

    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    n = min(len(a), len(b))
    if n < KID_MIN_SET:
        raise ValueError(f"KID needs at least {KID_MIN_SET} images per set, got {n}")
    m = min(subset_size, n // 2)
    g = torch.Generator().manual_seed(seed)
    values = [
        float(poly_mmd(a[torch.randperm(len(a), generator=g)[:m]], b[torch.randperm(len(b), generator=g)[:m]]))
        for _ in range(subsets)
    ]  # fmt: skip
    out = {"kid": float(np.mean(values)), "kid_std": float(np.std(values)), "subsets": subsets, "subset_size": m}
    if n < KID_MIN_IMAGES:
        out["warning"] = f"only {n} images per set: KID is too noisy to mean much below {KID_MIN_IMAGES}"
    return out


def wasserstein_1d(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Wasserstein-1 distance between two samples of scalars: the area between their empirical CDFs."""
    a = np.sort(np.asarray(a, dtype=np.float64).ravel())
    b = np.sort(np.asarray(b, dtype=np.float64).ravel())
    values = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(a, values[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(b, values[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(values)))
