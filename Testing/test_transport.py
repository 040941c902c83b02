"""Pins the maths of parallel transport (pole / Schild's ladder, conjugations) with analytic fields.

Reference target (docs/CONTRACTS.md, METHODS.md section 3): with our pull-back convention the
transport of u along v is ``Ad_exp(-v/2) u``, ``exp(w) = exp(-v/2) o exp(u) o exp(v/2)``, with the
group bracket ``[a, b] = (Da) b - (Db) a``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import expm

from inbrainsyn import fields
from inbrainsyn import transport as tr



@pytest.fixture(autouse=True)
def _no_autograd():
    """These tests need no gradients; disable them for this module's tests only (a module-level
    ``torch.set_grad_enabled(False)`` leaked into every test collected after it)."""
    with torch.no_grad():
        yield


# --------------------------------------------------------------------------------------------
# Analytic test fields
# --------------------------------------------------------------------------------------------


def fourier_field(shape, max_norm, wavelength=16.0, modes=6, seed=0, dtype=torch.float64):
    """Smooth random ``(3, Z, Y, X)`` field: a sum of plane sinusoids of one wavelength (voxels).

    Unlike Gaussian-filtered noise it is equally smooth everywhere (no border build-up), and its
    derivatives are bounded by ``max_norm * 2 pi / wavelength``.
    """
    gen = torch.Generator().manual_seed(seed)
    x = fields.voxel_coordinates(shape, dtype=dtype)
    out = torch.zeros((3, *shape), dtype=dtype)
    for _ in range(modes):
        k = torch.randn(3, generator=gen, dtype=dtype)
        k = k / k.norm() * (2 * math.pi / wavelength)
        amplitude = torch.randn(3, generator=gen, dtype=dtype)
        phase = float(torch.rand(1, generator=gen)) * 2 * math.pi
        out += amplitude.view(3, 1, 1, 1) * torch.sin(torch.einsum("i,i...->...", k, x) + phase)
    return out / out.norm(dim=0).max() * max_norm


def centred_coordinates(shape, dtype=torch.float64):
    coords = fields.voxel_coordinates(shape, dtype=dtype)
    centre = torch.tensor([(shape[2] - 1) / 2, (shape[1] - 1) / 2, (shape[0] - 1) / 2], dtype=dtype)
    return coords - centre.view(3, 1, 1, 1)


def linear_field(matrix, shape):
    """``M (x - c)``, c the grid centre: ``(3, Z, Y, X)`` float64."""
    return torch.einsum("ij,j...->i...", torch.as_tensor(matrix, dtype=torch.float64), centred_coordinates(shape))


def quadratic_field(shape, seed=0, scale=1e-3):
    """A random quadratic field ``u_i(x) = sum_jk Q_ijk x_j x_k + L_ij x_j`` (third derivatives 0)."""
    rng = np.random.default_rng(seed)
    q = torch.as_tensor(rng.normal(size=(3, 3, 3)) * scale)
    lin = torch.as_tensor(rng.normal(size=(3, 3)) * 0.05)
    x = centred_coordinates(shape)
    return torch.einsum("ijk,j...,k...->i...", q, x, x) + torch.einsum("ij,j...->i...", lin, x)


def quadratic_at(shape, seed, shift):
    """The same quadratic field evaluated at ``x + shift`` (analytically)."""
    rng = np.random.default_rng(seed)
    q = torch.as_tensor(rng.normal(size=(3, 3, 3)) * 1e-3)
    lin = torch.as_tensor(rng.normal(size=(3, 3)) * 0.05)
    x = centred_coordinates(shape) + torch.as_tensor(shift, dtype=torch.float64).view(3, 1, 1, 1)
    return torch.einsum("ijk,j...,k...->i...", q, x, x) + torch.einsum("ij,j...->i...", lin, x)


def constant_field(vector, shape):
    return torch.ones((3, *shape), dtype=torch.float64) * torch.as_tensor(vector, dtype=torch.float64).view(3, 1, 1, 1)


def interior(t, margin):
    return t[..., margin:-margin, margin:-margin, margin:-margin]


def mean_norm(field, margin):
    return float(interior(field.norm(dim=0), margin).mean())


def flipped_pole_ladder(u, v, steps):
    """The pole ladder written with the *vector-field* bracket sign (what a sign slip would give)."""
    s = v / (2.0 * steps)
    vf_bracket = lambda a, b: -fields.lie_bracket(a, b)
    w = u
    for _ in range(steps):
        first = vf_bracket(s, w)
        w = w - first + 0.5 * vf_bracket(s, first)
    return w


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def test_lean_bracket_equals_fields_lie_bracket():
    shape = (12, 14, 16)
    a, b = fourier_field(shape, 2.0, 8.0, seed=1), fourier_field(shape, 3.0, 6.0, seed=2)
    assert torch.allclose(tr.BracketWith(a)(b), fields.lie_bracket(a, b), atol=1e-12)


def test_ladder_steps_follow_the_size_of_v():
    shape = (6, 6, 6)
    assert tr.ladder_steps(torch.zeros((3, *shape))) == 1
    v = constant_field([0.0, 30.0, 40.0], shape)  # |v| = 50 voxels
    assert tr.ladder_steps(v, max_rung_voxels=0.5) == 50  # pole rung v/(2n) <= 0.5
    assert tr.ladder_steps(v, max_rung_voxels=1.0, half=False) == 50  # Schild rung v/n <= 1
    assert tr.ladder_steps(v * 1000) == tr.MAX_STEPS


# --------------------------------------------------------------------------------------------
# Generic properties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", tr.METHODS)
def test_zero_v_gives_u_back(method):
    shape = (16, 16, 16)
    u = fourier_field(shape, 2.0, 10.0, seed=3)
    w = tr.transport(u, torch.zeros_like(u), method=method)
    assert torch.allclose(w, u, atol=1e-9)


@pytest.mark.parametrize("method", ["pole", "half-conjugation", "conjugation", "none"])
def test_transport_is_linear_in_u(method):
    shape = (20, 20, 20)
    u1, u2 = fourier_field(shape, 2.0, 10.0, seed=4), fourier_field(shape, 1.0, 7.0, seed=5)
    v = fourier_field(shape, 3.0, 24.0, seed=6)
    combined = tr.transport(2.0 * u1 - 3.0 * u2, v, method=method, steps=3)
    separate = 2.0 * tr.transport(u1, v, method=method, steps=3) - 3.0 * tr.transport(u2, v, method=method, steps=3)
    assert torch.allclose(combined, separate, atol=1e-9)


def test_schild_ladder_is_not_linear_in_u_but_its_nonlinearity_shrinks_with_steps():
    """Schild's parallelogram depends on exp(u) (terms like [u, [u, v]]); rescaling u/n damps them."""
    shape = (20, 20, 20)
    u, v = fourier_field(shape, 2.0, 12.0, seed=7), fourier_field(shape, 4.0, 24.0, seed=8)

    def nonlinearity(steps):
        return mean_norm(tr.schild_ladder(2.0 * u, v, steps) - 2.0 * tr.schild_ladder(u, v, steps), 3)

    assert nonlinearity(1) > 1e-4
    assert nonlinearity(8) < 0.3 * nonlinearity(1)


