"""Hugging Face Hub ids where a local directory is expected: `--hf-dir`, `model.load`, `data.tokenizer`.

`owner/name` or `owner/name@revision` (a branch, tag or commit) that is not an existing local path
is fetched with `huggingface_hub.snapshot_download` into the standard cache and replaced by the
snapshot directory. huggingface_hub's environment applies: `HF_TOKEN` (gated/private models),
`HF_HUB_CACHE` / `HF_HOME` (cache location), `HF_HUB_OFFLINE=1` (cache only, no network).
A local path always wins over a hub id of the same spelling.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# A repo id: one "/" between two names of letters, digits, "-", "_", "."; optional "@revision".
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")

MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
               "pytorch_model*.bin", "pytorch_model.bin.index.json", "model.yaml", "weights/*", "hf/*"]
TOKENIZER_FILES = ["tokenizer*", "*.model", "special_tokens_map.json", "vocab*", "merges.txt",
                   "added_tokens.json", "tokenizer/*"]


class HubError(ValueError):
    """A hub id that cannot be resolved; the message is one line."""


def parse_hub_id(value: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `value` is a hub id and not a local path; else None."""
    if not value or Path(value).exists() or value.startswith((".", "/", "~")):
        return None
    match = _HUB_ID.match(value)
    return (match["repo"], match["revision"]) if match else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str | None:
    """Read at call time (huggingface_hub reads its variables once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def resolve(value: str, *, what: str, files: list[str] | None = None) -> str:
    """A local directory for `value`: itself when local, else the hub snapshot (downloaded or
    cached). `what` names the option for error messages (`--hf-dir`, `model.load`)."""
    parsed = parse_hub_id(value)
    if parsed is None:
        return value
    repo, revision = parsed
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:
        raise HubError(f"{what}: {value} is not a local path, and huggingface_hub (needed for hub ids) "
                       f"is not installed") from None
    cache = _cache_dir() or "the default Hugging Face cache"
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=files, cache_dir=_cache_dir(),
                                 local_files_only=_offline())
    except LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE is set" if _offline() else "the hub could not be reached"
        raise HubError(f"{what}: {value} is not a local path and not in {cache} ({reason}); download it "
                       f"with `huggingface-cli download {repo}` or pass a local directory") from None
    except GatedRepoError:
        raise HubError(f"{what}: {repo} is gated: accept its licence on huggingface.co and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(f"{what}: no hub repository {repo} (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: {repo} has no revision {revision!r}") from None


def resolve_config(config) -> None:
    """Replace hub ids in model.load and data.tokenizer by local snapshot directories (in place)."""
    if config.model.load:
        config.model.load = resolve(config.model.load, what="model.load", files=MODEL_FILES + TOKENIZER_FILES)
        if not (Path(config.model.load) / "model.yaml").is_file() and (Path(config.model.load) / "config.json").is_file():
            raise HubError(f"model.load: {config.model.load} is a Hugging Face model, not a megatron-reft "
                           f"checkpoint; convert it first: megatron-reft convert hf-to-megatron --hf-dir "
                           f"<id or dir> --out ckpt/<name>")
    if config.data.tokenizer:
        config.data.tokenizer = resolve(config.data.tokenizer, what="data.tokenizer", files=TOKENIZER_FILES)
