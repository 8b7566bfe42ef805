"""nprune: a pure-NumPy lab for lottery-ticket pruning experiments on MNIST.

Every forward and backward pass is written by hand (``nprune.layers``) and checked numerically
(``nprune.gradcheck``); ``python -m nprune.experiment`` runs iterative magnitude pruning and writes
tables and plots.
"""
__version__ = "0.1.0"
