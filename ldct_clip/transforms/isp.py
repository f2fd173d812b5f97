"""Camera pipeline (ISP) noise synthesis for the sRGB task, vectorised over whole images (numpy, torch conv).

The CBDNet chain (Guo et al., CVPR 2019) as used by the reference code to make its sRGB training pairs
(``alwaysuu/CLIPDenoising``, ``basicsr/data/ISP_implement.py``, ``cbdnet_noise_generate_srgb``), our own code:

1. inverse camera response curve (sRGB value -> irradiance);
2. sRGB -> XYZ as :func:`skimage.color.rgb2xyz` computes it: the reference uses that function, which applies
   the sRGB transfer curve's inverse on top of the camera response's (:func:`srgb_to_linear`, then skimage's
   ``xyz_from_rgb`` matrix);
3. XYZ -> camera space with a random convex combination of the XYZ->camera matrices in
   :data:`XYZ_TO_CAMERA_MATRICES` (each row normalised to sum 1, result clipped to [0, 1]);
4. Bayer mosaic, one of RGGB, BGGR, GRBG, GBRG;
5. inverse white balance: red sites times ``fr``, blue sites times ``fb``, both uniform in [0.75, 1];
6. noise on the raw mosaic, exactly the reference's formula (``add_PG_noise``)::

       y = clip(x + N1 * sigma_s * x + N2 * sigma_c, 0, 1),   N1, N2 ~ N(0, 1) independent,

   i.e. a standard deviation ``sqrt((sigma_s x)^2 + sigma_c^2)``. The paper's fixed setting ("fixed") is
   sigma_s = 0.04, sigma_c = 0.03 (reference ``is_strict``: s2/4, c2/2 with s2 = 0.16, c2 = 0.06); the random
   setting draws both log-uniformly from [1e-4, 0.16] and [1e-4, 0.06];
7. white balance (divide by ``fr``, ``fb``), clip; 8. Malvar-He-Cutler (2004) demosaicing, clip;
9. camera -> XYZ (inverse matrix), clip; 10. XYZ -> sRGB as :func:`skimage.color.xyz2rgb` (matrix, sRGB
   transfer curve, clip: :func:`linear_to_srgb`);
11. camera response curve.

Differences from the reference, on purpose: curves are evaluated by linear interpolation (the reference
looks up the nearest of 1024 bins, a quantisation of up to 1/2048); demosaicing mirrors the border without
repeating the edge sample (torch's ``reflect`` padding, scipy's ``mirror``), which keeps the Bayer phase,
where the reference's scipy ``"reflect"`` mixes colours in the outer two rows and columns; the chain runs
in float32.

The camera response curves (:class:`ParametricResponse`, the DoRF and CBDNet curve files) are in
``ldct_clip.transforms.camera_response``; the Bayer mosaic and Malvar demosaicing in
``ldct_clip.transforms.mosaic``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import convert_to_dst_type
from skimage.color.colorconv import rgb_from_xyz, xyz_from_rgb

from ldct_clip.errors import InputError
from ldct_clip.transforms.camera_response import CameraResponse, ParametricResponse
from ldct_clip.transforms.mosaic import BAYER_PATTERNS, bayer_gains, bayer_masks, demosaic_malvar, mosaic

__all__ = [
    "CameraParameters",
    "CameraPipelineNoise",
    "CameraPipelineNoised",
    "XYZ_TO_CAMERA_MATRICES",
    "add_raw_noise",
    "linear_to_srgb",
    "run_camera_pipeline",
    "srgb_to_linear",
]

# XYZ -> camera matrices, row-major. These are the four of CBDNet's ISP (copied into the reference's
# ISP_implement.py); the last three are dcraw's adobe_coeff entries (divided by 10000) for the cameras named.
# The first one's camera is not named in CBDNet.
XYZ_TO_CAMERA_MATRICES: dict[str, tuple[float, ...]] = {
    "cbdnet_0": (1.0234, -0.2969, -0.2266, -0.5625, 1.6328, -0.0469, -0.0703, 0.2188, 0.6406),
    "sony_ilce_7r": (0.4913, -0.0541, -0.0202, -0.6130, 1.3513, 0.2906, -0.1564, 0.2151, 0.7183),
    "olympus_e_p5": (0.8380, -0.2630, -0.0639, -0.2887, 1.0725, 0.2496, -0.0627, 0.1427, 0.5438),
    "sony_dsc_rx100m2": (0.6596, -0.2079, -0.0562, -0.4782, 1.3016, 0.1933, -0.0970, 0.1581, 0.5181),
}

FIXED_NOISE = (0.04, 0.03)  # (sigma_s, sigma_c): the paper's fixed Poisson-Gaussian setting
RANDOM_NOISE_MAX = (0.16, 0.06)  # upper ends of the log-uniform random setting (lower end 1e-4)


def srgb_to_linear(values: np.ndarray) -> np.ndarray:
    """The sRGB transfer curve's inverse (IEC 61966-2-1), as in :func:`skimage.color.rgb2xyz`.

    Own two lines rather than skimage's function: fused with the colour matrix it is several times faster
    (skimage applies it through boolean-mask indexing), and the pipeline runs it on every training image."""
    return np.where(values > 0.04045, ((np.maximum(values, 0.04045) + 0.055) / 1.055) ** 2.4, values / 12.92)


def linear_to_srgb(values: np.ndarray) -> np.ndarray:
    """The sRGB transfer curve, clipped to [0, 1], as in :func:`skimage.color.xyz2rgb`."""
    encoded = np.where(
        values > 0.0031308, 1.055 * np.maximum(values, 0.0031308) ** (1 / 2.4) - 0.055, values * 12.92
    )
    return np.clip(encoded, 0, 1, out=encoded)


def _camera_matrix(weights: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Convex combination of flattened XYZ->camera matrices, each row normalised to sum 1 (reference)."""
    m = (np.asarray(weights, float) / np.sum(weights)) @ matrices
    m = m.reshape(3, 3)
    return m / m.sum(axis=1, keepdims=True)


