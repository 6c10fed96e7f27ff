"""Which subjects are held out of detail training: a hash draw per subject, never per item.

Every expression and photo of a held-out subject is held out together, so the held-out error measures
faces the network has never seen (not other photos of a training face). The draw is
:func:`facedetail.io.seeds.in_holdout` of the subject id: stable as the set grows and the same in
every stage that asks (the displacement PCA must not see held-out subjects either).
"""

from __future__ import annotations

from facedetail.io.seeds import in_holdout

SPLIT_STREAM = "detail_split"
"""The seed stream of the split (the same in ``detail_pca``, ``detail_pairs`` and ``train_detail``)."""


def subject_of(item_id: str) -> str:
    """The subject of an item id ``<subject>/<expression>`` or of a pair id ``<subject>/<expression>/<photo>``."""
    return item_id.split("/", 1)[0]


def is_held_out(subject: str, fraction: float, seed: int) -> bool:
    """Whether ``subject`` is in the held-out split (``fraction`` of subjects, drawn with ``seed``)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), not {fraction}")
    return in_holdout(seed, SPLIT_STREAM, subject, fraction)
