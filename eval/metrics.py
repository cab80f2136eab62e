"""Evaluation metrics as plain functions: FID, CLIP score, fixed-timestep validation loss, bits per dimension.

Model-dependent parts are passed in (a feature extractor, an embedder, a loss or prediction function), so each
metric is tested on small models built in the test and the same code runs on real weights:

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to features of two image sets.
  Default features: torchvision's Inception V3 2048-d pool features from a weights file the user passes
  (nothing is downloaded). Note: torchvision's Inception weights differ from the 2015 TF graph that
  pytorch-fid / the original FID use, so values are comparable with each other, not with published FIDs.
- CLIP score (Hessel et al. 2021, as in torchmetrics): 100 * max(cos(image, text), 0), averaged.
- Validation loss at fixed, evenly spaced timesteps over a held-out set (the MLPerf text-to-image metric):
  the training objective with the timestep and the noise fixed, so two checkpoints compare without sampling
  noise.
- Bits per dimension of the latent under the discrete-time variational bound (Ho et al. 2020, eq. 5;
  Kingma et al. 2021 "VDM", sec. 3), with a Monte-Carlo estimate over timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from eval.common import EvalError, sample_generator

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


# ---------------------------------------------------------------------- fixed-timestep validation loss


def fixed_timesteps(num_train_timesteps: int, k: int) -> list[int]:
    """k evenly spaced timesteps, the centres of k equal bins of [0, T): floor((i + ½) T / k)."""
    if not 1 <= k <= num_train_timesteps:
        raise EvalError(f"the number of evaluation timesteps must be in [1, {num_train_timesteps}], got {k}")
    return [int((i + 0.5) * num_train_timesteps / k) for i in range(k)]


class FixedTimestepBatches:
    """Wrap a finite, ordered source of host batches (dicts of (B, ...) tensors); yield `(t, batch)` for every
    batch and every timestep in `timesteps`, each batch extended with

    - `timesteps`: (B,) int64, all equal to t;
    - `noise`: (B, C, h, w) float32, sample i's own fixed noise for timestep t;
    - `latent_eps`: (B, C, h, w) float32, sample i's fixed draw of the VAE posterior (same for every t).

    Sample i (counted from `index_offset`) draws from a generator seeded by (seed, i) alone, so the values do
    not depend on the batch size or the device count, and two evaluations see exactly the same noise."""

    def __init__(self, batches: Iterable[dict[str, torch.Tensor]], timesteps: Sequence[int],
                 latent_shape: tuple[int, int, int], seed: int = 0, index_offset: int = 0):
        self.batches, self.timesteps, self.latent_shape = batches, list(timesteps), tuple(latent_shape)
        self.seed, self.index_offset = seed, index_offset
        self.ndims = {**getattr(batches, "ndims", {}), "noise": 4, "timesteps": 1, "latent_eps": 4}

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        index = self.index_offset
        shape = (1, *self.latent_shape)
        for batch in self.batches:
            b = next(iter(batch.values())).shape[0]
            gens = [sample_generator(self.seed, index + i) for i in range(b)]
            index += b
            latent_eps = torch.cat([torch.randn(shape, generator=g) for g in gens])
            noises = [torch.cat([torch.randn(shape, generator=g) for g in gens]) for _ in self.timesteps]
            for t, noise in zip(self.timesteps, noises):
                yield t, {**batch, "latent_eps": latent_eps, "noise": noise,
                          "timesteps": torch.full((b,), t, dtype=torch.int64)}


def validation_loss(
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    batches: Iterable[tuple[int, dict[str, torch.Tensor]]],
    after_each: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Mean of `loss_fn(batch)` (a scalar: the batch's mean loss) over `(t, batch)` pairs, overall and per t:
    `{"eval_loss": ..., "eval_loss_t0062": ..., ...}`. All batches must have the same size (the mean of
    batch means is then the mean over samples). `after_each` runs after every call: on XLA a sync, so every
    call is the same graph; the values are read only at the end (already computed, a transfer, no graph)."""
    losses: list[tuple[int, torch.Tensor]] = []
    for t, batch in batches:
        losses.append((t, loss_fn(batch)))
        if after_each is not None:
            after_each()
    if not losses:
        raise EvalError("the held-out set is empty (smaller than one batch?)")
    per_t: dict[int, list[float]] = {}
    for t, loss in losses:
        per_t.setdefault(t, []).append(float(loss))
    out = {"eval_loss": float(np.mean([v for vs in per_t.values() for v in vs]))}
    out.update({f"eval_loss_t{t:04d}": float(np.mean(vs)) for t, vs in sorted(per_t.items())})
    return out