@dataclass
class CameraParameters:
    """One draw of the pipeline's random choices (also the record of what a call did)."""

    response: CameraResponse | ParametricResponse
    xyz_to_camera: np.ndarray  # (3, 3), rows summing to 1
    pattern: str
    red_gain: float  # inverse white balance factor fr in [0.75, 1]
    blue_gain: float
    sigma_s: float
    sigma_c: float


def add_raw_noise(
    raw: np.ndarray, sigma_s: float, sigma_c: float, rng: np.random.RandomState | np.random.Generator
) -> np.ndarray:
    """The reference's raw noise (``add_PG_noise``): ``clip(x + N1 * sigma_s * x + N2 * sigma_c, 0, 1)``,
    N1 and N2 independent standard normal (drawn in that order), std ``sqrt((sigma_s x)^2 + sigma_c^2)``.
    Computes in the precision of ``raw`` (float32 or float64)."""
    dtype = np.dtype(raw.dtype if np.issubdtype(raw.dtype, np.floating) else np.float64)

    def normal() -> np.ndarray:
        if isinstance(rng, np.random.Generator):
            return rng.standard_normal(raw.shape, dtype=dtype)
        return rng.standard_normal(raw.shape).astype(dtype, copy=False)

    noisy = raw.astype(dtype) + normal() * (dtype.type(sigma_s) * raw)
    noisy += normal() * dtype.type(sigma_c)
    return np.clip(noisy, 0, 1, out=noisy)


