"""``train.weak.weak_sites_freeze``: sites without masks leave the decoder
(or the encoder) to the sites with masks. The split of the network, the
sites' real DP-SGD rounds honouring it, and the server averaging each array
over the sites that trained it (real ClientApps, no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client import site_runtime
from medseg_core import keys
from medseg_core.checkpoint import load_checkpoint
from medseg_core.config import ModelConfig, ScenarioConfig, TrainConfig, parse_model
from medseg_core.errors import ConfigError
from medseg_core.models.heads import encoder_decoder_names
from medseg_core.models.registry import build_model
from medseg_core.sites import materialise_site
from medseg_core.training.session import build_segmenter
from medseg_core.training.site import RoundRequest, SiteSession
from server.federation import initial_state, run_federation

from local_grid import LocalGrid, site_yamls


def _scenario(freeze: str, *, dp: bool, rounds: int = 1, from_round: int = 1) -> ScenarioConfig:
    return parse_model(ScenarioConfig, {
        "rounds": rounds, "seed": 5,
        "sites": [{"id": "masks", "n_train": 12, "n_test": 3, "label_regime": "mask",
                   "lesion_prevalence": 1.0},
                  {"id": "reports", "n_train": 12, "n_test": 3, "label_regime": "image",
                   "lesion_prevalence": 0.5},
                  {"id": "volumes", "dims": 3, "depth": 4, "n_train": 6, "n_test": 2,
                   "label_regime": "bag", "lesion_prevalence": 0.5}],
        "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4, "weak_head": "cam",
                  "mil_pooling": "attention", "adaptation": "norm"},
        "data": {"image_size": 32, "val_fraction": 0.25},
        "train": {"batch_size": 4, "lr": 0.01, "weak": {"weak_sites_freeze": freeze,
                                                              "weak_sites_freeze_from_round": from_round}},
        "strategy": {"name": "fedavg"},
        "privacy": {"enabled": dp, "epsilon": 50.0},
    })


@pytest.mark.parametrize("name", ["unet", "basicunet"])
def test_the_encoder_and_decoder_split_every_network_parameter(name: str) -> None:
    model = build_model(ModelConfig(name=name, channels=(8, 16, 32, 64, 128, 8)
                                    if name == "basicunet" else (8, 16, 32), strides=(2, 2, 2, 2, 2)
                                    if name == "basicunet" else (2, 2), norm_groups=4),
                        in_channels=1, out_channels=2)
    enc, dec = encoder_decoder_names(model)
    assert enc and dec and not enc & dec
    assert enc | dec == {n for n, _ in model.named_parameters()}
    out_conv = "final_conv.weight" if name == "basicunet" else "model.2.1.conv.unit0.conv.weight"
    first_conv = "conv_0.conv_0.conv.weight" if name == "basicunet" else "model.0.conv.unit0.conv.weight"
    assert out_conv in dec and first_conv in enc
    with pytest.raises(ValueError, match="no MONAI UNet or BasicUNet"):
        encoder_decoder_names(model.model[0] if name == "unet" else model.conv_0)


@pytest.mark.parametrize("freeze", ["decoder", "encoder"])
def test_sites_without_masks_send_the_frozen_part_unchanged_under_dp(freeze: str,
                                                                     tmp_path: Path) -> None:
    scenario = _scenario(freeze, dp=True)
    g = initial_state(scenario)
    enc, dec = encoder_decoder_names(build_segmenter(scenario.model, scenario.data))
    frozen, trained = (dec, enc) if freeze == "decoder" else (enc, dec)
    for spec in scenario.sites:
        site = materialise_site(spec, scenario, tmp_path)
        sess = SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data,
                           weak_cfg=scenario.train.weak)
        res = sess.train_round(g, RoundRequest(server_round=1, total_rounds=1, local_epochs=1,
                                               lr=0.01, batch_size=4, run_name="freeze"))
        assert res.epsilon is not None and res.epsilon > 0  # a real DP-SGD round
        shared = res.shared
        # the private norm layers never leave the site; every other array does
        changed = {k for k in shared if not np.array_equal(shared[k], g[k])}
        weak_site = spec.label_regime in ("image", "bag")
        assert {k for k in trained if k in shared} <= changed
        assert {k for k in frozen if k in shared} & changed == (
            set() if weak_site else {k for k in frozen if k in shared})
        assert any("cam_head" in k for k in changed)  # the heads still train everywhere


def test_the_freeze_starts_at_its_round(tmp_path: Path) -> None:
    """``weak_sites_freeze_from_round``: a site without masks trains the
    decoder in the rounds before it and sends it unchanged from it on (real
    DP-SGD rounds, the same site and its persisted accountant)."""
    scenario = _scenario("decoder", dp=True, rounds=3, from_round=3)
    g = initial_state(scenario)
    _, dec = encoder_decoder_names(build_segmenter(scenario.model, scenario.data))
    site = materialise_site(scenario.sites[1], scenario, tmp_path)  # the image-level site
    sess = SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data,
                       weak_cfg=scenario.train.weak)
    moved = {}
    for rnd in (1, 2, 3):
        res = sess.train_round(g, RoundRequest(server_round=rnd, total_rounds=3, local_epochs=1,
                                               lr=0.01, batch_size=4, run_name="freeze-from"))
        moved[rnd] = {k for k in dec if k in res.shared and not np.array_equal(res.shared[k], g[k])}
        assert res.epsilon is not None and res.epsilon > 0
    n_dec = len([k for k in dec if k in g])
    assert len(moved[1]) == len(moved[2]) == n_dec  # before the start round: every decoder array
    assert moved[3] == set()  # from it: none


class _RecordingGrid(LocalGrid):
    """Keeps every reply the server pulled."""

    def __init__(self, sites: dict[int, Path]) -> None:
        super().__init__(sites)
        self.pulled = []

    def pull_messages(self, ids):  # noqa: ANN001, ANN201 - Grid's signature
        got = super().pull_messages(ids)
        self.pulled += got
        return got


def test_the_server_averages_the_frozen_part_over_the_mask_sites_only(tmp_path: Path) -> None:
    site_runtime._SESSIONS.clear()
    scenario = _scenario("decoder", dp=False)
    grid = _RecordingGrid(site_yamls(scenario, tmp_path))
    run_federation(grid, scenario, tmp_path / "run", run_id="freeze")
    train = [r for r in grid.pulled if r.metadata.message_type == "train"]
    by_regime = {r.content.config_records[keys.SITE][keys.LABEL_REGIME]:
                 r.content.array_records[keys.ARRAYS] for r in train}
    assert set(by_regime) == {"mask", "image", "bag"}
    enc, dec = encoder_decoder_names(build_segmenter(scenario.model, scenario.data))
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "round_0001").arrays
    shared_dec = sorted(k for k in dec if k in ckpt)
    assert shared_dec  # private norm layers are not in the checkpoint; the convolutions are
    for k in shared_dec:  # the aggregate decoder is the mask site's, not diluted by frozen copies
        np.testing.assert_allclose(ckpt[k], by_regime["mask"][k].numpy(), rtol=1e-6, atol=1e-7)
    moved = [k for k in enc if k in ckpt
             and not np.allclose(ckpt[k], by_regime["mask"][k].numpy())]
    assert moved  # the encoder is a real average over all three sites


@pytest.mark.parametrize(("weak", "msg"), [
    ({"weak_sites_freeze": "bottleneck"}, r"weak_sites_freeze"),
    ({"weak_sites_freeze_from_round": 4}, r"weak_sites_freeze_from_round is 4 but "
                                           r"weak_sites_freeze is 'none'.*Fix: set weak_sites_freeze"),
    ({"weak_sites_freeze": "decoder", "weak_sites_freeze_from_round": 0},
     r"weak_sites_freeze_from_round"),
])
def test_a_bad_freeze_value_is_refused_with_its_name(weak: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        parse_model(TrainConfig, {"weak": weak})


def test_freezing_with_no_mask_site_is_refused_with_the_fix() -> None:
    raw = _scenario("decoder", dp=False).model_dump(mode="json")
    raw["sites"] = raw["sites"][1:]
    with pytest.raises(ConfigError, match=r"weak_sites_freeze is 'decoder' but every site's "
                                          r"label_regime is image or bag.*Fix: add a site with masks"):
        parse_model(ScenarioConfig, raw)


def test_a_freeze_that_would_start_after_the_last_round_is_refused() -> None:
    raw = _scenario("decoder", dp=False, rounds=3, from_round=3).model_dump(mode="json")
    parse_model(ScenarioConfig, raw)  # the last round is a valid start
    raw["train"]["weak"]["weak_sites_freeze_from_round"] = 4
    with pytest.raises(ConfigError, match=r"weak_sites_freeze_from_round is 4 but the run has 3 "
                                          r"round\(s\): the decoder would never be frozen. Fix"):
        parse_model(ScenarioConfig, raw)
