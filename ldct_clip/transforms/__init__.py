"""MONAI-style array and dictionary transforms: HU normalisation and windows, noise models, camera pipeline."""

from ldct_clip.transforms.camera_response import CameraResponse as CameraResponse
from ldct_clip.transforms.camera_response import ParametricResponse as ParametricResponse
from ldct_clip.transforms.camera_response import load_crf_mat as load_crf_mat
from ldct_clip.transforms.camera_response import load_dorf_curves as load_dorf_curves
from ldct_clip.transforms.ct_noise import TRAIN_NOISE_STD as TRAIN_NOISE_STD
from ldct_clip.transforms.ct_noise import CTGaussianNoise as CTGaussianNoise
from ldct_clip.transforms.ct_noise import CTGaussianNoised as CTGaussianNoised
from ldct_clip.transforms.ct_noise import SimulatedCTNoise as SimulatedCTNoise
from ldct_clip.transforms.ct_noise import SimulatedCTNoised as SimulatedCTNoised
from ldct_clip.transforms.ct_noise import SimulationSettings as SimulationSettings
from ldct_clip.transforms.intensity import HUToModelRange as HUToModelRange
from ldct_clip.transforms.intensity import HUToModelRanged as HUToModelRanged
from ldct_clip.transforms.intensity import ModelRangeToHU as ModelRangeToHU
from ldct_clip.transforms.intensity import ModelRangeToHUd as ModelRangeToHUd
from ldct_clip.transforms.intensity import WindowHU as WindowHU
from ldct_clip.transforms.intensity import WindowHUd as WindowHUd
from ldct_clip.transforms.io import LoadCT, LoadCTd, LoadImaged, SaveCT, SaveCTd, SaveImaged
from ldct_clip.transforms.isp import CameraPipelineNoise as CameraPipelineNoise
from ldct_clip.transforms.isp import CameraPipelineNoised as CameraPipelineNoised
from ldct_clip.transforms.noise import NOISE_SUITES as NOISE_SUITES
from ldct_clip.transforms.noise import GaussianNoise as GaussianNoise
from ldct_clip.transforms.noise import GaussianNoised as GaussianNoised
from ldct_clip.transforms.noise import MixtureNoise as MixtureNoise
from ldct_clip.transforms.noise import MixtureNoised as MixtureNoised
from ldct_clip.transforms.noise import PoissonNoise as PoissonNoise
from ldct_clip.transforms.noise import PoissonNoised as PoissonNoised
from ldct_clip.transforms.noise import SaltPepperNoise as SaltPepperNoise
from ldct_clip.transforms.noise import SaltPepperNoised as SaltPepperNoised
from ldct_clip.transforms.noise import SpatialGaussianNoise as SpatialGaussianNoise
from ldct_clip.transforms.noise import SpatialGaussianNoised as SpatialGaussianNoised
from ldct_clip.transforms.noise import SpeckleNoise as SpeckleNoise
from ldct_clip.transforms.noise import SpeckleNoised as SpeckleNoised
from ldct_clip.transforms.noise import load_noise_suites as load_noise_suites
from ldct_clip.transforms.noise import make_noise as make_noise
