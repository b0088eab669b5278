"""docker/: no engine runs here, so check what can be checked: every service
runs a `medseg` command line that the CLI accepts (the same commands the
integration tests run as processes), images run as a non-root user, the
hospitals' data is mounted read-only and long-running services have health checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from simulations.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_every_service_runs_a_valid_medseg_command(name: str) -> None:
    svc = COMPOSE["services"][name]
    cmd = svc["command"]
    if svc.get("entrypoint") == ["sh", "-c"]:
        assert "medseg nodes add" in cmd[0]
        argv = ["nodes", "add", "/certs/nodes/x.pub", "--workdir", "/srv/run"]
    else:
        argv = list(cmd)
    args = build_parser().parse_args(argv)  # SystemExit on a bad command line
    assert callable(args.func)


def test_image_is_non_root_and_demo_config_is_valid() -> None:
    from medseg_core.config import load_scenario

    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "USER medseg" in text and 'ENTRYPOINT ["medseg"]' in text
    scenario = load_scenario(ROOT / "docker" / "demo.yaml")
    assert {s.id for s in scenario.sites} == {"hospital-a", "hospital-b", "hospital-c"}


@pytest.mark.parametrize("name", ["hospital-a", "hospital-b", "hospital-c"])
def test_hospitals_mount_data_read_only_and_report_health(name: str) -> None:
    svc = COMPOSE["services"][name]
    assert any(v.endswith(":/data:ro") for v in svc["volumes"])
    assert "healthcheck" in svc and "--insecure" not in svc["command"]
    assert "healthcheck" in COMPOSE["services"]["aggregator"]
