"""Mask-aware optimisers: SGD (momentum, weight decay) and Adam (bias-corrected).

The update rules, per parameter ``p`` with gradient ``g`` and mask ``M`` (1 keeps, 0 prunes)
(:func:`sgd_update`, :func:`adam_update`; :mod:`nprune.reference` has the textbook form that the
tests hold them to)::

    SGD:   g <- g + wd p;   v <- mu v + g   (v = g when mu = 0);   p <- p - lr v;   p <- p * M
    Adam:  g <- g + wd p;   m <- b1 m + (1-b1) g;   v <- b2 v + (1-b2) g^2;
           p <- p - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps);   p <- p * M

Weight decay is L2 added to the gradient, as in PyTorch (not AdamW). State is kept per parameter
*name* (``"fc1.W"``); call :meth:`Optimizer.reset` at each pruning round. Backward already zeroes the
gradient of a pruned weight; the re-mask after the update is the second lock, so a pruned weight is
exactly zero after any number of steps, whatever momentum or Adam's moments hold. All arithmetic is
in place in the parameters' own dtype (float32 by default: Python-float hyper-parameters do not
upcast float32 arrays under NumPy's promotion rules).

Everything else in this module makes a step cheap without changing a bit of its result:

* **Dense path: chunks and scratch.** A parameter larger than :data:`CHUNK` entries is updated chunk
  by chunk (flat views, built once per set of arrays), so that the ~5 (SGD) or ~10 (Adam) passes
  over a chunk find it in cache instead of streaming whole weight matrices through memory each
  time. No temporaries are allocated per step: the scratch arrays of the update (``tmp``, and ``wd``
  with weight decay) are views of one shared buffer per scratch key, as large as the largest chunk,
  reused by every chunk while it is still in cache. Every entry goes through the same arithmetic
  as unchunked (tests check ``==``); ``benchmarks/optim_speed.py`` times the chunk sizes.
* **Compact path: the survivors only.** A parameter whose mask keeps at most
  :data:`COMPACT_DENSITY` of its entries is updated on its surviving entries only. All such
  parameters, together with the small unmasked ones (the biases), form one *fused group*: one flat
  vector holds their live entries (``idx = flatnonzero(mask)`` per parameter, rebuilt only when a
  mask object changes) and one flat vector per state key. Each step gathers ``p`` and ``g`` at
  ``idx`` into the flat vectors, runs the *same* update once on the whole group and scatters ``p``
  back. Pruned entries are never written, so they stay exactly 0 without the re-mask, and every live
  entry goes through exactly the arithmetic of the dense path (all hyper-parameters are global):
  both paths give bit-identical parameters (tests check ``==``). At low density this replaces ~10
  passes over all weights, plus ~10 small NumPy calls per parameter, by ~13 passes over the
  survivors and ~10 calls in total. The parameter is still read and written in place, so external
  writes (``set_weights``, rewinding) are always seen. The group's state lives in the group, not in
  ``state[name]``; when masks change without :meth:`~Optimizer.reset`, state is carried over entry by
  entry (revived entries start at 0), also from and to full-size per-parameter state when a
  parameter enters or leaves the group. ``compact=False`` forces the dense path everywhere,
  ``compact=True`` puts every masked parameter in the group.
* **Flat buffers.** When the model keeps its parameters and gradients in flat buffers
  (:attr:`~nprune.model.Sequential.flat_params`), the state arrays are views of one flat buffer
  per key at the same offsets, and the dense path's re-mask reads one flat copy of the masks (1 where
  nothing is pruned). The dense path then merges the work items of consecutive parameters into runs
  over the flat arrays and cuts the runs, not each parameter, into chunks of :data:`CHUNK`: a few
  long chunks for the whole model instead of one or more short ones per parameter (a chunk that
  meets no pruned parameter skips the re-mask; multiplying an unpruned entry by 1 changes no bit).
  The compact path gathers and scatters the whole fused group with one index into the flat arrays.
* **Subnormal flush** (:data:`FLUSH_EVERY`, :data:`FLUSH_BELOW`): see there.
"""
from __future__ import annotations

import math

import numpy as np

from .flat import flat_runs, offset_in
from .layers import mask_to_apply

