"""``benchmarks/adaptation.py``: every arm it writes for the committed
strong-shift scenario is a valid scenario, with DP and with its
``without_dp`` block merged (the ``none`` arm of a scenario with
``train.adaptation_from_round``, or ``train.private_epochs``, used to be
refused)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medseg_core.config import ScenarioConfig, parse_model

ROOT = Path(__file__).resolve().parents[2]


def _bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when run as a script: _common beside it
    spec = importlib.util.spec_from_file_location("bench_adaptation", ROOT / "benchmarks" / "adaptation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mode", ["none", "norm", "adapter", "norm+adapter", "fedavg-ft"])
def test_every_arm_of_the_strong_shift_scenario_parses(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    base = yaml.safe_load((ROOT / "simulations" / "configs" / "strong_shift.yaml").read_text())
    assert base["train"]["adaptation_from_round"] > 1  # the case this test guards
    # and a without_dp block with private-only epochs, which plain FedAvg refuses
    base.setdefault("without_dp", {}).setdefault("train", {}).setdefault("private_epochs", 2)
    arm = parse_model(ScenarioConfig, _bench(monkeypatch).mode_config(base, 3, mode, None), source=mode)
    assert arm.seed == 3
    assert arm.model.adaptation.value == ("none" if mode == "fedavg-ft" else mode)
    no_dp = arm.for_privacy(False)  # the without_dp block merged, as --dp off runs it
    if mode == "fedavg-ft":  # plain FedAvg, then every weight fine-tuned as the adapter's are
        assert arm.train.adaptation_from_round == 1 and no_dp.train.private_epochs == 0
        assert arm.train.personalize.epochs == base["train"].get("personalize", {}).get("epochs", 0)
        assert no_dp.train.personalize.model_dump() == {
            **base["without_dp"]["train"]["personalize"], "layers": "all"}
    elif mode == "none":
        assert arm.train.adaptation_from_round == 1
        assert arm.train.personalize.epochs == 0
        assert no_dp.train.private_epochs == 0 and no_dp.train.adaptation_from_round == 1
        assert no_dp.train.personalize.epochs == 0  # nothing private to personalise
    else:
        assert arm.train.adaptation_from_round == base["train"]["adaptation_from_round"]
        assert no_dp.train.private_epochs == base["without_dp"]["train"]["private_epochs"]
        assert no_dp.train.personalize.model_dump() == {
            **base["without_dp"]["train"]["personalize"], "layers": "private"}


def test_personalize_epochs_apply_to_the_arms_with_private_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    base = yaml.safe_load((ROOT / "simulations" / "configs" / "strong_shift.yaml").read_text())
    b = _bench(monkeypatch)
    for mode, epochs in (("adapter", 4), ("none", 0), ("fedavg-ft", 4)):
        arm = b.mode_config(base, 0, mode, 4)
        every = {"layers": "all"} if mode == "fedavg-ft" else {}
        assert arm["train"]["personalize"] == {**base["train"].get("personalize", {}),
                                               "epochs": epochs, **every}
        # the without_dp block's own personalisation (SGD) takes the same epochs
        assert arm["without_dp"]["train"]["personalize"] == {
            **base["without_dp"]["train"]["personalize"], "epochs": epochs, **every}


def test_fedavg_ft_without_personalisation_epochs_is_refused(tmp_path: Path) -> None:
    """Under DP the strong-shift scenario personalises nothing, so a fedavg-ft arm
    would be plain FedAvg under another name: refused before any run starts."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "adaptation.py"), "--modes", "none", "fedavg-ft",
         "--dp", "on", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert "dp-on-seed0-fedavg-ft" in proc.stderr and "Fix: --personalize EPOCHS" in proc.stderr
    assert not (tmp_path / "out" / "dp-on-seed0-none").exists()  # refused before the first arm ran
