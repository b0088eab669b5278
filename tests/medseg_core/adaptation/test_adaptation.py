"""Site-private adaptation layers: which keys stay local, the store, the leak check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from medseg_core.adaptation import (
    AdaptationStore,
    InputAdapter,
    check_shared_only,
    local_keys,
    merge_state,
    split_state,
)
from medseg_core.config import AdaptationMode, DataConfig, ModelConfig, parse_model
from medseg_core.data.slices import _torch_threads
from medseg_core.errors import AdaptationLeakError, ConfigError
from medseg_core.training.session import build_segmenter, load_state


def _model(mode: str) -> torch.nn.Module:
    cfg = parse_model(ModelConfig, {"channels": [8, 16], "strides": [2], "norm_groups": 4,
                                    "adaptation": mode})
    return build_segmenter(cfg, DataConfig(image_size=32))


def test_norm_mode_keeps_every_groupnorm_affine_local() -> None:
    model = _model("norm")
    keys = local_keys(model, AdaptationMode.NORM)
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and keys == {f"{n}.{p}" for n in norms for p in ("weight", "bias")}
    assert not any(k.startswith("adapter.") for k in keys)


def test_adapter_modes_and_none() -> None:
    model = _model("norm+adapter")
    both = local_keys(model, AdaptationMode.NORM_ADAPTER)
    only_adapter = local_keys(model, AdaptationMode.ADAPTER)
    assert only_adapter == {k for k in model.state_dict() if k.startswith("adapter.")}
    assert only_adapter < both
    assert local_keys(model, AdaptationMode.NONE) == frozenset()


def test_adapter_mode_on_a_model_without_adapter_is_an_error() -> None:
    with pytest.raises(ValueError, match="needs an input adapter"):
        local_keys(_model("none"), AdaptationMode.ADAPTER)


def test_unknown_mode_names_the_choices() -> None:
    with pytest.raises(Exception, match="norm\\+adapter"):
        parse_model(ModelConfig, {"adaptation": "nrom"})


@pytest.mark.parametrize(("field_grid", "hidden", "depth"), [(8, 8, 1), (0, 8, 1), (8, 16, 3)])
def test_input_adapter_is_identity_at_init_and_dp_compatible(field_grid: int, hidden: int,
                                                             depth: int) -> None:
    adapter = InputAdapter(3, hidden=hidden, field_grid=field_grid, depth=depth)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(adapter(x), x)
    assert any(n.startswith("field") for n, _ in adapter.named_parameters()) == bool(field_grid)
    assert len(adapter.deeper) == depth - 1 and adapter.conv1.out_channels == hidden
    model = _model("norm+adapter")
    ModuleValidator.validate(model, strict=True)
    # Opacus computes a per-sample gradient for every adapter parameter, the
    # field's included (pooling and interpolation are parameter-free)
    with torch.no_grad():  # leave the identity so every layer gets a gradient
        for p in adapter.parameters():
            p.normal_(0.0, 0.1)
    gsm = GradSampleModule(adapter, loss_reduction="sum")
    gsm(x.requires_grad_(True)).pow(2).sum().backward()
    for name, p in adapter.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape == (2, *p.shape), name
        assert torch.allclose(p.grad_sample.sum(0), p.grad, atol=1e-5), name


def test_adapter_field_grid_is_configurable_and_checked() -> None:
    cfg = parse_model(ModelConfig, {"channels": [8, 16], "strides": [2], "norm_groups": 4,
                                    "adaptation": "adapter", "adapter_field_grid": 0})
    model = build_segmenter(cfg, DataConfig(image_size=32))
    assert not any(k.startswith("adapter.field") for k in model.state_dict())
    assert any(k.startswith("adapter.field") for k in _model("adapter").state_dict())
    with pytest.raises(Exception, match="adapter_field_grid"):
        parse_model(ModelConfig, {"adapter_field_grid": -1})
    # a state saved without the field (field_grid 0) does not load silently into
    # a model with it: the error names the setting that fixes it
    old = {k: v.numpy() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError,
                       match=r"missing 6 key\(s\) \['adapter\.field1\.bias'.*adapter_field_grid"):
        load_state(_model("adapter"), old)


def test_adapter_width_and_depth_are_configurable_and_checked() -> None:
    base = {"channels": [8, 16], "strides": [2], "norm_groups": 4, "adaptation": "adapter"}
    cfg = parse_model(ModelConfig, {**base, "adapter_hidden": 16, "adapter_depth": 3})
    model = build_segmenter(cfg, DataConfig(image_size=32))
    assert {k for k in model.state_dict() if k.startswith("adapter.deeper.")} == {
        f"adapter.deeper.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    assert model.adapter.conv1.weight.shape[0] == 16
    # the private keys are every adapter key, the deeper layers' included
    assert local_keys(model, AdaptationMode.ADAPTER) == {
        k for k in model.state_dict() if k.startswith("adapter.")}
    for key, bad in (("adapter_depth", 0), ("adapter_hidden", 0), ("adapter_depth", 9)):
        with pytest.raises(Exception, match=key):
            parse_model(ModelConfig, {**base, key: bad})
    with pytest.raises(ValueError, match="depth=0"):
        InputAdapter(1, depth=0)
    # a default adapter's state (hidden 8, depth 1) does not load into this one,
    # and the other way round: the error names the keys and both settings
    old = {k: v.numpy() for k, v in _model("adapter").state_dict().items()}
    with pytest.raises(ConfigError, match=r"missing 4 key\(s\) \['adapter\.deeper\.0\.bias'"
                                          r".*adapter_hidden and model\.adapter_depth"):
        load_state(model, old)
    wide = build_segmenter(parse_model(ModelConfig, {**base, "adapter_hidden": 16}),
                           DataConfig(image_size=32))
    with pytest.raises(ConfigError, match=r"differ in shape \(adapter\.conv1\.bias: \(8,\) in "
                                          r"the state, \(16,\) in the model.*adapter_hidden"):
        load_state(wide, old)


def _fitted_error(adapter: InputAdapter, train: tuple[torch.Tensor, torch.Tensor],
                  test: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator,
                  steps: int) -> float:
    """Test MSE of ``adapter`` after ``steps`` Adam steps (batches of 16 drawn
    from ``gen``) mapping ``train[0]`` to ``train[1]``."""
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(train[0]), (16,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(adapter(train[0][idx]), train[1][idx]).backward()
        opt.step()
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(adapter(test[0]), test[1]))


def test_deeper_adapter_denoises_what_one_layer_cannot() -> None:
    # A site whose scanner adds more noise than the others' (strong_shift's
    # bias-noisy): one 3x3 layer is a 3x3 filter; three (receptive field 7x7)
    # average over more pixels of a smooth image. Same data, optimiser, steps.
    gen = torch.Generator().manual_seed(0)

    def noisy(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        coarse = torch.randn(n, 1, 6, 6, generator=gen)
        clean = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bicubic",
                                                align_corners=True)
        return clean + 0.5 * torch.randn(clean.shape, generator=gen), clean

    train, target = noisy(256)
    test, test_target = noisy(64)
    errors = {}
    with _torch_threads(1):
        for hidden, depth in ((8, 1), (16, 3)):
            torch.manual_seed(0)
            adapter = InputAdapter(1, hidden=hidden, field_grid=0, depth=depth)
            errors[depth] = _fitted_error(adapter, (train, target), (test, test_target), gen, 150)
    before = float(torch.nn.functional.mse_loss(test, test_target))
    assert errors[3] < 0.7 * errors[1] < 0.7 * before, (errors, before)


def _shaded(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stationary textures (mean 1) under a random smooth gain per case, both
    z-scored per case as loading does: (shaded, clean)."""
    clean = 1.0 + 0.3 * torch.randn(n, 1, 32, 32, generator=gen)
    coarse = torch.rand(n, 1, 3, 3, generator=gen) * 1.2 + 0.4  # gain 0.4-1.6
    gain = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bicubic",
                                           align_corners=True).clamp_min(0.2)

    def z(t: torch.Tensor) -> torch.Tensor:
        return (t - t.mean((2, 3), keepdim=True)) / t.std(dim=(2, 3), keepdim=True)

    return z(clean * gain), z(clean)


