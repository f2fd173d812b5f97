"""What the MONAI bundle specification requires of metadata.json (docs/source/mb_specification.rst).

MONAI >= 1.2 names the package list "required_packages_version" (it renames the older
"optional_packages_version" on load). Checked offline: MONAI's verify_metadata downloads its schema.
"""

REQUIRED_KEYS = (
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
TENSOR_KEYS = (
    "type",
    "format",
    "modality",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
)
