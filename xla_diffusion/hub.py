"""Publishing an exported pipeline folder: a model card (README.md with the hub's YAML metadata) and a push
with `huggingface_hub` (create the repo, then upload the folder in one commit). Process 0 only.

Secrets: the token goes to `huggingface_hub` and nowhere else. Hyper-parameters pass through
`tracking.public_config`, and every error message is built here, one line, with the token masked.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from . import fsio
from .errors import UserError
from .tracking import public_config

log = logging.getLogger(__name__)

TAGS = ("stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "diffusers-training",
        "pytorch-xla")

# Licenses of the usual bases, as their hub model cards declare them; used when the base is a hub id whose
# card is not at hand (a local copy's README.md is read instead when there is one).
KNOWN_BASE_LICENSES = {
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2": "openrail++",
    "stabilityai/stable-diffusion-2-base": "openrail++",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
}

# Not part of the model: the trainer's checkpoints and wandb's local run files (wandb syncs those itself).
DEFAULT_IGNORE_PATTERNS = ("checkpoints/*", "*/checkpoints/*", "wandb/*", "*/wandb/*", "step_*", "epoch_*")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(UserError, ValueError):
    """A push or model card that cannot be done; the message is one line for the user, without the token. The
    run's export is on disk by then: exit code 1 (the run could not finish its work), not 2 (bad input)."""

    exit_code = 1


def is_hub_id(name: str | None) -> bool:
    """True for "namespace/name" that is not a local path or URL (what the hub accepts as base_model)."""
    return bool(name) and "://" not in name and _HUB_ID.match(name) is not None and not os.path.exists(name)


def _front_matter(text: str) -> dict[str, Any]:
    import yaml

    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        meta = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def base_model_license(base_model: str) -> str | None:
    """The base model's license where known: the `license` of the README.md in a local or gs:// copy of the
    base, else the table of the usual Stable Diffusion bases; None when unknown."""
    if "://" in base_model or os.path.isdir(base_model):
        readme = fsio.join(base_model, "README.md")
        if fsio.exists(readme):
            lic = _front_matter(fsio.read_bytes(readme).decode("utf-8", errors="replace")).get("license")
            if isinstance(lic, str):
                return lic
    return KNOWN_BASE_LICENSES.get(base_model)


