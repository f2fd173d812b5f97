"""What the MONAI/ignite training engines need beyond MONAI: mixup, handlers, resume state, the learning-rate
schedule, the distributed set-up and the encoder's BatchNorm recalibration.

Iteration-based training. ``SupervisedTrainer`` runs ``iterations / epoch_length`` "epochs" of
``epoch_length`` iterations over an endless, seeded data stream (``ldct_clip.data.stream.StreamSampler``):
an epoch is only a round between checkpoints, logs and validations (1000 iterations by default, see
:func:`round_length`). Checkpoints are written at round ends and hold everything a resumed run needs to
continue as if never stopped (bit for bit on a CPU; on GPUs up to their non-deterministic kernels):
model, optimizer, LR scheduler, trainer (iteration, epoch), the RNG states of python/numpy/torch/cuda of
every rank (:class:`TrainingState`); the data stream's position is the trainer's iteration
(:class:`StreamPositionHandler`). A resumed run does not know the best score of the run before it: its
first validation writes ``best.pt`` again.

Multi-GPU: ``torchrun`` sets the environment, :func:`init_distributed` starts the process group (NCCL on
GPUs, gloo on CPUs) and puts every rank at a barrier before the engines are built, so no rank enters
ignite's collective calls (inside ``CheckpointSaver``) ahead of the others: the known MONAI/ignite hang.
Handlers with collectives or state (checkpointing, validation, LR schedule, clipping) run on every rank;
only the logging handlers are rank 0's. Validation runs in full on every rank, so every rank sees the same
key metric and the "best" checkpoint decision agrees.

Training step: :class:`TrainingStepInferer` (module ``precision``) runs the network in the step's precision
and memory format (``train_precision``, ``train_memory_format`` in the train configs; ``"auto"``: the faster
one measured at the first iteration), also on CPUs, where MONAI's ``amp`` does not autocast.

Modules: ``mixup``, ``precision``, ``handlers`` (gradient clipping, LR logging, progress bar, stream position,
checkpoints, final model), ``resume`` (seeding, RNG state, resuming, warm starts), ``schedules`` (rounds and the LR
schedule), ``distributed``, ``validation`` (the padded validation inferer), ``recalibration``.
"""

from ldct_clip.training.distributed import cleanup_distributed as cleanup_distributed
from ldct_clip.training.distributed import init_distributed as init_distributed
from ldct_clip.training.distributed import is_main_process as is_main_process
from ldct_clip.training.distributed import main_process_only as main_process_only
from ldct_clip.training.distributed import wrap_ddp as wrap_ddp
from ldct_clip.training.handlers import FinalModelSaver as FinalModelSaver
from ldct_clip.training.handlers import GradientClipHandler as GradientClipHandler
from ldct_clip.training.handlers import LearningRateRecorder as LearningRateRecorder
from ldct_clip.training.handlers import StreamPositionHandler as StreamPositionHandler
from ldct_clip.training.handlers import TrainingCheckpointer as TrainingCheckpointer
from ldct_clip.training.handlers import TrainingProgressBar as TrainingProgressBar
from ldct_clip.training.handlers import trainable_parameters as trainable_parameters
from ldct_clip.training.mixup import Mixup as Mixup
from ldct_clip.training.precision import StepFormat as StepFormat
from ldct_clip.training.precision import TrainingStepInferer as TrainingStepInferer
from ldct_clip.training.precision import candidate_formats as candidate_formats
from ldct_clip.training.precision import choose_step_format as choose_step_format
from ldct_clip.training.precision import cuda_amp_kwargs as cuda_amp_kwargs
from ldct_clip.training.precision import measure_step_formats as measure_step_formats
from ldct_clip.training.recalibration import recalibrate_encoder_bn as recalibrate_encoder_bn
from ldct_clip.training.resume import NetworkConfig as NetworkConfig
from ldct_clip.training.resume import ResumeFromCheckpoint as ResumeFromCheckpoint
from ldct_clip.training.resume import TrainingState as TrainingState
from ldct_clip.training.resume import resume_handlers as resume_handlers
from ldct_clip.training.resume import seed_everything as seed_everything
from ldct_clip.training.resume import warm_start as warm_start
from ldct_clip.training.schedules import PAPER_CONSTANT_FRACTION as PAPER_CONSTANT_FRACTION
from ldct_clip.training.schedules import constant_then_cosine as constant_then_cosine
from ldct_clip.training.schedules import constant_then_cosine_lr as constant_then_cosine_lr
from ldct_clip.training.schedules import round_length as round_length
from ldct_clip.training.validation import PaddedInferer as PaddedInferer
