"""nprune: a pure-NumPy lab for lottery-ticket pruning experiments on MNIST.

Every forward and backward pass is written by hand (:mod:`nprune.layers`) and checked against slow
oracles (:mod:`nprune.reference`) and numerical gradients (:mod:`nprune.gradcheck`).

The Python API (see the README for a worked example)::

    data = nprune.load_data()                       # MNIST splits, found or downloaded and verified
    net = nprune.build("lenet300", seed=0)          # a Sequential model
    init = net.get_weights()
    nprune.train(net, data, iterations=2000)        # -> TrainResult (curves, early stop)
    nprune.prune(net, {"fc1": .2, "fc2": .2, "fc3": .1})   # masks over the survivors, in place
    nprune.rewind(net, init)                        # survivors back to their initial values
    rows = nprune.imp(nprune.recipe("lenet300"), data).run(seeds=[0], rounds=3)   # in memory

``python -m nprune.experiment`` runs the same engine from the command line and writes run folders,
tables and plots.
"""
from .api import build, density, imp, load_data, prune, recipe, rewind, train
from .experiment.config import Recipe
from .experiment.imp import IMP
from .model import Sequential
from .training import TrainConfig, TrainResult

__version__ = "0.1.0"

__all__ = ["build", "density", "imp", "load_data", "prune", "recipe", "rewind", "train", "IMP",
           "Recipe", "Sequential", "TrainConfig", "TrainResult"]
