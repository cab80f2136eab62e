"""eval.metrics on small real models: FID (closed form, a random conv extractor, the Inception loader), CLIP
score (a tiny random CLIPModel, and a known-answer embedder), the fixed-timestep validation loss against a
by-hand computation, and bits/dim against diffusers' posterior, an oracle, and a model that learned."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_prep.synthetic import COLOURS, all_combinations, draw_shape
from eval import metrics as M
from xla_diffusion.data.randomness import sample_generator
from xla_diffusion.errors import EvalError
from xla_diffusion.validation import FixedTimestepBatches, fixed_timesteps, validation_loss

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _shape_images(n: int, res: int = 32, seed: int = 0) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    import random

    rng = random.Random(seed)
    combos = [rng.choice(all_combinations()) for _ in range(n)]
    return np.stack([np.asarray(draw_shape(f, s, b, res, rng)) for f, s, b in combos]), combos


class RandomConvFeatures:
    """A small random conv net as the FID feature extractor: uint8 (N, H, W, 3) → (N, 16)."""

    def __init__(self):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2),
            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        ).eval()

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()


# ------------------------------------------------------------------------------------------------ FID


def test_frechet_distance_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, size=5), rng.uniform(0.5, 2, size=5)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    assert M.frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_survives_singular_covariances():
    """Fewer samples than feature dimensions: singular covariances, still a finite, non-negative distance."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 32)), rng.normal(size=(5, 32)) + 0.5
    d = M.frechet_distance(*M.feature_statistics(a), *M.feature_statistics(b))
    assert np.isfinite(d) and d > 0


def test_fid_is_zero_on_itself_and_grows_with_a_colour_shift():
    images, _ = _shape_images(200)
    extractor = RandomConvFeatures()
    itself = M.fid(images, images, extractor)
    shifted = []
    for delta in (8, 32, 64, 128):
        moved = images.astype(int)
        moved[..., 0] = np.clip(moved[..., 0] + delta, 0, 255)
        shifted.append(M.fid(images, moved.astype(np.uint8), extractor))
    assert all(a < b for a, b in zip(shifted, shifted[1:])), shifted
    assert abs(itself) < 1e-3 * shifted[0], (itself, shifted)  # ~0: round-off of sqrtm only


