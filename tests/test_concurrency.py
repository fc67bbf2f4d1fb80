"""Two arrival batches ingested and preprocessed by concurrent runs against one SQLite
instance give what running them one after the other gives.

Two long-lived worker processes (tests/batch_worker.py) share one project: at the same
moment each runs one batch's raw copy, inventory, findings and CLAHE tensors as a
Dagster run under the multiprocess executor (a process per step, forked from a
forkserver with xcam's definitions preloaded), then commits the DVC stages as the
`dvc_commit_after_run` sensor does (DVC serialised by xcam's lock, the other run possibly
still writing). The second batch holds a byte-identical copy of a file of the first, so
the batches are not independent: whichever inventory runs second must quarantine its
copy as a duplicate. A concurrent outcome is right when it equals a serial one (batch 1
then 2, or 2 then 1, computed in-process here): the same raw copies, inventories,
findings and tensors, byte for byte, with exactly one copy admitted. The `ingest` pool
(limit 1) must have run the raw copies and the inventories of the two runs one at a
time (checked from the step events). Every run succeeds, no pool slot stays held, no
output says "database is locked" or reports a DVC lock error, and `dvc status` finds the
committed stages up to date.

Five concurrent iterations (about 14 s each on 2 cores; the first also starts the
forkservers); the project, its instance and dvc.lock are reset between them, the
workers (and their imports) kept. A fresh instance is opened by both workers at once
in every iteration: xcam opens it under a lock (orchestrate.project_instance), without
which one of them fails with "table run_tags already exists".
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from automation.harness import DVC, dvc, make_project, project_env, xcam
from kill_harness import digests, environment

from xcam_assets.automation import INGEST_ASSETS
from xcam_assets.config import load_settings
from xcam_assets.definitions import ASSETS
from xcam_assets.demo import write_demo_cohort
from xcam_assets.project import XcamProject, batch_partitions

pytestmark = pytest.mark.slow

ITERATIONS = 5
TESTS = Path(__file__).resolve().parent
OUTPUTS = ["raw", "inventory", "findings", "tensors"]
DUPLICATE = "copy_of_first_image.dcm"
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
LOCK_ERRORS = ("database is locked", "lockerror", "unable to acquire lock", "is busy")


class Worker:
    def __init__(self, name: str, root: Path, logs: Path) -> None:
        self.name, self.log = name, logs / f"worker-{name}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(TESTS / "batch_worker.py")], cwd=root,
                env=project_env(root, OMP_NUM_THREADS="1", XCAM_LOG_LEVEL="DEBUG"),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                start_new_session=True)
        self.expect("ready")

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, word: str) -> list[str]:
        line = self.proc.stdout.readline()
        if not line.startswith(word):
            pytest.fail(f"worker {self.name} said {line!r}, not {word!r}:\n"
                        f"{self.log.read_text(errors='replace')[-5000:]}")
        return line.split()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.send("quit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _cohort(root: Path) -> tuple[list[str], str]:
    """24 synthetic images in 2 batches; batch 2 also holds a copy of a negative image
    of batch 1 (same bytes, same SOP Instance UID), labelled the same."""
    with environment(project_env(root)):
        s = load_settings()
        batches = write_demo_cohort(s.incoming_dir, n_images=24, n_batches=2, size=64,
                                    seed=s.seed, finding=s.findings[0])
    first, second = batches
    rows = list(csv.DictReader((first / "labels.csv").open()))
    negative = next(r for r in rows if r["present"] == "0")
    shutil.copy(first / negative["file"], second / DUPLICATE)
    with (second / "labels.csv").open("a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=list(rows[0])).writerow({**negative, "file": DUPLICATE})
    for b in batches:
        (b / ".complete").touch()
    return [b.name for b in batches], negative["file"]


def _reset(root: Path) -> None:
    """Back to a project with only the incoming batches (data, instance, dvc.lock)."""
    for folder in OUTPUTS:
        shutil.rmtree(root / "data" / folder, ignore_errors=True)
    for entry in (root / "dagster_home").iterdir():
        if entry.name != "dagster.yaml":
            (shutil.rmtree if entry.is_dir() else Path.unlink)(entry)
    (root / "dvc.lock").unlink(missing_ok=True)


def _outputs(root: Path) -> dict[str, str]:
    return {f"{folder}/{rel}": digest for folder in OUTPUTS
            for rel, digest in digests(root / "data" / folder).items()}


def _check_instance(root: Path) -> None:
    with environment(project_env(root)), dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert len(runs) == 2 and {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
        assert not instance.event_log_storage.get_concurrency_run_ids(), "pool slots held"


def _admitted_copies(root: Path, batches: list[str], original: str) -> list[str]:
    inv = pl.concat([pl.read_parquet(root / "data" / "inventory" / f"{b}.parquet")
                     for b in batches])
    sha = inv.filter(pl.col("file") == original)["sha256"][0]
    return sorted(f"{r['batch']}/{r['file']}" for r in inv.filter(
        (pl.col("sha256") == sha) & (pl.col("status") == "ok")).iter_rows(named=True))


@pytest.fixture
def workers(tmp_path: Path):
    if not DVC.exists():
        pytest.skip(f"DVC is not installed at {DVC} (make setup)")
    root = make_project(tmp_path / "project", with_code=True)
    params = root / "resources" / "params.yaml"  # CLAHE in the step process: no pool of
    params.write_text(params.read_text().replace("workers: 0", "workers: 1"))  # its own
    dvc(root, "init", "--no-scm", "-q")
    dvc(root, "config", "core.analytics", "false")
    batches, original = _cohort(root)
    logs = tmp_path / "logs"
    logs.mkdir()
    started = [Worker(name, root, logs) for name in ("a", "b")]
    try:
        yield root, batches, original, dict(zip(batches, started, strict=True))
    finally:
        for w in started:
            w.stop()


def test_concurrent_batches_equal_a_serial_order(workers) -> None:
    root, batches, original, by_batch = workers
    admitted_first = {batches[0]: [f"{batches[0]}/{original}"],
                      batches[1]: [f"{batches[1]}/{DUPLICATE}"]}

    def serial(order: list[str]) -> tuple[dict[str, str], list[str]]:
        """The reference: one batch after the other, in-process in this process."""
        _reset(root)
        with environment(project_env(root)), dg.DagsterInstance.get() as instance:
            instance.add_dynamic_partitions(batch_partitions.name, order)
            for batch in order:
                assert dg.materialize(ASSETS, selection=dg.AssetSelection.assets(*INGEST_ASSETS),
                                      partition_key=batch, instance=instance,
                                      resources={"xcam": XcamProject()}, run_config=QUIET).success
        return _outputs(root), _admitted_copies(root, batches, original)

    def concurrent() -> tuple[dict[str, str], list[str]]:
        _reset(root)
        t0 = time.monotonic()
        for batch in batches:
            by_batch[batch].send(f"run {batch}")
        answers = [by_batch[b].expect("done") for b in batches]
        print(f"two batches, concurrent runs: {time.monotonic() - t0:.1f}s")
        for _, batch, status, dvc_code in answers:
            assert status == "SUCCESS", f"run of {batch}: {status}"
            assert dvc_code == "0", f"dvc commit after {batch}: exit {dvc_code}"
        _check_instance(root)
        return _outputs(root), _admitted_copies(root, batches, original)

    references = {}
    for order in (batches, batches[::-1]):
        references[order[0]], admitted = serial(order)
        assert admitted == admitted_first[order[0]]  # the later batch's copy: quarantined
    orders = []
    for _ in range(ITERATIONS):
        outputs, admitted = concurrent()
        first = [b for b, ref in references.items() if ref == outputs]
        assert first, "concurrent outputs equal neither serial order; differing: " + ", ".join(
            sorted(k for k in outputs.keys() | references[batches[0]].keys()
                   if outputs.get(k) != references[batches[0]].get(k)))
        assert admitted == admitted_first[first[0]]
        orders.append(first[0])
    # the two commits of the last iteration left DVC consistent with the outputs
    status = xcam(root, "dvc", "status", "ingest", "preprocess")
    assert "up to date" in status, status
    logs = "\n".join(p.read_text(errors="replace").lower()
                     for p in sorted((root.parent / "logs").glob("*.log")))
    for phrase in LOCK_ERRORS:
        assert phrase not in logs, f"{phrase!r} in a worker's output"
    print(f"concurrent iterations equal the serial order starting with {orders}")
