"""Stage ``train_detail_supervised``: the ablation the paper's claim needs — the same training with η = 0.

The paper says the unsupervised re-rendering loss (``η·L_recon`` on wild photos) helps. This stage trains the
detail network exactly as ``train_detail`` does (the same ``train_detail:`` params section, pairs, PCA, split,
seed and schedule) except that η is 0, so the wild photos and ``L_recon`` are never used; the ``evaluate``
stage scores both networks on the same held-out photos. Outputs as ``train_detail``'s, in
``data/train_detail_supervised/`` (curves in ``dvclive/train_detail_supervised/``).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from facedetail.io.transaction import StageOutput
from stages import train_detail
from stages._common import PARAMS_FILE, Stage, main
from stages.train_detail import TrainDetailParams

NAME = "train_detail_supervised"


def supervised_only(params: TrainDetailParams) -> TrainDetailParams:
    """``params`` with η = 0 and no wild textures (which only the η term reads)."""
    train = params.train
    loss = train.loss.model_copy(update={"eta_recon": 0.0})
    return params.model_copy(update={"train": train.model_copy(update={"loss": loss}), "wild": ""})


@dataclasses.dataclass(frozen=True)
class AblationStage(Stage[TrainDetailParams]):
    """A stage that reads another stage's params section and changes it (here: η = 0)."""

    source: str = train_detail.NAME

    def load_params(self, root: Path, params_file: str = PARAMS_FILE) -> TrainDetailParams:
        """``train_detail``'s params, validated as that stage validates them, with η = 0."""
        return supervised_only(train_detail.STAGE.load_params(root, params_file))


def build(params: TrainDetailParams, root: Path, out: StageOutput) -> dict[str, Any]:
    """``train_detail``'s training, in this stage's folders."""
    return train_detail.build(params, root, out, name=NAME)


STAGE = AblationStage(NAME, TrainDetailParams, build, train_detail.inputs, seed=lambda p: p.train.seed, resumable=True,
                      headline=("heldout.mae_mm", "heldout.mean_patch_mae_mm", "heldout.beats_baselines"),
                      look_at=(train_detail.PREVIEW,),
                      limits="An ablation: the same network and data as train_detail, without the unsupervised loss.")
run = STAGE.run

if __name__ == "__main__":
    sys.exit(main(STAGE))
