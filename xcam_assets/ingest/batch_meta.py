"""What a batch says about itself: `batch.yaml` beside its DICOMs (optional).

    role: external        # internal (default): joins the train/val/test split by patient
    site: "Hospital B"    # free text, shown with the batch's results

An **external** batch is data from a site the models never saw (regulators ask for
performance there): it never enters the patient-level split, so training, validation and
test data and the checkpoints stay exactly as they were, and the frozen checkpoints score
it on its own (`external_scores`). The file travels with the batch into the immutable raw
store (DVC-tracked), so the audit shows how a batch was declared. Written by hand: a
two-key YAML file needs no library beyond PyYAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

BATCH_META = "batch.yaml"
ROLES = ("internal", "external")


class BatchMetaError(ValueError):
    """A batch.yaml that cannot be read or says something unknown (names the file)."""


@dataclass(frozen=True)
class BatchMeta:
    role: str = "internal"
    site: str = ""

    @property
    def external(self) -> bool:
        return self.role == "external"


def read_batch_meta(batch_dir: Path) -> BatchMeta:
    """The batch's declaration (`internal` when it has no batch.yaml)."""
    path = Path(batch_dir) / BATCH_META
    if not path.is_file():
        return BatchMeta()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BatchMetaError(f"{path}: not readable YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise BatchMetaError(f"{path}: expected a mapping with role/site, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"role", "site"})
    if unknown:
        raise BatchMetaError(f"{path}: unknown key(s) {unknown} (known: role, site)")
    role = str(raw.get("role", "internal"))
    if role not in ROLES:
        raise BatchMetaError(f"{path}: role {role!r} is not one of {', '.join(ROLES)}")
    return BatchMeta(role=role, site=str(raw.get("site") or ""))


def write_batch_meta(batch_dir: Path, meta: BatchMeta) -> Path:
    """Declare a batch (before its `.complete` marker): written atomically."""
    from xcam_assets.atomic import atomic_write_text

    path = Path(batch_dir) / BATCH_META
    atomic_write_text(path, yaml.safe_dump({"role": meta.role, "site": meta.site},
                                           sort_keys=True))
    return path


def external_batches(raw_dir: Path, batches: list[str]) -> list[str]:
    """The batches (of `batches`, under the raw store `raw_dir`) declared external."""
    return [b for b in batches if read_batch_meta(Path(raw_dir) / b).external]
