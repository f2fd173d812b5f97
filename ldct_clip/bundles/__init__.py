"""The MONAI bundles of ldct-clip: where they live, what they ship, and running them.

Every command that runs the model runs a bundle config through :class:`BundlePipeline`.
"""

from ldct_clip.bundles.locate import (
    DEFAULT_CT_BUNDLE,
    SHIPPED_WEIGHTS,
    TASKS,
    available_bundles,
    bundle_metadata,
    bundle_network_def,
    bundle_search_paths,
    bundle_weights,
    config_bundle_root,
    expected_weights_sha256,
    is_shipped_bundle,
    resolve_bundle,
)
from ldct_clip.bundles.pipeline import BundlePipeline, EvaluatorDenoiser

__all__ = [
    "DEFAULT_CT_BUNDLE",
    "SHIPPED_WEIGHTS",
    "TASKS",
    "BundlePipeline",
    "EvaluatorDenoiser",
    "available_bundles",
    "bundle_metadata",
    "bundle_network_def",
    "bundle_search_paths",
    "bundle_weights",
    "config_bundle_root",
    "expected_weights_sha256",
    "is_shipped_bundle",
    "resolve_bundle",
]
