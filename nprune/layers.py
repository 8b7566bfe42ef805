"""Layers with hand-written forward and backward passes, each carrying an elementwise weight mask.

The contract every layer keeps (tests check it):

* ``params``: ``dict[str, ndarray]`` -- the layer's parameters, owned by the layer. Optimisers update
  them **in place**, so code may hold references to them.
* ``grads``: ``dict[str, ndarray]`` -- same keys and shapes, filled by :meth:`Layer.backward`.
* ``prunable``: names of the parameters that may be pruned (the weights, never the biases).
* ``masks``: ``dict[str, ndarray | None]`` with one key per prunable name. ``None`` means "not pruned";
  otherwise an array of the parameter's shape and dtype holding exactly 0.0 or 1.0.
* The mask invariant ``param[mask == 0] == 0`` holds exactly, in three places: :meth:`set_mask` zeroes
  the pruned entries, ``backward`` multiplies the weight gradient by the mask, and optimisers re-mask
  the parameter after each step. Forward therefore uses the (already zeroed) weight directly.
* ``forward(x, train=True) -> y`` caches what backward needs (only when ``train``);
  ``backward(dout) -> dx`` never modifies ``dout`` or anything else the caller holds.
* ``need_dx``: when False (the first layer of a network) ``backward`` may skip dx and return None.
* ``fresh_params(rng) -> dict``: a new draw of every parameter from the layer's initialiser (used at
  construction and by the ``reinit`` reset strategy); nothing is assigned.
"""
