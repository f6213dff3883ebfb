"""Dynamic Layer-wise Distillation (DLD) of SAM-Lightening students from vanilla SAM teachers.

Public interface (used by the training workers)::

    from samlight.distill import TrainingSample, FineTuneConfig, fine_tune
    path = fine_tune("lightening_t" | student_dir, "vit_h:/w/sam_vit_h.pth", samples, FineTuneConfig(out_dir=...))
"""

from samlight.distill.config import FineTuneConfig
from samlight.distill.data import TrainingSample, coco_dataset, image_folder
from samlight.distill.schedule import dynamic_layer_weights, layer_mapping
from samlight.distill.trainer import fine_tune

__all__ = [
    "FineTuneConfig",
    "TrainingSample",
    "coco_dataset",
    "dynamic_layer_weights",
    "fine_tune",
    "image_folder",
    "layer_mapping",
]
