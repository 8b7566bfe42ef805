"""Mask-aware optimisers: SGD (momentum, weight decay) and Adam (bias-corrected).

State is kept per parameter *name* (``"fc1.W"``), so it survives nothing it should not: call
:meth:`Optimizer.reset` at each pruning round. After every update the parameter is multiplied by its
mask again, so a pruned weight is exactly zero after any number of steps, whatever momentum or Adam's
moments hold. (Backward already zeroes the pruned gradients; the re-mask is the second lock.)

All arithmetic is in place on the parameters' own dtype (float32 by default): Python-float
hyper-parameters do not upcast float32 arrays under NumPy's promotion rules. No temporaries are
allocated per step: the dense path's scratch (``tmp``, and ``wd`` with weight decay) is one shared
buffer of at most ``CHUNK`` entries per scratch key, reused by every chunk, so it stays in cache
(the compact path has its own).

Compact (sparse-aware) path. A pruned parameter whose mask keeps at most ``COMPACT_DENSITY`` of its
entries is updated on its surviving entries only. All such parameters, together with the small
unmasked ones (the biases), form one *fused group*: one flat vector holds their live entries
(``idx = flatnonzero(mask)`` per parameter, rebuilt only when a mask object changes) and one flat
vector per state key. Each step gathers ``p`` and ``g`` at ``idx`` into the flat vectors (one
``np.take`` each per parameter), runs the *same* ``_update`` code once on the whole group, and
scatters ``p`` back (``p.ravel()[idx] = p_nz``). Pruned entries are never written, so they stay
exactly 0 without the re-mask, and every live entry goes through exactly the float32 operations of
the dense path (all hyper-parameters are global), so both paths give bit-identical parameters (tests
check ``==``). At 2% density this replaces ~10 passes over all weights (plus ~10 small NumPy calls per
parameter) by ~13 passes over 2% of them and ~10 calls in total. The parameter is still read and
written in place, so external writes (``set_weights``, rewinding) are always seen. The group's state
is not in ``state[name]`` (it lives in ``_group``); when masks change without :meth:`reset`, state
is carried over entry by entry (revived entries start at 0), also from/to full-size per-parameter
state when a parameter enters or leaves the group. ``compact=False`` forces the dense path
everywhere, ``compact=True`` puts every masked parameter in the group.

Chunks (dense path). A parameter larger than ``CHUNK`` entries is updated chunk by chunk (flat
views of at most ``CHUNK`` entries, built once per set of arrays), so that the ~5 (SGD) or ~10 (Adam)
passes over a chunk find it in cache instead of streaming whole weight matrices through memory
each time. The arithmetic of every entry is unchanged, so the results are bit-identical to the
unchunked update (tests check ``==``). ``benchmarks/optim_speed.py`` measures the step time against
the chunk size.
"""
from __future__ import annotations

import math

import numpy as np

from .layers import mask_to_apply

# Denormals: a moment whose gradient is zero for many steps (e.g. the weights of MNIST's blank border
# pixels) decays geometrically (x0.9 per step for Adam's first moment) into the float32 subnormal
# range, where x86 arithmetic is ~100x slower: after one LeNet-300-100 epoch ~10k such entries made
# Adam's step 2.3x slower. NumPy cannot set flush-to-zero, so every FLUSH_EVERY steps the decaying
# state entries with |x| < FLUSH_BELOW are set to exactly 0. Between two flushes an entry decays by
# at most 0.9**100 ~ 3e-5, so starting above 1e-30 it stays far from the subnormal range (< 1.2e-38).
# Effect on the parameters: a dropped moment below 1e-30 changes an update by < 1e-27 in absolute
# terms, far below float32 resolution of any non-zero weight (so in practice weights are unchanged).
FLUSH_EVERY = 100
FLUSH_BELOW = 1e-30
#: masked parameters with at most this fraction of surviving entries use the compact path
COMPACT_DENSITY = 0.5
#: unmasked parameters up to this size (biases) join the compact path's fused update
SMALL = 4096


#: the dense path updates parameters in flat chunks of at most this many entries (see above)
CHUNK = 1 << 16


def _chunked(work, chunk: int) -> list:
    """The work items ``(p, g, mask, *state)`` with every item larger than ``chunk`` entries cut
    into items of flat views of at most ``chunk`` entries (C-contiguous arrays only: views)."""
    out = []
    for w in work:
        n = w[0].size
        if n <= chunk or not all(a is None or a.flags.c_contiguous for a in w):
            out.append(w)
            continue
        flat = [None if a is None else a.reshape(-1) for a in w]
        for lo in range(0, n, chunk):
            out.append(tuple(None if f is None else f[lo:lo + chunk] for f in flat))
    return out


def _flush_tiny(a: np.ndarray) -> None:
    """Set entries with ``|a| < FLUSH_BELOW`` to exactly 0, in place."""
    np.copyto(a, 0, where=np.abs(a) < FLUSH_BELOW)


