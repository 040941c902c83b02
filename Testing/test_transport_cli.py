"""``inbrainsyn transport``: files in, transported field out; bad input gets a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from inbrainsyn import fields
from inbrainsyn import transport as tr
from inbrainsyn.cli import main
from test_transport import fourier_field


def oblique_grid(size=(20, 18, 16), spacing=(1.5, 0.8, 2.5)):
    angle = 0.3
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    return fields.Grid(size=size, spacing=spacing, origin=(-10.0, 4.0, 7.0), direction=tuple(rot.ravel()))


def write_field(path, field, grid):
    sitk.WriteImage(fields.field_to_sitk(field, grid), str(path))
    return str(path)


@pytest.fixture
def pair(tmp_path):
    """U and V on an oblique anisotropic grid, written as ITK displacement fields."""
    grid = oblique_grid()
    u = fourier_field(grid.shape, 1.5, 12.0, seed=1).float()
    v = fourier_field(grid.shape, 3.0, 24.0, seed=2).float()
    return grid, u, v, write_field(tmp_path / "U.nii.gz", u, grid), write_field(tmp_path / "V.nii.gz", v, grid)


def run_cli(*argv):
    return main(["transport", *map(str, argv)])


def test_pole_output_is_the_engine_result_in_mm_with_a_sidecar(pair, tmp_path, capsys):
    grid, u, v, u_path, v_path = pair
    out = tmp_path / "W.nii.gz"
    disp = tmp_path / "D.nii.gz"
    assert run_cli("--svf", u_path, "--along", v_path, "--method", "pole", "--steps", 3, "-o", out,
                   "--displacement", disp, "--device", "cpu") == 0
    w, grid_w = fields.field_from_sitk(sitk.ReadImage(str(out)))
    assert grid_w.same_as(grid)
    expected = tr.transport(u, v, "pole", steps=3)
    assert torch.allclose(w, expected, atol=1e-4)
    d, _ = fields.field_from_sitk(sitk.ReadImage(str(disp)))
    assert torch.allclose(d, fields.accurate_exp(expected), atol=1e-4)
    sidecar = json.loads((tmp_path / "W.json").read_text())
    assert sidecar["parameters"] == {"method": "pole", "steps": 3}
    assert sidecar["device"] == "cpu"
    assert sidecar["max_norm_voxels"]["along"] == pytest.approx(3.0, rel=1e-4)
    assert "method=pole" in capsys.readouterr().out


def test_half_conjugation_of_a_constant_v_in_mm_shifts_u_by_half_v(tmp_path):
    """Chart invariance end to end: V constant (2, -2, 4) voxels, given in mm on an oblique grid,
    must shift U by exactly (1, -1, 2) voxels (integer shifts: trilinear sampling is exact)."""
    grid = oblique_grid()
    u = fourier_field(grid.shape, 1.5, 12.0, seed=3).float()
    v = torch.ones((3, *grid.shape)) * torch.tensor([2.0, -2.0, 4.0]).view(3, 1, 1, 1)
    out = tmp_path / "W.nii.gz"
    assert run_cli("--svf", write_field(tmp_path / "U.nii.gz", u, grid), "--along",
                   write_field(tmp_path / "V.nii.gz", v, grid), "--method", "half-conjugation", "-o", out) == 0
    w, _ = fields.field_from_sitk(sitk.ReadImage(str(out)))
    # w(z, y, x) = u(z + 2, y - 1, x + 1) away from the borders
    inner = w[:, 1:-3, 2:-2, 1:-2]
    shifted = u[:, 3:-1, 1:-3, 2:-1]
    assert torch.allclose(inner, shifted, atol=1e-4)


def test_existing_output_is_refused_unless_overwrite(pair, tmp_path, capsys):
    _, _, _, u_path, v_path = pair
    out = tmp_path / "W.nii.gz"
    out.write_text("precious")
    assert run_cli("--svf", u_path, "--along", v_path, "--method", "none", "-o", out) == 3
    assert out.read_text() == "precious"
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli("--svf", u_path, "--along", v_path, "--method", "none", "-o", out, "--overwrite") == 0
    w, _ = fields.field_from_sitk(sitk.ReadImage(str(out)))
    assert w.shape[0] == 3


def test_mismatched_grids_name_both_files(pair, tmp_path, capsys):
    grid, u, v, u_path, _ = pair
    other = oblique_grid(spacing=(1.0, 1.0, 1.0))
    v_other = write_field(tmp_path / "V_other.nii.gz", v, other)
    assert run_cli("--svf", u_path, "--along", v_other, "-o", tmp_path / "W.nii.gz") == 2
    err = capsys.readouterr().err
    assert "U.nii.gz" in err and "V_other.nii.gz" in err and "not on the same grid" in err
    assert not (tmp_path / "W.nii.gz").exists()


def test_non_finite_field_is_refused_naming_the_file(pair, tmp_path, capsys):
    grid, u, _, _, v_path = pair
    bad = u.clone()
    bad[1, 3, 4, 5] = float("inf")
    # MetaImage keeps non-finite values; ITK's NIfTI reader silently turns them into 0
    bad_path = write_field(tmp_path / "U_bad.mha", bad, grid)
    assert run_cli("--svf", bad_path, "--along", v_path, "-o", tmp_path / "W.nii.gz") == 2
    err = capsys.readouterr().err
    assert "U_bad.mha" in err and "NaN or infinite" in err


@pytest.mark.parametrize("components", [1, 2])
def test_field_with_wrong_component_count_is_refused_naming_the_file(pair, tmp_path, capsys, components):
    _, _, _, u_path, _ = pair
    image = sitk.Image([8, 8, 8], sitk.sitkVectorFloat32 if components > 1 else sitk.sitkFloat32,
                       *([components] if components > 1 else []))
    bad_path = tmp_path / f"V_{components}c.nii.gz"
    sitk.WriteImage(image, str(bad_path))
    assert run_cli("--svf", u_path, "--along", bad_path, "-o", tmp_path / "W.nii.gz") == 2
    err = capsys.readouterr().err
    assert f"V_{components}c.nii.gz" in err and "3 vector components" in err


def test_missing_file_bad_steps_and_bad_mask_are_clear_errors(pair, tmp_path, capsys):
    grid, _, _, u_path, v_path = pair
    assert run_cli("--svf", tmp_path / "nope.nii.gz", "--along", v_path, "-o", tmp_path / "W.nii.gz") == 2
    assert "nope.nii.gz: no such file" in capsys.readouterr().err
    assert run_cli("--svf", u_path, "--along", v_path, "--steps", 0, "-o", tmp_path / "W.nii.gz") == 2
    assert "--steps 0" in capsys.readouterr().err
    mask = sitk.Image([5, 5, 5], sitk.sitkUInt8)
    mask[2, 2, 2] = 1
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    assert run_cli("--svf", u_path, "--along", v_path, "--mask", tmp_path / "mask.nii.gz", "-o", tmp_path / "W.nii.gz") == 2
    err = capsys.readouterr().err
    assert "mask.nii.gz" in err and "not on the same grid" in err


def test_mask_zeroes_w_outside(pair, tmp_path):
    grid, u, v, u_path, v_path = pair
    mask_array = np.zeros(grid.shape, dtype=np.uint8)
    mask_array[4:12, 4:14, 5:15] = 1
    mask_path = tmp_path / "mask.nii.gz"
    sitk.WriteImage(fields.tensor_to_image(torch.from_numpy(mask_array), grid), str(mask_path))
    out = tmp_path / "W.nii.gz"
    assert run_cli("--svf", u_path, "--along", v_path, "--method", "half-conjugation", "--mask", mask_path, "-o", out) == 0
    w, _ = fields.field_from_sitk(sitk.ReadImage(str(out)))
    inside = torch.from_numpy(mask_array).bool()
    assert torch.count_nonzero(w[:, ~inside]) == 0
    assert torch.allclose(w[:, inside], tr.conjugate(u, v, 0.5)[:, inside], atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error(pair, tmp_path, capsys):
    _, _, _, u_path, v_path = pair
    assert run_cli("--svf", u_path, "--along", v_path, "--device", "cuda", "-o", tmp_path / "W.nii.gz") == 2
    assert "no CUDA GPU" in capsys.readouterr().err