# --------------------------------------------------------------------------------------------
# Constant v: transport is a translation by v/2
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3])
def test_pole_ladder_with_constant_v_shifts_a_quadratic_u_by_half_v_exactly(steps):
    """Ad_exp(-c/2) u (x) = u(x + c/2); the ladder step is its 2nd-order Taylor series, exact on
    quadratics (central differences are exact there); borders excluded (one-sided differences)."""
    shape = (24, 24, 24)
    c = [1.3, -2.1, 0.7]
    u, v = quadratic_field(shape, seed=9), constant_field(c, shape)
    w = tr.pole_ladder(u, v, steps)
    expected = quadratic_at(shape, 9, [ci / 2 for ci in c])
    wrong_way = quadratic_at(shape, 9, [-ci / 2 for ci in c])  # what the flipped bracket would give
    margin = 2 * steps + 1
    assert float(interior((w - expected).abs(), margin).max()) < 1e-9
    assert float(interior((expected - wrong_way).abs(), margin).max()) > 0.1
    flipped = flipped_pole_ladder(u, v, steps)
    assert float(interior((flipped - wrong_way).abs(), margin).max()) < 1e-9


@pytest.mark.parametrize("method, fraction", [("half-conjugation", 0.5), ("conjugation", 1.0)])
def test_conjugations_with_constant_v_are_translations(method, fraction):
    """With an integer shift the trilinear sampling is exact, so the push-forward must be too."""
    shape = (20, 20, 20)
    c = [2.0, -4.0, 2.0]
    u, v = quadratic_field(shape, seed=10), constant_field(c, shape)
    w = tr.transport(u, v, method=method)
    expected = quadratic_at(shape, 10, [fraction * ci for ci in c])
    assert float(interior((w - expected).abs(), 5).max()) < 1e-9