def test_intensity_field_undoes_a_per_case_shading_the_residual_block_cannot() -> None:
    # A per-case multiplicative field is not a fixed filter: the residual block
    # alone (field_grid=0) cannot learn to remove it, the case-conditional
    # field can. Same data, same optimiser, same steps.
    gen = torch.Generator().manual_seed(0)
    train, target = _shaded(256, gen)
    test, test_target = _shaded(64, gen)
    errors = {}
    with _torch_threads(1):  # small tensors: one thread is fastest, and safe beside workers
        for grid in (8, 0):
            torch.manual_seed(0)
            adapter = InputAdapter(1, hidden=8, field_grid=grid)
            errors[grid] = _fitted_error(adapter, (train, target), (test, test_target), gen, 100)
    before = float(torch.nn.functional.mse_loss(test, test_target))
    assert errors[8] < 0.5 * errors[0], (errors, before)
    assert errors[8] < 0.5 * before, (errors, before)


def test_split_merge_roundtrip_and_leak_check() -> None:
    model = _model("norm+adapter")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    local = local_keys(model, AdaptationMode.NORM_ADAPTER)
    shared, private = split_state(state, local)
    assert set(private) == local and not set(shared) & local
    assert merge_state(shared, private).keys() == state.keys()
    check_shared_only(shared, local, what="update")  # no error
    with pytest.raises(AdaptationLeakError, match="adapter.conv1.weight.*Refused before sending"):
        check_shared_only(state, local, what="update")
    with pytest.raises(AdaptationLeakError, match="global model from the server"):
        merge_state(state, private)