#: Every FLUSH_EVERY steps, the state entries that decay geometrically while their gradient is zero
#: (momentum, Adam's moments; e.g. those of the weights of MNIST's blank border pixels) with
#: ``|x| < FLUSH_BELOW`` are set to exactly 0. Left alone they decay (x0.9 per step for Adam's first
#: moment) into the float32 subnormal range (< 1.2e-38), where x86 arithmetic is about a hundred
#: times slower, and NumPy cannot set flush-to-zero: after one LeNet-300-100 epoch enough entries get
#: there to slow Adam's step down severalfold. Between two flushes an entry decays by at most
#: 0.9**100 ~ 3e-5, so starting above 1e-30 it stays far from the subnormal range. A dropped entry
#: changes an update by < 1e-27, far below the float32 resolution of any non-zero weight.
FLUSH_EVERY = 100
FLUSH_BELOW = 1e-30
#: masked parameters with at most this fraction of surviving entries use the compact path
COMPACT_DENSITY = 0.5
#: unmasked parameters up to this size (biases) join the compact path's fused update
SMALL = 4096
#: the dense path updates parameters in flat chunks of at most this many entries
CHUNK = 1 << 16


# ----- the update rules -----------------------------------------------------------------------------

def _plus_weight_decay(g, p, out, weight_decay):
    """``g + weight_decay * p`` written into ``out`` (``g`` itself when weight_decay is 0)."""
    if not weight_decay:
        return g
    np.multiply(p, weight_decay, out=out)
    out += g
    return out


def sgd_update(p, g, v, tmp, lr, momentum, weight_decay) -> None:
    """One SGD step on arrays of one shape, in place: ``g <- g + weight_decay p``,
    ``v <- momentum v + g``, ``p <- p - lr v`` (no ``v`` when momentum is 0: ``p <- p - lr g``).

    Inputs: p (updated), g (read only), v (the momentum buffer, updated; None without momentum),
    tmp (scratch, overwritten); lr, momentum, weight_decay (floats)."""
    g = _plus_weight_decay(g, p, tmp, weight_decay)
    if momentum:
        v *= momentum
        v += g
        g = v
    np.multiply(g, lr, out=tmp)
    p -= tmp


def adam_update(p, g, mu, nu, tmp, wd, lr, b1, b2, eps, t, weight_decay) -> None:
    """One Adam step on arrays of one shape, in place.

    Inputs: p (updated), g (read only), mu and nu (the moments, updated; see below), tmp and wd
    (scratch, overwritten; wd is used only with weight decay); lr, b1, b2, eps, weight_decay
    (floats); t (this step's number, 1, 2, ...).

    The state keeps the *unnormalised* moments ``mu = m / (1-b1)`` and ``nu = v / (1-b2)``, i.e.
    ``mu <- b1 mu + g`` and ``nu <- b2 nu + g^2``, and every constant factor is folded into two
    scalars::

        lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) == c * mu / (sqrt(nu) + e),
        c = lr (1-b1) sqrt(bc2) / (bc1 sqrt(1-b2)),   e = eps sqrt(bc2) / sqrt(1-b2),

    with ``bc1 = 1 - b1^t`` and ``bc2 = 1 - b2^t``: the textbook rule in 10 passes over the arrays
    instead of 13. Float32 rounding differs from the textbook form in the last bits."""
    g = _plus_weight_decay(g, p, wd, weight_decay)
    mu *= b1
    mu += g
    nu *= b2
    np.multiply(g, g, out=tmp)
    nu += tmp
    sq_bc2 = math.sqrt(1.0 - b2 ** t)
    bc1 = 1.0 - b1 ** t
    sq_1mb2 = math.sqrt(1.0 - b2)
    np.sqrt(nu, out=tmp)
    tmp += eps * sq_bc2 / sq_1mb2
    np.divide(mu, tmp, out=tmp)
    tmp *= lr * (1.0 - b1) * sq_bc2 / (bc1 * sq_1mb2)
    p -= tmp


# ----- the optimisers -------------------------------------------------------------------------------

