"""FID features comparable with published numbers: the standard FID Inception weights
(`pt_inception-2015-12-05-6726825d.pth`, pytorch-fid's port of the 2015 TensorFlow graph that the original
FID code uses) run through pytorch-fid's own `InceptionV3`, with its input convention.

pytorch-fid only fetches these weights from a URL; here they come from a file the user passes (nothing is
downloaded). The extractor plugs into `eval.metrics.fid` like the torchvision one:

    fid(images_a, images_b, FidInceptionFeatures("pt_inception-2015-12-05-6726825d.pth"))

`inception_extractor(path)` picks the right extractor from the weights file itself (the FID graph has a
1008-way classifier, torchvision's ImageNet model a 1000-way one).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from eval.common import EvalError

FID_WEIGHTS_HINT = ("the FID Inception weights pt_inception-2015-12-05-6726825d.pth (pytorch-fid's, from "
                    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                    "pt_inception-2015-12-05-6726825d.pth)")
FID_NUM_CLASSES = 1008  # the 2015 graph's classifier; torchvision's ImageNet Inception has 1000


def _read_state_dict(weights_path: str | None, flag: str, hint: str) -> dict[str, Any]:
    if not weights_path:
        raise EvalError(f"FID needs Inception weights: pass {flag} PATH to {hint}")
    if not os.path.isfile(weights_path):
        raise EvalError(f"{flag} {weights_path}: no such file (expected {hint})")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unreadable file is the same user error)
        raise EvalError(f"{flag} {weights_path}: cannot read it ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise EvalError(f"{flag} {weights_path}: not a state dict (expected {hint})")
    return state


def load_fid_inception(weights_path: str | None, flag: str = "--fid_inception_weights", dims: int = 2048
                       ) -> torch.nn.Module:
    """pytorch-fid's `InceptionV3` with the weights from `weights_path`, in eval mode, returning the block whose
    features have `dims` channels (2048: the final average pool, what FID uses; 64, 192, 768: earlier blocks).
    Raises EvalError naming `flag` when the file is missing, unreadable or not these weights."""
    import pytorch_fid.inception as pfi

    if dims not in pfi.InceptionV3.BLOCK_INDEX_BY_DIM:
        raise EvalError(f"FID Inception features come in {sorted(pfi.InceptionV3.BLOCK_INDEX_BY_DIM)} dims, not {dims}")
    state = _read_state_dict(weights_path, flag, FID_WEIGHTS_HINT)
    # pytorch-fid builds the FID graph and then loads the weights from FID_WEIGHTS_URL with
    # load_state_dict_from_url; hand it the file's state dict instead (no download, same code path).
    fetch = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda url, *args, **kwargs: state
    try:
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    except RuntimeError:
        raise EvalError(f"{flag} {weights_path} does not fit the FID Inception graph (expected {FID_WEIGHTS_HINT})"
                        ) from None
    finally:
        pfi.load_state_dict_from_url = fetch
    return model.eval()


class FidInceptionFeatures:
    """Callable uint8 images (N, H, W, 3) → (N, dims) float64 FID Inception features (dims 2048 for FID), as
    pytorch-fid computes them: pixels / 255 (torchvision's ToTensor), inside the model a bilinear resize to
    299 px and scaling to [-1, 1], and a spatial average for the blocks that are not already pooled."""

    def __init__(self, weights_path: str | None, device: str = "cpu", flag: str = "--fid_inception_weights",
                 dims: int = 2048):
        self.model = load_fid_inception(weights_path, flag, dims).to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float().div(255)
        features = self.model(x)[0]  # (N, dims, h, w); h = w = 1 for 2048
        if features.shape[2:] != (1, 1):
            features = torch.nn.functional.adaptive_avg_pool2d(features, (1, 1))
        return features.squeeze(3).squeeze(2).double().cpu().numpy()


def is_fid_inception_file(weights_path: str) -> bool:
    """True when the state dict at `weights_path` is the FID graph's (a 1008-way classifier)."""
    state = _read_state_dict(weights_path, "--inception_weights", FID_WEIGHTS_HINT)
    fc = state.get("fc.weight")
    return fc is not None and tuple(fc.shape)[0] == FID_NUM_CLASSES


def inception_extractor(weights_path: str | None, device: str = "cpu", flag: str = "--inception_weights") -> Any:
    """The FID extractor for a weights file: pytorch-fid's FID Inception for the standard FID weights (values
    comparable with published FIDs), else eval.metrics' torchvision Inception (comparable only among runs
    scored with the same torchvision weights)."""
    from eval.metrics import InceptionFeatures

    if weights_path and os.path.isfile(weights_path) and is_fid_inception_file(weights_path):
        return FidInceptionFeatures(weights_path, device, flag=flag)
    return InceptionFeatures(weights_path, device)
