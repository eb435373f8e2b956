"""The MNIST auxiliary-logit setting of subliminal learning (Cloud et al. 2025).

A teacher MLP with ``10 + m`` outputs learns MNIST on its 10 class logits; a
student from the same initialisation is distilled only on the ``m`` auxiliary
logits, on uniform noise images, and is then tested on digits.
"""

from __future__ import annotations

from gradlens.subliminal.conditions import (
    BASE_CONDITIONS,
    CAUSAL_CONDITIONS,
    CONDITIONS,
    Condition,
    get_conditions,
)
from gradlens.subliminal.losses import class_cross_entropy, class_kl, logit_kl
from gradlens.subliminal.models import init_mlp
from gradlens.subliminal.noise import noise_batch
from gradlens.subliminal.teacher import accuracy, train_classifier

__all__ = [
    "BASE_CONDITIONS",
    "CAUSAL_CONDITIONS",
    "CONDITIONS",
    "Condition",
    "accuracy",
    "class_cross_entropy",
    "class_kl",
    "get_conditions",
    "init_mlp",
    "logit_kl",
    "noise_batch",
    "train_classifier",
]
