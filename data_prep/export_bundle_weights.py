"""Export a trained ldct-clip checkpoint as bundle weights: float16 tensors, the network config kept.

Half precision halves the file (RN50 configuration: ~39 MB instead of ~78 MB); ``load_model`` and MONAI's
``CheckpointLoader`` cast back to the network's float32 on load. Prints the sha256 for the bundle's
metadata.json.

    python data_prep/export_bundle_weights.py runs/ct/model.pt bundles/lowdose_ct_denoising/models/model.pt \
        --note "what the weights are"
"""

import argparse
import sys

from ldct_clip.demo import sha256_of
from ldct_clip.errors import LdctClipError
from ldct_clip.networks import load_model, save_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="trained checkpoint (ldct-clip train's model.pt)")
    parser.add_argument("output", help="where to write the float16 bundle weights")
    parser.add_argument("--note", default="", help="a line stored in the file under 'note'")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.checkpoint).half()
        path = save_checkpoint(args.output, model, extra={"note": args.note} if args.note else None)
    except LdctClipError as error:
        print(f"export_bundle_weights: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} (sha256 {sha256_of(path)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
