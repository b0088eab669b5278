"""What each privacy accountant makes of one run's DP-SGD, per site, side by side.

For every site of a finished ``medseg simulate`` run (``RUN_DIR``, its sites'
``state/accountant.json`` and ``site.yaml``), prints:

* the epsilon its recorded history (noise multiplier, sample rate, steps)
  spends at the site's delta under each accountant, and
* the noise multiplier each accountant calibrates for the same sample rate and
  total steps to land at the site's epsilon cap, with the ratio to RDP's.

The lower the noise at the same cap, the less the DP-SGD noise costs the model:
this is the figure behind ``privacy.accountant`` (README, "Privacy model").
GDP is left out by default (a central-limit approximation that can
under-state epsilon; ``--accountants rdp prv gdp`` adds it).

    .venv/bin/python benchmarks/accountants.py RUN_DIR [--accountants rdp prv]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medseg_core.config import load_site_config
from medseg_core.privacy.accountant import ACCOUNTANTS, accountant_from_dict, new_accountant
from medseg_core.privacy.noise import calibrate_noise, projected_epsilon


def site_rows(site_dir: Path, accountants: list[str]) -> dict:
    """One site's epsilon and calibrated noise under each accountant."""
    cfg = load_site_config(site_dir / "site.yaml")
    path = site_dir / "state" / "accountant.json"
    if not path.is_file():
        raise SystemExit(f"{site_dir.name}: no {path}; the site trained no DP round in this run. "
                         "Fix: pass a run made with privacy.enabled: true")
    history = accountant_from_dict(json.loads(path.read_text())).history
    plans = {(round(s, 12), round(q, 12)) for s, q, _ in history}
    if len(plans) != 1:
        raise SystemExit(f"{site_dir.name}: its history has (noise, sample rate) pairs "
                         f"{sorted(plans)}; this benchmark compares one. Fix: pass a run whose "
                         "rounds kept one noise multiplier and sample rate")
    sigma, q = history[0][0], history[0][1]
    steps = sum(n for _, _, n in history)
    out: dict = {"sample_rate": q, "steps": steps, "epsilon_cap": cfg.epsilon, "delta": cfg.delta,
                 "recorded": (cfg.accountant, sigma), "epsilon": {}, "noise": {}, "seconds": {}}
    for name in accountants:
        out["epsilon"][name] = projected_epsilon(new_accountant(name),  # type: ignore[arg-type]
                                                 noise_multiplier=sigma, sample_rate=q, steps=steps,
                                                 delta=cfg.delta)
        t0 = time.perf_counter()
        out["noise"][name] = calibrate_noise(new_accountant(name), target_epsilon=cfg.epsilon,  # type: ignore[arg-type]
                                             delta=cfg.delta, sample_rate=q, steps=steps)
        out["seconds"][name] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished medseg simulate --out directory")
    ap.add_argument("--accountants", nargs="+", choices=ACCOUNTANTS, default=["rdp", "prv"])
    args = ap.parse_args()
    sites = sorted(p.parent for p in (args.run / "sites").glob("*/site.yaml"))
    if not sites:
        raise SystemExit(f"{args.run}: no sites/*/site.yaml. Fix: pass a medseg simulate --out directory")
    base = args.accountants[0]
    print(f"run {args.run}: per site, epsilon its recorded history spends, and the noise multiplier "
          f"each accountant calibrates for the same steps at the site's cap (ratio to {base})")
    for site in sites:
        r = site_rows(site, args.accountants)
        eps = " / ".join(f"{a} {r['epsilon'][a]:.3f}" for a in args.accountants)
        noise = " / ".join(f"{a} {r['noise'][a]:.4f} ({r['noise'][a] / r['noise'][base]:.3f}x, "
                           f"{r['seconds'][a]:.1f} s)" for a in args.accountants)
        print(f"{site.name}: q {r['sample_rate']:.4f}, {r['steps']} steps at noise "
              f"{r['recorded'][1]:.4f} ({r['recorded'][0]}) | epsilon at delta {r['delta']:g}: {eps} | "
              f"noise for epsilon {r['epsilon_cap']:g}: {noise}")


if __name__ == "__main__":
    main()
