"""A site's data as its training runtime sees it: which cases it can learn
from under the federation's model, the local validation split, the test
split and, at a MIL site, its bags.

:class:`SiteData` is a base of :class:`medseg_core.training.site.SiteSession`,
which sets the attributes it reads (the site's config, the federation's
model / data / weak settings and the checked ``dataset.json``). Refusals
name the site, the cases and the fix.
"""

from __future__ import annotations

import logging
from functools import cached_property

import torch

from medseg_core.config import DataConfig, LabelRegime, ModelConfig, SiteConfig
from medseg_core.data.datalist import Datalist
from medseg_core.data.slices import SliceSet, load_slices, split_cases
from medseg_core.errors import DataIntegrityError
from medseg_core.weak import BagSet, WeakSettings, bags_from_slices, check_bags

__all__ = ["SiteData"]

logger = logging.getLogger(__name__)


class SiteData:
    """The data half of a site session (see the module docstring)."""

    site: SiteConfig
    model_cfg: ModelConfig
    data_cfg: DataConfig
    weak_settings: WeakSettings
    datalist: Datalist

    @property
    def weak(self) -> bool:
        """Whether the federation's model trains image-level cases (CAM head)."""
        return self.model_cfg.weak_head == "cam" or self.mil_enabled

    @property
    def mil_enabled(self) -> bool:
        """Whether the federation's model has a MIL head."""
        return self.model_cfg.mil_pooling != "none"

    @property
    def is_bag_site(self) -> bool:
        """Whether this site trains on MIL bags (every training case is in one)."""
        return self.mil_enabled and any(c.bag is not None for c in self.datalist.split("training"))

    @cached_property
    def train_bags(self) -> BagSet:
        """The site's training bags (bag sites only; no validation split: a
        bag site has no masks to validate on)."""
        _ = self._train_val
        return bags_from_slices(self.train_set, self._bag_labels)

    def _training_cases(self) -> list:
        """The training cases this site can learn from, by the model's head.

        Raises
        ------
        DataIntegrityError
            No usable case, or MIL bags (not trainable yet), each with the fix.
        """
        cases = self.datalist.split("training")
        if any(c.bag is not None for c in cases):
            if not self.mil_enabled:
                raise DataIntegrityError(
                    f"site {self.site.id!r}: its training cases carry MIL 'bag' ids but the "
                    "federation's model has no MIL head. Fix: set model.mil_pooling: attention "
                    "(or max) in the scenario"
                )
            self._bag_labels = check_bags(cases, self.site.id)
            return list(cases)
        masked = [c for c in cases if c.label is not None]
        if not self.weak:
            if not masked:
                raise DataIntegrityError(
                    f"site {self.site.id!r} has no training case with a mask "
                    f"(label_regime={self.site.label_regime.value!r}); mask-supervised training "
                    "needs at least one 'label' in dataset.json 'training'. For image-level "
                    "labels set model.weak_head: cam in the scenario"
                )
            return masked
        if self.site.label_regime == LabelRegime.IMAGE:
            lacking = [c.case_id for c in cases
                       if c.label is None and c.cls is None and not c.unlabeled]
            if lacking:
                raise DataIntegrityError(
                    f"site {self.site.id!r} declares label_regime 'image' but {len(lacking)} "
                    f"training case(s) have neither a 'class' nor a 'label': {lacking[:10]}"
                    f"{' ...' if len(lacking) > 10 else ''}. Fix: add \"class\": 0 or 1 to each "
                    "in dataset.json, or \"class\": null to mark a case as deliberately unlabeled"
                )
        usable = [c for c in cases if c.label is not None or c.cls is not None]
        unlabeled = len(cases) - len(usable)
        if not usable:
            raise DataIntegrityError(
                f"site {self.site.id!r} has no training case with a mask or an image-level "
                f"'class' ({len(cases)} unlabeled case(s)); weak training needs at least one"
            )
        if unlabeled and self.weak_settings.fixmatch:
            logger.info("site %s: %d unlabeled training case(s) train by FixMatch consistency",
                        self.site.id, unlabeled)
            return list(cases)
        if unlabeled:
            logger.info("site %s: %d unlabeled training case(s) are not used (train.weak.fixmatch "
                        "is off)", self.site.id, unlabeled)
        return usable

    @cached_property
    def _train_val(self) -> tuple[SliceSet, SliceSet | None]:
        cases = self._training_cases()
        all_slices = load_slices(
            cases, image_size=self.data_cfg.image_size,
            context_slices=self.data_cfg.context_slices, require_labels=not self.weak,
        )
        if self.is_bag_site:
            return all_slices, None
        if self.weak:
            per_case = torch.bincount(all_slices.case_index, minlength=len(cases))
            vol_pos = [c.case_id for i, c in enumerate(cases)
                       if c.label is None and c.cls == 1 and int(per_case[i]) > 1]
            if vol_pos:
                raise DataIntegrityError(
                    f"site {self.site.id!r}: {len(vol_pos)} positive 3D volume(s) with only an "
                    f"image-level 'class' (e.g. {vol_pos[:3]}): a volume's label does not say "
                    "which slices hold the lesion, so it is a MIL bag of slices, which is not "
                    "trainable yet. Fix: give those volumes masks, or leave this site out"
                )
        tr, va = split_cases(len(all_slices.case_ids), self.site.val_fraction, self.site.seed)
        # Validation Dice needs masks: a drawn validation case without one
        # trains instead (nothing is left unused).
        tr = list(tr) + [p for p in va if cases[p].label is None]
        va = [p for p in va if cases[p].label is not None]
        return all_slices.subset(tr), (all_slices.subset(va) if va else None)

    @cached_property
    def train_case_labels(self) -> torch.Tensor:
        """``(n_cases,)`` int64 per training case (of :attr:`train_set`):
        1 if it has a lesion, 0 if not, -1 unknown; from its image-level or
        bag ``class``, else from its mask (any foreground)."""
        tr = self.train_set
        n = len(tr.case_ids)
        cls = torch.full((n,), -1, dtype=torch.int64).scatter_reduce(
            0, tr.case_index, tr.classes.long(), reduce="amax", include_self=False)
        if tr.labels is not None:
            fg = (tr.labels.flatten(1) > 0).any(dim=1).long()
            masked = tr.has_mask
            from_mask = torch.full((n,), -1, dtype=torch.int64).scatter_reduce(
                0, tr.case_index[masked], fg[masked], reduce="amax", include_self=False)
            cls = torch.where(cls < 0, from_mask, cls)
        return cls

    @property
    def train_set(self) -> SliceSet:
        """Training slices (after the local validation split)."""
        return self._train_val[0]

    @property
    def val_set(self) -> SliceSet | None:
        """Local validation slices (None when val_fraction is 0)."""
        return self._train_val[1]

    @cached_property
    def test_set(self) -> SliceSet:
        """The site's test split (held out). Cases may lack masks: they are
        then scored by image-level AUC only (:meth:`evaluate`)."""
        return load_slices(
            self.datalist.split("test"), image_size=self.data_cfg.image_size,
            context_slices=self.data_cfg.context_slices, require_labels=False,
        )
