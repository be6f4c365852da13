"""Upload a finished export to the Hugging Face Hub."""

from __future__ import annotations

import logging
from pathlib import Path

from adamerge.errors import MergeInputError

log = logging.getLogger(__name__)


class UploadError(MergeInputError):
    """The upload to the Hub failed; the local export is complete."""


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "adamerge export",
) -> str:
    """Upload a finished export folder to the Hub model repo ``repo_id`` (created if missing; ``revision``: a
    branch, created if missing), with the token ``huggingface_hub`` finds (``HF_TOKEN``, ``hf auth login``).
    Returns the commit URL. Untested against the live Hub (no network where adamerge is tested): the calls are."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
        )
    except Exception as e:  # network, auth, permissions: huggingface_hub raises many types
        retry = f"hf upload {repo_id} {folder} ." + (f" --revision {revision}" if revision else "")
        raise UploadError(
            f"upload of {folder} to the Hub repo {repo_id!r} failed ({type(e).__name__}: {e}); the "
            f"export is complete at {folder}: retry with `{retry}`"
        ) from e
    url = str(getattr(info, "commit_url", None) or info)
    log.info("uploaded %s to %s", folder, url)
    return url