def test_pole_ladder_with_constant_v_on_smooth_u_matches_the_exact_shift():
    """On u = sin waves of wavelength L the shift is exact analytically; the ladder's error is its
    finite-difference error ~ (2 pi / L)^2 / 6 of the correction (2.6% at L = 16) plus O(|s|^3)."""
    shape = (32, 32, 32)
    c = torch.tensor([3.0, -2.0, 4.0], dtype=torch.float64)
    gen_shape = shape
    x = fields.voxel_coordinates(gen_shape, dtype=torch.float64)
    k = torch.tensor([0.2, 0.3, -0.25], dtype=torch.float64)  # wavelength 2 pi / |k| ~ 14.5 voxels
    phase = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64).view(3, 1, 1, 1)

    def u_at(shift):
        arg = torch.einsum("i,i...->...", k, x + shift.view(3, 1, 1, 1))
        return 2.0 * torch.sin(arg.unsqueeze(0) + phase)

    u, v = u_at(torch.zeros(3, dtype=torch.float64)), constant_field(c, shape)
    expected, wrong_way = u_at(c / 2), u_at(-c / 2)
    w = tr.pole_ladder(u, v, steps=8)
    correction = mean_norm(expected - u, 10)
    assert mean_norm(w - expected, 10) < 0.05 * correction
    assert mean_norm(flipped_pole_ladder(u, v, 8) - expected, 10) > 0.5 * correction
    assert mean_norm(wrong_way - expected, 10) > 0.5 * correction


# --------------------------------------------------------------------------------------------
# Affine fields: everything reduces to 3x3 matrices
# --------------------------------------------------------------------------------------------


def _matrices(seed=11):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(3, 3)) * 0.04, rng.normal(size=(3, 3)) * 0.06


def _matrix_pole(U, V, steps, sign=1.0):
    S = V / (2 * steps)
    br = lambda a, b: sign * (a @ b - b @ a)
    for _ in range(steps):
        first = br(S, U)
        U = U - first + 0.5 * br(S, first)
    return U


def test_pole_ladder_on_linear_fields_is_the_matrix_recursion_converging_to_the_half_conjugate():
    """u = U x, v = V x: exp(v) = e^V x, compose = matrix product, [a, b] = (AB - BA) x, so the
    pole ladder is U_{k+1} = U_k - [S, U_k] + 1/2 [S, [S, U_k]] (differences exact on linear
    fields, borders included) and converges to e^{-V/2} U e^{V/2} with error O(|V|^3 / n^2)."""
    U, V = _matrices()
    shape = (12, 13, 14)
    u, v = linear_field(U, shape), linear_field(V, shape)
    target = expm(-V / 2) @ U @ expm(V / 2)
    errors = []
    for steps in (1, 2, 4):
        w = tr.pole_ladder(u, v, steps)
        matrix = _matrix_pole(U, V, steps)
        assert torch.allclose(w, linear_field(matrix, shape), atol=1e-12)
        errors.append(np.abs(matrix - target).max())
    assert errors[0] < 0.02 * np.abs(target - U).max()  # one step already close: third order
    assert errors[1] < 0.3 * errors[0] and errors[2] < 0.3 * errors[1]  # ~ 1/4 per doubling
    # the flipped bracket converges to e^{+V/2} U e^{-V/2}: far from the target
    flipped = _matrix_pole(U, V, 4, sign=-1.0)
    assert np.abs(flipped - target).max() > 0.5 * np.abs(target - U).max()
    assert np.abs(flipped - expm(V / 2) @ U @ expm(-V / 2)).max() < 2 * errors[2] + 1e-12


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_push_forward_of_linear_fields_is_matrix_conjugation(fraction):
    """Ad_exp(-f v) u for linear fields: e^{-fV} U e^{fV} x (not e^{fV} U e^{-fV} x)."""
    U, V = _matrices(12)
    shape = (24, 24, 24)
    u, v = linear_field(U, shape), linear_field(V, shape)
    w = tr.conjugate(u, v, fraction, exp_steps=12)  # many squarings: exp(Vx) error ~ |V|^2 / 2^13
    expected = linear_field(expm(-fraction * V) @ U @ expm(fraction * V), shape)
    reversed_order = linear_field(expm(fraction * V) @ U @ expm(-fraction * V), shape)
    margin = 5  # exp(f v) moves points by < 1.5 voxel here; keep clear of border replication
    err = float(interior((w - expected).abs(), margin).max())
    assert err < 1e-4
    assert float(interior((reversed_order - expected).abs(), margin).max()) > 100 * err


