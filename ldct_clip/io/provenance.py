"""Provenance of a derived output: which weights, bundle and ldct-clip version made it, and what was done.

The same record goes into the DICOM header (standard attributes, so a PACS shows it), into the NIfTI
header's 80-byte ``descrip`` (abridged) and into the manifest / sidecar JSON (complete).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import ldct_clip

__all__ = ["DENOISED_TASK", "Provenance", "file_sha256", "is_denoising_contribution"]

#: ``Provenance.task`` of a denoised output; anything else (e.g. "simulated 0.25 dose") is not denoised.
DENOISED_TASK = "denoised"
#: Manufacturer of the ContributingEquipmentSequence item ldct-clip adds (how its outputs are recognised).
MANUFACTURER = "ldct-clip"
#: Length of the sha256 prefix in the short texts (DerivationDescription, NIfTI descrip, SeriesDescription).
SHORT_SHA = 12
_ST_MAX = 1024  # ST (Short Text): 1024 characters at most
_LO_MAX = 64  # LO (Long String): 64 characters at most
_DESCRIP_BYTES = 80  # NIfTI-1 header field descrip: char[80]
_HASH_BLOCK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Provenance:
    """What made a derived output.

    Args:
        weights_name: file name of the model weights (no folder: paths are private and change).
        weights_sha256: hex sha256 of the weights file.
        bundle_name: MONAI bundle that ran (folder name).
        bundle_version: the bundle's ``metadata.json`` version.
        demo_weights: the weights are the shipped demo weights, not a trained model for real use.
        ldct_clip_version: version of ldct-clip that wrote the output.
        command: the command line that made the output.
        task: what was done: ``"denoised"``, or e.g. ``"simulated 0.25 dose"``.
        model_name: the network's name, for the texts.
    """

    weights_name: str = ""
    weights_sha256: str = ""
    bundle_name: str = ""
    bundle_version: str = ""
    demo_weights: bool = False
    ldct_clip_version: str = ldct_clip.__version__
    command: str = ""
    task: str = DENOISED_TASK
    model_name: str = "CLIPDenoiser"

    @classmethod
    def for_weights(
        cls,
        weights: str | os.PathLike,
        bundle_name: str = "",
        bundle_version: str = "",
        demo_weights: bool = False,
        command: str = "",
        **kwargs,
    ) -> Provenance:
        """The provenance of outputs made with the weights file ``weights`` (hashed here).

        Args:
            weights: the weights file.
            bundle_name, bundle_version, demo_weights, command, kwargs: see the class.
        """
        path = Path(weights)
        return cls(
            weights_name=path.name,
            weights_sha256=file_sha256(path),
            bundle_name=bundle_name,
            bundle_version=bundle_version,
            demo_weights=demo_weights,
            command=command,
            **kwargs,
        )

    @property
    def is_denoising(self) -> bool:
        return self.task == DENOISED_TASK

    @property
    def short_sha(self) -> str:
        return self.weights_sha256[:SHORT_SHA]

    def _bundle(self) -> str:
        return " ".join(p for p in (self.bundle_name, self.bundle_version) if p)

    def _weights(self, full: bool = False) -> str:
        if not self.weights_name and not self.weights_sha256:
            return ""
        sha = self.weights_sha256 if full else self.short_sha
        text = f"weights {self.weights_name or '<unnamed>'}"
        if sha:
            text += f" sha256 {sha}"
        return text + (" (demo weights)" if self.demo_weights else "")

    def derivation_description(self) -> str:
        """DICOM DerivationDescription: what was done, by which model, weights (sha256 prefix), bundle, version."""
        parts = [p for p in (self._bundle() and f"bundle {self._bundle()}", self._weights()) if p]
        by = f" by {self.model_name}" if self.is_denoising and self.model_name else ""
        text = f"{self.task.capitalize()}{by}"
        if parts:
            text += f" ({', '.join(parts)})"
        return f"{text} with ldct-clip {self.ldct_clip_version}"[:_ST_MAX]

    def series_suffix(self) -> str:
        """Appended to the source's SeriesDescription: " [denoised]", " [denoised, demo weights]"."""
        return f" [{self.task}, demo weights]" if self.demo_weights else f" [{self.task}]"

    def contribution_description(self) -> str:
        """ContributionDescription: the task, the full sha256 of the weights and the command."""
        text = self.task
        if self._weights(full=True):
            text += f" with {self._weights(full=True)}"
        if self._bundle():
            text += f", bundle {self._bundle()}"
        if self.command:
            text += f"; command: {self.command}"
        return text[:_ST_MAX]

    def apply_to_dataset(self, ds: Dataset) -> Dataset:
        """Record the provenance in ``ds`` with standard attributes (PS3.3 C.12.1, General Image C.7.6.1).

        Sets DerivationDescription and appends an item to ContributingEquipmentSequence (Purpose of
        Reference "Processing Equipment", Manufacturer "ldct-clip", ManufacturerModelName the bundle,
        SoftwareVersions, ContributionDateTime, ContributionDescription with the weights' sha256). The
        source's own equipment attributes (the scanner's) are kept as they are.
        """
        ds.DerivationDescription = self.derivation_description()
        purpose = Dataset()
        purpose.CodeValue = "109102"
        purpose.CodingSchemeDesignator = "DCM"
        purpose.CodeMeaning = "Processing Equipment"
        item = Dataset()
        item.PurposeOfReferenceCodeSequence = Sequence([purpose])
        item.Manufacturer = MANUFACTURER
        item.ManufacturerModelName = (self.bundle_name or f"ldct-clip {self.task}")[:_LO_MAX]
        item.SoftwareVersions = [
            v[:_LO_MAX] for v in (f"ldct-clip {self.ldct_clip_version}", self._bundle()) if v
        ]
        item.ContributionDateTime = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        item.ContributionDescription = self.contribution_description()
        existing = list(ds.get("ContributingEquipmentSequence", []) or [])
        ds.ContributingEquipmentSequence = Sequence([*existing, item])
        return ds

    def nifti_descrip(self) -> str:
        """The NIfTI header ``descrip`` (80 bytes): "ldct-clip 0.1.0 lowdose_ct_denoising 0.2.0 w:bee4a582f420"."""
        parts = [f"ldct-clip {self.ldct_clip_version}"]
        if self._bundle():
            parts.append(self._bundle())
        if self.short_sha:
            parts.append(f"w:{self.short_sha}")
        if self.demo_weights:
            parts.append("demo")
        if not self.is_denoising or not self.short_sha:
            parts.append(self.task)
        return " ".join(parts).encode("ascii", "replace")[:_DESCRIP_BYTES].decode("ascii")

    def as_dict(self) -> dict:
        """Every field, plus the texts written to DICOM and NIfTI (for the manifest)."""
        return {
            **asdict(self),
            "derivation_description": self.derivation_description(),
            "nifti_descrip": self.nifti_descrip(),
        }


def is_denoising_contribution(ds: Dataset) -> bool:
    """True when ldct-clip denoised this dataset (not, e.g., simulated a lower dose from a real scan).

    Recognises the ContributingEquipmentSequence item :meth:`Provenance.apply_to_dataset` writes, and the
    DerivationDescription of outputs written before that item existed ("Denoised by ... with ldct_clip").
    """
    for item in ds.get("ContributingEquipmentSequence", []) or []:
        if str(item.get("Manufacturer", "")) == MANUFACTURER:
            description = str(item.get("ContributionDescription", "")).lower()
            if description.startswith(DENOISED_TASK):
                return True
    derivation = str(ds.get("DerivationDescription", "") or "").lower()
    return derivation.startswith("denoised by") and ("ldct_clip" in derivation or "ldct-clip" in derivation)
