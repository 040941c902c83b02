"""The pipeline's native-space composition ``A o psi o A^-1``, pinned with analytic transforms."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from inbrainsyn import fields
from inbrainsyn.native import GridImage, NativeMapper, affine_parts, resample_native
from inbrainsyn.synthesis import normalise_intensity


def make_grid(size, spacing, origin, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return fields.Grid(size=size, spacing=spacing, origin=origin, direction=tuple(rot.ravel()))


def test_affine_parts_reads_matrix_and_offset():
    tf = sitk.AffineTransform(3)
    m = np.array([[1.1, 0.1, 0.0], [0.0, 0.9, 0.2], [0.05, 0.0, 1.0]])
    tf.SetMatrix(m.ravel().tolist())
    tf.SetCenter((5.0, -3.0, 2.0))
    tf.SetTranslation((1.0, 2.0, 3.0))
    matrix, offset = affine_parts(tf)
    p = np.array([7.0, 8.0, -9.0])
    assert np.allclose(matrix @ p + offset, tf.TransformPoint(tuple(p)), atol=1e-9)


def test_constant_template_displacement_maps_to_affine_conjugate():
    """psi = translation by t (template mm)  =>  A o psi o A^-1 = translation by M t (native mm)."""
    native = make_grid((20, 18, 16), (1.2, 1.0, 2.0), (-10.0, 5.0, 3.0), angle=0.4)
    template = make_grid((40, 40, 40), (2.0, 2.0, 2.0), (-50.0, -45.0, -40.0))
    m = np.array([[0.9, 0.1, 0.0], [-0.1, 1.1, 0.05], [0.0, 0.0, 1.0]])
    offset = np.array([2.0, -1.0, 0.5])
    t_mm = np.array([1.5, -0.5, 2.0])
    d_vox = torch.from_numpy(np.linalg.solve(template.index_to_physical, t_mm)).float().view(3, 1, 1, 1).expand(3, 40, 40, 40)
    mapper = NativeMapper(native, template, m, offset, torch.device("cpu"), chunk_slices=5)
    native_mm = mapper.native_map(d_vox.contiguous())
    # native points whose preimage lies inside the template grid see exactly M t
    assert np.allclose(native_mm.reshape(-1, 3), m @ t_mm, atol=1e-4)


def test_pull_template_with_identity_affine_is_plain_resampling():
    grid = make_grid((24, 20, 22), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    values = torch.rand(grid.shape)
    mapper = NativeMapper(grid, grid, np.eye(3), np.zeros(3), torch.device("cpu"))
    out = mapper.pull_template(values, None, mode="nearest")
    assert np.allclose(out, values.numpy(), atol=1e-6)


def test_native_warp_matches_sitk_resampling_through_the_composed_transform():
    """Warping a native image by our composed map equals ITK resampling through A o T o A^-1."""
    native = make_grid((30, 28, 26), (1.0, 1.2, 1.5), (-5.0, -6.0, -7.0), angle=0.3)
    template = make_grid((50, 50, 50), (2.0, 2.0, 2.0), (-50.0, -50.0, -50.0))
    m = np.array([[1.05, 0.0, 0.1], [0.0, 0.95, 0.0], [-0.1, 0.0, 1.0]])
    offset = np.array([1.0, 0.5, -0.5])
    t_mm = np.array([0.0, 2.0, 0.0])  # template translation
    d_vox = torch.from_numpy(np.linalg.solve(template.index_to_physical, t_mm)).float().view(3, 1, 1, 1).expand(3, 50, 50, 50).contiguous()
    coords = fields.voxel_coordinates(native.shape)
    image = fields.tensor_to_image(torch.sin(coords[0] / 4.0) * torch.cos(coords[1] / 5.0) + coords[2] / 20.0, native)
    mapper = NativeMapper(native, template, m, offset, torch.device("cpu"))
    ours = sitk.GetArrayFromImage(resample_native(image, mapper.native_map(d_vox), sitk.sitkLinear))

    a = sitk.AffineTransform(3)
    a.SetMatrix(m.ravel().tolist())
    a.SetTranslation(offset.tolist())
    t = sitk.TranslationTransform(3, t_mm.tolist())
    composite = sitk.CompositeTransform([a, t, a.GetInverse()])  # applied last-first: A^-1, then T, then A
    theirs = sitk.GetArrayFromImage(sitk.Resample(image, image, composite, sitk.sitkLinear, 0.0))
    inner = (slice(4, -4),) * 3
    assert np.abs(ours[inner] - theirs[inner]).max() < 1e-3


def test_normalise_intensity_maps_percentiles_to_unit_range():
    rng = np.random.default_rng(0)
    array = np.zeros((30, 30, 30), np.float32)
    array[5:25, 5:25, 5:25] = rng.uniform(100, 900, size=(20, 20, 20))
    out = sitk.GetArrayFromImage(normalise_intensity(sitk.GetImageFromArray(array)))
    fg = out[5:25, 5:25, 5:25]
    assert abs(np.percentile(fg, 1)) < 0.01 and abs(np.percentile(fg, 99) - 1) < 0.01


# ------------------------------------------------------------------------------------------------
# The torch resampler against ITK's (issue 15: native outputs resampled in torch on the run's device)
# ------------------------------------------------------------------------------------------------


def _itk_resample(image, d_mm, interpolator, default):
    field = sitk.GetImageFromArray(d_mm.astype(np.float64), isVector=True)
    field.CopyInformation(image)
    tf = sitk.DisplacementFieldTransform(field)
    return sitk.GetArrayFromImage(sitk.Resample(image, image, tf, interpolator, default, sitk.sitkFloat32))


@pytest.mark.parametrize("mode, interpolator, tolerance, torch_spline", [
    ("bspline", sitk.sitkBSpline, 5e-6, False),  # CPU path (SciPy): measured 2e-6 of the range on white noise
    ("bspline", sitk.sitkBSpline, 5e-6, True),  # the eight-look-up torch path used on GPUs, run here on the CPU
    ("linear", sitk.sitkLinear, 2e-6, False),
    ("nearest", sitk.sitkNearestNeighbor, 0.0, False),
])
def test_grid_image_matches_itk_resampling(mode, interpolator, tolerance, torch_spline, monkeypatch):
    """White noise (the hardest image for an interpolator) on an oblique anisotropic grid, displaced by
    up to 3 voxels so that many points fall outside: our values equal ITK's within float32 rounding
    (relative to the image's range) everywhere, and the same points get the default value."""
    rng = np.random.default_rng(0)
    shape = (20, 24, 28)
    grid = make_grid((28, 24, 20), (1.0, 1.2, 0.9), (3.0, -2.0, 5.0), angle=0.3)
    array = (rng.normal(size=shape) * 100).astype(np.float32)
    image = fields.tensor_to_image(torch.from_numpy(array), grid)
    d_vox = torch.from_numpy(rng.uniform(-3, 3, size=(3, *shape)).astype(np.float32))
    theirs = _itk_resample(image, fields.field_to_physical(d_vox, grid), interpolator, -7.0)
    spline = GridImage(image, "cpu", mode)
    if torch_spline:
        monkeypatch.setattr(spline, "_bspline_scipy", spline._bspline)
    ours = spline.sample(fields.voxel_coordinates(shape) + d_vox, -7.0).numpy()
    outside = theirs == -7.0
    assert 0.05 < outside.mean() < 0.5  # the test reaches the border handling
    assert np.array_equal(outside, ours == -7.0)
    assert np.abs(ours - theirs).max() <= tolerance * np.ptp(array) + 1e-6


def test_bspline_reproduces_a_cubic_polynomial_exactly_inside():
    """A cubic B-spline interpolant reproduces polynomials of degree <= 3 away from the (mirrored) border."""
    shape = (16, 18, 20)
    coords = fields.voxel_coordinates(shape).double()
    poly = lambda c: 0.01 * c[0] ** 3 - 0.05 * c[1] ** 2 + 0.3 * c[2] + 0.02 * c[0] * c[1]  # noqa: E731
    spline = GridImage(poly(coords).float().numpy(), "cpu", "bspline")
    points = coords + torch.tensor([0.37, -0.21, 0.44], dtype=torch.float64).view(3, 1, 1, 1)
    inner = (slice(6, -6),) * 3
    expected = poly(points)[inner].numpy()
    got = spline.sample(points.float())[inner].numpy()
    assert np.abs(got - expected).max() < 2e-3 * np.abs(expected).max()


def test_warp_native_equals_itk_resampling_through_the_native_field():
    """The slab-wise torch warp of the input equals ITK B-spline resampling through the native-grid field
    that NativeMapper.native_map builds (the path the pipeline used before issue 15)."""
    native = make_grid((30, 28, 26), (1.0, 1.2, 1.5), (-5.0, -6.0, -7.0), angle=0.3)
    template = make_grid((40, 40, 40), (2.0, 2.0, 2.0), (-45.0, -45.0, -45.0))
    m = np.array([[1.05, 0.0, 0.1], [0.0, 0.95, 0.0], [-0.1, 0.0, 1.0]])
    offset = np.array([1.0, 0.5, -0.5])
    coords_t = fields.voxel_coordinates(template.shape)
    d_vox = torch.stack((torch.sin(coords_t[1] / 5.0), torch.cos(coords_t[2] / 6.0), 0.5 * torch.sin(coords_t[0] / 7.0)))
    coords = fields.voxel_coordinates(native.shape)
    image = fields.tensor_to_image(torch.sin(coords[0] / 2.0) * torch.cos(coords[1] / 3.0) + coords[2] / 20.0, native)
    mapper = NativeMapper(native, template, m, offset, torch.device("cpu"), chunk_slices=7)
    theirs = sitk.GetArrayFromImage(resample_native(image, mapper.native_map(d_vox), sitk.sitkBSpline))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the CPU spline splits each slab between threads
    try:
        ours = mapper.warp_native(GridImage(image, "cpu", "bspline"), d_vox)
    finally:
        torch.set_num_threads(threads)
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < 1e-4
