"""``model.pretrained = true``: timm's hub download, without hanging on an offline machine.

Offline, huggingface_hub retries for most of a minute before failing, so the hub is probed first (with a
short timeout) and, when it is unreachable and the weights are not already cached, the user is told to
pass a local ``--weights`` file instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch

from ftsgd.errors import ModelError

__all__ = ["looks_like_download_error", "no_hub_error", "pretrained_overlay"]

_PROBE_TIMEOUT_S = 3.0
"""How long the hub connectivity probe may take before the hub counts as unreachable."""


def no_hub_error(name: str, why: str) -> ModelError:
    return ModelError(
        f"cannot download pretrained weights for {name!r}: {why}. Pass a local weights file instead "
        'with --weights PATH (model.weights = "PATH"): a .safetensors or PyTorch .pth/.bin file '
        "fetched on a machine with internet access"
    )


def _reachable(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds within ``timeout`` seconds.

    Runs in a daemon thread because name resolution ignores socket timeouts; on a black-holed
    network it could otherwise block far longer than the probe is meant to take.
    """
    ok = threading.Event()

    def probe() -> None:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except Exception:  # any failure (DNS, refused, timeout) means "not reachable"
            return
        sock.close()
        ok.set()

    thread = threading.Thread(target=probe, name="ftsgd-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return ok.is_set()


def _probe_target(url: str) -> tuple[str, int]:
    """Host and port a download of ``url`` connects to first (the proxy, if one is configured)."""
    scheme = urlparse(url).scheme or "https"
    proxy = os.environ.get(f"{scheme}_proxy") or os.environ.get(f"{scheme.upper()}_PROXY")
    parsed = urlparse(proxy if proxy else url)
    default_port = 443 if (parsed.scheme or scheme) == "https" else 80
    return parsed.hostname or "", parsed.port or default_port


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cached_pretrained_file(pcfg: Mapping[str, Any]) -> str | None:
    """Path of already-downloaded pretrained weights in the hub or torch cache, if any."""
    hub_id = pcfg.get("hf_hub_id")
    if hub_id:
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            repo, _, revision = str(hub_id).partition("@")
            filenames = [pcfg["hf_hub_filename"]] if pcfg.get("hf_hub_filename") else []
            filenames += ["model.safetensors", "pytorch_model.bin"]
            for filename in filenames:
                found = try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    url = pcfg.get("url")
    if url and not hub_id:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if candidate.is_file():
            return str(candidate)
    return None


def pretrained_overlay(name: str) -> dict[str, Any]:
    """Decide how ``pretrained=True`` gets its weights without hanging on an offline machine.

    Returns a ``pretrained_cfg_overlay`` for ``timm.create_model``: ``{"file": cached}`` when the weights
    are already cached (so timm never touches the network), else ``{}`` after checking that the
    download source answers.

    Raises:
        ModelError: timm has no pretrained weights for the model, or they are not cached and the
            source is unreachable (or ``HF_HUB_OFFLINE`` is set).
    """
    if name.startswith("local-dir:"):
        return {}
    if name.startswith("hf-hub:"):
        pcfg: Mapping[str, Any] = {"hf_hub_id": name.removeprefix("hf-hub:")}
    else:
        found = None
        with contextlib.suppress(Exception):
            found = timm.models.get_pretrained_cfg(name)
        pcfg = found.to_dict() if found is not None else {}
        if not (pcfg.get("hf_hub_id") or pcfg.get("url") or pcfg.get("file")):
            raise ModelError(
                f"timm has no pretrained weights for {name!r}; pass a local weights file with "
                "--weights PATH (model.weights), or train from scratch with pretrained = false"
            )
        if pcfg.get("file"):
            return {}
        cached = _cached_pretrained_file(pcfg)
        if cached:
            return {"file": cached}
    if pcfg.get("hf_hub_id"):
        if _env_flag("HF_HUB_OFFLINE"):
            raise no_hub_error(name, "HF_HUB_OFFLINE is set and the weights are not in the local cache")
        url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    else:
        url = str(pcfg["url"])
    host, port = _probe_target(url)
    if not _reachable(host, port, _PROBE_TIMEOUT_S):
        raise no_hub_error(name, f"{host}:{port} is unreachable (offline?) and the weights are not cached")
    return {}


def looks_like_download_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return isinstance(exc, OSError) or module.startswith(("huggingface_hub", "urllib", "requests", "httpx"))