# --------------------------------------------------------------------------------------------
# Smooth random fields: pole ladder vs the exact half-conjugation
# --------------------------------------------------------------------------------------------


def test_half_conjugation_svf_exponentiates_to_the_three_map_composition_in_that_order():
    """exp(Ad_exp(-v/2) u) = exp(-v/2) o exp(u) o exp(v/2) (compose: inner map first)."""
    shape = (32, 32, 32)
    u, v = fourier_field(shape, 2.0, 16.0, seed=13), fourier_field(shape, 4.0, 28.0, seed=14)
    exp = fields.accurate_exp
    from_svf = exp(tr.conjugate(u, v, 0.5))
    composed = tr.conjugated_displacement(u, v, 0.5)
    reverse = fields.compose(exp(0.5 * v), fields.compose(exp(u), exp(-0.5 * v)))
    err = mean_norm(from_svf - composed, 6)
    # what remains is trilinear interpolation in the compositions (~4% of the change here;
    # with fields.exp's default 1/4-voxel first step it would be 13%)
    assert err < 0.06 * mean_norm(from_svf - exp(u), 6)
    assert mean_norm(reverse - composed, 6) > 10 * err


def test_conjugation_reproduces_the_older_template_seen_through_v():
    """Semantic pin of the order on images: if S = T0 o exp(v) and T1 = T0 o exp(u), warping S by
    exp(-v) o exp(u) o exp(v) gives T1 o exp(v) (the subject relates to T1 as to T0)."""
    shape = (32, 32, 32)
    x = fields.voxel_coordinates(shape, dtype=torch.float64)
    t0 = torch.sin(x[0] / 5.0) * torch.cos(x[1] / 6.0) + torch.sin(x[2] / 4.0 + x[0] / 9.0)
    u, v = fourier_field(shape, 1.5, 20.0, seed=15), fourier_field(shape, 2.5, 28.0, seed=16)
    subject = fields.warp(t0, fields.exp(v))
    older_seen_through_v = fields.warp(fields.warp(t0, fields.exp(u)), fields.exp(v))
    aged = fields.warp(subject, tr.transported_displacement(u, v, "conjugation"))
    wrong = fields.warp(subject, fields.compose(fields.exp(v), fields.compose(fields.exp(u), fields.exp(-v))))
    change = float(interior((older_seen_through_v - subject).abs(), 6).mean())
    err = float(interior((aged - older_seen_through_v).abs(), 6).mean())
    assert err < 0.1 * change
    assert float(interior((wrong - older_seen_through_v).abs(), 6).mean()) > 5 * err


def test_pole_ladder_matches_half_conjugation_on_smooth_fields_and_improves_with_steps():
    shape = (32, 32, 32)
    u = fourier_field(shape, 2.0, 20.0, seed=17)
    v = fourier_field(shape, 8.0, 56.0, seed=18)  # |Dv| < 1: a plausible diffeomorphism
    reference = tr.conjugate(u, v, 0.5)
    margin = 6
    correction = mean_norm(reference - u, margin)
    errors = {n: mean_norm(tr.pole_ladder(u, v, n) - reference, margin) for n in (1, 2, 4)}
    default = mean_norm(tr.transport(u, v, "pole") - reference, margin)
    assert default < 0.05 * correction  # relative error of the transport itself < 5%
    assert errors[1] > 1.5 * errors[2] and errors[2] > errors[4]  # falls with n (to the grid's floor)
    assert default <= errors[4] * 1.05
    assert mean_norm(flipped_pole_ladder(u, v, 4) - reference, margin) > 0.5 * correction
    assert mean_norm(tr.transport(u, v, "none") - reference, margin) > 0.9 * correction


