"""A site's privacy state as its training runtime sees it: the persisted
Opacus accountant, the run's fixed noise plan and the site's own ledger.

:class:`SitePrivacy` is a base of :class:`medseg_core.training.site.SiteSession`
(after :class:`~medseg_core.training.site_data.SiteData`, whose privacy units,
slices or bags, it counts). Everything here stays in the site's ``state_dir``:

* ``accountant.json`` - the accountant's history, so epsilon composes over
  every round and survives a restart of the client process;
* ``privacy_plan.json`` - the run's noise multiplier, calibrated once;
* ``ledger.jsonl`` - the site's own append-only privacy ledger.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from medseg_core.errors import PrivacyBudgetExceeded
from medseg_core.privacy.accountant import epsilon_of, load_accountant
from medseg_core.privacy.noise import projected_epsilon
from medseg_core.privacy.budget import FIX_HINT, RoundPrivacyPlan, plan_round
from medseg_core.training.rounds import RoundRequest
from medseg_core.training.bags import bag_batch_size
from medseg_core.training.session import steps_per_epoch
from medseg_core.training.site_data import SiteData

__all__ = ["SitePrivacy"]


class SitePrivacy(SiteData):
    """The privacy half of a site session (see the module docstring)."""

    @property
    def accountant_path(self) -> Path:
        """Where this site's accountant lives."""
        return self.site.state_dir / "accountant.json"

    def load_accountant(self):  # noqa: ANN201 - opacus IAccountant
        """The site's accountant as persisted (fresh if none yet)."""
        return load_accountant(self.accountant_path, self.site.accountant)

    def epsilon_spent(self) -> float:
        """Cumulative epsilon at the site's delta (0.0 before any DP step)."""
        return epsilon_of(self.load_accountant(), self.site.delta)

    def dp_steps_per_epoch(self, batch_size: int, bags_per_step: int | None = None) -> int:
        """DP steps per epoch over the site's privacy units (slices, or bags:
        ``bags_per_step`` of them, or about ``batch_size`` slices' worth)."""
        if self.is_bag_site:
            bags = self.train_bags
            return steps_per_epoch(len(bags), bag_batch_size(batch_size, bags.images.shape[1],
                                                             bags_per_step))
        return steps_per_epoch(len(self.train_set), batch_size)

    def plan(self, req: RoundRequest, *, accountant: object) -> RoundPrivacyPlan:
        """This round's DP parameters; raises PrivacyBudgetExceeded if it cannot fit.

        The noise multiplier is calibrated once per run (at the site's first
        round of that run) so the planned rounds spend the remaining budget
        evenly (less the share of ``req.reserve_epochs`` personalisation
        epochs at the same sample rate), then kept fixed: a later round that
        would take the site past its cap is refused rather than trained with
        ever larger noise.
        """
        spe = self.dp_steps_per_epoch(req.batch_size, req.bag_batch_size)
        q, steps = 1.0 / spe, spe * req.local_epochs
        path = self.site.state_dir / "privacy_plan.json"
        stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        key = {"run": req.run_name, "sample_rate": q, "steps": steps,
               "reserve_steps": spe * req.reserve_epochs}
        if stored is not None and all(stored.get(k) == v for k, v in key.items()):
            return self.fixed_noise_plan(accountant, float(stored["noise_multiplier"]), q, steps,
                                          f"round {req.server_round}")
        plan = plan_round(
            accountant,
            epsilon_cap=self.site.epsilon,
            delta=self.site.delta,
            max_grad_norm=self.site.max_grad_norm,
            sample_rate=q,
            steps_this_round=steps,
            rounds_remaining=max(1, req.total_rounds - req.server_round + 1),
            reserve_steps=spe * req.reserve_epochs,
        )
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**key, "noise_multiplier": plan.noise_multiplier}), encoding="utf-8")
        os.replace(tmp, path)
        return plan

    def fixed_noise_plan(self, accountant: object, sigma: float, q: float, steps: int,
                          what: str) -> RoundPrivacyPlan:
        """The plan of ``steps`` DP steps at the run's fixed noise ``sigma``;
        raises PrivacyBudgetExceeded (nothing trained) if they would pass the cap."""
        before = epsilon_of(accountant, self.site.delta)
        after = projected_epsilon(accountant, noise_multiplier=sigma, sample_rate=q, steps=steps,
                                  delta=self.site.delta)
        if after > self.site.epsilon * (1 + 1e-6):
            raise PrivacyBudgetExceeded(
                f"site {self.site.id!r}: {what} would take epsilon from {before:.4f} to "
                f"{after:.4f}, past the site's cap {self.site.epsilon:g} "
                f"(delta={self.site.delta:g}); the site does not train. Fix: {FIX_HINT}."
            )
        return RoundPrivacyPlan(
            noise_multiplier=sigma, max_grad_norm=self.site.max_grad_norm, sample_rate=q,
            steps=steps, epsilon_before=before, epsilon_after=after, delta=self.site.delta,
            accountant=self.site.accountant,
        )

    def append_ledger(
        self, server_round: int, plan: RoundPrivacyPlan, epsilon: float, steps: int,
        phase: str = "train",
    ) -> None:
        """Append a row to the site's own privacy ledger (fsynced)."""
        row = {"round": server_round, "phase": phase, **asdict(plan), "steps_taken": steps,
               "epsilon": epsilon}
        path = self.site.state_dir / "ledger.jsonl"
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