def test_store_pairs_rounds_and_isolates_runs(tmp_path: Path) -> None:
    store = AdaptationStore(tmp_path, "run-a")
    for r in (1, 2, 4):
        store.save(r, {"w": np.full(2, float(r), np.float32)})
    assert store.rounds() == [1, 2, 4]
    assert store.load_before(1) is None
    assert store.load_before(4)["w"][0] == 2.0  # training round 4 starts from round 2's
    assert store.load_at(3)["w"][0] == 2.0  # the site missed round 3
    assert store.load_at(4)["w"][0] == 4.0
    assert AdaptationStore(tmp_path, "run-b").load_at(4) is None


def _adapted_site(tmp_path: Path, mode: str = "norm+adapter"):
    from medseg_core.config import ScenarioConfig
    from medseg_core.sites import materialise_site
    from medseg_core.training.site import SiteSession

    scenario = parse_model(ScenarioConfig, {
        "sites": [{"id": "new", "n_train": 8, "n_test": 2,
                   "shift": {"intensity_scale": 1.6, "intensity_offset": 0.2}}],
        "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4, "adaptation": mode},
        "data": {"image_size": 32}})
    site = materialise_site(scenario.sites[0], scenario, tmp_path)
    return scenario, SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data)


def test_tta_changes_only_private_parameters_and_lowers_entropy(tmp_path: Path) -> None:
    from server.federation import initial_state

    scenario, sess = _adapted_site(tmp_path)
    glob = initial_state(scenario)
    before = sess.private_state("r", 3)
    res = sess.test_time_adapt(glob, "r", 3, epochs=3, lr=1e-2)
    assert res.entropy_after < res.entropy_before and res.steps == 3
    assert set(res.private) == sess.local_keys
    assert any(not np.array_equal(res.private[k], before[k]) for k in before)
    # stored as the site's parameters for that round: evaluation now uses them
    stored = AdaptationStore(sess.site.state_dir, "r").load_at(3)
    assert all(np.array_equal(stored[k], res.private[k]) for k in res.private)
    assert set(glob) & sess.local_keys == set()  # the global model was not touched


def test_tta_without_private_parameters_says_how_to_fix(tmp_path: Path) -> None:
    from server.federation import initial_state

    scenario, sess = _adapted_site(tmp_path, mode="none")
    with pytest.raises(ValueError, match="set model.adaptation"):
        sess.test_time_adapt(initial_state(scenario), "r", 1)


def test_medseg_adapt_cli_reports_before_and_after(tmp_path: Path, capsys) -> None:
    import json

    from medseg_core.checkpoint import save_checkpoint
    from server.federation import initial_state
    from simulations.cli import main

    scenario, sess = _adapted_site(tmp_path)
    ck = save_checkpoint(tmp_path / "ck", round=4, arrays=initial_state(scenario),
                         config=json.loads(scenario.model_dump_json()), extra={"run_id": "fed-1"})
    site_yaml = tmp_path / "sites" / "new" / "site.yaml"
    assert main(["adapt", "--site", str(site_yaml), "--checkpoint", str(ck), "--epochs", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["round"] == 4 and report["steps"] == 1
    assert 0.0 <= report["test_dice_before"] <= 1.0 and 0.0 <= report["test_dice_after"] <= 1.0
    assert AdaptationStore(sess.site.state_dir, "fed-1").rounds() == [4]