class Optimizer:
    """Base class. ``model`` is a :class:`~nprune.model.Sequential` (anything with ``params()``,
    ``grads()`` and ``masks()`` dicts keyed by name)."""

    def __init__(self, model, lr: float, compact: bool | None = None):
        if not lr > 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        self.compact = compact
        self.model = model
        self.lr = float(lr)
        self.state: dict[str, dict[str, np.ndarray]] = {}
        self._group = None       # the compact path's fused state (see _compact_group)
        self._no_group = None    # the masks for which no parameter qualified
        self._chunks = None      # the dense path's chunk views and their arrays' ids
        self.t = 0

    def reset(self) -> None:
        """Forget all state (momentum buffers, Adam moments, step count)."""
        self.state = {}
        self._group = None
        self._no_group = None
        self._chunks = None
        self.t = 0

    def _slots(self, name: str, p: np.ndarray, keys) -> dict[str, np.ndarray]:
        s = self.state.get(name)
        if s is None:
            s = {k: np.zeros_like(p) for k in keys}
            self.state[name] = s
        return s

    def step(self) -> None:
        """Apply one update from the gradients the last backward left, then re-mask."""
        self.t += 1
        params, grads, masks = self.model.params(), self.model.grads(), self.model.masks()
        group = self._compact_group(params, masks)
        work = []
        for name, p in params.items():
            if group is not None and name in group["names"]:
                continue
            work.append((p, grads[name], masks.get(name)) + tuple(self._state_arrays(name, p)))
        key = tuple(id(a) for w in work for a in w)
        if self._chunks is None or self._chunks[0] != key:
            work = [(p, g, mask_to_apply(m), *s) for p, g, m, *s in work]
            self._chunks = (key, self._with_scratch(_chunked(work, CHUNK)))
        for p, g, m, *state in self._chunks[1]:
            self._update(p, g, *state)
            if m is not None:
                np.multiply(p, m, out=p)
        if group is not None:
            self._compact_step(group, params, grads)
        if self.t % FLUSH_EVERY == 0:
            for s in list(self.state.values()) + ([group["state"]] if group is not None else []):
                for key in self.decaying:
                    if key in s:
                        _flush_tiny(s[key])

    def _with_scratch(self, items) -> list:
        """Fill the scratch slots (``None`` state entries, see :meth:`_state_arrays`) of the dense
        path's chunk items with views of shared buffers: the k-th scratch slot of every item views
        buffer k (one per dtype), as large as the largest chunk. The chunks run one after another,
        so sharing is safe, and a buffer that is reused while still in cache saves a full-size pass
        through memory (LeNet-300-100's step: ~6% shorter)."""
        need = {}
        for p, g, m, *state in items:
            for k in range(sum(a is None for a in state)):
                key = (k, p.dtype.str)
                need[key] = max(need.get(key, 0), p.size)
        bufs = {key: np.empty(n, np.dtype(key[1])) for key, n in need.items()}
        out = []
        for p, g, m, *state in items:
            k = 0
            for i, a in enumerate(state):
                if a is None:
                    state[i] = bufs[(k, p.dtype.str)][:p.size].reshape(p.shape)
                    k += 1
            out.append((p, g, m, *state))
        return out

    # -- compact path (see the module docstring) ------------------------------------------------
    def _is_compact(self, m) -> bool:
        if self.compact is False:
            return False
        return self.compact is True or np.count_nonzero(m) <= COMPACT_DENSITY * m.size

    def _compact_group(self, params, masks):
        """The fused group of the compact path, rebuilt when a mask object changes; None when no
        parameter qualifies. Members: masked parameters at density <= COMPACT_DENSITY, plus the small
        unmasked ones (biases, <= SMALL entries) so that one set of ~10 array operations updates all."""
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
        state = {k: np.zeros(off, dtype) for k in self._compact_keys()}
        # carry state over: from an old group, or from full-size per-parameter state
        for n, (idx, a, b) in layout.items():
            for k in self._compact_keys():
                if k in self.scratch_keys:
                    continue
                full = self._full_state(n, k, params[n])
                if full is not None:
                    state[k][a:b] = full if idx is None else full[idx]
        self._release_group(params, keep=layout)
        for n in layout:
            self.state.pop(n, None)
        self._group = g = {"names": layout, "masks": {n: masks.get(n) for n in params},
                           "state": state, "p": np.empty(off, dtype), "g": np.empty(off, dtype)}
        return g

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
                self.state[n] = {k: self._full_state(n, k, p).reshape(p.shape).copy()
                                 for k in self._compact_keys() if k not in self.scratch_keys}

    def _compact_step(self, g, params, grads) -> None:
        pz, gz = g["p"], g["g"]
        for n, (idx, a, b) in g["names"].items():
            if idx is None:
                np.copyto(pz[a:b], params[n].reshape(-1))
                np.copyto(gz[a:b], grads[n].reshape(-1))
            else:
                np.take(params[n].reshape(-1), idx, out=pz[a:b], mode="clip")
                np.take(grads[n].reshape(-1), idx, out=gz[a:b], mode="clip")
        self._update(pz, gz, *(g["state"][k] for k in self._compact_keys()))
        for n, (idx, a, b) in g["names"].items():
            if idx is None:
                np.copyto(params[n].reshape(-1), pz[a:b])
            else:
                params[n].reshape(-1)[idx] = pz[a:b]

    def _compact_keys(self) -> tuple:
        """State keys of :meth:`_update` in argument order (same as :meth:`_state_arrays`)."""
        return ()

    #: keys of :meth:`_compact_keys` that are scratch space, not state (never carried over)
    scratch_keys: tuple[str, ...] = ("tmp", "wd")

    #: state keys that decay geometrically when the gradient is zero (flushed, see FLUSH_EVERY)
    decaying: tuple[str, ...] = ()

    def _state_arrays(self, name, p) -> tuple:
        """The per-parameter state arrays handed to :meth:`_update` (created on first use), in the
        order of :meth:`_compact_keys`; ``None`` for a scratch slot (filled by the shared buffers of
        :meth:`_with_scratch`)."""
        return ()

    def _update(self, p, g, *state):  # pragma: no cover - abstract
        """Update ``p`` in place from gradient ``g`` and the state arrays of :meth:`_state_arrays`."""
        raise NotImplementedError