def _cell(value: Any) -> str:
    """A markdown table cell: JSON for containers, no newlines or unescaped pipes."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("\n", " ").replace("|", "\\|")


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else _cell(value)


def model_card_text(
    *,
    base_model: str,
    hyperparameters: Mapping[str, Any],
    steps: int,
    mesh: Mapping[str, int],
    num_processes: int,
    num_devices: int,
    mean_step_time_s: float | None,
    images_per_s: float | None = None,
    dataset: str | None = None,
    license: str | None = None,
    validation_image: str | None = None,
    validation_prompts: Sequence[str] = (),
    eval_metrics: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> str:
    """README.md text: YAML metadata (license, base_model and datasets when they are hub ids, tags,
    library and pipeline) then what was trained and how. `validation_image` is a path relative to the card."""
    import yaml

    meta: dict[str, Any] = {}
    lic = license or base_model_license(base_model)
    if lic:
        meta["license"] = lic
    if is_hub_id(base_model):
        meta["base_model"] = base_model
    if dataset and is_hub_id(dataset):
        meta["datasets"] = [dataset]
    meta["tags"] = list(TAGS)
    meta["library_name"] = "diffusers"
    meta["pipeline_tag"] = "text-to-image"
    meta["inference"] = True

    title = repo_id.split("/")[-1] if repo_id else "Text-to-image fine-tune"
    base_ref = f"[{base_model}](https://huggingface.co/{base_model})" if is_hub_id(base_model) else f"`{base_model}`"
    data_ref = (f"[{dataset}](https://huggingface.co/datasets/{dataset})" if dataset and is_hub_id(dataset)
                else f"`{dataset}`" if dataset else "its training data")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
             f"A text-to-image diffusion model fine-tuned from {base_ref} on {data_ref} with PyTorch/XLA SPMD "
             "(xla_diffusion), exported as a diffusers pipeline.", ""]
    if validation_image:
        lines += ["## Validation images", "", f"![validation images]({validation_image})", ""]
        if validation_prompts:
            lines += ["Prompts: " + "; ".join(f"*{_cell(p)}*" for p in validation_prompts), ""]
    lines += ["## Use", "", "```python", "from diffusers import DiffusionPipeline", "",
              f"pipe = DiffusionPipeline.from_pretrained({json.dumps(repo_id or 'PATH_TO_THIS_FOLDER')})",
              f"image = pipe({json.dumps(validation_prompts[0] if validation_prompts else 'a photo of a cat')})"
              ".images[0]",
              "```", ""]
    mesh_text = " × ".join(f"{axis} {size}" for axis, size in mesh.items()) or "-"
    lines += ["## Training", "", "| | |", "| --- | --- |", f"| steps | {steps} |",
              f"| hosts (processes) | {num_processes} |", f"| devices | {num_devices} |",
              f"| device mesh | {_cell(mesh_text)} |"]
    if mean_step_time_s is not None:
        lines.append(f"| mean step time (after warm-up) | {mean_step_time_s:.4g} s |")
    if images_per_s is not None:
        lines.append(f"| throughput | {images_per_s:.4g} images/s |")
    lines.append("")
    hp = public_config(hyperparameters)
    if hp:
        lines += ["### Hyper-parameters", "", "| name | value |", "| --- | --- |"]
        lines += [f"| {_cell(k)} | {_fmt(v)} |" for k, v in hp.items()]
        lines.append("")
    if eval_metrics:
        lines += ["## Evaluation", "", "Metrics of the last evaluation during training:", "",
                  "| metric | value |", "| --- | --- |"]
        lines += [f"| {_cell(k)} | {_fmt(v)} |" for k, v in eval_metrics.items()]
        lines.append("")
    return "\n".join(lines)


def write_model_card(
    folder: str,
    *,
    base_model: str,
    hyperparameters: Mapping[str, Any],
    steps: int,
    mesh: Mapping[str, int],
    num_processes: int,
    num_devices: int,
    mean_step_time_s: float | None,
    images_per_s: float | None = None,
    dataset: str | None = None,
    license: str | None = None,
    validation_grid: str | None = None,
    validation_prompts: Sequence[str] = (),
    eval_metrics: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> str:
    """Write `folder`/README.md (local or gs://) and return its path. `validation_grid` (an image file, local or
    gs://) is copied into the folder as `validation_grid<ext>` and shown by a relative link, so the card and
    its image travel together. See `model_card_text` for the rest."""
    image_name = None
    if validation_grid:
        if not fsio.exists(validation_grid):
            raise HubError(f"model card: the validation grid {validation_grid} does not exist")
        image_name = "validation_grid" + (os.path.splitext(validation_grid)[1] or ".png")
        fsio.write_bytes_atomic(fsio.join(folder, image_name), fsio.read_bytes(validation_grid))
    text = model_card_text(
        base_model=base_model, hyperparameters=hyperparameters, steps=steps, mesh=mesh,
        num_processes=num_processes, num_devices=num_devices, mean_step_time_s=mean_step_time_s,
        images_per_s=images_per_s, dataset=dataset, license=license, validation_image=image_name,
        validation_prompts=validation_prompts, eval_metrics=eval_metrics, repo_id=repo_id,
    )
    path = fsio.join(folder, "README.md")
    fsio.write_bytes_atomic(path, text.encode("utf-8"))
    return path


def _connection_errors() -> tuple[type[BaseException], ...]:
    """The transport errors of the HTTP library huggingface_hub uses (requests up to 0.x, httpx from 1.0)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import requests

        errors += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:
        pass
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    return tuple(errors)


def _describe(e: BaseException, endpoint: str, repo_id: str) -> str:
    from huggingface_hub.utils import HfHubHTTPError

    where = f"{endpoint.rstrip('/')}/{repo_id}"
    response = getattr(e, "response", None)
    if isinstance(e, HfHubHTTPError) and response is not None:
        status = response.status_code
        if status == 401:
            return (f"push to {where}: the hub rejected the token (401 Unauthorized); pass a write token with "
                    "--hub_token or log in with `hf auth login`")
        if status == 403:
            return f"push to {where}: this token may not write to {repo_id} (403 Forbidden)"
        server = getattr(e, "server_message", None) or ""
        return f"push to {where}: the hub answered {status} {getattr(response, 'reason', '')} {server}".strip()
    if isinstance(e, _connection_errors()):
        return f"push to {where}: cannot reach the hub at {endpoint} ({type(e).__name__})"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"push to {where} failed: {type(e).__name__}: {first}".rstrip(": ")


class _HubSession:
    """One client for one repo: every call goes through `run`, which turns any failure into one HubError line
    with the token masked."""

    def __init__(self, repo_id: str, token: str | None, endpoint: str | None):
        from huggingface_hub import HfApi, constants

        self.api, self.repo_id, self.token = HfApi(endpoint=endpoint, token=token or None), repo_id, token
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"push to {self.api.endpoint}/{repo_id}: HF_HUB_OFFLINE is set, so huggingface_hub makes "
                           "no requests")

    def run(self, action: Any) -> Any:
        try:
            return action(self.api)
        except Exception as e:  # noqa: BLE001 (every failure is the same one line; the export stays on disk)
            message = _describe(e, self.api.endpoint, self.repo_id)
            if self.token:
                message = message.replace(self.token, "***")
            raise HubError(message) from None

    def create(self, private: bool, revision: str | None) -> str:
        """Create the repo (and branch) if missing; returns the repo id the hub answered with."""
        def create(api: Any) -> str:
            repo_id = api.create_repo(self.repo_id, private=private, exist_ok=True, repo_type="model").repo_id
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return repo_id

        self.repo_id = self.run(create)
        return self.repo_id


