"""The synthetic demo cohort, arrived: written into the project's incoming folder with
every batch marked complete (`.complete`), as an upload finishes. One helper for the
tests that run the lineage on it."""

from __future__ import annotations

from pathlib import Path

from xcam_assets.demo import write_demo_cohort


def arrived_demo_cohort(s, n_images: int, size: int = 128, n_batches: int = 2) -> list[Path]:
    """Write `n_images` demo DICOMs in `n_batches` batches of `size` px into
    `s.incoming_dir` (seeded by `s.seed`, lesions labelled as `s.findings[0]`) and mark
    each batch complete; returns the batch folders."""
    batches = write_demo_cohort(s.incoming_dir, n_images=n_images, n_batches=n_batches,
                                size=size, seed=s.seed, finding=s.findings[0])
    for b in batches:
        (b / ".complete").touch()
    return batches
