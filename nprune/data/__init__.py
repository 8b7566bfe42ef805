"""Data on disk: IDX files (:mod:`.idx`), the MNIST-style data sets (:mod:`.datasets`: find, download,
verify, split, batch) and atomic file writing plus the per-user cache folder (:mod:`.fsutil`).

Importing this package loads nothing but NumPy; import the module you need.
"""