def create_repo(repo_id: str, token: str | None, private: bool = False, revision: str | None = None, *,
                is_main_process: bool, endpoint: str | None = None) -> str | None:
    """Create the model repo `repo_id` (and branch `revision`) if missing, before training, so a bad token or an
    unreachable hub stops a run at its start rather than after it (diffusers' XLA example creates the repo
    first too). Returns the repo id on process 0, None elsewhere; raises HubError (one line)."""
    if not is_main_process:
        return None
    return _HubSession(repo_id, token, endpoint).create(private, revision)


def push_to_hub(
    folder: str,
    repo_id: str,
    token: str | None,
    private: bool = False,
    revision: str | None = None,
    *,
    is_main_process: bool,
    endpoint: str | None = None,
    commit_message: str = "Upload pipeline trained with xla_diffusion",
    ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS,
) -> str | None:
    """Upload the local `folder` to the model repo `repo_id` in one commit (created if missing, `private` then;
    on branch `revision`, created from main if missing). `token` None uses the saved login / HF_TOKEN, and
    `endpoint` None uses HF_ENDPOINT or the public hub. Returns the commit URL on process 0, None elsewhere.
    Raises HubError (one line, token masked) on any failure; the folder is only read."""
    if not is_main_process:
        return None
    if "://" in folder or not os.path.isdir(folder):
        raise HubError(f"push to the hub: {folder} is not a local folder")
    hub = _HubSession(repo_id, token, endpoint)
    repo_id = hub.create(private, revision)
    info = hub.run(lambda api: api.upload_folder(
        folder_path=folder, repo_id=repo_id, revision=revision, repo_type="model", commit_message=commit_message,
        ignore_patterns=list(ignore_patterns),
    ))
    log.info("pushed %s to %s", folder, info.commit_url)
    return info.commit_url
