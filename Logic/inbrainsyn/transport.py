"""Parallel transport of a stationary velocity field (SVF) u along an SVF v (InBrainSyn's core step).

Setting (see docs/CONTRACTS.md and METHODS.md section 3)
--------------------------------------------------------
Points of the group are deformations g (image ``T0 o g``); a tangent vector w at g means the
curve ``g o exp(t w)``.  The template ageing is u (``T0 o exp(u) ~ T1``) at the base point id; the
subject is reached along v (``T0 o exp(v) ~ S``), i.e. at ``q = exp(v)``.  The transported SVF w
is applied to the subject: ``S o exp(w)`` is the subject aged as the template aged.

With the symmetric Cartan-Schouten connection, parallel transport along the one-parameter
subgroup ``exp(t v)`` is the adjoint action by the *half* deformation (what the pole ladder
computes and converges to)::

    Pi(u) = Ad_exp(-v/2) u,   exp(Pi(u)) = exp(-v/2) o exp(u) o exp(v/2)
          = u - [v/2, u] + 1/2 [v/2, [v/2, u]] - ...

with the group bracket ``[a, b] = (Da) b - (Db) a`` of :func:`inbrainsyn.fields.lie_bracket`.

Methods (one entry point, :func:`transport`)
--------------------------------------------
``pole``             pole ladder in BCH form, iterated: ``u_{k+1} = u_k - [s, u_k] + 1/2 [s, [s, u_k]]``,
                     ``s = v / (2 n)``; error O(|v|^3 |u| / n^2); linear in u.
``schild``           Schild's ladder in BCH form: n rungs along ``v / n`` transporting ``u / n``
                     (then times n); non-linear in u, error O(|u| |v| / n) -- lower order.
``half-conjugation`` exact ``Ad_exp(-v/2) u`` by push-forward (no series, no log).
``conjugation``      ``Ad_exp(-v) u`` (``exp(-v) o exp(u) o exp(v)``): the "change of coordinates"
                     transport, which assumes the subject relates to T1 as it relates to T0.
``none``             u unchanged (the template ageing applied as is).

Shapes: fields are ``(3, Z, Y, X)`` in voxel units of one shared grid; everything runs on the
device and dtype of ``u``.
"""

from __future__ import annotations

import math

import torch

from inbrainsyn import fields

METHODS = ("pole", "schild", "half-conjugation", "conjugation", "none")

# The pole ladder step is a second-order Taylor step of du/dt = -[v/2, u], whose (Du) s part is an
# advection by s.  On the grid (central differences) a second-order step amplifies the shortest
# wavelengths by up to 1 + |s|^4 / 8 per step, so |s| is kept at or below ~1/2 voxel by default
# (amplification <= 1.008 per step), which also keeps the O(|s|^3) truncation error small.
DEFAULT_MAX_RUNG_VOXELS = 0.5
MAX_STEPS = 256

# The exponential applied to images lives with the warp convention (fields.accurate_exp); the
# names stay importable from here for callers written before the move.
ACCURATE_EXP_STEP_VOXELS = fields.ACCURATE_EXP_STEP_VOXELS
accurate_exp = fields.accurate_exp


# --------------------------------------------------------------------------------------------
# Memory-lean bracket with a fixed left argument
# --------------------------------------------------------------------------------------------


def _component_gradient(field: torch.Tensor, i: int) -> torch.Tensor:
    """Gradient of component i of a ``(3, Z, Y, X)`` field: ``(3, Z, Y, X)``, ``[j] = d f_i / d x_j``.

    Uses :func:`fields.spatial_gradient` (the project's finite differences and axis order) on one
    component at a time, so only 3 N extra floats live at once instead of 9 N (+ a stacked copy).
    """
    return fields.spatial_gradient(field[i : i + 1])[0]


