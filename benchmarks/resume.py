"""Resume after ``kill -9`` of the aggregator, against an uninterrupted run.

Deploys one scenario twice on 127.0.0.1 (TLS + SuperNode authentication,
the same ``medseg certs / server / nodes add / client`` commands as the
README), same seed and sites: once uninterrupted, once with the aggregator
(``medseg server``, its SuperLink and ServerApp) killed with SIGKILL right
after round k's checkpoint and restarted with ``medseg server --resume``.
Prints both runs' final per-site test Dice, and the privacy-ledger rows in
the server's run store right after the kill and at the end (one row per
site and round expected: none lost, none written twice).

    .venv/bin/python benchmarks/resume.py [--config simulations/configs/quick.yaml] [--rounds 4] [--kill-after 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from deploy_vs_sim import _deploy, _medseg  # noqa: E402

from medseg_core.config import load_scenario  # noqa: E402
from medseg_core.sites import materialise_site  # noqa: E402


def _ledger(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return sorted(c.execute("SELECT site_id, round, epsilon FROM privacy_ledger"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "simulations" / "configs" / "quick.yaml"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--kill-after", type=int, default=2)
    args = ap.parse_args()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="resumebench"))
    cfg = yaml.safe_load(Path(args.config).read_text())
    cfg["rounds"] = args.rounds
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    scenario = load_scenario(config)

    results = {}
    for arm in ("uninterrupted", "killed+resumed"):
        base = tmp / arm
        sites = {}
        for spec in scenario.sites:  # fresh site state per arm: same data, same seed
            materialise_site(spec, scenario, base / "hospitals")
            sites[spec.id] = base / "hospitals" / "sites" / spec.id / "site.yaml"
        certs = base / "certs"
        subprocess.run(_medseg("certs", "--out", str(certs), "--san", "127.0.0.1",
                               *[a for sid in sites for a in ("--node", sid)]),
                       check=True, env=env, stdout=subprocess.DEVNULL)
        db = base / "run" / "server" / "server" / "runstore.sqlite"
        after_kill: list = []
        if arm == "killed+resumed":
            marker = base / "run" / "server" / "server" / "checkpoints" / f"round_{args.kill_after:04d}"

            def watch() -> None:  # the ledger as the crash left it (before --resume writes)
                while not (marker / "meta.json").is_file():
                    time.sleep(0.1)
                time.sleep(0.5)
                after_kill.extend(_ledger(db))

            threading.Thread(target=watch, daemon=True).start()
        _deploy(str(config), base / "run", sites, certs, env, cold=False,
                kill_after=args.kill_after if arm == "killed+resumed" else None)
        fed = json.loads((base / "run" / "server" / "server" / "federated.json").read_text())
        results[arm] = (fed, _ledger(db), after_kill)

    print(f"scenario {args.config}: {len(scenario.sites)} sites x {args.rounds} rounds, "
          f"aggregator killed (SIGKILL) after round {args.kill_after} in the second run")
    (fu, lu, _), (fr, lr, lk) = results["uninterrupted"], results["killed+resumed"]
    for sid in fu["sites"]:
        du, dr = fu["sites"][sid]["dice"], fr["sites"][sid]["dice"]
        print(f"  {sid:<12} test Dice uninterrupted {du:.4f}  resumed {dr:.4f}  (diff {dr - du:+.4f})")
    keys = [(r[0], r[1]) for r in lr]
    print(f"  ledger rows: uninterrupted {len(lu)}; killed run right after the kill {len(lk)}, "
          f"after resume {len(lr)} ({len(set(keys))} distinct site-rounds; expected "
          f"{len(scenario.sites) * args.rounds})")
    print(f"  rows present at the kill and unchanged after resume: {len(set(lk) & set(lr))}/{len(lk)}")
    same_eps = all(abs(a[2] - b[2]) < 1e-9 for a, b in zip(lu, lr)) and len(lu) == len(lr)
    print(f"  per-site epsilon identical to the uninterrupted run: {same_eps}")


if __name__ == "__main__":
    main()