class Optimizer:
    """Base class. ``model`` is a :class:`~nprune.model.Sequential` (anything with ``params()``,
    ``grads()`` and ``masks()`` dicts keyed by name). A subclass says which state and scratch arrays
    its update takes (:meth:`_update_keys`, :meth:`_state_arrays`) and applies its rule
    (:meth:`_update`)."""

    def __init__(self, model, lr: float, compact: bool | None = None):
        if not lr > 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        self.compact = compact
        self.model = model
        self.lr = float(lr)
        self.state: dict[str, dict[str, np.ndarray]] = {}
        self._group = None       # the compact path's fused group (see _compact_group)
        self._no_group = None    # the masks for which no parameter qualified
        self._chunks = None      # the dense path's work items and their arrays' ids (_dense_items)
        self._flat_state = None  # {key: flat state buffer} when the model has flat buffers
        self.t = 0

    def reset(self) -> None:
        """Forget all state (momentum buffers, Adam moments, step count)."""
        self.state = {}
        self._group = None
        self._no_group = None
        self._chunks = None
        self._flat_state = None
        self.t = 0

    def step(self) -> None:
        """Apply one update from the gradients the last backward left; pruned weights stay 0."""
        self.t += 1
        params, grads, masks = self.model.params(), self.model.grads(), self.model.masks()
        group = self._compact_group(params, masks)
        for p, g, m, *state in self._dense_items(params, grads, masks, group):
            self._update(p, g, *state)
            if m is not None:
                np.multiply(p, m, out=p)
        if group is not None:
            self._compact_step(group, params, grads)
        if self.t % FLUSH_EVERY == 0:
            self._flush_state(group)

    # -- what a subclass defines ----------------------------------------------------------------
    #: keys of :meth:`_update_keys` that are scratch space, not state (never carried over)
    scratch_keys: tuple[str, ...] = ("tmp", "wd")

    #: state keys that decay geometrically when the gradient is zero (flushed, see FLUSH_EVERY)
    decaying: tuple[str, ...] = ()

    def _update_keys(self) -> tuple:
        """Names of the state and scratch arrays :meth:`_update` takes, in argument order."""
        return ()

    def _state_arrays(self, name, p) -> tuple:
        """The arrays of :meth:`_update_keys` for parameter ``name``: its state (created on first
        use) and ``None`` for each scratch slot (filled by :func:`_with_scratch`)."""
        return ()

    def _update(self, p, g, *arrays):  # pragma: no cover - abstract
        """Update ``p`` in place from gradient ``g`` and the arrays of :meth:`_update_keys`."""
        raise NotImplementedError

    def _slots(self, name: str, p: np.ndarray, keys) -> dict[str, np.ndarray]:
        """``state[name]``, created as zero arrays like ``p`` under ``keys`` on first use: views of
        the flat state buffers when the model has flat buffers holding ``p``."""
        s = self.state.get(name)
        if s is None:
            s = {k: self._zero_state(name, p, k) for k in keys}
            self.state[name] = s
        return s

    def _zero_state(self, name: str, p: np.ndarray, key: str) -> np.ndarray:
        """A zeroed state array like ``p``: its view of the flat state buffer ``key`` when the
        model's flat buffers hold ``p``, else a new array."""
        fp, layout = getattr(self.model, "flat_params", None), getattr(self.model, "flat_layout", None)
        if fp is None or name not in layout or offset_in(p, fp) != layout[name][0]:
            return np.zeros_like(p)
        if self._flat_state is None:
            self._flat_state = {}
        buf = self._flat_state.get(key)
        if buf is None:
            buf = self._flat_state[key] = np.zeros_like(fp)
        a, b = layout[name]
        view = buf[a:b].reshape(p.shape)
        view[...] = 0
        return view

    # -- dense path (see the module docstring) --------------------------------------------------
    def _dense_items(self, params, grads, masks, group) -> list:
        """The work items ``(p, g, mask or None, *arrays of _update_keys)`` of every parameter
        outside the compact group, cut into chunks of at most CHUNK entries, with the scratch slots
        filled. Built again only when one of the arrays is a new object; a mask that keeps every
        entry is left out (:func:`~nprune.layers.mask_to_apply`)."""
        work = []
        for name, p in params.items():
            if group is not None and name in group["names"]:
                continue
            work.append((p, grads[name], masks.get(name)) + tuple(self._state_arrays(name, p)))
        key = tuple(id(a) for w in work for a in w)
        if self._chunks is None or self._chunks[0] != key:
            work = [(p, g, mask_to_apply(m), *s) for p, g, m, *s in work]
            flat = getattr(self.model, "flat_params", None)
            self._chunks = (key, _with_scratch(flat_runs(work, flat, CHUNK)))
        return self._chunks[1]

    def _flush_state(self, group) -> None:
        """Set the tiny entries of every decaying state array to 0 (see FLUSH_EVERY)."""
        for s in list(self.state.values()) + ([group["state"]] if group is not None else []):
            for key in self.decaying:
                if key in s:
                    np.copyto(s[key], 0, where=np.abs(s[key]) < FLUSH_BELOW)

    # -- compact path (see the module docstring) ------------------------------------------------
    def _is_compact(self, m) -> bool:
        if self.compact is False:
            return False
        return self.compact is True or np.count_nonzero(m) <= COMPACT_DENSITY * m.size

    def _compact_group(self, params, masks):
        """The fused group of the compact path, rebuilt when a mask object changes; None when no
        parameter qualifies. Members: masked parameters at density <= COMPACT_DENSITY, plus the small
        unmasked ones (biases, <= SMALL entries) so that one set of ~10 array operations updates all.

        A dict: ``names`` {name: (idx or None for all entries, start, end) in the flat vectors},
        ``masks`` (the mask objects it was built for), ``state`` {key: flat vector}, ``p`` and ``g``
        (the flat gather buffers)."""
        g = self._group
        if g is not None and g["masks"].keys() == params.keys() and all(
                g["masks"][n] is masks.get(n) for n in params):
            return g
        ng = self._no_group
        if g is None and ng is not None and ng.keys() == params.keys() and all(
                ng[n] is masks.get(n) for n in params):
            return None
        members = []
        dtype = None                 # one flat vector: members share the first compact one's dtype
        for n, p in params.items():
            m = masks.get(n)
            if m is not None and (dtype is None or p.dtype == dtype) and self._is_compact(m):
                dtype = p.dtype
                members.append((n, np.flatnonzero(m.reshape(-1))))
        for n, p in params.items():
            if masks.get(n) is None and p.size <= SMALL and p.dtype == dtype:
                members.append((n, None))
        if not any(idx is not None for _, idx in members):
            self._release_group(params, keep=())
            self._group = None
            self._no_group = {n: masks.get(n) for n in params}
            return None
        off, layout = 0, {}
        for n, idx in members:
            size = params[n].size if idx is None else idx.size
            layout[n] = (idx, off, off + size)
            off += size
        state = {k: np.zeros(off, dtype) for k in self._update_keys()}
        # carry state over: from an old group, or from full-size per-parameter state
        for n, (idx, a, b) in layout.items():
            for k in self._update_keys():
                if k in self.scratch_keys:
                    continue
                full = self._full_state(n, k, params[n])
                if full is not None:
                    state[k][a:b] = full if idx is None else full[idx]
        self._release_group(params, keep=layout)
        for n in layout:
            self.state.pop(n, None)
        self._group = g = {"names": layout, "masks": {n: masks.get(n) for n in params},
                           "state": state, "p": np.empty(off, dtype), "g": np.empty(off, dtype),
                           "flat": self._flat_index(layout, params)}
        return g

    def _flat_index(self, layout, params):
        """The group's entries as one index into the model's flat buffers (member after member, in
        the order of ``layout``), or None when a member is not where the flat layout says."""
        model = self.model
        fp, fg = getattr(model, "flat_params", None), getattr(model, "flat_grads", None)
        if fp is None:
            return None
        grads, parts = model.grads(), []
        for n, (idx, a, b) in layout.items():
            off = model.flat_layout[n][0]
            if offset_in(params[n], fp) != off or offset_in(grads[n], fg) != off:
                return None
            parts.append(off + (np.arange(b - a) if idx is None else idx))
        return np.concatenate(parts).astype(np.intp)

    def _full_state(self, name, key, p):
        """Full-size (raveled) state ``key`` of ``name`` from the current group or per-parameter
        state, or None."""
        g = self._group
        if g is not None and name in g["names"]:
            idx, a, b = g["names"][name]
            if idx is None:
                return g["state"][key][a:b].copy()
            full = np.zeros(p.size, p.dtype)
            full[idx] = g["state"][key][a:b]
            return full
        s = self.state.get(name)
        if s is not None and key in s:
            return s[key].reshape(-1)
        return None

    def _release_group(self, params, keep) -> None:
        """Members of the old group not in ``keep`` get their state back as full-size arrays."""
        g = self._group
        if g is None:
            return
        for n in g["names"]:
            if n not in keep and n in params:
                p = params[n]
                keys = [k for k in self._update_keys() if k not in self.scratch_keys]
                full = {k: self._full_state(n, k, p).reshape(p.shape) for k in keys}
                for k, v in self._slots(n, p, keys).items():
                    np.copyto(v, full[k])

    def _compact_step(self, g, params, grads) -> None:
        """Gather the group's live parameters and gradients, update them at once, scatter back."""
        pz, gz = g["p"], g["g"]
        if g["flat"] is not None:
            fp, gidx = self.model.flat_params, g["flat"]
            np.take(fp, gidx, out=pz, mode="clip")
            np.take(self.model.flat_grads, gidx, out=gz, mode="clip")
            self._update(pz, gz, *(g["state"][k] for k in self._update_keys()))
            fp[gidx] = pz
            return
        for n, (idx, a, b) in g["names"].items():
            if idx is None:
                np.copyto(pz[a:b], params[n].reshape(-1))
                np.copyto(gz[a:b], grads[n].reshape(-1))
            else:
                np.take(params[n].reshape(-1), idx, out=pz[a:b], mode="clip")
                np.take(grads[n].reshape(-1), idx, out=gz[a:b], mode="clip")
        self._update(pz, gz, *(g["state"][k] for k in self._update_keys()))
        for n, (idx, a, b) in g["names"].items():
            if idx is None:
                np.copyto(params[n].reshape(-1), pz[a:b])
            else:
                params[n].reshape(-1)[idx] = pz[a:b]


