"""All Opacus glue: make_private, accountant state <-> dict, noise calibration, budget planning.

Importing this package registers the fast per-sample gradient samplers of
:mod:`medseg_core.privacy.grad_samplers` with Opacus.
"""

from medseg_core.privacy.accountant import (
    ACCOUNTANTS,
    accountant_from_dict,
    accountant_to_dict,
    epsilon_of,
    load_accountant,
    new_accountant,
    save_accountant,
)
from medseg_core.privacy.noise import calibrate_noise, projected_epsilon
from medseg_core.privacy.budget import RoundPrivacyPlan, plan_round
from medseg_core.privacy.engine import (
    GRAD_SAMPLE_MODES,
    PrivateTraining,
    exported_state,
    make_private,
    poisson_sample_rate,
    unwrap,
)
from medseg_core.privacy.grad_samplers import register_grad_samplers

register_grad_samplers()

__all__ = [
    "ACCOUNTANTS",
    "GRAD_SAMPLE_MODES",
    "PrivateTraining",
    "RoundPrivacyPlan",
    "accountant_from_dict",
    "accountant_to_dict",
    "calibrate_noise",
    "epsilon_of",
    "exported_state",
    "load_accountant",
    "make_private",
    "new_accountant",
    "plan_round",
    "poisson_sample_rate",
    "projected_epsilon",
    "register_grad_samplers",
    "save_accountant",
    "unwrap",
]
