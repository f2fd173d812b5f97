"""Geometric training augmentation: the 8 flips/rotations (the dihedral group of the square).

The reference draws one of the 8 modes uniformly per crop. MONAI has no single transform for it, but two
of its transforms give exactly that distribution, so no own code is needed:

- ``RandRotate90(prob=0.75, max_k=3)``: with probability 0.75 it rotates by k*90 degrees with k uniform in
  {1, 2, 3}, otherwise not at all, so k is uniform in {0, 1, 2, 3};
- ``RandFlip(prob=0.5, spatial_axis=0)``: flips one axis with probability 0.5, independently.

The 4 x 2 outcomes are the 8 distinct elements of the group, each with probability 1/8
(``tests/test_datasets.py`` counts them).
"""

from __future__ import annotations

from monai.config import KeysCollection
from monai.transforms import Compose, RandFlip, RandFlipd, RandRotate90, RandRotate90d

__all__ = ["RandDihedral", "RandDihedrald"]


class RandDihedral(Compose):
    """One of the 8 flips/rotations of a 2-D channel-first image, uniformly at random.

    Args:
        spatial_axes: the two spatial axes of the image plane.
    """

    def __init__(self, spatial_axes: tuple[int, int] = (0, 1)) -> None:
        super().__init__(
            [
                RandRotate90(prob=0.75, max_k=3, spatial_axes=spatial_axes),
                RandFlip(prob=0.5, spatial_axis=spatial_axes[0]),
            ]
        )


class RandDihedrald(Compose):
    """Dictionary version of :class:`RandDihedral`: the same flip/rotation for every key of a sample.

    Args:
        keys: keys of the images to transform alike (e.g. noisy and clean).
        spatial_axes: the two spatial axes of the image plane.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self, keys: KeysCollection, spatial_axes: tuple[int, int] = (0, 1), allow_missing_keys: bool = False
    ) -> None:
        super().__init__(
            [
                RandRotate90d(
                    keys, prob=0.75, max_k=3, spatial_axes=spatial_axes, allow_missing_keys=allow_missing_keys
                ),
                RandFlipd(
                    keys, prob=0.5, spatial_axis=spatial_axes[0], allow_missing_keys=allow_missing_keys
                ),
            ]
        )
