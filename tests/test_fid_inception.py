"""FID through the standard FID Inception graph (eval/fid_inception.py) equals pytorch-fid's own computation
on the same images and the same weights file. The real weights cannot be downloaded here, so the file holds
a randomly initialised network of the same architecture (pytorch-fid's FID blocks)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from eval.common import EvalError
from eval.fid_inception import FidInceptionFeatures, inception_extractor, is_fid_inception_file, load_fid_inception
from eval.metrics import InceptionFeatures, fid


def _random_fid_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The FID graph as pytorch-fid's fid_inception_v3 assembles it, randomly initialised. Convolutions get
    He-normal weights so the 2048-d pool features stay O(1) (torchvision's default init shrinks them to ~1e-7,
    where a Fréchet distance compares round-off)."""
    import pytorch_fid.inception as pfi

    torch.manual_seed(seed)
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.state_dict()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth")
    torch.save(_random_fid_inception_state(), path)
    return path


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """Two small sets of uint8 images (N, 32, 32, 3) from different distributions, also saved as PNG folders
    for pytorch-fid's path-based API."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, 32)[None, :, None, None]
    b = np.clip(ramp + rng.normal(0, 30, (5, 32, 32, 3)), 0, 255).astype(np.uint8)
    dirs = []
    for name, images in (("a", a), ("b", b)):
        d = tmp_path_factory.mktemp(name)
        for i, img in enumerate(images):
            Image.fromarray(img).save(d / f"{i:03d}.png")
        dirs.append(str(d))
    return a, b, dirs


class _WeightsFromFile:
    """pytorch-fid with its weights download replaced by the same file (the test cannot download)."""

    def __init__(self, path: str):
        self.state = torch.load(path, map_location="cpu", weights_only=True)

    def __enter__(self):
        import pytorch_fid.inception as pfi

        self.saved = pfi.load_state_dict_from_url
        pfi.load_state_dict_from_url = lambda url, *a, **k: self.state
        return self

    def __exit__(self, *exc):
        import pytorch_fid.inception as pfi

        pfi.load_state_dict_from_url = self.saved


@pytest.fixture(scope="module")
def features_a(weights_file, image_sets, single_thread_torch):
    return FidInceptionFeatures(weights_file)(image_sets[0])


def test_features_equal_pytorch_fid_activations(weights_file, image_sets, features_a):
    """The 2048-d pool features FID uses, image by image."""
    import pathlib

    import pytorch_fid.inception as pfi
    from pytorch_fid.fid_score import get_activations

    _, _, (dir_a, _) = image_sets
    with _WeightsFromFile(weights_file):
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    files = sorted(pathlib.Path(dir_a).glob("*.png"))
    theirs = get_activations(files, model, batch_size=50, dims=2048, device="cpu", num_workers=0)
    assert features_a.shape == (6, 2048) and features_a.dtype == np.float64
    assert features_a.std(axis=0).mean() > 1e-3  # the random network's features do vary between images
    np.testing.assert_allclose(features_a, theirs, rtol=1e-5, atol=1e-6)


def _fid_both_ways(weights_file, image_sets, dims):
    from pytorch_fid.fid_score import calculate_fid_given_paths

    a, b, dirs = image_sets
    ours = fid(a, b, FidInceptionFeatures(weights_file, dims=dims))  # eval.metrics' FID entry point
    with _WeightsFromFile(weights_file):
        theirs = calculate_fid_given_paths(dirs, batch_size=50, device="cpu", dims=dims, num_workers=0)
    return ours, theirs


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::scipy.linalg.LinAlgWarning")
def test_fid_equals_pytorch_fid_first_block(weights_file, image_sets, single_thread_torch):
    """Every step of FID (weights, preprocessing, features, statistics, Fréchet distance) on pytorch-fid's
    64-d first block, where the 64 × 64 matrix square root is instant."""
    ours, theirs = _fid_both_ways(weights_file, image_sets, 64)
    assert ours > 0
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::scipy.linalg.LinAlgWarning")
def test_fid_equals_pytorch_fid(weights_file, image_sets, single_thread_torch):
    """FID as published (2048-d features). Slow: two 2048 × 2048 matrix square roots."""
    ours, theirs = _fid_both_ways(weights_file, image_sets, 2048)
    assert ours > 0
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_missing_weights_are_one_line(tmp_path):
    with pytest.raises(EvalError, match=r"^--fid_inception_weights .*nope.pth: no such file \(expected the FID "
                                        r"Inception weights pt_inception-2015-12-05-6726825d.pth"):
        load_fid_inception(str(tmp_path / "nope.pth"))
    with pytest.raises(EvalError, match="FID needs Inception weights: pass --fid_inception_weights PATH"):
        load_fid_inception(None)
    with pytest.raises(EvalError, match="not 100"):
        load_fid_inception(None, dims=100)


def test_other_weights_do_not_fit(tmp_path):
    from torchvision.models import inception_v3

    path = str(tmp_path / "torchvision_inception.pth")
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    with pytest.raises(EvalError, match="does not fit the FID Inception graph"):
        load_fid_inception(path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EvalError, match="cannot read it"):
        load_fid_inception(str(garbage))


def test_extractor_chosen_from_the_file(weights_file, tmp_path):
    from torchvision.models import inception_v3

    tv = str(tmp_path / "inception_v3_google.pth")
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tv)
    assert is_fid_inception_file(weights_file) and not is_fid_inception_file(tv)
    assert isinstance(inception_extractor(weights_file), FidInceptionFeatures)
    assert isinstance(inception_extractor(tv), InceptionFeatures)
    assert os.path.isfile(weights_file)


@pytest.mark.parametrize("kind", ["fid_inception", "torchvision_inception"])
def test_evaluate_takes_either_weights_file(kind, weights_file, image_sets, tmp_path, monkeypatch):
    """eval.evaluate --inception_weights: the extractor is chosen from the file (the standard FID weights go
    through pytorch-fid's graph, tested equal to pytorch-fid above; torchvision's through eval.metrics), handed
    to eval.metrics.fid with the samples and the reference images, and the result says which features it used."""
    import json

    import eval.metrics as M
    from eval.evaluate import main
    from xla_diffusion.cli import run_cli
    from xla_diffusion.sample_files import write_samples

    a, _, (_, dir_b) = image_sets
    write_samples(str(tmp_path / "samples"), a, [{"text": f"p{i}", "file_name": f"images/{i:05d}.png",
                                                   "prompt_index": i} for i in range(len(a))])
    if kind == "fid_inception":
        path = weights_file
    else:
        from torchvision.models import inception_v3

        path = str(tmp_path / "inception_v3_google.pth")
        torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    seen = {}

    def fake_fid(images, reference, extractor):  # the 2048-d Fréchet distance itself is tested above (slow)
        seen.update(images=images, reference=reference, extractor=extractor)
        return 1.5

    monkeypatch.setattr(M, "fid", fake_fid)
    out = tmp_path / "scores.json"
    assert run_cli(main, ["--pipeline", "unused", "--samples", str(tmp_path / "samples"), "--reference_dir", dir_b,
                          "--inception_weights", path, "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert (metrics["fid"], metrics["fid_features"], metrics["fid_reference_images"]) == (1.5, kind, 5)
    expected = FidInceptionFeatures if kind == "fid_inception" else InceptionFeatures
    assert type(seen["extractor"]) is expected
    np.testing.assert_array_equal(seen["images"], a)
    assert seen["reference"].shape == (5, 32, 32, 3)