def run_camera_pipeline(
    srgb: np.ndarray,
    params: CameraParameters,
    rng: np.random.RandomState | np.random.Generator | None = None,
    srgb_transfer: bool = True,
    bayer: bool = True,
    return_clean: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Push an (H, W, 3) sRGB image in [0, 1] through the inverse ISP, raw noise and the ISP.

    Args:
        srgb: (H, W, 3) float image in [0, 1].
        params: the camera (curve, matrix, pattern, gains) and noise levels.
        rng: generator of the raw noise; needed unless both sigmas are 0.
        srgb_transfer: convert RGB <-> XYZ as skimage's ``rgb2xyz``/``xyz2rgb`` do, applying the sRGB
            transfer curve on top of the camera response (the reference's behaviour); False: the plain
            linear-RGB matrices.
        bayer: mosaic and demosaic (False: a three-sensor camera, noise on every channel; demosaicing is
            the one step of the chain that is not invertible, so False isolates its error).
        return_clean: also develop the noise-free raw image (doubles the forward half of the work).

    Returns:
        ``(noisy, clean)``: (H, W, 3) float32 in [0, 1]; ``clean`` went through the same pipeline without
        noise (None unless ``return_clean``).
    """
    # float32 throughout: half the memory traffic; the errors (1e-7) are far below 16-bit steps
    srgb = np.clip(np.asarray(srgb, dtype=np.float32), 0, 1)
    linear = np.asarray(params.response.invert(srgb), dtype=np.float32)
    to_camera = params.xyz_to_camera.astype(np.float32)
    if srgb_transfer:
        linear = srgb_to_linear(linear)
    camera = np.clip(linear @ (to_camera @ xyz_from_rgb.astype(np.float32)).T, 0, 1)
    shape = camera.shape[:2]
    if bayer:
        gains = bayer_gains(shape, params.pattern, params.red_gain, params.blue_gain).astype(np.float32)
        raw = mosaic(camera, params.pattern) * gains
    else:
        gains = np.array([params.red_gain, 1.0, params.blue_gain], dtype=np.float32)
        raw = camera * gains
    if params.sigma_s > 0 or params.sigma_c > 0:
        if rng is None:
            raise ValueError("a random generator is needed to add noise")
        noisy_raw = add_raw_noise(raw, params.sigma_s, params.sigma_c, rng).astype(np.float32)
    else:
        noisy_raw = raw
    camera_to_xyz = np.linalg.inv(params.xyz_to_camera).astype(np.float32)
    xyz_to_rgb = rgb_from_xyz.astype(np.float32)

    def develop(raw_image: np.ndarray) -> np.ndarray:
        balanced = raw_image / gains
        np.clip(balanced, 0, 1, out=balanced)
        cam = demosaic_malvar(balanced, params.pattern) if bayer else balanced
        np.clip(cam, 0, 1, out=cam)
        xyz_back = cam @ camera_to_xyz.T
        np.clip(xyz_back, 0, 1, out=xyz_back)
        linear_back = xyz_back @ xyz_to_rgb.T
        linear_back = linear_to_srgb(linear_back) if srgb_transfer else np.clip(linear_back, 0, 1)
        out = params.response.apply(linear_back)
        return np.clip(out, 0, 1, out=out)

    noisy = develop(noisy_raw)
    if not return_clean:
        return noisy, None
    return noisy, (noisy if noisy_raw is raw else develop(raw))


class CameraPipelineNoise(Randomizable, Transform):
    """Realistic sRGB noise: a random camera pipeline run backwards to raw, Poisson-Gaussian noise, forwards.

    Args:
        noise: "fixed" (sigma_s 0.04, sigma_c 0.03: the paper's sRGB training data), "random" (log-uniform
            levels up to 0.16 and 0.06), "off" (no noise: the pipeline's own round-trip error), or a tuple
            ``(sigma_s, sigma_c)``.
        responses: camera response curves to draw from (e.g. :func:`load_dorf_curves`); ``None``: a fresh
            :class:`ParametricResponse` per call.
        matrices: XYZ->camera matrices (rows of 9 numbers) mixed with random convex weights; default
            :data:`XYZ_TO_CAMERA_MATRICES`.
        patterns: Bayer patterns to draw from.
        gain_range: range of the inverse white-balance factors (reference: 0.75 to 1).
        fixed_seed: reset the generator to this seed before every call (reproducible per image), or None.
        srgb_transfer: see :func:`run_camera_pipeline` (True: as the reference).
        bayer: see :func:`run_camera_pipeline` (True: as the reference).

    Input: (3, H, W) sRGB in [0, 1] (numpy, torch or MetaTensor). Output: the noisy image, same type,
    float32. :meth:`simulate` also returns the noise-free pipeline output; ``self.params`` is the last draw.
    """

    def __init__(
        self,
        noise: str | tuple[float, float] = "fixed",
        responses: Sequence[CameraResponse | ParametricResponse] | None = None,
        matrices: Sequence[Sequence[float]] | None = None,
        patterns: Sequence[str] = BAYER_PATTERNS,
        gain_range: tuple[float, float] = (0.75, 1.0),
        fixed_seed: int | None = None,
        srgb_transfer: bool = True,
        bayer: bool = True,
    ) -> None:
        if isinstance(noise, str) and noise not in ("fixed", "random", "off"):
            raise InputError(f"noise must be 'fixed', 'random', 'off' or (sigma_s, sigma_c), got {noise!r}")
        self.noise = noise if isinstance(noise, str) else (float(noise[0]), float(noise[1]))
        self.responses = list(responses) if responses is not None else None
        if self.responses is not None and not self.responses:
            raise InputError("responses is empty; pass curves or None for the built-in family")
        self.matrices = np.asarray(
            list(XYZ_TO_CAMERA_MATRICES.values()) if matrices is None else matrices, dtype=float
        ).reshape(-1, 9)
        self.patterns = tuple(p.upper() for p in patterns)
        for p in self.patterns:
            bayer_masks((2, 2), p)  # validates
        self.gain_range = gain_range
        self.fixed_seed = fixed_seed
        self.srgb_transfer = srgb_transfer
        self.bayer = bayer
        self.params: CameraParameters | None = None

    def randomize(self, data: Any = None) -> None:
        if self.responses is None:
            response = ParametricResponse.sample(self.R)
        else:
            response = self.responses[self.R.randint(len(self.responses))]
        matrix = _camera_matrix(self.R.random_sample(len(self.matrices)), self.matrices)
        pattern = self.patterns[self.R.randint(len(self.patterns))]
        red, blue = self.R.uniform(*self.gain_range, size=2)
        if self.noise == "fixed":
            sigma_s, sigma_c = FIXED_NOISE
        elif self.noise == "off":
            sigma_s, sigma_c = 0.0, 0.0
        elif self.noise == "random":
            low = np.log(1e-4)
            sigma_s, sigma_c = (
                float(np.exp(low + self.R.rand() * (np.log(top) - low))) for top in RANDOM_NOISE_MAX
            )
        else:
            sigma_s, sigma_c = self.noise
        self.params = CameraParameters(response, matrix, pattern, float(red), float(blue), sigma_s, sigma_c)

    def simulate(self, img: Any, return_clean: bool = True) -> tuple[Any, Any]:
        """``(noisy, clean)`` for a (3, H, W) image; ``clean`` is the noise-free pipeline output (None
        when not ``return_clean``)."""
        array = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img)
        if array.ndim != 3 or array.shape[0] != 3:
            raise InputError(f"the camera pipeline needs an RGB image (3, H, W), got shape {array.shape}")
        if self.fixed_seed is not None:
            self.set_random_state(seed=self.fixed_seed)
        self.randomize()
        # the raw noise comes from a Generator seeded by this transform's RandomState (MONAI's generator):
        # reproducible with set_random_state, and its float32 normals are ~3x faster than RandomState's
        noise_rng = np.random.default_rng(self.R.randint(0, 2**31 - 1, size=4))
        noisy, clean = run_camera_pipeline(
            np.moveaxis(array, 0, -1),
            self.params,
            noise_rng,
            srgb_transfer=self.srgb_transfer,
            bayer=self.bayer,
            return_clean=return_clean,
        )
        return tuple(
            None
            if x is None
            else convert_to_dst_type(np.ascontiguousarray(np.moveaxis(x, -1, 0)), img, dtype=np.float32)[0]
            for x in (noisy, clean)
        )

    def __call__(self, img: Any) -> Any:
        return self.simulate(img, return_clean=False)[0]


class CameraPipelineNoised(Randomizable, MapTransform):
    """Dictionary version of :class:`CameraPipelineNoise`: reads the clean image, writes a noisy one.

    Args:
        keys: key of the clean sRGB image (one key).
        noisy_key: key written with the noisy image.
        clean_target: "input" keeps the clean image as it is (the reference trains on the original image
            against the pipeline's noisy output); "pipeline" replaces it by the noise-free pipeline output,
            so that the pair differs by noise only.
        allow_missing_keys: do not raise for a missing key.
        kwargs: arguments of :class:`CameraPipelineNoise`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        noisy_key: str = "noisy",
        clean_target: str = "input",
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise InputError(f"CameraPipelineNoised takes one clean-image key, got {list(self.keys)}")
        if clean_target not in ("input", "pipeline"):
            raise InputError(f"clean_target must be 'input' or 'pipeline', got {clean_target!r}")
        self.noisy_key = noisy_key
        self.clean_target = clean_target
        self.pipeline = CameraPipelineNoise(**kwargs)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.pipeline.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        """Draws happen in the array transform."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            noisy, clean = self.pipeline.simulate(d[key], return_clean=self.clean_target == "pipeline")
            d[self.noisy_key] = noisy
            if self.clean_target == "pipeline":
                d[key] = clean
        return d