class SGD(Optimizer):
    """SGD with optional (heavy-ball) momentum and L2 weight decay, as in PyTorch
    (:func:`sgd_update`)."""

    def __init__(self, model, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 compact: bool | None = None):
        super().__init__(model, lr, compact)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)

    decaying = ("v",)

    def _update_keys(self):
        return ("v", "tmp") if self.momentum else ("tmp",)

    def _state_arrays(self, name, p):
        if self.momentum:
            return (self._slots(name, p, ("v",))["v"], None)
        return (None,)

    def _update(self, p, g, *arrays):
        v = arrays[0] if self.momentum else None
        sgd_update(p, g, v, arrays[-1], self.lr, self.momentum, self.weight_decay)


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction, as PyTorch writes it (:func:`adam_update`). The
    state holds ``m / (1-b1)`` and ``v / (1-b2)`` under the keys ``m`` and ``v``. Weight decay, when
    set, is L2 added to the gradient (not AdamW)."""

    def __init__(self, model, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, compact: bool | None = None):
        super().__init__(model, lr, compact)
        self.b1, self.b2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)

    decaying = ("m", "v")

    def _update_keys(self):
        return ("m", "v", "tmp", "wd") if self.weight_decay else ("m", "v", "tmp")

    def _state_arrays(self, name, p):
        s = self._slots(name, p, ("m", "v"))
        return (s["m"], s["v"], None) + ((None,) if self.weight_decay else ())

    def _update(self, p, g, m, v, tmp, wd=None):
        adam_update(p, g, m, v, tmp, wd, self.lr, self.b1, self.b2, self.eps, self.t,
                    self.weight_decay)


OPTIMIZERS = {"sgd": SGD, "adam": Adam}


def make_optimizer(name: str, model, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    """Build an optimiser by name: ``sgd`` (with ``momentum``) or ``adam``."""
    if name == "sgd":
        return SGD(model, lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return Adam(model, lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


# ----- dense-path helpers ---------------------------------------------------------------------------

def _with_scratch(items) -> list:
    """The work items with their scratch slots (``None`` entries after ``(p, g, mask)``) filled:
    the k-th scratch slot of every item views buffer k (one per dtype), as large as the largest
    item. The items are updated one after another, so sharing is safe, and a buffer that is reused
    while still in cache saves a pass through memory per scratch array and step."""
    need = {}
    for p, g, m, *arrays in items:
        for k in range(sum(a is None for a in arrays)):
            key = (k, p.dtype.str)
            need[key] = max(need.get(key, 0), p.size)
    bufs = {key: np.empty(n, np.dtype(key[1])) for key, n in need.items()}
    out = []
    for p, g, m, *arrays in items:
        k = 0
        for i, a in enumerate(arrays):
            if a is None:
                arrays[i] = bufs[(k, p.dtype.str)][:p.size].reshape(p.shape)
                k += 1
        out.append((p, g, m, *arrays))
    return out