# ------------------------------------------------------------------------------------ bits per dimension


@dataclass(frozen=True)
class VLBSchedule:
    """Float64 tables of a discrete DDPM schedule (0-based t = 0..T-1, diffusers' indexing: x_t ~
    q(x_t | x0) = N(sqrt(a_t) x0, (1 - a_t) I) with a_t = alphas_cumprod[t]; a_{-1} = 1 is the clean data).

    For t >= 1 the posterior q(x_{t-1} | x_t, x0) = N(c0_t x0 + ct_t x_t, var_t) (Ho et al. 2020, eqs. 6-7):
    c0_t = beta_t sqrt(a_{t-1}) / (1 - a_t), ct_t = sqrt(alpha_t) (1 - a_{t-1}) / (1 - a_t),
    var_t = beta_t (1 - a_{t-1}) / (1 - a_t)."""

    alphas_cumprod: torch.Tensor  # (T,)
    betas: torch.Tensor  # (T,)
    coef_x0: torch.Tensor  # (T,), entry 0 unused
    coef_xt: torch.Tensor  # (T,), entry 0 unused
    posterior_var: torch.Tensor  # (T,), entry 0 unused

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> VLBSchedule:
        a = alphas_cumprod.double().cpu()
        prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
        betas = 1 - a / prev
        return cls(
            alphas_cumprod=a, betas=betas,
            coef_x0=betas * prev.sqrt() / (1 - a), coef_xt=(1 - betas).sqrt() * (1 - prev) / (1 - a),
            posterior_var=betas * (1 - prev) / (1 - a),
        )

    def predicted_x0(self, x_t: torch.Tensor, t: int, model_output: torch.Tensor, prediction_type: str
                     ) -> torch.Tensor:
        """x0 implied by the model's output at step t (all float64)."""
        a = self.alphas_cumprod[t]
        if prediction_type == "epsilon":
            return (x_t - (1 - a).sqrt() * model_output) / a.sqrt()
        if prediction_type == "v_prediction":
            return a.sqrt() * x_t - (1 - a).sqrt() * model_output
        raise EvalError(f"bits/dim: unknown prediction_type {prediction_type!r}")


def prior_kl(x0: torch.Tensor, sched: VLBSchedule) -> torch.Tensor:
    """KL(q(x_{T-1} | x0) || N(0, I)) in nats, summed over dims: (B,). Per dim ½(a x0² - a - log(1 - a))."""
    a = sched.alphas_cumprod[-1]
    per_dim = 0.5 * (a * x0.double() ** 2 - a - torch.log1p(-a))
    return per_dim.flatten(1).sum(1)


