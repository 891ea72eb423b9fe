"""Hub uploads of a CTRL run that fail without losing anything or leaking the token (Train layer).

Offline, not logged in or without permission, `push_to_hub` and the repo creation fail fast; the trainer has saved
the model, tokenizer and card locally first, and the error (`HubUploadError`) says why, with every token redacted,
and where the finished output is.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


class HubUploadError(RuntimeError):
    """The Hub could not be reached or refused the upload; the local output directory is complete."""


def local_copy_note(output_dir) -> str:
    return (
        f"The model, tokenizer and model card are saved locally in {Path(output_dir).resolve()}; "
        "upload them later with `trainer.push_to_hub()` or `hf upload <repo_id> <output_dir>` once you are online "
        "and logged in."
    )


def hub_failure(args, error: Exception, what: str) -> HubUploadError:
    """A `HubUploadError` for `error`, with `args.hub_token` and the token environment variables redacted."""
    secrets = [s for s in (args.hub_token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")) if s]
    reason = f"{type(error).__name__}: {error}"
    for secret in secrets:
        reason = reason.replace(secret, "***")
    return HubUploadError(f"{what} failed ({reason}). {local_copy_note(args.output_dir)}")


@contextmanager
def hub_token_redacted(args):
    """`args.hub_token` is None inside the block (the Trainer pickles `args` into training_args.bin at every save)."""
    token = args.hub_token
    args.hub_token = None
    try:
        yield
    finally:
        args.hub_token = token
