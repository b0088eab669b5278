"""A replayed round (server resumed after a crash) costs the site nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg_core.config import ScenarioConfig, parse_model
from medseg_core.sites import materialise_site
from medseg_core.training.replay import state_digest
from medseg_core.training.session import build_segmenter
from medseg_core.training.site import RoundRequest, SiteSession


def _session(tmp_path: Path) -> SiteSession:
    scenario = parse_model(ScenarioConfig, {
        "sites": [{"id": "s", "n_train": 8, "n_test": 2}],
        "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4},
        "data": {"image_size": 32}, "privacy": {"epsilon": 8.0}})
    site = materialise_site(scenario.sites[0], scenario, tmp_path)
    return SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data)


def test_replayed_round_returns_the_first_reply_without_spending_budget(tmp_path: Path) -> None:
    sess = _session(tmp_path)
    glob = {k: v.detach().numpy() for k, v in
            build_segmenter(sess.model_cfg, sess.data_cfg).state_dict().items()}
    req = RoundRequest(server_round=1, total_rounds=3, local_epochs=1, lr=0.05, batch_size=4,
                       optimizer="sgd", run_name="run-1")
    first = sess.train_round(glob, req)
    accountant = sess.accountant_path.read_bytes()
    ledger = (sess.site.state_dir / "ledger.jsonl").read_text()

    again = SiteSession(sess.site, model_cfg=sess.model_cfg, data_cfg=sess.data_cfg).train_round(
        glob, req)  # a restarted client process, same request

    assert sess.accountant_path.read_bytes() == accountant
    assert (sess.site.state_dir / "ledger.jsonl").read_text() == ledger
    assert again.epsilon == first.epsilon and again.privacy == first.privacy
    assert all(np.array_equal(again.shared[k], first.shared[k]) for k in first.shared)
    # a different global model is a new request: it trains (and spends budget)
    other = {k: v + 0.01 for k, v in glob.items()}
    assert state_digest(other) != state_digest(glob)
    third = sess.train_round(other, req)
    assert third.epsilon > first.epsilon