def _log_bin_mass(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, stable in both tails (mirrors the bin to the left tail)."""
    mirror = (lo + hi) > 0
    lo, hi = torch.where(mirror, -hi, lo), torch.where(mirror, -lo, hi)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp(log_lo - log_hi))


def decoder_nll(x0: torch.Tensor, x0_pred: torch.Tensor, sched: VLBSchedule, bin_width: float) -> torch.Tensor:
    """-log p(x0 | x_0) in nats, summed over dims: (B,). p is N(x0_pred, beta_0) per dim (the posterior mean at
    t = 0 is the predicted x0, its variance beta_0 as in Ho et al.), discretised to bins of width `bin_width`
    centred on x0: the probability mass of [x0 - w/2, x0 + w/2]."""
    sigma = sched.betas[0].sqrt()
    centre = (x0.double() - x0_pred.double()) / sigma
    half = bin_width / 2 / sigma
    return -_log_bin_mass(centre - half, centre + half).flatten(1).sum(1)


def diffusion_kl(x0: torch.Tensor, x_t: torch.Tensor, x0_pred: torch.Tensor, t: int, sched: VLBSchedule
                 ) -> torch.Tensor:
    """KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in nats for t >= 1, summed over dims: (B,). Both are
    Gaussians with the fixed posterior variance; p's mean is the posterior mean with x0 replaced by the
    model's x0_pred, so the KL is |mean_q - mean_p|² / (2 var_t)."""
    x_t = x_t.double()
    mean_q = sched.coef_x0[t] * x0.double() + sched.coef_xt[t] * x_t
    mean_p = sched.coef_x0[t] * x0_pred.double() + sched.coef_xt[t] * x_t
    return ((mean_q - mean_p) ** 2).flatten(1).sum(1) / (2 * sched.posterior_var[t])


def timestep_strata(num_train_timesteps: int, k: int | None, generator: torch.Generator) -> list[tuple[int, float]]:
    """(t, weight) pairs estimating sum over t = 1..T-1: one uniform draw from each of k equal strata, weighted
    by the stratum's size (unbiased, lower variance than k i.i.d. draws). k None or >= T-1: every t, weight 1."""
    n = num_train_timesteps - 1
    if k is None or k >= n:
        return [(t, 1.0) for t in range(1, num_train_timesteps)]
    if k < 1:
        raise EvalError(f"bits/dim needs at least 1 timestep, got {k}")
    edges = [1 + (i * n) // k for i in range(k + 1)]
    out = []
    for lo, hi in zip(edges, edges[1:]):
        t = lo + int(torch.randint(0, hi - lo, (1,), generator=generator))
        out.append((t, float(hi - lo)))
    return out


def bits_per_dim(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    num_timesteps: int | None = 32,
    generator: torch.Generator | None = None,
    bin_width: float = 2 / 255,
) -> dict[str, torch.Tensor]:
    """Negative log-likelihood bound of latents x0 (B, C, h, w) (the scaled latents the model is trained on)
    under the model's discrete-time diffusion, in bits per latent dimension, per sample:

        L = KL(q(x_{T-1}|x0) || N(0,I)) + sum_{t=1}^{T-1} KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) - log p(x0|x_0)

    divided by (C h w ln 2). The sum over t is estimated from `num_timesteps` stratified draws (None: all
    T-1 terms); each term draws x_t ~ q(x_t | x0) from `generator`. The decoder term discretises each latent
    dimension to bins of width `bin_width` (default 2/255: the resolution of 8-bit pixels on [-1, 1]); the
    bound is therefore the code length of latents quantised to that grid. `predict(x_t, t)` returns the model's
    output (epsilon or v, per `prediction_type`) for x_t (B, C, h, w) and t (B,) int64, with any conditioning
    closed over.

    Returns per-sample tensors (B,) float64: `bpd` and its parts `prior`, `diffusion`, `decoder` (bits/dim).
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    sched = VLBSchedule.from_alphas_cumprod(alphas_cumprod)
    num_train = len(sched.alphas_cumprod)
    b = x0.shape[0]
    dims = x0[0].numel()
    x0 = x0.float().cpu()

    def noisy(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(x0.shape, generator=generator)
        a = sched.alphas_cumprod[t]
        x_t = (a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()).float()
        with torch.no_grad():
            out = predict(x_t, torch.full((b,), t, dtype=torch.int64))
        return x_t, sched.predicted_x0(x_t.double(), t, out.double().cpu(), prediction_type)

    x_t, x0_pred = noisy(0)
    decoder = decoder_nll(x0, x0_pred, sched, bin_width)
    diffusion = torch.zeros(b, dtype=torch.float64)
    for t, weight in timestep_strata(num_train, num_timesteps, generator):
        x_t, x0_pred = noisy(t)
        diffusion = diffusion + weight * diffusion_kl(x0, x_t, x0_pred, t, sched)
    prior = prior_kl(x0, sched)
    to_bits = 1.0 / (dims * math.log(2))
    parts = {"prior": prior * to_bits, "diffusion": diffusion * to_bits, "decoder": decoder * to_bits}
    return {"bpd": parts["prior"] + parts["diffusion"] + parts["decoder"], **parts}


def unet_predictor(unet: torch.nn.Module, encoder_hidden_states: torch.Tensor) -> Callable[..., torch.Tensor]:
    """predict(x_t, t) for bits_per_dim: a diffusers UNet conditioned on text states (B, L, D), in eval mode
    on whatever device the UNet lives."""
    device = next(unet.parameters()).device

    def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x_t.to(device), t.to(device), encoder_hidden_states.to(device), return_dict=False)[0]

    return predict

