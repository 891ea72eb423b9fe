"""Provenance of reference rewards: how they were made, recorded by `build_reference_rewards` and checked by
`CTRLTrainer` against its own settings (work in progress)."""

from __future__ import annotations


def check_reference_provenance(trainer, dataset, split: str) -> None:
    """Compare the provenance recorded in `dataset` with `trainer`'s settings (see `CTRLConfig.reference_provenance_check`)."""
    return None
