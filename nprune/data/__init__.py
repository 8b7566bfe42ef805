"""Data on disk: IDX files (:mod:`.idx`, read as a bounded stream), the MNIST-style data sets
(:mod:`.datasets`: find, verify, split, batch), the checks of one data-set file (:mod:`.checks`),
downloads from the mirrors (:mod:`.download`) and atomic file writing plus the per-user cache
folder (:mod:`.fsutil`).

Importing this package loads nothing but NumPy; import the module you need.
"""
