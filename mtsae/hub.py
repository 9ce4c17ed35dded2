"""Fast, short failures when the Hugging Face hub cannot be used.

Before a model, tokenizer or dataset named by its hub id is loaded, :func:`check_hub` decides once per
process whether the hub can be used: with ``HF_HUB_OFFLINE=1`` it cannot; otherwise one request with
a short timeout tells (no retries with back-off). When the hub cannot be used and the model is not in
the local Hugging Face cache, :class:`HubUnavailableError` is raised at once; its first line says what
is wrong and the next ones say what to do (``hf download ...``, then point the config at the copy).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["HubUnavailableError", "check_hub", "download_command", "hub_offline", "is_local"]

log = logging.getLogger(__name__)

#: seconds the reachability request may take
PROBE_TIMEOUT_S = 5.0

_probe_result: str | None | bool = False  # False: not probed yet; None: reachable; str: why not


class HubUnavailableError(OSError):
    """The hub cannot be used (offline, unreachable) and the named repository is not available locally."""


def is_local(name: str) -> bool:
    """True when ``name`` is a filesystem path rather than a hub id (``org/name`` or ``name``)."""
    return (
        name.startswith(("/", "./", "../", "~", "."))
        or name.count("/") > 1
        or Path(name).expanduser().exists()
    )


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    return any(
        os.environ.get(k, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _probe() -> str | None:
    """One request to the hub endpoint: None when it answers, else the reason."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(
            urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=PROBE_TIMEOUT_S
        )
    except urllib.error.HTTPError:
        return None  # the hub answered
    except (OSError, ValueError) as err:
        return f"{constants.ENDPOINT} is unreachable ({type(err).__name__}: {err})"
    return None


def _unreachable() -> str | None:
    global _probe_result
    if hub_offline():
        return "HF_HUB_OFFLINE=1 is set"
    if _probe_result is False:
        _probe_result = _probe()
    return _probe_result


def _cached(name: str, revision: str | None, repo_type: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    probe_file = "config.json" if repo_type == "model" else "README.md"
    found = try_to_load_from_cache(name, probe_file, revision=revision, repo_type=repo_type)
    return isinstance(found, str)


def download_command(name: str, repo_type: str = "model") -> str:
    """The ``hf download`` command that makes a local copy of ``name``."""
    local = f"/path/to/local/{Path(name.rstrip('/')).name or repo_type}"
    kind = " --repo-type dataset" if repo_type == "dataset" else ""
    return f"hf download{kind} {name} --local-dir {local}"


def check_hub(
    name: str, what: str, revision: str | None = None, repo_type: str = "model", setting: str = ""
) -> None:
    """Raise :class:`HubUnavailableError` at once if ``name`` needs the hub and the hub cannot be used.

    Args:
        name: a hub id or a local path (local paths pass).
        what: what is being loaded (for the message), e.g. ``"the weights of model_name"``.
        revision: the hub revision.
        repo_type: ``model`` or ``dataset``.
        setting: the config key that names ``name`` (e.g. ``data.source.init_args.model_name``).
    """
    if is_local(name):
        return
    why = _unreachable()
    if why is None:
        return
    if _cached(name, revision, repo_type):
        log.info("%s; using the local Hugging Face cache for %s", why, name)
        return
    point = (
        f"then set {setting}: /path/to/local/{Path(name).name}" if setting else "then pass the local folder"
    )
    raise HubUnavailableError(
        f"cannot load {what} {name!r}: {why} and it is not in the local Hugging Face cache.\n"
        f"Download it once on a machine with network access (`{download_command(name, repo_type)}`; gated "
        f"models such as Gemma need their license accepted on the hub and HF_TOKEN), copy it here, and "
        f"{point}."
    )
