"""Walls CI keeps standing: the package's shape, checked on its source (no import, no run).

* no private Optuna or MLflow API: no ``._name`` attribute of another object, no import of a
  private module or name of theirs, no raw SQL on MLflow's own tables (one bounded exception,
  listed below with its reason);
* ``class Study`` (the coordinator) stays within 120 lines, and every module within 400;
* every module of the package is in a layer of the import-linter contract
  (``pyproject.toml``), which ``lint-imports`` checks, and the same layers are listed in
  ``docs/architecture.md``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mlops_tune"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 400
MAX_STUDY_LINES = 120
#: the public API of named tuples starts with an underscore
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make",
                  "_exit"}  # os._exit: public (an exit without cleanup), the stop deadline's last resort
#: SQL that names one of MLflow's own tables
MLFLOW_SQL = re.compile(r"\b(FROM|INTO|UPDATE|TABLE)\s+(experiments|experiment_tags|runs|metrics|latest_metrics|"
                        r"params|tags|alembic_version|registered_models|model_versions|logged_models)\b", re.I)
#: (module, function) allowed MLflow SQL, each with why no public way exists
MLFLOW_SQL_EXCEPTIONS = {
    # a new SQLite store is seeded from a migrated, empty copy (MLflow's ~60 migrations take ~3 s per
    # new store): the copy must lose MLflow's Default experiment, whose artifact root would point
    # into the cache. No public API deletes an experiment for good. Bounded by mlflow<4 in pyproject.
    ("mlops_tune/records/stores.py", "_template"),
}


#: (module, private name) allowed, each with why no public way exists
PRIVATE_EXCEPTIONS = {
    # MLflow maps every installed distribution to its modules on the first log_model (~1 s, inside a
    # trial); mlops_tune.records.tracking.warm_model_logging fills that cache while a model trains. No public
    # API warms it; if the helper moves, log_model does the work itself. Bounded by mlflow<4 in pyproject.
    ("mlops_tune/records/tracking.py", "_init_packages_to_modules_map"),
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def private_uses(path: Path) -> list[str]:
    """``file:line what`` for each private Optuna/MLflow use (or another object's private attribute)."""
    found = []
    rel = path.relative_to(ROOT).as_posix()
    functions = [node for node in ast.walk(_tree(path)) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]

    def function_of(node: ast.AST) -> str:
        line = getattr(node, "lineno", 0)
        inside = [f for f in functions if f.lineno <= line <= (f.end_lineno or f.lineno)]
        return max(inside, key=lambda f: f.lineno).name if inside else ""

    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                and node.attr not in NAMEDTUPLE_API \
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            found.append(f"{rel}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("optuna", "mlflow"):
            private = [p for p in node.module.split(".") if p.startswith("_")]
            private += [a.name for a in node.names if a.name.startswith("_")
                        and (rel, a.name) not in PRIVATE_EXCEPTIONS]
            if private:
                found.append(f"{rel}:{node.lineno} from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("optuna", "mlflow") and any(
                        p.startswith("_") for p in alias.name.split(".")):
                    found.append(f"{rel}:{node.lineno} import {alias.name}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MLFLOW_SQL.search(node.value) \
                and (rel, function_of(node)) not in MLFLOW_SQL_EXCEPTIONS:
            found.append(f"{rel}:{node.lineno} SQL on MLflow's tables: {node.value[:60]!r}")
    return found


def test_no_private_optuna_or_mlflow_api_in_the_package() -> None:
    found = [use for path in MODULES for use in private_uses(path)]
    assert found == [], "private API (use the public one, or add a bounded exception here):\n" + "\n".join(found)


@pytest.mark.parametrize("source, words", [
    ("x = study._storage", "._storage"),
    ("from optuna.storages._heartbeat import get_heartbeat_thread", "optuna.storages._heartbeat"),
    ("from mlflow.utils import _get_fully_qualified_class_name", "_get_fully_qualified_class_name"),
    ("import mlflow.store._unity_catalog", "mlflow.store._unity_catalog"),
    ("q = 'DELETE FROM experiments WHERE experiment_id = 0'", "SQL on MLflow's tables"),
])
def test_the_private_api_check_finds_each_kind(tmp_path: Path, source: str, words: str) -> None:
    """The check above fails when the package breaks the rule (each kind written on purpose)."""
    bad = ROOT / "mlops_tune" / f"_wall_probe_{tmp_path.name}.py"
    try:
        bad.write_text(f"def f(study):\n    {source}\n")
        found = private_uses(bad)
    finally:
        bad.unlink()
    assert len(found) == 1 and words in found[0], found


def study_class_lines() -> int:
    path = PACKAGE / "study" / "coordinator.py"
    classes = [n for n in _tree(path).body if isinstance(n, ast.ClassDef) and n.name == "Study"]
    assert len(classes) == 1, "class Study is no longer in mlops_tune/study/coordinator.py: move this check with it"
    return int(classes[0].end_lineno or 0) - classes[0].lineno + 1


def test_the_study_class_and_every_module_stay_small() -> None:
    assert study_class_lines() <= MAX_STUDY_LINES, f"class Study is {study_class_lines()} lines"
    long = {path.relative_to(ROOT).as_posix(): n for path in MODULES
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: {long}"


def layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    contract = next(c for c in config if c["type"] == "layers")
    return [[name.strip() for name in layer.split("|")] for layer in contract["layers"]]


def unlayered() -> list[str]:
    names = [name for layer in layers() for name in layer]
    return [module for module in map(_module, MODULES) if module != "mlops_tune"
            and not any(module == name or module.startswith(name + ".") for name in names)]


def test_every_module_is_in_a_layer_and_the_docs_list_the_same_layers() -> None:
    assert unlayered() == [], f"modules in no import-linter layer (pyproject.toml): {unlayered()}"
    docs = (ROOT / "docs" / "architecture.md").read_text()
    listed = re.findall(r"^\d+\. (.+)$", docs.split("## Which way imports go", 1)[1].split("\n## ", 1)[0], re.M)
    assert [sorted(n.strip(" `") for n in line.split("|")) for line in listed] == \
        [sorted(n.removeprefix("mlops_tune.") for n in layer) for layer in layers()], \
        "docs/architecture.md ('Which way imports go') must list pyproject.toml's layers"


def test_the_layer_check_finds_a_module_in_no_layer() -> None:
    stray = PACKAGE / "stray_module_for_the_wall_test.py"
    try:
        stray.write_text("")
        MODULES.append(stray)
        assert unlayered() == ["mlops_tune.stray_module_for_the_wall_test"]
    finally:
        MODULES.remove(stray)
        stray.unlink()
