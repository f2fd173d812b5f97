"""``ldct-clip train``: train the denoiser with a MONAI bundle's train config.

The command is a thin layer over the bundle: MONAI's ``ConfigWorkflow`` reads the config files, the
command's options are its config overrides, and it runs the config's ``initialize``, ``run`` and
``finalize`` sections, exactly what ``python -m monai.bundle run --config_file ...`` does. So a CLI run and
a bundle run are one code path, and every config key can also be set with ``--set key=value``.

Multi-GPU: ``torchrun --nproc_per_node=N -m ldct_clip train --config train.json --config
multi_gpu_train.json ...``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ldct_clip.cli.overrides import add_set_option, parse_set_options
from ldct_clip.errors import InputError, OutputError

DEFAULT_ITERATIONS = 40000
#: ``--noise`` choices: the config components ``{name}_noise`` (``train`` and ``val`` transforms) of the CT
#: bundle's train config.
NOISE_CHOICES = ("gaussian", "simulated")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the denoiser (MONAI bundle train config, the paper's recipe by default)",
        description=(
            "Train the CLIP-feature denoiser on normal-dose CT with the paper's recipe (Gaussian noise "
            "sigma 5/255, mixup, AdamW, cosine LR, 40k iterations) through a MONAI bundle train config, "
            "or with simulated low-dose noise (--noise simulated). "
            "Data: a folder of {patient}_{slice}_target.npy slices (Mayo layout) or of normal-dose DICOM "
            "series / NIfTI volumes, one patient each."
        ),
    )
    parser.add_argument(
        "--config",
        action="append",
        metavar="FILE",
        help="bundle config file(s), later ones override earlier ones (default: the shipped "
        "lowdose_ct_denoising bundle's configs/train.json)",
    )
    parser.add_argument("--data", metavar="DIR", help="training data folder")
    parser.add_argument("--output", metavar="DIR", help="output folder for checkpoints, logs and model.pt")
    parser.add_argument(
        "--encoder-weights",
        metavar="W",
        help="CLIP encoder weights: 'openai' (the paper; must be in the local cache), a weight file, or "
        "'none' (random encoder, for tests)",
    )
    parser.add_argument(
        "--iterations", type=int, metavar="N", help=f"training iterations (default {DEFAULT_ITERATIONS})"
    )
    parser.add_argument(
        "--resume", metavar="CKPT", help="continue from a checkpoint_epoch=N.pt of an earlier run"
    )
    parser.add_argument(
        "--init-weights",
        metavar="FILE",
        help="start from these trained weights of the same network (fine-tuning, e.g. a bundle's "
        "models/model.pt); optimizer, LR schedule and iteration count start fresh",
    )
    parser.add_argument("--batch", type=int, metavar="N", help="batch size per process (default 16)")
    parser.add_argument("--crop", type=int, metavar="N", help="training crop size (default 128)")
    parser.add_argument(
        "--noise",
        choices=NOISE_CHOICES,
        help="training noise: 'gaussian' (the paper, sigma --noise-sigma; default) or 'simulated' "
        "(precomputed realisations of `ldct-clip simulate`'s low-dose noise per training volume, cached; "
        "NIfTI/DICOM volumes only)",
    )
    parser.add_argument(
        "--noise-dose", type=float, metavar="D", help="dose fraction of --noise simulated (default 0.25)"
    )
    parser.add_argument(
        "--noise-realizations",
        type=int,
        metavar="N",
        help="noise realisations simulated per volume for --noise simulated (default 2)",
    )
    parser.add_argument(
        "--noise-sigma", type=float, metavar="S", help="noise std in 1/255 of the model range (default 5)"
    )
    parser.add_argument(
        "--val-patients", metavar="IDS", help="comma-separated validation patients (default L506)"
    )
    parser.add_argument(
        "--val-fraction", type=float, metavar="F", help="hold out this fraction of patients instead"
    )
    parser.add_argument(
        "--val-max-slices", type=int, metavar="N", help="validate on at most N slices per patient"
    )
    parser.add_argument(
        "--checkpoint-interval", type=int, metavar="N", help="iterations between checkpoints (1000)"
    )
    parser.add_argument("--seed", type=int, help="random seed (default 100, the reference's)")
    parser.add_argument("--workers", type=int, metavar="N", help="data loader worker processes (default 4)")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into an output folder that holds a model"
    )
    add_set_option(parser)
    # small networks for tests and smoke runs; not part of the documented interface
    parser.add_argument("--layers", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def build_overrides(args: argparse.Namespace) -> dict:
    """Config overrides from the command line options.

    Raises:
        InputError: an option out of range, a missing data folder or checkpoint.
    """
    overrides: dict = {}
    if args.data is not None:
        data = Path(args.data).expanduser()
        if not data.is_dir():
            raise InputError(f"--data {args.data!r} is not a folder: give the folder with the training data")
        overrides["data_dir"] = str(data.resolve())
    if args.output is not None:
        overrides["output_dir"] = str(Path(args.output).expanduser().resolve())
    if args.encoder_weights is not None:
        overrides["encoder_weights"] = (
            None if args.encoder_weights.lower() == "none" else args.encoder_weights
        )
    if args.resume is not None:
        resume = Path(args.resume).expanduser()
        if not resume.is_file():
            raise InputError(
                f"--resume {args.resume!r} does not exist: give a checkpoint_epoch=N.pt file of a run"
            )
        overrides["resume"] = str(resume.resolve())
    if args.init_weights is not None:
        if args.resume is not None:
            raise InputError(
                "--init-weights and --resume exclude each other: --resume continues a run with its own "
                "weights; give one of them"
            )
        init = Path(args.init_weights).expanduser()
        if not init.is_file():
            raise InputError(
                f"--init-weights {args.init_weights!r} does not exist: give an ldct-clip model file "
                "(model.pt, best.pt, a bundle's models/model.pt)"
            )
        overrides["init_weights"] = str(init.resolve())
    simple = {
        "iterations": args.iterations,
        "batch_size": args.batch,
        "crop_size": args.crop,
        "checkpoint_interval": args.checkpoint_interval,
        "seed": args.seed,
        "num_workers": args.workers,
        "val_fraction": args.val_fraction,
        "val_max_slices": args.val_max_slices,
        "width": args.width,
    }
    for key, value in simple.items():
        if value is not None:
            if isinstance(value, int) and key not in ("seed",) and value < (0 if key == "num_workers" else 1):
                raise InputError(f"--{key.replace('_', '-')} must be positive, got {value}")
            overrides[key] = value
    if args.noise is not None:
        overrides["train_noise"] = f"@{args.noise}_noise#train"
        overrides["val_noise"] = f"@{args.noise}_noise#val"
    if args.noise_dose is not None:
        if not 0 < args.noise_dose <= 1:
            raise InputError(f"--noise-dose must be a dose fraction in (0, 1], got {args.noise_dose}")
        overrides["simulation#dose"] = args.noise_dose
    if args.noise_realizations is not None:
        if args.noise_realizations < 1:
            raise InputError(f"--noise-realizations must be at least 1, got {args.noise_realizations}")
        overrides["simulation#realizations"] = args.noise_realizations
    if args.noise_sigma is not None:
        if args.noise_sigma <= 0:
            raise InputError(f"--noise-sigma must be positive, got {args.noise_sigma}")
        overrides["noise_std"] = args.noise_sigma / 255.0
    if args.val_patients is not None:
        overrides["val_patients"] = [p for p in args.val_patients.split(",") if p]
        overrides.setdefault("val_fraction", None)
    elif args.val_fraction is not None:
        overrides["val_patients"] = None
    if args.layers is not None:
        try:
            overrides["layers"] = [int(v) for v in str(args.layers).strip("[]()").split(",")]
        except ValueError:
            raise InputError(
                f"--layers {args.layers!r} must be comma-separated integers, e.g. 3,4,6,3"
            ) from None
    overrides.update(parse_set_options(args.set))
    return overrides


def config_workflow(config_files: list[str], overrides: dict, workflow_type: str | None = "train"):
    """MONAI's ``ConfigWorkflow`` over ``config_files`` with ``overrides``, as ``monai.bundle run`` makes it:
    the bundle's ``metadata.json`` and ``logging.conf`` are those next to the first config file, when there.
    """
    from monai.bundle import ConfigWorkflow

    folder = Path(config_files[0]).parent
    meta, logging_conf = folder / "metadata.json", folder / "logging.conf"
    return ConfigWorkflow(
        config_file=[str(f) for f in config_files],
        meta_file=str(meta) if meta.is_file() else [],  # [] reads no metadata without logging an error
        logging_file=str(logging_conf) if logging_conf.is_file() else False,
        workflow_type=workflow_type,
        **overrides,
    )


def run_config(config_files: list[str], overrides: dict, workflow=None) -> None:
    """Run a bundle config's ``initialize``, ``run`` and ``finalize`` sections with ``overrides``
    (``finalize`` also after a failure, so a distributed run leaves its process group).

    Args:
        config_files: config files, later ones override earlier ones.
        overrides: config ids and their values.
        workflow: a :func:`config_workflow` of the same files and overrides, if already made.

    Raises:
        LdctClipError: the user-fixable error behind a config failure, unwrapped from MONAI's
            "Failed to instantiate" chain.
    """
    from ldct_clip.bundles.errors import user_error

    workflow = workflow if workflow is not None else config_workflow(config_files, overrides)
    try:
        workflow.initialize()
        workflow.run()
    except Exception as error:
        user = user_error(error)
        if user is not None:
            raise user from None
        raise
    finally:
        workflow.finalize()


def train_recording_losses(config_files: list[str], overrides: dict) -> tuple[list[float], object, float]:
    """Run a train config (``initialize``, ``run``, ``finalize``) and record the loss of every iteration: what
    the loss-curve benchmark and tests compare between training steps.

    Returns:
        the per-iteration losses, the trainer (its inferer says which step format ran) and the seconds the
        ``run`` section took.
    """
    from ignite.engine import Events

    workflow = config_workflow(config_files, overrides)
    losses: list[float] = []
    try:
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output["loss"].item())
        )
        start = time.perf_counter()
        workflow.run()
        seconds = time.perf_counter() - start
    finally:
        workflow.finalize()
    return losses, trainer, seconds


def default_config() -> str:
    from ldct_clip.bundles import DEFAULT_CT_BUNDLE, resolve_bundle

    return str(resolve_bundle(DEFAULT_CT_BUNDLE) / "configs" / "train.json")


def run(args: argparse.Namespace) -> int:
    configs = args.config or [default_config()]
    for config in configs:
        if not Path(config).is_file():
            raise InputError(f"config file {config!r} does not exist: give a bundle's configs/train.json")
    overrides = build_overrides(args)
    workflow = config_workflow(configs, overrides)
    if args.noise is not None and f"{args.noise}_noise" not in workflow.parser:
        raise InputError(
            f"--noise {args.noise}: the config has no {args.noise}_noise component (the CT bundle's "
            "train.json has them); set the config's train_noise and val_noise instead"
        )
    output = Path(workflow.parser.get_parsed_content("output_dir"))
    if args.resume is None and not args.overwrite and (output / "model.pt").exists():
        raise OutputError(
            f"{output} already holds a trained model.pt: choose another --output, add --overwrite, "
            "or continue it with --resume"
        )
    run_config(configs, overrides, workflow)
    print(f"trained model: {output / 'model.pt'} (checkpoints and TensorBoard logs in {output})")
    return 0
