"""Site-private adaptation layers (never aggregated, never sent).

* :mod:`.layers` - the residual input adapter and the wrapper that puts it in
  front of a segmenter;
* :mod:`.partition` - which state-dict keys are site-private for an
  :class:`~medseg_core.config.AdaptationMode`, and the split/merge/leak check
  every outgoing state goes through;
* :mod:`.store` - the site's per-round store of its private parameters
  (``state_dir/adaptation/``), so they survive rounds, restarts and resumes;
* :mod:`.tta` - test-time adaptation of the private parameters for a site that
  never trained (entropy minimisation on its unlabeled images).
"""

from medseg_core.adaptation.layers import AdaptedSegmenter, InputAdapter
from medseg_core.adaptation.partition import (
    check_shared_only,
    local_keys,
    merge_state,
    split_state,
)
from medseg_core.adaptation.store import AdaptationStore

__all__ = [
    "AdaptationStore",
    "AdaptedSegmenter",
    "InputAdapter",
    "check_shared_only",
    "local_keys",
    "merge_state",
    "split_state",
]
