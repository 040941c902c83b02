"""The pipeline's native-space composition ``A o psi o A^-1``, pinned with analytic transforms."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from inbrainsyn import fields
from inbrainsyn.native import NativeMapper, affine_parts, resample_native
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