class SGD(Optimizer):
    """SGD with optional (heavy-ball) momentum and L2 weight decay, as in PyTorch:

    ``g <- g + wd * p``;  ``v <- mu * v + g``;  ``p <- p - lr * v``  (``v = g`` when mu = 0).
    """

    def __init__(self, model, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 compact: bool | None = None):
        super().__init__(model, lr, compact)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)

    decaying = ("v",)

    def _compact_keys(self):
        return ("v", "tmp") if self.momentum else ("tmp",)

    def _state_arrays(self, name, p):
        if self.momentum:
            return (self._slots(name, p, ("v",))["v"], None)
        return (None,)

    def _update(self, p, g, *state):
        tmp = state[-1]
        if self.weight_decay:
            np.multiply(p, self.weight_decay, out=tmp)
            tmp += g
            g = tmp
        if self.momentum:
            v = state[0]
            v *= self.momentum
            v += g
            g = v
        np.multiply(g, self.lr, out=tmp)  # lr * g, into a reused buffer
        p -= tmp


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction, written as PyTorch does it:

    ``m <- b1 m + (1-b1) g``;  ``v <- b2 v + (1-b2) g^2``;
    ``p <- p - (lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps)``.
    The state holds ``m / (1-b1)`` and ``v / (1-b2)`` under the keys ``m`` and ``v`` (see ``_update``).
    Weight decay, when set, is L2 added to the gradient (not AdamW).
    """

    def __init__(self, model, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, compact: bool | None = None):
        super().__init__(model, lr, compact)
        self.b1, self.b2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)

    decaying = ("m", "v")

    def _compact_keys(self):
        return ("m", "v", "tmp", "wd") if self.weight_decay else ("m", "v", "tmp")

    def _state_arrays(self, name, p):
        s = self._slots(name, p, ("m", "v"))
        return (s["m"], s["v"], None) + ((None,) if self.weight_decay else ())

    def _update(self, p, g, m, v, tmp, wd=None):
        if self.weight_decay:
            np.multiply(p, self.weight_decay, out=wd)
            wd += g
            g = wd
        # 10 passes instead of 13: the state keeps the *unnormalised* moments
        #   mu = m / (1-b1) = b1 mu + g   and   nu = v / (1-b2) = b2 nu + g^2,
        # and every constant factor is folded into two scalars:
        #   lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) == c * mu / (sqrt(nu) + e)
        #   with c = lr (1-b1) sqrt(bc2) / (bc1 sqrt(1-b2)),  e = eps sqrt(bc2) / sqrt(1-b2).
        # Same maths as PyTorch's Adam; float32 rounding differs in the last bits.
        mu, nu = m, v
        b1, b2 = self.b1, self.b2
        mu *= b1
        mu += g
        nu *= b2
        np.multiply(g, g, out=tmp)
        nu += tmp
        sq_bc2 = math.sqrt(1.0 - b2 ** self.t)
        bc1 = 1.0 - b1 ** self.t
        sq_1mb2 = math.sqrt(1.0 - b2)
        np.sqrt(nu, out=tmp)
        tmp += self.eps * sq_bc2 / sq_1mb2
        np.divide(mu, tmp, out=tmp)
        tmp *= self.lr * (1.0 - b1) * sq_bc2 / (bc1 * sq_1mb2)
        p -= tmp


OPTIMIZERS = {"sgd": SGD, "adam": Adam}


def make_optimizer(name: str, model, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    """Build an optimiser by name: ``sgd`` (with ``momentum``) or ``adam``."""
    if name == "sgd":
        return SGD(model, lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return Adam(model, lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
