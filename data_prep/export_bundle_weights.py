"""Export a trained ldct-clip checkpoint as bundle weights: float16 tensors, the network config kept.

Half precision halves the file (RN50 configuration: ~39 MB instead of ~78 MB); ``load_model`` and MONAI's
``CheckpointLoader`` cast back to the network's float32 on load. Prints the sha256 and, with
``--metadata``, records it in the bundle's metadata.json under ``shipped_weights`` (which
``ldct_clip.bundles.bundle_weights`` checks before use).

    python data_prep/export_bundle_weights.py runs/ct/model.pt bundles/lowdose_ct_denoising/models/model.pt \
        --note "what the weights are" --metadata bundles/lowdose_ct_denoising/configs/metadata.json
"""

import argparse
import json
import sys
from pathlib import Path

from ldct_clip.errors import LdctClipError
from ldct_clip.networks import load_model, save_checkpoint
from ldct_clip.networks.clip_weights import sha256_of


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="trained checkpoint (ldct-clip train's model.pt)")
    parser.add_argument("output", help="where to write the float16 bundle weights")
    parser.add_argument("--note", default="", help="a line stored in the file under 'note'")
    parser.add_argument(
        "--metadata", type=Path, help="bundle metadata.json to record the file and its sha256 in"
    )
    args = parser.parse_args(argv)
    if args.metadata is not None and not args.metadata.is_file():
        print(f"export_bundle_weights: error: {args.metadata} is not a metadata.json file", file=sys.stderr)
        return 2
    if args.metadata is not None and not args.note:
        # the note is what `ldct-clip info` and the docs show of the weights; an empty one loses "demo weights"
        print(
            "export_bundle_weights: error: --metadata needs --note: say what the weights are (it replaces the "
            "note in metadata.json)",
            file=sys.stderr,
        )
        return 2
    try:
        model = load_model(args.checkpoint).half()
        path = save_checkpoint(args.output, model, extra={"note": args.note} if args.note else None)
    except LdctClipError as error:
        print(f"export_bundle_weights: error: {error}", file=sys.stderr)
        return 2
    digest = sha256_of(path)
    print(f"wrote {path} ({Path(path).stat().st_size / 1e6:.1f} MB, sha256 {digest})")
    if args.metadata is not None:
        metadata = json.loads(args.metadata.read_text())
        # other entries (e.g. "demo", which marks outputs "[denoised, demo weights]") are kept
        metadata["shipped_weights"] = {
            **metadata.get("shipped_weights", {}),
            "path": "models/" + Path(path).name,
            "sha256": digest,
            "dtype": "float16",
            "note": args.note,
        }
        args.metadata.write_text(json.dumps(metadata, indent=4, ensure_ascii=False) + "\n")
        print(f"recorded its sha256 in {args.metadata}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