def test_schild_ladder_converges_towards_the_pole_ladder_target():
    shape = (28, 28, 28)
    u = fourier_field(shape, 1.5, 16.0, seed=19)
    v = fourier_field(shape, 6.0, 48.0, seed=20)
    reference = tr.conjugate(u, v, 0.5)
    margin = 5
    correction = mean_norm(reference - u, margin)
    errors = [mean_norm(tr.schild_ladder(u, v, n) - reference, margin) for n in (1, 3, 9)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1 * correction
    pole = mean_norm(tr.pole_ladder(u, v, 4) - reference, margin)
    assert pole < errors[0]  # the pole ladder is the higher-order scheme


def test_transport_back_along_minus_v_returns_u():
    """Pi_{-v} o Pi_v = id: going to exp(v) and back (q o exp(-v) = id) undoes the transport."""
    shape = (32, 32, 32)
    u, v = fourier_field(shape, 2.0, 16.0, seed=21), fourier_field(shape, 6.0, 48.0, seed=22)
    for method in ("pole", "half-conjugation"):
        there = tr.transport(u, v, method)
        back = tr.transport(there, -v, method)
        assert mean_norm(back - u, 8) < 0.05 * mean_norm(there - u, 8)


def test_volume_change_follows_the_template_at_corresponding_points():
    """What the product promises: the subject shrinks/grows where the template did.  For
    exp(W) = g o exp(u) o g^-1 with g = exp(-v/2), det D exp(W)(x) = det D exp(u)(y) up to the
    factor det Dg(exp(u) y) / det Dg(y) = 1 + O(|u| |D log det Dg|), y = exp(v/2)(x)."""
    shape = (32, 32, 32)
    u, v = fourier_field(shape, 1.0, 16.0, seed=29), fourier_field(shape, 6.0, 48.0, seed=30)
    template_change = torch.log(fields.jacobian_determinant(fields.accurate_exp(u)))
    expected = fields.sample_at(template_change, fields.accurate_exp(0.5 * v))
    margin = 6

    def mismatch(method):
        phi = tr.transported_displacement(u, v, method)
        return float(interior((torch.log(fields.jacobian_determinant(phi)) - expected).abs(), margin).mean())

    none = mismatch("none")
    assert mismatch("half-conjugation") < 0.25 * none
    assert mismatch("pole") < 0.25 * none
    assert mismatch("conjugation") > 0.5 * none  # the full conjugate puts the change elsewhere


def test_transported_displacement_is_exp_of_the_transported_svf():
    shape = (24, 24, 24)
    u, v = fourier_field(shape, 1.5, 14.0, seed=23), fourier_field(shape, 4.0, 30.0, seed=24)
    pole = tr.transported_displacement(u, v, "pole", steps=3)
    assert torch.allclose(pole, fields.accurate_exp(tr.pole_ladder(u, v, 3)), atol=1e-12)
    half = tr.transported_displacement(u, v, "half-conjugation")
    assert mean_norm(half - fields.accurate_exp(tr.conjugate(u, v, 0.5)), 5) < 0.03 * mean_norm(half, 5)


def test_mask_keeps_w_inside_and_zeroes_it_outside():
    shape = (16, 16, 16)
    u, v = fourier_field(shape, 1.5, 10.0, seed=25), fourier_field(shape, 3.0, 20.0, seed=26)
    mask = torch.zeros(shape, dtype=torch.float64)
    mask[4:12, 4:12, 4:12] = 1.0
    w = tr.transport(u, v, "pole", steps=2)
    masked = tr.transport(u, v, "pole", steps=2, mask=mask)
    assert torch.equal(masked[:, mask == 0], torch.zeros_like(masked[:, mask == 0]))
    assert torch.allclose(masked[:, mask == 1], w[:, mask == 1])
    disp = tr.transported_displacement(u, v, "half-conjugation", mask=mask)
    assert torch.allclose(disp, fields.accurate_exp(tr.conjugate(u, v, 0.5) * mask))


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_a_clear_message():
    u = torch.zeros((3, 8, 8, 8))
    with pytest.raises(ValueError, match="same grid"):
        tr.transport(u, torch.zeros((3, 8, 8, 9)))
    with pytest.raises(ValueError, match=r"\(3, Z, Y, X\)"):
        tr.transport(torch.zeros((2, 8, 8, 8)), torch.zeros((2, 8, 8, 8)))
    bad = u.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tr.transport(u, bad)
    with pytest.raises(ValueError, match="unknown transport method 'ladder'"):
        tr.transport(u, u, method="ladder")
    with pytest.raises(ValueError, match="steps"):
        tr.transport(u, u, steps=0)
    with pytest.raises(ValueError, match="mask"):
        tr.transport(u, u, mask=torch.ones((8, 8)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_transport_runs_on_cuda_and_agrees_with_cpu():
    shape = (24, 24, 24)
    u, v = fourier_field(shape, 1.5, 14.0, seed=27).float(), fourier_field(shape, 4.0, 30.0, seed=28).float()
    for method in tr.METHODS:
        cpu = tr.transport(u, v, method)
        gpu = tr.transport(u.cuda(), v.cuda(), method).cpu()
        assert torch.allclose(cpu, gpu, atol=1e-4), method
