"""``python -m nprune.experiment``: iterative magnitude pruning on MNIST, results as tables and plots.

    python -m nprune.experiment                       # the default: both nets, rewind vs reinit, minutes
    python -m nprune.experiment --preset lth          # Frankle & Carbin's LeNet-300-100 figure
    python -m nprune.experiment --preset lth --seeds 3 --rounds 10 --jobs 2
    python -m nprune.experiment report runs/lenet300-1a2b3c4d5e
    python -m nprune.experiment presets               # list presets and what they set
    python -m nprune.experiment train --net lenet5    # one dense network, accuracy per epoch
    python -m nprune.experiment calibrate | show      # the auto kernel's thresholds

Every finished round is saved at once (atomically); rerunning the same command resumes.
"""
from .cli import main

__all__ = ["main"]
