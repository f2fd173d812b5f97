"""Data: datasets and the synthetic phantom."""

from ldct_clip.data.datasets import CTSliceDataset as CTSliceDataset
from ldct_clip.data.datasets import PairedSliceDataset as PairedSliceDataset
from ldct_clip.data.datasets import StreamDataset as StreamDataset
from ldct_clip.data.datasets import StreamSampler as StreamSampler
from ldct_clip.data.datasets import find_pairs as find_pairs
from ldct_clip.data.datasets import find_volumes as find_volumes
from ldct_clip.data.datasets import make_train_dataset as make_train_dataset
from ldct_clip.data.datasets import make_val_dataset as make_val_dataset
from ldct_clip.data.datasets import split_patients as split_patients
