"""Training and fine-tuning of the GLIDE U-Nets and the noised CLIP (see ``trainer`` and ``data``)."""

from glide_text2im.train.data import (
    ExampleSampler,
    ImageCaptionFolder,
    TrainingExamples,
    as_source,
    low_res_of,
    random_inpaint_mask,
    subject_box_mask,
)
from glide_text2im.train.trainer import (
    CLIPTask,
    DiffusionTask,
    TrainConfig,
    Trainer,
    adapt_input_channels,
    build_task,
    contrastive_losses,
    read_state,
)

__all__ = [
    "ExampleSampler",
    "ImageCaptionFolder",
    "TrainingExamples",
    "as_source",
    "low_res_of",
    "random_inpaint_mask",
    "subject_box_mask",
    "CLIPTask",
    "DiffusionTask",
    "TrainConfig",
    "Trainer",
    "adapt_input_channels",
    "build_task",
    "contrastive_losses",
    "read_state",
]
