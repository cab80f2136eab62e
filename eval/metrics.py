"""Offline evaluation metrics as plain functions: FID, CLIP score, bits per dimension (the fixed-timestep
validation loss, which the trainer also computes, lives in `xla_diffusion.validation`).

Model-dependent parts are passed in (a feature extractor, an embedder, a loss or prediction function), so each
metric is tested on small models built in the test and the same code runs on real weights:

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to features of two image sets.
  Default features: torchvision's Inception V3 2048-d pool features from a weights file the user passes
  (nothing is downloaded). Note: torchvision's Inception weights differ from the 2015 TF graph that
  pytorch-fid / the original FID use, so values are comparable with each other, not with published FIDs.
- CLIP score (Hessel et al. 2021, as in torchmetrics): 100 * max(cos(image, text), 0), averaged.
- Bits per dimension of the latent under the discrete-time variational bound (Ho et al. 2020, eq. 5;
  Kingma et al. 2021 "VDM", sec. 3), with a Monte-Carlo estimate over timesteps (in eval/likelihood.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from xla_diffusion.errors import EvalError

FeatureExtractor = Callable[[np.ndarray], np.ndarray]  # uint8 images (N, H, W, 3) → features (N, D)


# ----------------------------------------------------------------------------------------------- FID


def extract_features(extractor: FeatureExtractor, images: np.ndarray, batch_size: int = 50) -> np.ndarray:
    """Features (N, D) float64 of uint8 images (N, H, W, 3), computed `batch_size` images at a time."""
    if len(images) == 0:
        raise EvalError("no images to compute features of")
    starts = range(0, len(images), batch_size)
    return np.concatenate([np.asarray(extractor(images[i : i + batch_size]), dtype=np.float64) for i in starts])


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D), float64, of features (N, D); N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise EvalError(f"need at least 2 feature vectors (N, D) for FID statistics, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """d² = |mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½) between N(mu1, S1) and N(mu2, S2), in float64.

    (S1 S2)^½ is a real matrix square root (scipy.linalg.sqrtm). When the product is singular (fewer samples
    than feature dimensions) sqrtm can return non-finite values; then eps·I is added to both covariances, the
    standard fallback. Round-off gives sqrtm a tiny imaginary part, which is dropped; a large one is an
    error, not a result.
    """
    import scipy.linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise EvalError(f"feature statistics differ in shape: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise EvalError(f"FID: the matrix square root has an imaginary part of "
                            f"{np.max(np.abs(covmean.imag)):.3g}: covariances too ill-conditioned")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(images_a: np.ndarray, images_b: np.ndarray, extractor: FeatureExtractor, batch_size: int = 50) -> float:
    """FID between two sets of uint8 images (N, H, W, 3) under `extractor`'s features."""
    stats_a = feature_statistics(extract_features(extractor, images_a, batch_size))
    stats_b = feature_statistics(extract_features(extractor, images_b, batch_size))
    return frechet_distance(*stats_a, *stats_b)


INCEPTION_HINT = ("torchvision's Inception V3 ImageNet weights, inception_v3_google-0cc3c7bd.pth "
                  "(torchvision.models.Inception_V3_Weights.IMAGENET1K_V1)")


def load_inception(weights_path: str | None) -> torch.nn.Module:
    """torchvision Inception V3 with its classifier removed (output: 2048-d pool features), weights from a local
    state-dict file (.pth/.pt or .safetensors; with or without the auxiliary classifier). Raises EvalError
    naming the file to pass when it is missing or does not fit."""
    import os

    from torchvision.models import inception_v3

    if not weights_path:
        raise EvalError(f"FID needs Inception weights: pass --inception_weights PATH to {INCEPTION_HINT}")
    if not os.path.isfile(weights_path):
        raise EvalError(f"--inception_weights {weights_path}: no such file (expected {INCEPTION_HINT})")
    try:
        if weights_path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights_path)
        else:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unreadable file is the same user error)
        raise EvalError(f"--inception_weights {weights_path}: cannot read it ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise EvalError(f"--inception_weights {weights_path}: not a state dict (expected {INCEPTION_HINT})")
    aux = any(k.startswith("AuxLogits.") for k in state)
    model = inception_v3(weights=None, aux_logits=aux, init_weights=False, transform_input=False)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise EvalError(f"--inception_weights {weights_path} does not fit torchvision's Inception V3 (expected "
                        f"{INCEPTION_HINT})") from None
    model.fc = torch.nn.Identity()  # the 2048-d average-pooled features, as FID uses
    return model.eval()


class InceptionFeatures:
    """Callable uint8 images (N, H, W, 3) → (N, 2048) Inception pool features: bilinear resize to 299 px and
    scaling to [-1, 1], the input convention of the Google Inception weights."""

    def __init__(self, weights_path: str | None, device: str = "cpu"):
        self.model = load_inception(weights_path).to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.model(x * 2 - 1).double().cpu().numpy()


# ----------------------------------------------------------------------------------------- CLIP score


def clip_score(
    images: np.ndarray,
    texts: Sequence[str],
    image_features: Callable[[np.ndarray], torch.Tensor],
    text_features: Callable[[Sequence[str]], torch.Tensor],
    batch_size: int = 64,
) -> float:
    """Mean over pairs of 100 * max(cos(image_features(image), text_features(text)), 0); images uint8
    (N, H, W, 3), one text per image; the feature functions return (n, D)."""
    if len(images) != len(texts):
        raise EvalError(f"{len(images)} images but {len(texts)} texts for the CLIP score")
    if len(images) == 0:
        raise EvalError("no images for the CLIP score")
    scores = []
    for i in range(0, len(images), batch_size):
        img = torch.as_tensor(image_features(images[i : i + batch_size])).double()
        txt = torch.as_tensor(text_features(list(texts[i : i + batch_size]))).double()
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        scores.append(100 * cos.clamp(min=0))
    return float(torch.cat(scores).mean())


class ClipEmbedder:
    """transformers CLIPModel + CLIPProcessor from a local folder (e.g. a saved openai/clip-vit-large-patch14)."""

    def __init__(self, path: str | None, device: str = "cpu"):
        import os

        from transformers import CLIPModel, CLIPProcessor

        if not path:
            raise EvalError("the CLIP score needs a CLIP model: pass --clip_model PATH to a folder holding a "
                            "transformers CLIPModel and its CLIPProcessor (e.g. openai/clip-vit-large-patch14)")
        if not os.path.isdir(path):
            raise EvalError(f"--clip_model {path}: no such folder")
        try:
            self.model = CLIPModel.from_pretrained(path).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise EvalError(f"--clip_model {path}: cannot load a CLIPModel + CLIPProcessor ({str(e).splitlines()[0]})"
                            ) from None
        self.device = device

    @torch.no_grad()
    def image_features(self, images: np.ndarray) -> torch.Tensor:
        inputs = self.processor(images=list(images), return_tensors="pt")
        return self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device)).cpu()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        return self.model.get_text_features(
            input_ids=inputs["input_ids"].to(self.device), attention_mask=inputs["attention_mask"].to(self.device)
        ).cpu()


# Bits per dimension lives in eval/likelihood.py; re-exported so `eval.metrics` stays the one metrics API.
from eval.likelihood import (  # noqa: E402, F401
    VLBSchedule,
    bits_per_dim,
    diffusion_kl,
    timestep_strata,
    unet_predictor,
)
