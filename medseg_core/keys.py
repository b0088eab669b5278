"""Record and metric names shared by client and server.

One place that knows the wire vocabulary; client and server import from here
so a typo is an ImportError, not a silently missing metric.
"""

from __future__ import annotations

# RecordDict keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"  # ConfigRecord in replies: {"site-id": str, "label-regime": str}

# ConfigRecord keys sent by the server
SERVER_ROUND = "server-round"
TOTAL_ROUNDS = "total-rounds"
LOCAL_EPOCHS = "local-epochs"
LEARNING_RATE = "lr"
PROXIMAL_MU = "proximal-mu"
EVAL_SPLIT = "split"  # "val" or "test"
RUN_NAME = "run-name"
MODEL_ROUND = "model-round"  # the round whose global model an evaluate message carries
AUC = "auc"  # image/bag-level ROC AUC on the site's test split
EMPTY_DICE = "empty-dice"  # Dice an all-background prediction would score on that split
DICE_SE = "dice-se"  # standard error of the split's Dice over its cases
MIN_COMPONENT_VOXELS = "min-component-voxels"
BAG_GATE = "bag-gate"  # evaluation: segment only the bags the MIL head calls positive
EVAL_THRESHOLD = "eval-threshold"  # evaluation: "argmax", or "site" (each site's calibrated threshold)
EVAL_CALIBRATION_CASES = "eval-calibration-cases"  # evaluation: cases a site threshold reads (0: all)
EVAL_MIL_HEAD = "eval-mil-head"  # evaluation: "federated", or "site" (a bag site's refit MIL head)
THRESHOLD = "threshold"  # evaluate reply: the foreground threshold the site scored at (NaN: argmax)
EVAL_REFINE = "eval-refine"  # evaluation: post-processing of predictions ("none" or "pamr")
MIL_AUC = "mil-auc"  # bag sites: AUC of the MIL head's bag-level prediction
BAG_BATCH_SIZE = "bag-batch-size"  # train: a MIL site's bags per DP step (0: batch-size / K)
ADAPTATION_FROM_ROUND = "adaptation-from-round"  # train: first round the private layers train
PRIVATE_EPOCHS = "private-epochs"  # train: epochs of the private layers alone before the local epochs
PERSONALIZE_EPOCHS = "personalize-epochs"  # train: epochs whose DP budget to reserve; personalize: to run
PERSONALIZE_OPTIMIZER = "personalize-optimizer"  # personalize: adam or sgd
PERSONALIZE_MOMENTUM = "personalize-momentum"  # personalize: SGD momentum
PERSONALIZE_LAYERS = "personalize-layers"  # personalize: "private" layers or "all" weights
PERSONALIZED = "personalized"  # evaluate: with the site's personalised private layers
POSITIVES_GATE = "positives-gate-open"  # train/personalize: the weak positives' closed-loop warm-up

# MetricRecord keys sent by clients
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
DICE = "dice"
HD95 = "hd95"
EPSILON = "epsilon"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
MAX_GRAD_NORM = "max-grad-norm"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
N_TRAIN = "n-train"
TRAIN_SECONDS = "train-seconds"
DICE_BEFORE = "dice-before"  # personalize reply: local val Dice before personalisation ("dice": after)
EPOCHS_KEPT = "epochs-kept"  # personalize reply: the epoch kept (0: the federated layers)
# set by the server on accepted train replies: num-examples x the site's
# supervision weight (strategy.regime_weights); what aggregation weighs by
AGG_WEIGHT = "agg-weight"

# ConfigRecord keys in the SITE record of a reply
SITE_ID = "site-id"
LABEL_REGIME = "label-regime"
ACCOUNTANT = "accountant"
DP_ENABLED = "dp-enabled"

# Error codes carried in Flower error replies (Error.code)
ERR_CLIENT_FAILURE = 4000  # an unexpected exception at the site (reason = type and message)
ERR_BUDGET_EXHAUSTED = 4001
ERR_DATA_INTEGRITY = 4002
ERR_SITE_CONFIG = 4003
ERR_ADAPTATION_LEAK = 4004  # a site-private parameter would have been sent; nothing was
