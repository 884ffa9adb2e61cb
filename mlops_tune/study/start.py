"""Where a study starts: trial 0 (the base model, or the registry's champion) and trial 1, the
probe (``study.probe=widest``)."""

from __future__ import annotations

from typing import Any

from mlops_tune.records import registry
from mlops_tune.runtime.errors import UsageError
from mlops_tune.workers.plan import Plan


def start_point(plan: Plan) -> tuple[dict[str, Any], str]:
    """Trial 0: the base model, or with ``study.start_from=champion`` the registry's champion
    (the space widened to hold it, still anchored on the base model). Returns the point and
    where it came from ("" for the base model)."""
    cfg = plan.cfg
    if cfg["study"]["start_from"] != "champion":
        return dict(plan.space.base), ""
    found = registry.champion_config(str(cfg["registry"]["name"]))
    if found is None:
        print(f"study '{plan.name}': no '{registry.CHAMPION_ALIAS}' in {cfg['registry']['name']} yet: "
              "trial 0 is the base model", flush=True)
        return dict(plan.space.base), ""
    champion_cfg, origin = found
    family = (champion_cfg.get("model") or {}).get("family")
    if family != cfg["model"]["family"]:
        print(f"study '{plan.name}': the champion {origin} is a {family} model, not "
              f"{cfg['model']['family']}: trial 0 is the base model", flush=True)
        return dict(plan.space.base), ""
    point = plan.space.point_of(champion_cfg)
    plan.start_from(point)
    print(f"study '{plan.name}': trial 0 is the champion {origin}", flush=True)
    return point, f"champion {origin}"


def probe(plan: Plan, start: dict[str, Any]) -> tuple[dict[str, Any], list[str]] | None:
    """Trial 1 (``study.probe=widest``): trial 0 with every layer as wide as the search space
    allows, so the study learns early whether capacity alone reaches the gate (on digits it
    did on every seed; ``docs/architecture.md``, "The probe"). None when the space has no
    layers to widen, or when the widest model breaks ``model.max_params`` or ``gate.max_params``."""
    if plan.cfg["study"]["probe"] != "widest" or int(plan.cfg["study"]["n_trials"]) < 2:
        return None
    widest = plan.space.widest(start)
    if widest is None:
        return None
    point, ops = widest
    model_cfg, inputs = plan.space.apply(plan.cfg, point)["model"], plan.splits.as_input(plan.family.input_kind)
    checks: list[tuple[dict[str, Any], str | None]] = [(model_cfg, None)]  # None: the error says why
    limit = plan.gate.get("max_params")
    if limit is not None:  # a model that cannot pass the gate is not worth a trial
        checks.append(({**model_cfg, "max_params": int(limit)}, f"over gate.max_params={int(limit):,}"))
    for checked, reason in checks:
        try:
            plan.family.check_data(checked, inputs)
        except UsageError as exc:
            print(f"study '{plan.name}': no probe of the widest layers ({reason or exc})", flush=True)
            return None
    return point, ops
