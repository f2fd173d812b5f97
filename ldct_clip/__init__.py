"""ldct-clip: low-dose CT denoising with frozen CLIP features, on MONAI."""

__version__ = "0.1.0"
