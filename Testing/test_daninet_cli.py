"""``inbrainsyn daninet preview --native-slice K [--json]``: the input's axial slice K -> template slice.

Geometry tests use small synthetic grids and known affines (milliseconds); the CLI tests run the
real command in-process on the shipped model, with the shipped bank template (already on the
model's grid: no registration) and, marked slow, a 3 mm copy of it shifted 7 mm (a real affine
alignment, about a minute on 2 loaded cores).
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest
import SimpleITK as sitk

from inbrainsyn.cli import main
from inbrainsyn.daninet.preview import check_native_slice, load_model, template_slice_for_native_slice
from inbrainsyn.errors import InputError


def grid(size, spacing, origin, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


TEMPLATE = grid((20, 24, 40), (1.5, 1.5, 1.5), (0.0, 0.0, -30.0))  # axial z = -30 + 1.5 j


# ---------------------------------------------------------------- geometry with known affines


def test_identity_on_the_same_grid_keeps_the_index():
    identity = sitk.Transform(3, sitk.sitkIdentity)
    assert [template_slice_for_native_slice(k, TEMPLATE, TEMPLATE, identity) for k in (0, 17, 39)] == [0, 17, 39]


def test_translation_and_coarser_native_grid():
    """Native 3 mm slices from z0 = -20; A(q) = q + (0, 0, 6): template z = native z - 6.

    Native slice K sits at z = -20 + 3K, so the template index is (-20 + 3K - 6 + 30) / 1.5 = (4 + 3K) / 1.5.
    """
    native = grid((10, 12, 12), (3.0, 3.0, 3.0), (2.0, 1.0, -20.0))
    shift = sitk.TranslationTransform(3, (0.0, 0.0, 6.0))
    for k in range(0, 10):
        assert template_slice_for_native_slice(k, native, TEMPLATE, shift) == int(np.floor((4 + 3 * k) / 1.5 + 0.5))


def test_scaling_and_flipped_native_axis():
    """A(q) = 1.2 q (about the origin) and a native grid whose k axis points down (direction z = -1).

    Native slice K at z = 10 - 2K -> template z = (10 - 2K) / 1.2 -> index ((10 - 2K) / 1.2 + 30) / 1.5.
    """
    native = grid((8, 8, 15), (2.0, 2.0, 2.0), (0.0, 0.0, 10.0), (1, 0, 0, 0, 1, 0, 0, 0, -1))
    scale = sitk.ScaleTransform(3, (1.2, 1.2, 1.2))
    for k in (0, 5, 14):
        expected = int(np.floor(((10 - 2 * k) / 1.2 + 30) / 1.5 + 0.5))
        assert template_slice_for_native_slice(k, native, TEMPLATE, scale) == expected


def test_slice_outside_the_input_or_the_band_is_refused_with_the_native_band():
    native = grid((10, 12, 12), (3.0, 3.0, 3.0), (2.0, 1.0, -20.0))
    shift = sitk.TranslationTransform(3, (0.0, 0.0, 6.0))
    with pytest.raises(InputError, match=r"native slice 12 is outside scan.nii \(it has axial slices 0 .. 11\)"):
        template_slice_for_native_slice(12, native, TEMPLATE, shift, band=(10, 20), name="scan.nii")
    with pytest.raises(InputError, match="native slice -1 is outside"):
        check_native_slice(-1, native)
    # K = 1: z = -17, template z = -23, index 4.67 -> 5. Template indices 9.5 .. 20.5 (those rounding
    # into the band 10 .. 20) lie at template z -15.75 .. 0.75, native z -9.75 .. 6.75, native K 3.42 .. 8.92.
    with pytest.raises(InputError, match=r"maps to template slice 5, outside the band 10 .. 20 .*native slices 4 .. 8 "):
        template_slice_for_native_slice(1, native, TEMPLATE, shift, band=(10, 20))
    accepted = {k: template_slice_for_native_slice(k, native, TEMPLATE, shift, band=(10, 20)) for k in (4, 8)}
    assert accepted == {4: 11, 8: 19}  # the named ends are really accepted ...
    for k in (3, 9):  # ... and their neighbours really refused
        with pytest.raises(InputError, match="outside the band"):
            template_slice_for_native_slice(k, native, TEMPLATE, shift, band=(10, 20))


# ---------------------------------------------------------------- the command, shipped model


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    """The shipped bank's HC template at 75 y, written as a NIfTI (it is on the model's grid)."""
    from inbrainsyn.templates import load_bank

    path = tmp_path_factory.mktemp("tpl") / "template.nii.gz"
    sitk.WriteImage(load_bank(None).template("HC", 75.0), str(path))
    return path


def run_cli(argv) -> tuple[int, list[dict]]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(argv)
    return code, [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


def test_native_slice_on_the_template_grid_with_json_events(template_file, tmp_path):
    lo, hi = load_model().cfg.slice_band
    k = (lo + hi) // 2
    code, events = run_cli(["daninet", "preview", str(template_file), "--age", "70", "--cohort", "HC",
                            "--targets", "75", "80", "--native-slice", str(k), "-o", str(tmp_path / "out"), "--json"])
    assert code == 0
    assert events[0]["event"] == "progress" and events[-1] == {"event": "result",
                                                               "manifest": str(tmp_path / "out" / "manifest.json")}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["inputs"]["native_slice"] == k and manifest["inputs"]["slice"] == k  # same grid: same slice
    assert manifest["parameters"]["alignment"].startswith("none")
    kinds = [o["kind"] for o in manifest["outputs"]]
    assert kinds.count("synthetic") == 2 and "baseline" in kinds and "report" in kinds
    for o in manifest["outputs"]:
        assert (tmp_path / "out" / o["path"]).is_file()


def test_native_slice_outside_the_band_ends_with_a_json_error(template_file, tmp_path):
    lo, hi = load_model().cfg.slice_band
    code, events = run_cli(["daninet", "preview", str(template_file), "--age", "70", "--cohort", "AD",
                            "--targets", "75", "--native-slice", str(lo - 3), "-o", str(tmp_path / "out"), "--json"])
    assert code == 2
    assert events[-1]["event"] == "error" and events[-1]["exit_code"] == 2
    assert f"outside the band {lo} .. {hi}" in events[-1]["message"]
    assert f"native slices {lo} .. {hi} of" in events[-1]["message"]
    assert "little or no brain" in events[-1]["message"]
    assert not (tmp_path / "out").exists()


def test_slice_and_native_slice_are_exclusive(template_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["daninet", "preview", str(template_file), "--age", "70", "--cohort", "HC", "--targets", "75",
              "--slice", "50", "--native-slice", "50", "-o", str(tmp_path / "out")])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err


@pytest.mark.slow
def test_native_slice_of_a_shifted_coarse_scan_is_found_after_alignment(template_file, tmp_path):
    """A 3 mm copy of the template whose grid starts 7 mm higher: native slice 25 lies at
    z = -65 + 75 = 10 mm, the template's slice (10 + 72) / 1.5 = 54.7. The affine alignment
    recovers the identity to within a millimetre, hence one template slice (1.5 mm)."""
    template = sitk.ReadImage(str(template_file))
    origin = list(template.GetOrigin())
    origin[2] += 7.0
    size = [int(round(n / 2)) for n in template.GetSize()]
    native = sitk.Resample(template, size, sitk.Transform(), sitk.sitkLinear, origin, (3.0, 3.0, 3.0),
                           template.GetDirection())
    path = tmp_path / "native.nii.gz"
    sitk.WriteImage(native, str(path))
    code, events = run_cli(["daninet", "preview", str(path), "--age", "70", "--cohort", "HC", "--targets", "80",
                            "--native-slice", "25", "-o", str(tmp_path / "out"), "--json"])
    assert code == 0, events
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    expected = (origin[2] + 3.0 * 25 - template.GetOrigin()[2]) / template.GetSpacing()[2]
    assert manifest["parameters"]["alignment"] == "coarse affine (8/4 mm)"
    assert abs(manifest["inputs"]["slice"] - expected) <= 1.0


def _shifted_scan(template_file, tmp_path, shift_mm=7.0):
    """The template on a 3 mm grid whose origin is ``shift_mm`` higher, and the affine that aligns it.

    Same physical space, so the true alignment ``A`` (template mm -> input mm) is the identity.
    """
    template = sitk.ReadImage(str(template_file))
    origin = list(template.GetOrigin())
    origin[2] += shift_mm
    size = [int(round(n / 2)) for n in template.GetSize()]
    native = sitk.Resample(template, size, sitk.Transform(), sitk.sitkLinear, origin, (3.0, 3.0, 3.0),
                           template.GetDirection())
    path = tmp_path / "native.nii.gz"
    sitk.WriteImage(native, str(path))
    return template, native, path


def _synthesize_like_manifest(folder, matrix, offset, baseline=None):
    """What ``inbrainsyn synthesize`` leaves behind that the preview reuses: the affine and the baseline."""
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(
        {"diagnostics": {"affine_matrix": np.asarray(matrix).tolist(), "affine_offset": list(offset)}}))
    if baseline is not None:
        sitk.WriteImage(baseline, str(folder / "baseline.nii.gz"))
    return folder / "manifest.json"


def test_preview_reuses_a_previous_runs_alignment(template_file, tmp_path):
    """With --alignment MANIFEST no registration runs: a deliberately shifted affine (A(q) = q + 6 mm
    along z) must move the chosen template slice by exactly 6 / 1.5 = 4 slices against the identity,
    which no fresh registration of this pair would produce."""
    template, native, path = _shifted_scan(template_file, tmp_path)
    slices = {}
    for name, dz in (("identity", 0.0), ("shifted", 6.0)):
        manifest = _synthesize_like_manifest(tmp_path / name, np.eye(3), (0.0, 0.0, dz), baseline=native)
        code, events = run_cli(["daninet", "preview", str(path), "--age", "70", "--cohort", "HC", "--targets", "80",
                                "--native-slice", "25", "--alignment", str(manifest), "-o", str(tmp_path / f"out_{name}"),
                                "--json"])
        assert code == 0, events
        written = json.loads((tmp_path / f"out_{name}" / "manifest.json").read_text())
        assert written["parameters"]["alignment"] == f"reused from {manifest}"
        slices[name] = written["inputs"]["slice"]
    expected = (native.GetOrigin()[2] + 3.0 * 25 - template.GetOrigin()[2]) / template.GetSpacing()[2]
    assert abs(slices["identity"] - expected) <= 0.5
    assert slices["identity"] - slices["shifted"] == 4


def test_a_previews_manifest_carries_its_alignment_to_the_next_preview(template_file, tmp_path):
    """A preview records the affine it used and the input's grid (diagnostics); the next preview of the
    same scan reuses it from that manifest (the Slicer module's second and later previews) and lands on
    the same template slice, while a scan on another grid is refused."""
    template, native, path = _shifted_scan(template_file, tmp_path)
    first = _synthesize_like_manifest(tmp_path / "synth", np.eye(3), (0.0, 0.0, 6.0), baseline=native)
    runs = {}
    for name, alignment in (("first", first), ("second", tmp_path / "out_first" / "manifest.json")):
        code, events = run_cli(["daninet", "preview", str(path), "--age", "70", "--cohort", "HC", "--targets", "80",
                                "--native-slice", "25", "--alignment", str(alignment), "-o", str(tmp_path / f"out_{name}"),
                                "--json"])
        assert code == 0, events
        runs[name] = json.loads((tmp_path / f"out_{name}" / "manifest.json").read_text())
    recorded = runs["first"]["diagnostics"]
    assert np.allclose(recorded["affine_matrix"], np.eye(3)) and np.allclose(recorded["affine_offset"], (0, 0, 6.0))
    assert tuple(recorded["input_geometry"]["size"]) == native.GetSize()
    assert runs["second"]["inputs"]["slice"] == runs["first"]["inputs"]["slice"]
    assert runs["second"]["parameters"]["alignment"].startswith("reused from")
    from inbrainsyn.daninet.alignment import read_alignment

    other = sitk.Image([10, 12, 14], sitk.sitkFloat32)
    with pytest.raises(InputError, match="belongs to another scan"):
        read_alignment(tmp_path / "out_first" / "manifest.json", other)


def test_alignment_of_another_scan_is_refused(template_file, tmp_path):
    from inbrainsyn.daninet.alignment import read_alignment

    template, native, _ = _shifted_scan(template_file, tmp_path)
    manifest = _synthesize_like_manifest(tmp_path / "other", np.eye(3), (0, 0, 0), baseline=template)
    with pytest.raises(InputError, match="belongs to another scan"):
        read_alignment(manifest, native)
    with pytest.raises(InputError, match="alignment file not found"):
        read_alignment(tmp_path / "missing.json", native)
    (tmp_path / "bad.json").write_text('{"outputs": []}')
    with pytest.raises(InputError, match="holds no affine alignment"):
        read_alignment(tmp_path / "bad.json", native)


def test_alignment_from_an_itk_transform_file_maps_points_as_written(tmp_path):
    from inbrainsyn.daninet.alignment import affine_from_parts, read_alignment

    matrix = np.array([[1.05, 0.02, 0.0], [-0.01, 0.98, 0.03], [0.0, 0.01, 1.02]])
    offset = np.array([3.0, -4.0, 12.5])
    sitk.WriteTransform(affine_from_parts(matrix, offset), str(tmp_path / "a.tfm"))
    transform = read_alignment(tmp_path / "a.tfm", TEMPLATE)
    for p in ((0.0, 0.0, 0.0), (10.0, -20.0, 30.0)):
        np.testing.assert_allclose(transform.TransformPoint(p), matrix @ np.array(p) + offset, atol=1e-9)