class BracketWith:
    """The linear map ``b -> [a, b] = (Da) b - (Db) a`` for a fixed field ``a`` (group bracket).

    ``Da`` (9 N floats) is computed once and reused, which is what a ladder needs (the rung s is the
    same at every step).  Equal to :func:`fields.lie_bracket` ``(a, b)`` up to rounding.
    a: ``(3, Z, Y, X)``.
    """

    def __init__(self, a: torch.Tensor):
        self.a = a
        self.jacobian = a.new_empty((3, 3, *a.shape[1:]))  # filled row by row: no stacked copy
        for i in range(3):
            self.jacobian[i] = _component_gradient(a, i)

    def __call__(self, b: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(b)
        for i in range(3):
            out[i] = _dot(self.jacobian[i], b) - _dot(_component_gradient(b, i), self.a)  # ((Da) b - (Db) a)_i
        return out


def _dot(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Voxel-wise dot product of two ``(3, Z, Y, X)`` tensors -> ``(Z, Y, X)`` (one temporary)."""
    out = p[0] * q[0]
    out.addcmul_(p[1], q[1])
    return out.addcmul_(p[2], q[2])


# --------------------------------------------------------------------------------------------
# Number of ladder steps
# --------------------------------------------------------------------------------------------


def ladder_steps(along: torch.Tensor, max_rung_voxels: float = DEFAULT_MAX_RUNG_VOXELS, half: bool = True) -> int:
    """Number n of ladder steps so that each rung is at most ``max_rung_voxels`` long.

    For the pole ladder the rung is ``s = v / (2 n)`` (``half=True``); for Schild's ladder it is
    ``v / n``.  At least 1, at most :data:`MAX_STEPS`.
    """
    if max_rung_voxels <= 0:
        raise ValueError(f"max_rung_voxels must be positive, got {max_rung_voxels}")
    length = fields.max_norm(along) * (0.5 if half else 1.0)
    return int(min(MAX_STEPS, max(1, math.ceil(length / max_rung_voxels))))


def default_steps(method: str, along: torch.Tensor) -> int | None:
    """Ladder steps :func:`transport` uses for ``method`` when none are given (None: not a ladder)."""
    if method == "pole":
        return ladder_steps(along)
    if method == "schild":
        return ladder_steps(along, half=False)
    return None


def _check_steps(steps: int | None) -> None:
    if steps is not None and (int(steps) != steps or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


def pole_ladder(u: torch.Tensor, along: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """Iterated pole ladder in BCH form: ``Ad_exp(-v/2) u`` to O(|v|^3 |u| / n^2).

    One step (Lorenzi & Pennec): the pole ``m = exp(s)`` reflects ``exp(u_k)`` to
    ``m exp(u_k)^-1 m``; the transported vector ``-log(exp(2s)^-1 m exp(u_k)^-1 m)``
    ``= Ad_exp(-s) u_k = u_k - [s, u_k] + 1/2 [s, [s, u_k]] + O(|s|^3 |u|)``, ``s = v / (2 n)``.
    n steps compose to ``Ad_exp(-v/2)`` because ``Ad`` is a homomorphism.
    u, along: ``(3, Z, Y, X)``; returns ``(3, Z, Y, X)``.  Linear in u.
    """
    _check_steps(steps)
    n = ladder_steps(along) if steps is None else int(steps)
    bracket = BracketWith(along / (2.0 * n))
    w = u
    for _ in range(n):
        first = bracket(w)
        # w - first + 1/2 [s, first], in place on the fresh tensor (u itself is never modified)
        w = bracket(first).mul_(0.5).sub_(first).add_(w)
    return w


def schild_rung(u: torch.Tensor, rung: torch.Tensor, bch_order: int = 2) -> torch.Tensor:
    """One rung of Schild's ladder from id to ``q = exp(rung)``, in BCH form.

    Geometric construction (base id, ``a = exp(u)``): midpoint of the diagonal a -> q,
    ``m = a o exp(1/2 log(a^-1 o q))``; the other diagonal from id through m ends at
    ``b = exp(2 log m)``; the transported vector is ``log(q^-1 o b)``.  With BCH:
    ``r = bch(-u, rung)``, ``log m = bch(u, r / 2)``, result ``bch(-rung, 2 log m)``.
    Exact when u and rung commute; otherwise differs from ``Ad_exp(-rung/2) u`` by terms of order
    ``|u| |rung| (|u| + |rung|)`` (non-linear in u).
    """
    half_diagonal = 0.5 * fields.bch(-u, rung, bch_order)
    log_midpoint = fields.bch(u, half_diagonal, bch_order)
    return fields.bch(-rung, 2.0 * log_midpoint, bch_order)


def schild_ladder(u: torch.Tensor, along: torch.Tensor, steps: int | None = None, bch_order: int = 2) -> torch.Tensor:
    """Schild's ladder with n rungs along ``v / n``, transporting ``u / n`` and rescaling by n.

    The per-rung error is ~ ``|u| |v/n| (|u| + |v/n|)``; transporting the small vector ``u / n``
    makes the total error O(|u| |v| (|u| + |v|) / n) -- first order in 1/n, against second order
    for the pole ladder.  Without the rescaling the error would not fall with n at all (the
    ``|u|^2 |v|`` part adds up over the rungs).
    """
    _check_steps(steps)
    n = ladder_steps(along, half=False) if steps is None else int(steps)
    rung = along / n
    w = u / n
    for _ in range(n):
        w = schild_rung(w, rung, bch_order)
    return w * n


def conjugate(u: torch.Tensor, along: torch.Tensor, fraction: float = 0.5, exp_steps: int | None = None) -> torch.Tensor:
    """``Ad_exp(-f v) u`` by push-forward, with no series and no log (f = ``fraction``).

    ``exp(-f v) o exp(u) o exp(f v) = exp(g_* u)`` for ``g = exp(-f v)``, and
    ``(g_* u)(x) = Dg(g^-1 x) u(g^-1 x) = [D h(x)]^-1 u(h(x))`` with ``h = g^-1 = exp(f v)``.
    So W(x) = J(x)^-1 u(x + d_h(x)), J = I + D d_h (one exponential, one sample, a 3x3 solve).
    Linear fields: ``W = e^{-fV} U e^{fV} x``.  Constant v = c: ``W(x) = u(x + f c)``.
    u, along: ``(3, Z, Y, X)``; returns ``(3, Z, Y, X)``.
    """
    h = fields.accurate_exp(fraction * along, exp_steps)
    u_at_h = fields.sample_at(u, h)
    return _solve_jacobian(fields.jacobian_matrix(h), u_at_h)


def _solve_jacobian(jac: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Per-voxel ``J^-1 b`` by the adjugate (Cramer): jac ``(3, 3, Z, Y, X)``, rhs ``(3, Z, Y, X)``.

    Where ``det J`` is not positive (a folded exp(v/2), which a valid registration does not
    produce) the voxel keeps ``b``: there is no meaningful push-forward through a fold.
    """
    j = jac
    cof = lambda r0, r1, c0, c1: j[r0, c0] * j[r1, c1] - j[r0, c1] * j[r1, c0]
    adj = [
        [cof(1, 2, 1, 2), -cof(0, 2, 1, 2), cof(0, 1, 1, 2)],
        [-cof(1, 2, 0, 2), cof(0, 2, 0, 2), -cof(0, 1, 0, 2)],
        [cof(1, 2, 0, 1), -cof(0, 2, 0, 1), cof(0, 1, 0, 1)],
    ]
    det = j[0, 0] * adj[0][0] + j[0, 1] * adj[1][0] + j[0, 2] * adj[2][0]
    folded = det <= 1e-6
    safe_det = torch.where(folded, torch.ones_like(det), det)
    out = torch.empty_like(rhs)
    for i in range(3):
        solved = (adj[i][0] * rhs[0] + adj[i][1] * rhs[1] + adj[i][2] * rhs[2]) / safe_det
        out[i] = torch.where(folded, rhs[i], solved)
    return out


def conjugated_displacement(u: torch.Tensor, along: torch.Tensor, fraction: float = 0.5) -> torch.Tensor:
    """Displacement of ``exp(-f v) o exp(u) o exp(f v)`` by composing the three maps (no log).

    ``compose(outer, inner) = phi_outer o phi_inner``: the point goes through ``exp(f v)`` first.
    """
    inner = fields.compose(fields.accurate_exp(u), fields.accurate_exp(fraction * along))
    return fields.compose(fields.accurate_exp(-fraction * along), inner)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _validate(u: torch.Tensor, along: torch.Tensor, method: str, mask: torch.Tensor | None) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown transport method {method!r}; choose one of {', '.join(METHODS)}")
    if u.dim() != 4 or u.shape[0] != 3:
        raise ValueError(f"u must be a (3, Z, Y, X) field, got shape {tuple(u.shape)}")
    if along.shape != u.shape:
        raise ValueError(f"u {tuple(u.shape)} and along {tuple(along.shape)} must be on the same grid")
    if mask is not None and tuple(mask.shape) != tuple(u.shape[1:]):
        raise ValueError(f"mask {tuple(mask.shape)} must have the grid shape {tuple(u.shape[1:])}")
    if not (torch.isfinite(u).all() and torch.isfinite(along).all()):
        raise ValueError("u and along must be finite (NaN or infinite vectors found)")


def _apply_mask(w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``mask * w``: mask ``(Z, Y, X)`` weights in [0, 1] (binary, or smoothed for a gentle fall-off)."""
    if mask is None:
        return w
    return w * mask.to(device=w.device, dtype=w.dtype).clamp(0.0, 1.0).unsqueeze(0)


def fade_outside(inside: torch.Tensor, spacing_zyx, margin_mm: float = 2.0, ramp_mm: float = 6.0) -> torch.Tensor:
    """Weights ``(Z, Y, X)`` for :func:`transport`'s ``mask``: 1 inside ``inside`` (boolean) and up to
    ``margin_mm`` outside it, falling smoothly (smoothstep) to 0 at ``margin_mm + ramp_mm`` outside and
    beyond, and 0 on the box faces.  With the subject's head (intracranial) region this keeps the
    transported ageing inside the head, so nothing moves in skull, scalp or background and the field
    vanishes before the edge of the template grid (no seam when it is mapped onto the input grid).
    """
    import numpy as np
    import scipy.ndimage

    outside = ~np.pad(inside.detach().cpu().numpy().astype(bool), 1, constant_values=False)
    distance = scipy.ndimage.distance_transform_edt(outside, sampling=spacing_zyx)[1:-1, 1:-1, 1:-1]
    t = np.clip((margin_mm + ramp_mm - distance) / max(ramp_mm, 1e-6), 0.0, 1.0)
    weights = t * t * (3.0 - 2.0 * t)
    for axis in range(3):  # the faces of the box stay still
        index = [slice(None)] * 3
        for end in (0, -1):
            index[axis] = end
            weights[tuple(index)] = 0.0
    return torch.from_numpy(weights.astype(np.float32))


def transport(
    u: torch.Tensor,
    along: torch.Tensor,
    method: str = "pole",
    steps: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Transported SVF w (``S o exp(w)`` = subject aged like the template), ``(3, Z, Y, X)``.

    u:      template ageing SVF, ``T0 o exp(u) ~ T1`` (voxel units).
    along:  template-to-subject SVF v, ``T0 o exp(v) ~ S`` (same grid).
    method: one of :data:`METHODS`.
    steps:  ladder steps (``pole``/``schild``); default from ``max |v|`` (:func:`ladder_steps`).
    mask:   optional ``(Z, Y, X)`` weights in [0, 1] multiplying w afterwards (e.g. a smoothed
            subject brain mask, so the background is left still); None keeps w everywhere.
    """
    _validate(u, along, method, mask)
    along = along.to(device=u.device, dtype=u.dtype)
    if method == "pole":
        w = pole_ladder(u, along, steps)
    elif method == "schild":
        w = schild_ladder(u, along, steps)
    elif method == "half-conjugation":
        w = conjugate(u, along, 0.5)
    elif method == "conjugation":
        w = conjugate(u, along, 1.0)
    else:
        w = u.clone()
    return _apply_mask(w, mask)


def transported_displacement(
    u: torch.Tensor,
    along: torch.Tensor,
    method: str = "pole",
    steps: int | None = None,
    mask: torch.Tensor | None = None,
    transported: torch.Tensor | None = None,
) -> torch.Tensor:
    """Displacement to warp the subject by: ``S o phi`` is the aged subject, ``(3, Z, Y, X)``.

    For the ladders (and ``none``) ``phi = exp(w)`` (:func:`fields.accurate_exp`).  For the conjugations without a mask the
    three exponentials are composed directly (``exp(-f v) o exp(u) o exp(f v)``), which needs
    neither a series nor a push-forward Jacobian; with a mask, ``exp(mask * w)``.
    ``transported``: the w that :func:`transport` already returned for these arguments, to avoid
    computing it twice.
    """
    _validate(u, along, method, mask)
    along = along.to(device=u.device, dtype=u.dtype)
    if mask is None and method in ("half-conjugation", "conjugation"):
        return conjugated_displacement(u, along, 0.5 if method == "half-conjugation" else 1.0)
    if transported is None:
        transported = transport(u, along, method, steps, mask)
    return fields.accurate_exp(transported)
