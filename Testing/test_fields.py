"""Pins the warp convention and the SVF geometry with analytic fields."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from synthetic_fields import smooth_random_field
from inbrainsyn import fields


def linear_field(matrix, shape):
    """v(x) = M (x - c) with c the grid centre: ``(3, Z, Y, X)``."""
    coords = fields.voxel_coordinates(shape, dtype=torch.float64)
    centre = torch.tensor([(shape[2] - 1) / 2, (shape[1] - 1) / 2, (shape[0] - 1) / 2], dtype=torch.float64)
    rel = coords - centre.view(3, 1, 1, 1)
    return torch.einsum("ij,j...->i...", torch.as_tensor(matrix, dtype=torch.float64), rel)


def interior(t, margin=3):
    return t[..., margin:-margin, margin:-margin, margin:-margin]


def test_bracket_of_constant_fields_is_zero():
    shape = (8, 9, 10)
    a = torch.ones((3, *shape)) * torch.tensor([1.0, -2.0, 0.5]).view(3, 1, 1, 1)
    b = torch.ones((3, *shape)) * torch.tensor([0.3, 0.7, -1.1]).view(3, 1, 1, 1)
    assert torch.count_nonzero(fields.lie_bracket(a, b)) == 0


def test_bracket_of_linear_fields_is_the_matrix_commutator_with_group_sign():
    """For a = A x, b = B x: (Da) b - (Db) a = (AB - BA) x (central differences are exact on linear fields)."""
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(3, 3)) * 0.1, rng.normal(size=(3, 3)) * 0.1
    shape = (10, 11, 12)
    a, b = linear_field(A, shape), linear_field(B, shape)
    expected = linear_field(A @ B - B @ A, shape)
    assert torch.allclose(fields.lie_bracket(a, b), expected, atol=1e-10)
    # the vector-field (Jacobi-Lie) bracket has the opposite sign: make sure we are not it
    assert not torch.allclose(fields.lie_bracket(a, b), -expected, atol=1e-3)


def test_exp_of_constant_field_is_a_translation():
    shape = (12, 12, 12)
    t = torch.tensor([1.7, -0.6, 2.3])
    v = torch.ones((3, *shape)) * t.view(3, 1, 1, 1)
    d = fields.exp(v)
    assert fields.squaring_steps(v) >= 3  # chosen from the magnitude
    assert torch.allclose(d, v, atol=1e-5)


def test_exp_of_zero_is_identity():
    d = fields.exp(torch.zeros((3, 6, 6, 6)))
    assert torch.count_nonzero(d) == 0


def test_exp_v_composed_with_exp_minus_v_is_identity():
    v = smooth_random_field((32, 32, 32), max_norm_vox=4.0, seed=3)
    phi, phi_inv = fields.exp(v), fields.exp(-v)
    err_right = torch.sqrt((fields.compose(phi, phi_inv) ** 2).sum(0))
    err_left = torch.sqrt((fields.compose(phi_inv, phi) ** 2).sum(0))
    assert float(interior(err_right, 4).max()) < 0.05
    assert float(interior(err_left, 4).max()) < 0.05


def test_exp_of_linear_field_matches_matrix_exponential():
    from scipy.linalg import expm

    rng = np.random.default_rng(2)
    M = rng.normal(size=(3, 3)) * 0.05
    shape = (24, 24, 24)
    v = linear_field(M, shape).float()
    d = fields.exp(v)
    expected = linear_field(expm(M) - np.eye(3), shape).float()
    assert float(interior(torch.abs(d - expected), 6).max()) < 0.02


def test_log_jacobian_determinant_of_exp_is_divergence_for_small_fields():
    v = smooth_random_field((32, 32, 32), max_norm_vox=0.3, seed=4)
    log_det = torch.log(fields.jacobian_determinant(fields.exp(v)))
    div = fields.divergence(v)
    err = interior(torch.abs(log_det - div), 4)
    assert float(err.max()) < 0.1 * float(interior(div.abs(), 4).max())


def test_compose_order_is_pull_back():
    """warp(warp(I, a), b) == warp(I, compose(a, b)) on a smooth image."""
    shape = (24, 24, 24)
    coords = fields.voxel_coordinates(shape)
    image = torch.sin(coords[0] / 4) + torch.cos(coords[1] / 5) * torch.sin(coords[2] / 6)
    a = smooth_random_field(shape, 3.0, seed=5, sigma=2.5)
    b = smooth_random_field(shape, 3.0, seed=6, sigma=2.5)
    twice = fields.warp(fields.warp(image, a), b)
    once = fields.warp(image, fields.compose(a, b))
    other = fields.warp(image, fields.compose(b, a))
    # the residual of the right order is interpolation error only (two trilinear passes vs one)
    err_right = float(interior(torch.abs(twice - once), 4).mean())
    err_wrong = float(interior(torch.abs(twice - other), 4).mean())
    assert err_right < 0.005
    assert err_wrong > 2 * err_right


def test_bch_second_order_matches_composition_with_group_sign():
    shape = (32, 32, 32)
    a = smooth_random_field(shape, 2.0, seed=7)
    b = smooth_random_field(shape, 2.0, seed=8)
    target = fields.compose(fields.exp(a), fields.exp(b))  # exp(a) o exp(b)
    err = lambda c: float(interior(torch.sqrt(((fields.exp(c) - target) ** 2).sum(0)), 5).mean())
    e1, e2, e3 = err(fields.bch(a, b, 1)), err(fields.bch(a, b, 2)), err(fields.bch(a, b, 3))
    flipped = err(a + b - 0.5 * fields.lie_bracket(a, b))
    assert e2 < 0.5 * e1
    assert e3 <= e2 * 1.05
    assert flipped > 2 * e2


def oblique_grid(size=(14, 12, 10)):
    angle = 0.3
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    return fields.Grid(size=size, spacing=(1.5, 0.8, 2.5), origin=(-10.0, 4.0, 7.0), direction=tuple(rot.ravel()))


def test_itk_displacement_field_reproduces_our_warp_on_an_oblique_anisotropic_grid():
    grid = oblique_grid()
    shape = grid.shape
    d = smooth_random_field(shape, 1.5, seed=9, sigma=3)
    coords = fields.voxel_coordinates(shape)
    image_t = torch.sin(coords[0] / 3) + coords[1] / 10 + torch.cos(coords[2] / 2)
    image = fields.tensor_to_image(image_t, grid)
    ours = fields.warp(image_t, d).numpy()

    field_image = fields.field_to_sitk(d, grid)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field_image, sitk.sitkVectorFloat64))
    theirs = sitk.GetArrayFromImage(sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0))
    inside = interior(torch.from_numpy(np.abs(ours - theirs)), 2)
    assert float(inside.max()) < 1e-3


def test_field_round_trip_through_itk_file(tmp_path):
    grid = oblique_grid()
    d = smooth_random_field(grid.shape, 2.0, seed=10)
    path = tmp_path / "field.nii.gz"
    sitk.WriteImage(fields.field_to_sitk(d, grid), str(path))
    back, grid_back = fields.field_from_sitk(sitk.ReadImage(str(path)))
    assert grid_back.same_as(grid)
    assert torch.allclose(back, d, atol=1e-4)


def test_field_from_sitk_rejects_wrong_component_count():
    img = sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 2)
    with pytest.raises(ValueError, match="3 vector components"):
        fields.field_from_sitk(img, name="bad.nii.gz")


def test_resize_field_keeps_physical_displacement():
    shape = (9, 11, 13)
    v = torch.ones((3, *shape)) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1)
    up = fields.resize_field(v, (17, 21, 25))
    assert torch.allclose(up[:, 5, 5, 5], torch.tensor([2.0, 4.0, 6.0]), atol=1e-5)


@pytest.mark.parametrize("grid_shape", [(37, 20, 22), (1, 1, 7000)])
def test_threaded_grid_sample_is_bit_identical_to_one_call(grid_shape, monkeypatch):
    """Slabs sampled in worker threads must give exactly the points of one grid_sample call."""
    import concurrent.futures

    import torch.nn.functional as F

    monkeypatch.setattr(fields, "PARALLEL_SAMPLING_POINTS", 1000)  # small grids take the threaded path too
    pools = []
    real_pool = concurrent.futures.ThreadPoolExecutor
    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", lambda n: pools.append(n) or real_pool(n))

    gen = torch.Generator().manual_seed(3)
    values = torch.rand((1, 2, 15, 16, 17), generator=gen)
    grid = torch.rand((1, *grid_shape, 3), generator=gen) * 2.4 - 1.2  # some points outside: border rule
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        for mode in ("bilinear", "nearest"):
            expected = F.grid_sample(values, grid, mode=mode, padding_mode="border", align_corners=True)
            assert torch.equal(fields.grid_sample_3d(values, grid, mode=mode), expected)
        assert pools == [3, 3] and torch.get_num_threads() == 3
        # a gradient is needed: one plain call, still differentiable
        wanted = values.clone().requires_grad_()
        fields.grid_sample_3d(wanted, grid).sum().backward()
        assert wanted.grad is not None and float(wanted.grad.sum()) > 0
    finally:
        torch.set_num_threads(previous)