def test_inception_extractor_loads_a_weights_file(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = str(tmp_path / "inception.pth")
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    extractor = M.InceptionFeatures(path)
    images, _ = _shape_images(3)
    feats = M.extract_features(extractor, images[:3], batch_size=2)
    assert feats.shape == (3, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    # (a 2048-d FID is left out: scipy's sqrtm of a 2048 x 2048 matrix takes ~40 s on two cores)


@pytest.mark.parametrize("weights, needle", [(None, "pass --inception_weights PATH"), ("/no/such.pth", "no such file")])
def test_inception_without_weights_says_which_file_to_pass(weights, needle):
    with pytest.raises(EvalError, match=needle) as e:
        M.InceptionFeatures(weights)
    assert "inception_v3_google" in str(e.value)


def test_inception_rejects_a_wrong_state_dict(tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(EvalError, match="does not fit torchvision's Inception V3"):
        M.InceptionFeatures(path)


# ------------------------------------------------------------------------------------------ CLIP score


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """A random CLIPModel (32 px images, the tiny SD tokenizer) + CLIPProcessor saved to a folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from xla_diffusion.tiny import build_tokenizer

    tok = build_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    )
    path = str(tmp_path_factory.mktemp("clip") / "tiny-clip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_clip_score_of_a_saved_clip_model(tiny_clip):
    clip = M.ClipEmbedder(tiny_clip)
    images, combos = _shape_images(5, res=48)
    texts = [f"a {f} {s} on a {b} background" for f, s, b in combos]
    score = M.clip_score(images, texts, clip.image_features, clip.text_features, batch_size=2)
    # by hand, through transformers directly
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        inputs = proc(text=texts, images=list(images), return_tensors="pt", padding=True)
        out = model(**inputs)
    cos = F.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert score == pytest.approx(float((100 * cos.clamp(min=0)).mean()), abs=1e-4)
    assert 0 <= score <= 100


def test_clip_score_known_answer_with_a_pluggable_embedder():
    """Image → one-hot of its foreground colour, text → one-hot of the colour named: matching pairs score
    100, mismatched ones 0 (cosine of orthogonal vectors, clamped)."""
    from eval.shapes_score import read_shape_image

    names = list(COLOURS)

    def image_features(images):
        return torch.eye(len(names))[[names.index(read_shape_image(im).fg) for im in images]]

    def text_features(texts):
        return torch.eye(len(names))[[names.index(t.split()[1]) for t in texts]]

    images, combos = _shape_images(8)
    right = [f"a {f} {s} on a {b} background" for f, s, b in combos]
    wrong = [f"a {b} {s} on a {f} background" for f, s, b in combos]
    assert M.clip_score(images, right, image_features, text_features) == pytest.approx(100)
    assert M.clip_score(images, wrong, image_features, text_features) == pytest.approx(0)


def test_clip_without_a_model_is_one_clear_error(tmp_path):
    with pytest.raises(EvalError, match="pass --clip_model PATH"):
        M.ClipEmbedder(None)
    with pytest.raises(EvalError, match="no such folder"):
        M.ClipEmbedder(str(tmp_path / "nope"))


# ------------------------------------------------------------------------------------ validation loss


def test_fixed_timesteps_are_evenly_spaced_bin_centres():
    assert fixed_timesteps(1000, 4) == [125, 375, 625, 875]
    assert fixed_timesteps(1000, 1) == [500]
    with pytest.raises(EvalError):
        fixed_timesteps(1000, 0)


@pytest.fixture(scope="module")
def tiny_models(tiny_pipeline):
    from xla_diffusion.models import load_models

    models = load_models(tiny_pipeline)
    models.unet.eval()
    return models


def test_validation_loss_equals_the_objective_by_hand(tiny_models, shapes_dir):
    """FixedTimestepBatches + validation_loss(compute_loss) == the epsilon MSE at those timesteps computed
    sample by sample with diffusers' own add_noise, the VAE posterior drawn with each sample's fixed eps."""
    from xla_diffusion.data.config import DataConfig
    from xla_diffusion.data.images import ImageCaptionBatches, load_image_caption_dataset
    from xla_diffusion.train_step import StepConfig, compute_loss

    m = tiny_models
    data = DataConfig(dataset_name=None, train_data_dir=os.path.join(shapes_dir, "train"), batch_size=4,
                      resolution=64, max_train_samples=12, center_crop=True)
    ds = load_image_caption_dataset(data)
    batches = ImageCaptionBatches(ds, m.tokenizer, data)

    timesteps = fixed_timesteps(1000, 3)
    fixed = FixedTimestepBatches(batches.ordered(), timesteps, m.latent_shape(64), seed=4)
    cfg = StepConfig(prediction_type="epsilon", snr_gamma=None, max_grad_norm=0.0, bf16=False,
                     scaling_factor=m.vae.config.scaling_factor)
    alphas = m.noise_scheduler.alphas_cumprod.float()
    with torch.no_grad():
        ours = validation_loss(lambda b: compute_loss(m.unet, m.vae, m.text_encoder, b, alphas, cfg), fixed)

    pixels = torch.cat([b["pixel_values"] for b in batches.ordered()])
    ids = torch.cat([b["input_ids"] for b in batches.ordered()])
    per_t = {t: [] for t in timesteps}
    with torch.no_grad():
        for i in range(len(pixels)):
            g = sample_generator(4, i)
            eps = torch.randn(1, *m.latent_shape(64), generator=g)
            noises = [torch.randn(1, *m.latent_shape(64), generator=g) for _ in timesteps]
            post = m.vae.encode(pixels[i : i + 1]).latent_dist
            x0 = (post.mean + post.std * eps) * m.vae.config.scaling_factor
            hidden = m.text_encoder(ids[i : i + 1])[0]
            for t, noise in zip(timesteps, noises):
                tt = torch.tensor([t])
                pred = m.unet(m.noise_scheduler.add_noise(x0, noise, tt), tt, hidden).sample
                per_t[t].append(F.mse_loss(pred, noise).item())
    assert ours["eval_loss"] == pytest.approx(np.mean([v for vs in per_t.values() for v in vs]), rel=1e-4)
    for t in timesteps:
        assert ours[f"eval_loss_t{t:04d}"] == pytest.approx(np.mean(per_t[t]), rel=1e-4)
    # deterministic: a second pass sees the same noise
    with torch.no_grad():
        again = validation_loss(lambda b: compute_loss(m.unet, m.vae, m.text_encoder, b, alphas, cfg), fixed)
    assert again == ours


# ------------------------------------------------------------------------------------- bits per dimension


@pytest.fixture(scope="module")
def ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, clip_sample=False)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_posterior_matches_diffusers_ddpm_step(ddpm, prediction_type):
    """Our posterior mean (with the model's x0) and variance are DDPMScheduler.step's, per timestep."""
    ddpm.register_to_config(prediction_type=prediction_type)
    sched = M.VLBSchedule.from_alphas_cumprod(ddpm.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in (1, 10, 500, 999):
        prev = ddpm.step(out, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(t))
        x0_pred = sched.predicted_x0(x_t.double(), t, out.double(), prediction_type)
        mean = sched.coef_x0[t] * x0_pred + sched.coef_xt[t] * x_t.double()
        # diffusers computes in float32, we in float64
        torch.testing.assert_close(sched.posterior_var[t].float(), ddpm._get_variance(t).float(), rtol=1e-4, atol=0)
        torch.testing.assert_close((mean + sched.posterior_var[t].sqrt() * noise).float(), prev, rtol=1e-4,
                                   atol=1e-5)
    ddpm.register_to_config(prediction_type="epsilon")


def test_diffusion_kl_is_half_the_snr_drop_times_x0_error(ddpm):
    """VDM's form of the same term: KL_t = ½ (SNR(t-1) - SNR(t)) |x0 - x0_pred|²."""
    sched = M.VLBSchedule.from_alphas_cumprod(ddpm.alphas_cumprod)
    g = torch.Generator().manual_seed(1)
    x0, x_t, x0_pred = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    a = sched.alphas_cumprod
    for t in (1, 300, 999):
        snr_drop = a[t - 1] / (1 - a[t - 1]) - a[t] / (1 - a[t])
        expected = 0.5 * snr_drop * ((x0.double() - x0_pred.double()) ** 2).flatten(1).sum(1)
        torch.testing.assert_close(M.diffusion_kl(x0, x_t, x0_pred, t, sched), expected, rtol=1e-8, atol=1e-10)


def test_bits_per_dim_of_an_oracle_is_the_known_prior_plus_decoder(ddpm):
    """A model that predicts the exact noise makes every diffusion KL zero; what is left has a closed form:
    the prior KL and the decoder's bin mass 2 Phi(w / 2 sigma_0) - 1 per dimension."""
    alphas = ddpm.alphas_cumprod
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def oracle(x_t, t):
        a = alphas.double()[t].reshape(-1, 1, 1, 1)
        return (x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()

    r = M.bits_per_dim(oracle, x0, alphas, "epsilon", num_timesteps=8)
    d, a_last, sigma0, w = x0[0].numel(), alphas[-1].double(), (1 - alphas[0].double()).sqrt(), 2 / 255
    prior = 0.5 * (a_last * x0.double() ** 2 - a_last - torch.log1p(-a_last)).flatten(1).sum(1)
    decoder = -d * torch.log(2 * torch.special.ndtr(w / 2 / sigma0) - 1)
    torch.testing.assert_close(r["bpd"], (prior + decoder) / (d * math.log(2)), rtol=1e-6, atol=1e-9)
    assert r["diffusion"].abs().max() < 1e-6


def _train_small_unet_on_one_latent(x0: torch.Tensor, hidden: torch.Tensor, alphas: torch.Tensor, steps: int):
    """An eager-CPU epsilon-prediction run on a single fixed latent: after it the model has learned to
    denoise towards that latent."""
    from diffusers import UNet2DConditionModel

    from xla_diffusion import objective

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden.shape[-1], attention_head_dim=8, norm_num_groups=8,
    )
    untrained = {k: v.clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(3)
    batch = 8
    for _ in range(steps):
        noise, t = torch.randn(batch, *x0.shape[1:], generator=g), torch.randint(0, 1000, (batch,), generator=g)
        xb = x0[:1].expand(batch, -1, -1, -1)
        pred = unet(objective.add_noise(xb, noise, t, alphas), t, hidden[:1].expand(batch, -1, -1)).sample
        objective.diffusion_loss(pred, xb, noise, t, alphas, "epsilon").backward()
        opt.step()
        opt.zero_grad()
    return unet.eval(), untrained


def test_a_model_that_learned_has_fewer_bits_per_dim(ddpm):
    alphas = ddpm.alphas_cumprod
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)).repeat(4, 1, 1, 1)
    hidden = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(6)).repeat(4, 1, 1)
    unet, untrained_state = _train_small_unet_on_one_latent(x0, hidden, alphas, steps=40)

    def bpd(model):
        # common random numbers: the same timesteps and noise for both models
        r = M.bits_per_dim(M.unet_predictor(model, hidden), x0, alphas, "epsilon", num_timesteps=12,
                           generator=torch.Generator().manual_seed(9))
        return float(r["bpd"].mean())

    trained = bpd(unet)
    unet.load_state_dict(untrained_state)
    untrained = bpd(unet)
    oracle_floor = float(M.bits_per_dim(
        lambda x_t, t: (x_t.double() - alphas.double()[t].reshape(-1, 1, 1, 1).sqrt() * x0.double())
        / (1 - alphas.double()[t].reshape(-1, 1, 1, 1)).sqrt(), x0, alphas, "epsilon", 12)["bpd"].mean())
    print(f"bits/dim: untrained {untrained:.3f}, trained {trained:.3f}, oracle {oracle_floor:.3f}")
    assert np.isfinite(trained) and np.isfinite(untrained)
    assert oracle_floor < trained < untrained - 0.5


def test_timestep_strata_are_unbiased_weights():
    """k strata cover t = 1..T-1 exactly once in total weight; k >= T-1 gives every t with weight 1."""
    g = torch.Generator().manual_seed(0)
    pairs = M.timestep_strata(1000, 7, g)
    assert len(pairs) == 7 and sum(w for _, w in pairs) == 999
    assert all(1 <= t <= 999 for t, _ in pairs)
    assert M.timestep_strata(10, None, g) == [(t, 1.0) for t in range(1, 10)]


# ----------------------------------------------------------------------------------------- evaluate CLI


def test_evaluate_cli_computes_what_it_can_and_says_what_it_skipped(tiny_pipeline, shapes_dir, tiny_clip, tmp_path,
                                                                    capsys):
    import json

    from eval.evaluate import main
    from xla_diffusion.cli import run_cli

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                               ["a red circle on a blue background", "a white square on a black background"]))
    out = tmp_path / "scores.json"
    rc = run_cli(main, [
        "--pipeline", tiny_pipeline, "--prompts", str(prompts), "--clip_model", tiny_clip,
        "--heldout", os.path.join(shapes_dir, "train"), "--max_heldout_samples", "8", "--batch_size", "4",
        "--num_inference_steps", "2", "--eval_timesteps", "2", "--bpd_timesteps", "4", "--output", str(out),
    ])
    assert rc == 0
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert m["num_samples"] == 2 and os.path.exists(os.path.join(m["samples_dir"], "samples.npz"))
    assert 0 <= m["clip_score"] <= 100
    assert {"shapes_colour_accuracy", "shapes_background_accuracy", "shapes_shape_accuracy"} <= set(m)
    assert set(fixed_timesteps(1000, 2)) == {int(k[-4:]) for k in m if k.startswith("eval_loss_t")}
    assert 0 < m["eval_loss"] < 10 and 0 < m["bits_per_dim"] < 100
    assert result["skipped"] == {"fid": "no --reference_dir"}
    table = capsys.readouterr().out
    assert "bits_per_dim" in table and "fid" in table and "skipped: no --reference_dir" in table


def test_evaluate_cli_without_inputs_skips_with_reasons(tiny_pipeline, tmp_path, capsys):
    import json

    from eval.evaluate import main
    from xla_diffusion.cli import run_cli

    out = tmp_path / "s.json"
    assert run_cli(main, ["--pipeline", tiny_pipeline, "--output", str(out)]) == 0
    skipped = json.loads(out.read_text())["skipped"]
    assert set(skipped) == {"fid", "clip_score", "shapes_accuracy", "eval_loss", "bits_per_dim"}
    assert skipped["eval_loss"] == "no --heldout"
    assert run_cli(main, ["--pipeline", tiny_pipeline, "--output", str(out), "--heldout", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --heldout")


def test_reference_images_are_resized_to_the_samples(tmp_path):
    from eval.evaluate import load_reference_images

    for i, size in enumerate([(32, 32), (80, 60)]):
        Image.new("RGB", size, (255, 0, 0)).save(tmp_path / f"{i}.png")
    ref = load_reference_images(str(tmp_path), (64, 64))
    assert ref.shape == (2, 64, 64, 3) and (ref[..., 0] == 255).all()
