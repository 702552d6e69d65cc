"""Names on the Hugging Face hub: telling them from local paths, and failing at once when one cannot be had.

A name goes to the hub when it reads 'owner/name' in the hub's characters (dots allowed: Qwen/Qwen3-0.6B,
meta-llama/Llama-3.1-8B; models also take a bare legacy name, gpt2) and nothing local answers to it: no such path, no leading '.', and no local folder
'owner' (data/reward while ./data exists is a mistyped path, not a hub name). Before anything loads, each hub name
is looked up in the local hub cache. One that is missing needs the hub: with HF_HUB_OFFLINE set, or with the hub
unreachable (one short probe instead of huggingface_hub's ~50 s of retries per name, measured), that is one line
saying how to fix it. When the hub is unreachable but every name is cached, the process goes offline and loads
from the cache (otherwise each cached file would still wait out the retries).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from rm.config import ConfigError

HUB_NAME = re.compile(r"([A-Za-z0-9_-][A-Za-z0-9_.-]*/)?[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # owner/ optional: gpt2
PROBE_TIMEOUT_S = 3.0
OFFLINE = "HF_HUB_OFFLINE is set"


def is_hub_name(location: str) -> bool:
    """'owner/name' (or a bare legacy name such as gpt2) that cannot be a local path (see the module docstring)."""
    return (HUB_NAME.fullmatch(location) is not None and not Path(location).exists()
            and not Path(location.split("/")[0]).exists())


def cache_root(cache_dir: str | None) -> Path:
    """The hub cache transformers and huggingface_hub read: cache_dir when given (their cache_dir argument), else
    HF_HUB_CACHE (HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE)


def cached_snapshot(name: str, repo_type: str, cache_dir: str | None = None) -> Path | None:
    """The cached snapshot folder of `name`'s main revision (repo_type 'model' or 'dataset'), or None."""
    repo = cache_root(cache_dir) / f"{repo_type}s--{name.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = repo / "snapshots" / ref.read_text().strip()
    return snapshot if snapshot.is_dir() else None


@functools.cache
def hub_unavailable() -> str | None:
    """Why the hub cannot be asked (HF_HUB_OFFLINE, or no answer to one HEAD request within PROBE_TIMEOUT_S), or
    None when it can. Asked once per process."""
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return OFFLINE
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001  (no DNS, refused, timed out, proxy: all mean the same here)
        return f"the hub ({constants.ENDPOINT}) cannot be reached: {type(err).__name__}: {err}"
    return None


def go_offline() -> None:
    """Load hub names from the cache only, in this process and those it starts."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # what huggingface_hub and transformers consult at each call
    os.environ["HF_HUB_OFFLINE"] = "1"


def why_unavailable(name: str, repo_type: str, cache_dir: str | None = None) -> str | None:
    """Why hub repo `name` ('model' or 'dataset') cannot be had, with the fix: not in the cache while the hub cannot
    be asked. None when it can be had; when it is cached and the hub is unreachable, the process goes offline."""
    if cached_snapshot(name, repo_type, cache_dir) is not None:
        reason = hub_unavailable()
        if reason not in (None, OFFLINE) and os.environ.get("HF_HUB_OFFLINE") != "1":  # not yet gone offline
            if os.environ.get("RANK", "0") == "0":
                print(f"{reason}; loading {name} and the other hub names from the hub cache (offline)")
            go_offline()
        return None
    reason = hub_unavailable()
    if reason is None:
        return None
    download = f"hf download {name}" + (" --repo-type dataset" if repo_type == "dataset" else "")
    fix = "unset HF_HUB_OFFLINE" if reason == OFFLINE else "connect this machine (or set HF_ENDPOINT to a mirror)"
    return (f"not in the hub cache ({cache_root(cache_dir)}) and {reason}: {fix}, download it where there is "
            f"network (`{download}` into the same HF_HOME), or pass a local path")


def check_hub_model(name: str, setting: str, cache_dir: str | None = None) -> None:
    """ConfigError (one line) when hub model `name` cannot be had (why_unavailable)."""
    problem = why_unavailable(name, "model", cache_dir)
    if problem:
        raise ConfigError(f"{setting} {name}: {problem}")


def dataset_snapshot(name: str, cache_dir: str | None = None) -> Path:
    """The local folder of hub data set `name`: downloaded (or updated) when the hub answers, else the cached one.
    Raises ConfigError (one line) when it cannot be had."""
    from huggingface_hub import snapshot_download

    problem = why_unavailable(name, "dataset", cache_dir)
    if problem:
        raise ConfigError(problem)
    try:
        return Path(snapshot_download(name, repo_type="dataset", cache_dir=cache_dir))
    except Exception as err:  # noqa: BLE001  (unknown repo, gated, network gone: one line)
        text = str(err).strip()
        raise ConfigError(f"not downloadable from the hub ({text.splitlines()[0] if text else type(err).__name__})") \
            from None
