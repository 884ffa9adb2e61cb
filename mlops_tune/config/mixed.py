"""A multirun over base models of different families, with keys that only some of them have.

``mlops-tune -m model=knn,ann model.epochs=5``: ``epochs`` is a key of the Keras models, not of
KNN. Hydra applies every override to every job, so KNN's job would fail on a key its config
lacks. Before Hydra parses the command line, a ``model.KEY=VALUE`` override that some but not
all of the swept models have becomes ``++model.KEY=VALUE`` (set, or add), and each job whose own
model file has no ``KEY`` drops it again and says so in one line. A key no swept model has is
left alone: Hydra rejects it and names the closest key, as for a single study.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: the model keys a multirun gives only to the models that have them (set by ``hydra_main``)
SPECIFIC_ENV = "MLOPS_TUNE_MODEL_SPECIFIC"
_OVERRIDE = re.compile(r"model\.([A-Za-z_]\w*)=(.*)", re.S)


def _model_keys(conf_dir: Path, option: str) -> set[str] | None:
    import yaml

    path = conf_dir / "model" / f"{option}.yaml"
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return set(loaded) if isinstance(loaded, dict) else None


def widen(argv: Sequence[str], conf_dir: Path) -> tuple[list[str], list[str]]:
    """``argv`` with each ``model.KEY=VALUE`` that only some swept models have made ``++model.KEY=VALUE``,
    and those ``model.KEY`` names."""
    swept = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("model=") and "," in arg), "")
    keys = {option.strip(): _model_keys(conf_dir, option.strip()) for option in swept.split(",") if option.strip()}
    if len(keys) < 2 or None in keys.values():
        return list(argv), []
    out, specific = [], []
    for arg in argv:
        match = _OVERRIDE.fullmatch(arg)
        having = [option for option, names in keys.items() if match and match[1] in (names or set())]
        if match and 0 < len(having) < len(keys):
            out.append(f"++{arg}")
            specific.append(f"model.{match[1]}")
        else:
            out.append(arg)
    return out, specific


def drop_foreign(cfg: Any, conf_dir: Path) -> list[str]:
    """In one job: remove the model-specific keys (:func:`widen`) this job's model file lacks.
    Returns a note for each key it removed."""
    specific = [key for key in os.environ.get(SPECIFIC_ENV, "").split(",") if key]
    if not specific:
        return []
    try:
        from hydra.core.hydra_config import HydraConfig

        option = HydraConfig.get().runtime.choices.get("model")
    except (ImportError, ValueError):
        return []
    own = _model_keys(conf_dir, str(option)) or set()
    from omegaconf import open_dict

    dropped = []
    with open_dict(cfg):
        for key in specific:
            name = key.removeprefix("model.")
            if name not in own and name in cfg.model:
                del cfg.model[name]
                dropped.append(f"{key} does not apply to model={option} (its config has no '{name}'): "
                               "left out of this job")
    return dropped
