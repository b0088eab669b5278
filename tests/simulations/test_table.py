"""The per-site table `medseg simulate` prints at the end."""

from __future__ import annotations

from simulations.runner import format_table


def test_table_shows_dice_with_its_standard_error_and_dp_state() -> None:
    summary = {
        "sites": ["a", "b"],
        "federated": {"dice_mean": 0.5, "per_site": {
            "a": {"dice": 0.5, "dice_se": 0.031, "n_train": 10, "epsilon": 7.9},
            "b": {"dice": None, "n_train": 3, "epsilon": None}}},
        "pooled": {"dice_mean": 0.625, "per_site": {"a": {"dice": 0.6}, "b": {"dice": 0.65, "dice_se": 0.1}}},
        "local": None,
        "wall_seconds": 3.0,
    }
    lines = format_table(summary).splitlines()
    row_a = next(x for x in lines if x.startswith("a "))
    row_b = next(x for x in lines if x.startswith("b "))
    assert "0.5000 ± 0.031" in row_a and "0.6000" in row_a and "7.900" in row_a
    assert row_b.split()[2] == "-" and "0.6500 ± 0.100" in row_b and row_b.endswith("off")
    assert "federated / pooled Dice = 0.800" in lines
    assert not any("local" in x for x in lines[:1])  # no local arm, no local column
