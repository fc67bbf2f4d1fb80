"""The house rules, read from the imports (ast) so they stay true:

* no import circle between xcam_assets modules (imports inside functions count too);
* stages import only themselves, earlier stages and the base modules:
  base < ingest < preprocess < train < explain < evaluate < orchestration/CLI;
* what is imported from an asset or check module is a Dagster definition (an asset, a
  check, a partitions definition), never a helper;
* the stages' science modules (everything but `assets.py` / `checks.py`) do not import
  Dagster at all;
* every asset body is at most 40 lines (the science lives in the stage modules).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import dagster as dg

PACKAGE = Path(__file__).resolve().parent.parent / "xcam_assets"
STAGES = ["ingest", "preprocess", "train", "explain", "evaluate"]
TOP = {"xcam_assets.definitions", "xcam_assets.automation", "xcam_assets.orchestrate",
       "xcam_assets.cli"}
DAGSTER_FACES = {"assets", "checks"}
MAX_ASSET_BODY_LINES = 40


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def rank(module: str) -> int:
    """0 for base modules, 1..5 for the stages in lineage order, 6 for the top."""
    if module in TOP:
        return len(STAGES) + 1
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in STAGES:
        return STAGES.index(parts[1]) + 1
    return 0


def imports_of(module: str) -> list[tuple[str, list[str], int]]:
    """(imported xcam module, names, line) for every import statement in `module`."""
    tree = ast.parse(MODULES[module].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("xcam_assets"):
                continue
            names = [a.name for a in node.names]
            # `from xcam_assets.train import zoo` imports the module xcam_assets.train.zoo
            subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
            if subs:
                found += [(m, [], node.lineno) for m in subs]
            else:
                found.append((node.module, names, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names
                      if a.name.startswith("xcam_assets")]
    return found


def dagster_imports(module: str) -> list[int]:
    tree = ast.parse(MODULES[module].read_text())
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module == "dagster" or node.module.startswith("dagster.")):
            lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(
                a.name == "dagster" or a.name.startswith("dagster.") for a in node.names):
            lines.append(node.lineno)
    return lines


def test_the_module_table_is_what_the_rules_assume() -> None:
    assert {"xcam_assets.train.stage", "xcam_assets.explain.stage", "xcam_assets.stats",
            "xcam_assets.evaluate.stage", "xcam_assets.ingest.stage"} <= set(MODULES)
    assert rank("xcam_assets.stats") == 0 and rank("xcam_assets.train.loop") == 3
    assert rank("xcam_assets.orchestrate") == 6
    # an import in a function body is seen too
    assert ("xcam_assets.orchestrate", ["ORDER", "StageFailed", "materialize_all",
                                        "materialize_stage"]) in [
        (m, n) for m, n, _ in imports_of("xcam_assets.cli")]


def test_no_import_circle() -> None:
    graph = {m: {target for target, _, _ in imports_of(m) if target in MODULES}
             for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # a package __init__ importing nothing of its own is fine; any cycle is not
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_no_import_against_the_lineage() -> None:
    wrong = [f"{m}:{line} imports {target} ({rank(m)} < {rank(target)})"
             for m in MODULES for target, _, line in imports_of(m)
             if target in MODULES and rank(target) > rank(m)]
    assert not wrong, "\n".join(wrong)


def test_only_dagster_definitions_come_from_asset_and_check_modules() -> None:
    wrong = []
    for m in MODULES:
        for target, names, line in imports_of(m):
            if target.rsplit(".", 1)[-1] not in DAGSTER_FACES:
                continue
            mod = importlib.import_module(target)
            for name in names:
                obj = getattr(mod, name)
                if not isinstance(obj, dg.AssetsDefinition | dg.AssetChecksDefinition
                                  | dg.PartitionsDefinition):
                    wrong.append(f"{m}:{line} imports {name} ({type(obj).__name__}) "
                                 f"from {target}")
    assert not wrong, "\n".join(wrong)


def test_stage_science_modules_do_not_import_dagster() -> None:
    science = [m for m in MODULES if rank(m) in range(1, len(STAGES) + 1)
               and m.rsplit(".", 1)[-1] not in DAGSTER_FACES]
    assert "xcam_assets.train.stage" in science and "xcam_assets.evaluate.tables" in science
    wrong = [f"{m}:{lines}" for m in science if (lines := dagster_imports(m))]
    assert not wrong, wrong


def asset_bodies() -> list[tuple[str, str, int]]:
    """(module, function, body lines without the docstring) of every @dg.asset."""
    out = []
    for stage in STAGES:
        name = f"xcam_assets.{stage}.assets"
        tree = ast.parse(MODULES[name].read_text())
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef):
                continue
            decorated = any("asset" in ast.unparse(d).split("(")[0] for d in node.decorator_list)
            if not decorated:
                continue
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]
            out.append((name, node.name, body[-1].end_lineno - body[0].lineno + 1))
    return out


def test_every_asset_body_is_short() -> None:
    bodies = asset_bodies()
    assert {b[1] for b in bodies} >= {"raw_dicoms", "dicom_inventory", "findings",
                                      "cohort_splits", "clahe_tensors", "checkpoints",
                                      "heatmap_sets", "metric_tables"}
    long = [b for b in bodies if b[2] > MAX_ASSET_BODY_LINES]
    assert not long, long
