"""Tests for medseg_core.models.registry: DP-compatible segmenters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from medseg_core.config import ModelConfig
from medseg_core.errors import ConfigError
from medseg_core.models import MODEL_REGISTRY, basicunet_features, build_model, validate_dp_compatible
from medseg_core.models import registry as registry_module

torch.set_num_threads(1)

SMALL = {"channels": (8, 16), "strides": (2,), "norm_groups": 4, "num_res_units": 1}


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
@pytest.mark.parametrize("overrides", [{}, SMALL], ids=["default", "small"])
def test_every_model_passes_opacus_strict_validation_and_forward_shape(name: str, overrides: dict) -> None:
    # Arrange
    cfg = ModelConfig(name=name, **overrides)
    x = torch.randn(2, 1, 32, 32)

    # Act
    model = build_model(cfg, in_channels=1, out_channels=3)
    ModuleValidator.validate(model, strict=True)  # raises on any problem
    out = model(x)

    # Assert
    assert out.shape == (2, 3, 32, 32)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_models_use_only_groupnorm_and_noninplace_parameter_free_activations(name: str) -> None:
    model = build_model(ModelConfig(name=name, **SMALL), in_channels=2, out_channels=3)

    kinds = {type(m) for m in model.modules()}

    assert nn.GroupNorm in kinds
    assert nn.LeakyReLU in kinds
    assert not kinds & {nn.BatchNorm2d, nn.InstanceNorm2d, nn.PReLU}
    assert all(not getattr(m, "inplace", False) for m in model.modules())


def test_basicunet_upsamples_without_transposed_convolutions() -> None:
    model = build_model(ModelConfig(name="basicunet", **SMALL), in_channels=1, out_channels=2)

    assert not any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())


def test_groupnorm_over_class_channels_uses_a_dividing_group_count() -> None:
    # MONAI UNet normalises its top up-convolution over out_channels (=3 here),
    # which norm_groups=4 does not divide.
    model = build_model(ModelConfig(**SMALL), in_channels=1, out_channels=3)

    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]

    assert {(n.num_channels, n.num_groups) for n in norms} >= {(8, 4), (3, 1)}
    assert all(n.num_channels % n.num_groups == 0 and n.affine for n in norms)


def test_unknown_model_name_raises_config_error_with_did_you_mean() -> None:
    cfg = ModelConfig.model_construct(**{**ModelConfig().model_dump(), "name": "unett"})

    with pytest.raises(ConfigError, match=r"unknown model name 'unett'.*'basicunet', 'unet'.*did you mean 'unet'\?"):
        build_model(cfg, in_channels=1, out_channels=2)


def test_config_rejects_unknown_model_name_through_the_registry() -> None:
    with pytest.raises(ValueError, match=r"did you mean 'basicunet'"):
        ModelConfig(name="basicunt")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_non_positive_channel_count_raises_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"in_channels must be a positive int, got"):
        build_model(ModelConfig(**SMALL), in_channels=bad, out_channels=2)  # type: ignore[arg-type]


def test_batchnorm_model_fails_validation_listing_every_problem() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.InstanceNorm2d(4, affine=False, track_running_stats=True),
    )

    with pytest.raises(ConfigError, match=r"3 problem\(s\)") as info:
        validate_dp_compatible(model)

    msg = str(info.value)
    assert "1 (BatchNorm2d): BatchNorm cannot support training with differential privacy" in msg
    assert "2 (ReLU): inplace=True" in msg
    assert "3 (InstanceNorm2d): We do not support tracking running stats" in msg
    assert "GroupNorm" in msg  # the fix


def test_validation_accepts_models_in_eval_mode() -> None:
    model = build_model(ModelConfig(**SMALL), in_channels=1, out_channels=2).eval()

    validate_dp_compatible(model)  # structural check only; no exception


def test_basicunet_features_pad_by_doubling_and_trim_to_five_levels() -> None:
    assert basicunet_features((16, 32, 64, 128)) == (16, 32, 64, 128, 256, 16)
    assert basicunet_features((8,)) == (8, 16, 32, 64, 128, 8)
    assert basicunet_features((4, 8, 16, 32, 64, 128)) == (4, 8, 16, 32, 64, 4)


def test_basicunet_features_rejects_empty_channels() -> None:
    with pytest.raises(ConfigError, match=r"model channels is empty"):
        basicunet_features(())


def test_registry_module_does_not_import_config_at_import_time() -> None:
    # config.py imports the registry lazily inside a validator; an import of
    # config from the registry outside TYPE_CHECKING would make a cycle.
    tree = ast.parse(Path(registry_module.__file__).read_text(encoding="utf-8"))

    top_level_imports = [
        node
        for node in tree.body
        if isinstance(node, ast.ImportFrom | ast.Import)
    ]
    modules = {getattr(n, "module", None) for n in top_level_imports} | {
        a.name for n in top_level_imports if isinstance(n, ast.Import) for a in n.names
    }

    assert "medseg_core.config" not in modules
