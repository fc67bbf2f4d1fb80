"""The thin Great Expectations adapter behind every table/tensor asset check.

Suites are declared in `resources/expectations/<suite>.yaml` as a list of
`{type: expect_..., kwargs: {...}}`. GE 1.x has no polars datasource, so polars
frames are validated through `to_pandas()` (see ../shared/ENVIRONMENT.md). The
dagster-ge integration is stuck on GE < 1.0, hence this adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from xcam_assets.config import Settings

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@dataclass
class SuiteOutcome:
    suite: str
    success: bool
    n_rows: int
    failures: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        if self.success:
            return f"suite {self.suite}: all expectations met on {self.n_rows} rows"
        parts = [
            f"{f['expectation']}({f.get('column', '')}): {f['unexpected_count']} unexpected, "
            f"e.g. {f['examples']}"
            for f in self.failures
        ]
        return f"suite {self.suite} failed on {self.n_rows} rows: " + "; ".join(parts)


def load_suite_config(suite_path: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load(suite_path.read_text())
    if not isinstance(spec, list):
        raise ValueError(f"{suite_path}: an expectation suite is a YAML list of {{type, kwargs}}")
    return spec


@lru_cache(maxsize=1)
def _context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = ctx.data_sources.add_pandas("xcam")
    asset = source.add_dataframe_asset(name="frame")
    return asset.add_batch_definition_whole_dataframe("whole")


def validate_frame(frame: Any, suite_path: Path, extra: list[dict] | None = None) -> SuiteOutcome:
    """Validate a polars or pandas frame against a YAML suite (+ extra expectations)."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    pdf = frame.to_pandas() if hasattr(frame, "to_pandas") else frame
    spec = load_suite_config(suite_path) + list(extra or [])
    expectations = [
        ExpectationConfiguration(type=e["type"], kwargs=e.get("kwargs", {})).to_domain_obj()
        for e in spec
    ]
    suite = gx.ExpectationSuite(name=suite_path.stem, expectations=expectations)
    batch = _context().get_batch(batch_parameters={"dataframe": pdf})
    result = batch.validate(suite, result_format="SUMMARY")
    failures = []
    for r in result.results:
        if r.success:
            continue
        info = r.result or {}
        exc_info = r.exception_info or {}
        nested = [v for v in exc_info.values() if isinstance(v, dict)]
        exc = exc_info.get("exception_message") or next(
            (v.get("exception_message") for v in nested if v.get("exception_message")), None)
        if exc:
            info = {"unexpected_count": "error", "partial_unexpected_list": [exc[:200]]}
        failures.append({
            "expectation": r.expectation_config.type,
            "column": r.expectation_config.kwargs.get("column", ""),
            "unexpected_count": info.get("unexpected_count", info.get("observed_value")),
            "examples": [str(v) for v in (info.get("partial_unexpected_list") or [])[:5]],
        })
    return SuiteOutcome(suite=suite_path.stem, success=bool(result.success),
                        n_rows=len(pdf), failures=failures)


def suite(settings: Settings, name: str) -> Path:
    """The path of suite `name` under the project's resources/expectations/."""
    return settings.root / "resources" / "expectations" / f"{name}.yaml"


def ge_result(outcome: SuiteOutcome, **metadata: Any) -> dg.AssetCheckResult:
    """A suite's outcome as the asset check's result (failures in the metadata)."""
    return dg.AssetCheckResult(
        passed=outcome.success,
        description=outcome.summary(),
        metadata={"suite": outcome.suite, "n_rows": outcome.n_rows,
                  "failures": dg.MetadataValue.json(outcome.failures), **metadata},
    )
