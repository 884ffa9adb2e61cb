"""cli: Hydra's multi-line errors as one line, with the fix where it is clear."""

from __future__ import annotations

import pytest

from mlops_tune.config.cli import summarize_hydra_error

HYDRA_UNKNOWN = """Could not override 'gate.treshold'.
To append to your config use +gate.treshold=0.9
Key 'treshold' is not in struct
    full_key: gate.treshold
    object_type=dict

Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.
"""
HYDRA_GROUP = """In 'tune': Could not find 'model/knnn'

Available options in 'model':
\tann
\tcnn
\tknn
Config search path:
\tprovider=hydra, path=pkg://hydra.conf
"""


def test_unknown_key_suggests_the_closest_key() -> None:
    assert summarize_hydra_error(HYDRA_UNKNOWN, "tune", ["model=knn"]) == \
        "unknown key gate.treshold; did you mean gate.threshold?"


def test_unknown_key_without_a_close_match_says_how_to_add_one() -> None:
    text = HYDRA_UNKNOWN.replace("gate.treshold", "zzz.qqq")
    assert summarize_hydra_error(text, None, []) == "unknown key zzz.qqq (add a new key with +zzz.qqq=...)"


def test_unknown_group_option_lists_the_options() -> None:
    line = summarize_hydra_error(HYDRA_GROUP, "tune", [])
    assert line == "Could not find 'model/knnn' (available: ann, cnn, knn)"


@pytest.mark.parametrize(("text", "words"), [
    ("usage: mlops-tune\nmlops-tune: error: unrecognized arguments: --bogus\n", "unrecognized arguments: --bogus"),
    ("mismatched input '=' expecting <EOF>\nSee https://hydra.cc/docs/1.2/advanced/override_grammar/basic for details",
     "quote a value with spaces"),
    ("Error: [Errno 13] Permission denied: '/ro/outputs'\n", "set hydra.run.dir"),
    ("", "invalid command line or config"),
])
def test_other_errors_become_one_line(text: str, words: str) -> None:
    line = summarize_hydra_error(text)
    assert words in line and "\n" not in line


@pytest.mark.parametrize("command", ["tune", "train"])
def test_help_lists_the_config_groups_a_user_picks_and_every_option_they_have(command: str) -> None:
    """``--help`` names the groups of the command's defaults a user picks (not the internal ``search``
    group or the schema), each with every option in its folder: a new model or dataset shows up."""
    import re

    import yaml

    from mlops_tune.config.cli import CONF_DIR

    cfg = yaml.safe_load((CONF_DIR / f"{command}.yaml").read_text())
    shown = dict(re.findall(r"^\s+(\w+): ([\w, ]+)$", cfg["hydra"]["help"]["template"].split("Config groups")[1], re.M))
    picked = [next(iter(entry)) for entry in cfg["defaults"] if isinstance(entry, dict)]
    assert list(shown) == [group for group in picked if not group.startswith("optional")]
    for group, options in shown.items():
        assert options.split(", ") == sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")), group
