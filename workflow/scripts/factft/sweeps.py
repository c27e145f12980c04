"""Sweeps of the theory model from the config: points, their settings, checks (no torch).

`simulation.settings` is the base point (the subsets figure and the mechanism plots); each entry of
`simulation.sweeps` varies one setting over a list of values, every other setting at its base
value. A point's name is its value as written (the `point` wildcard); the base point is
sweep "base", point "default". A sweep value equal to the base value is the base point: its
runs are the base runs (`run_of`), computed once. The workflow reads these at parse time, so
this module must not import torch (factft.theory does).
"""

from __future__ import annotations

from factft.errors import FactftError

BASE = "base"  # the sweep name of the single base point
BASE_POINT = "default"


def point_name(value) -> str:
    """A sweep value as a path component (the `point` wildcard)."""
    return str(value)


def sweep_points(simulation: dict) -> dict[str, list[str]]:
    """Every sweep and its point names, the base first; nothing when the config has no sweeps."""
    sweeps = simulation.get("sweeps") or {}
    if not sweeps:
        return {}
    return {BASE: [BASE_POINT], **{name: [point_name(v) for v in values] for name, values in sweeps.items()}}


def point_value(simulation: dict, sweep: str, point: str):
    """The swept setting's value at a point (None for the base point)."""
    if sweep == BASE:
        return None
    values = {point_name(v): v for v in simulation["sweeps"][sweep]}
    if point not in values:
        raise FactftError(f"simulation.sweeps.{sweep}: no value named '{point}'; values are {list(values)}")
    return values[point]


def point_settings(simulation: dict, sweep: str, point: str) -> dict:
    """The base settings with the sweep's setting at the point's value."""
    settings = dict(simulation["settings"])
    if sweep != BASE:
        settings[sweep] = point_value(simulation, sweep, point)
    return settings


def run_of(simulation: dict, sweep: str, point: str) -> tuple[str, str]:
    """The (sweep, point) whose runs compute a point: the base run where it has the base settings."""
    if sweep != BASE and point_settings(simulation, sweep, point) == simulation["settings"]:
        return BASE, BASE_POINT
    return sweep, point


def check_simulation(simulation: dict) -> None:
    """Check every point of every sweep before any job starts (FactftError naming the key)."""
    for sweep, points in sweep_points(simulation).items():
        for point in points:
            where = "simulation.settings" if sweep == BASE else f"simulation.sweeps.{sweep} = {point}"
            check_settings(point_settings(simulation, sweep, point), where)


def check_settings(settings: dict, where: str = "simulation.settings") -> None:
    """Settings that the schema cannot tie together."""
    tokens = vocabulary_size(settings)
    if settings["embedding"] == "orthogonal" and dimension(settings) < tokens:
        raise FactftError(
            f"{where}: orthogonal embeddings need dim >= the {tokens} tokens (subjects + relations x "
            f"(2 + answers_per_relation)); dim is {settings['dim']}: raise dim, set it to null, "
            "or use embedding: gaussian"
        )
    guaranteed = settings["min_mentions"] * settings["subjects"] * settings["relations"]
    budget = settings["pretrain_steps"] * settings["batch_size"]
    if guaranteed > budget:
        raise FactftError(
            f"{where}: min_mentions x subjects x relations = {guaranteed} statements exceed the "
            f"pretraining budget pretrain_steps x batch_size = {budget}; raise pretrain_steps or lower min_mentions"
        )
    n_test, n_subset = split_sizes(settings)
    if n_test < 2 or n_subset < 1:
        raise FactftError(
            f"{where}: {settings['subjects']} subjects leave {n_test} test subjects and {n_subset} per "
            "finetuning subset; raise subjects or change test_fraction / fraction"
        )


def split_sizes(settings: dict) -> tuple[int, int]:
    """Held-out test subjects, and subjects in each of FT-Top, FT-Bottom and FT-Random."""
    n_test = round(settings["test_fraction"] * settings["subjects"])
    return n_test, int(settings["fraction"] * (settings["subjects"] - n_test))


def vocabulary_size(settings: dict) -> int:
    return settings["subjects"] + settings["relations"] * (2 + settings["answers_per_relation"])


def dimension(settings: dict) -> int:
    """The embedding dimension; dim null means one per token."""
    return settings["dim"] or vocabulary_size(settings)
