"""The live run: everything the training loop works with, built once by the recipe's set-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from utils.training.adapters import AdapterEMA
from utils.training.batches import BucketBatchSampler
from utils.training.evaluation import EvalSet
from utils.training.loss_log import CsvLog
from utils.training.model_inputs import BatchMaker
from utils.training.settings import RunSettings
from utils.training.state import TrainState
from utils.training.timeline import Timeline


@dataclass
class Run:
    """Everything the training loop works with, set up by ``recipe.set_up``."""

    settings: RunSettings
    accelerator: object
    components: object  # utils.core.sdxl's SDXL components: UNet, VAE, text encoders, noise scheduler
    models: list  # the trained models, as accelerate prepared them: the UNet, then the text encoders
    params: list  # the adapter weights that train
    optimizer: object
    lr_scheduler: object
    dataloader: object
    sampler: BucketBatchSampler
    batch_maker: BatchMaker
    eval_set: EvalSet
    state: TrainState
    num_epochs: int
    timeline: Timeline = field(default_factory=Timeline)
    gradient_checkpointing: bool = False
    epoch_log: CsvLog | None = None  # logs/training_log.csv: one row per epoch
    step_log: CsvLog | None = None  # logs/training_steps.csv: one row per optimizer step
    nonfinite_in_a_row: int = 0
    ema: AdapterEMA | None = None  # --use_ema: the moving average of the adapter weights

    @property
    def unet(self):
        return self.models[0]
