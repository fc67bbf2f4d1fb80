"""Format name -> adapter, for the `xcam import-labels` command."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl

from xcam_assets.ingest.adapters.generic import read_canonical_csv, read_coco
from xcam_assets.ingest.adapters.nih import read_nih
from xcam_assets.ingest.adapters.rsna import read_rsna
from xcam_assets.ingest.adapters.siim import read_siim
from xcam_assets.ingest.adapters.tbx11k import read_tbx11k
from xcam_assets.ingest.adapters.vindr import read_vindr

FORMATS: dict[str, tuple[Callable[..., pl.DataFrame], str]] = {
    "siim": (read_siim, "train-rle.csv"),
    "nih": (read_nih, "Data_Entry_2017.csv [BBox_List_2017.csv]"),
    "rsna": (read_rsna, "stage_2_train_labels.csv(.zip)"),
    "vindr": (read_vindr, "train.csv"),
    "tbx11k": (read_tbx11k, "TBX11K folder (images/, annotations/)"),
    "csv": (read_canonical_csv, "canonical labels.csv"),
    "coco": (read_coco, "COCO instances .json"),
}


def read_labels(fmt: str, *sources: str | Path) -> pl.DataFrame:
    """Adapter rows of `fmt` read from `sources` (see FORMATS for what each expects)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown label format {fmt!r} (known: {', '.join(FORMATS)})")
    return FORMATS[fmt][0](*[Path(s) for s in sources])
