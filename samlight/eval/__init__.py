"""Evaluation: COCO box / point mIoU (overall, small / medium / large) and student-vs-teacher fidelity.

Public interface (used by the training workers to gate a new student)::

    from samlight.eval import evaluate_samples, fidelity
    evaluate_samples(model, samples, prompt="box")  # -> {"miou": float, "instances": int, ...}
"""

from samlight.eval.fidelity import fidelity
from samlight.eval.protocol import BASELINES, evaluate_samples

__all__ = ["BASELINES", "evaluate_samples", "fidelity"]
