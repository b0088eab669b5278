"""SQLite run store and privacy ledger."""

from pathlib import Path

from medseg_core.store import LedgerRow, RunStore


def _row(site: str, rnd: int, eps: float) -> LedgerRow:
    return LedgerRow(site_id=site, round=rnd, noise_multiplier=1.1, max_grad_norm=1.0,
                     sample_rate=0.1, steps=10, epsilon=eps, delta=1e-5, accountant="rdp")


def test_run_lifecycle_and_rounds(tmp_path: Path) -> None:
    with RunStore(tmp_path / "s.sqlite") as store:
        assert store.start_run("r1", name="t", config={"a": 1}, versions={}, git_rev=None)
        for rnd in (1, 2):
            store.start_round("r1", rnd)
            store.finish_round("r1", rnd, n_sampled=2, n_accepted=2, n_rejected=0,
                               train_loss=0.5, val_dice=0.7, epsilon_max=1.0 * rnd)
        store.start_round("r1", 3)  # crashed mid-round: not completed
        assert store.last_completed_round("r1") == 2
        assert [r["round"] for r in store.rounds("r1")] == [1, 2, 3]
        assert not store.start_run("r1", name="t", config={}, versions={}, git_rev=None)


def test_ledger_is_append_only_and_max_not_mean(tmp_path: Path) -> None:
    with RunStore(tmp_path / "s.sqlite") as store:
        store.start_run("r", name="t", config={}, versions={}, git_rev=None)
        assert store.add_ledger("r", _row("a", 1, 2.0))
        assert store.add_ledger("r", _row("a", 2, 4.0))
        assert store.add_ledger("r", _row("b", 1, 7.0))
        assert not store.add_ledger("r", _row("a", 2, 99.0))  # replay: first row kept
        assert [r.epsilon for r in store.ledger("r", "a")] == [2.0, 4.0]
        assert store.max_epsilon("r") == {"a": 4.0, "b": 7.0}


def test_rejections_and_site_metrics_persist(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with RunStore(path) as store:
        store.start_run("r", name="t", config={}, versions={}, git_rev=None)
        store.add_rejection("r", 1, "a", node_id=5, kind="validation", reason="NaN")
        store.add_site_metrics("r", 1, "a", phase="train", split="val", dice=0.5)
    with RunStore(path) as store:  # reopened: nothing lost
        assert store.rejections("r")[0]["reason"] == "NaN"
        assert store.site_metrics("r", phase="train")[0]["dice"] == 0.5
