"""Render the module's side-by-side result offscreen (slicer-core, no desktop) into a PNG for the README.

    /work/venv/bin/python Testing/slicer/make_screenshot.py [--manifest OUT/manifest.json] -o docs/images/slicer_side_by_side.png

Without --manifest it renders a phantom result in the engine's output format (engine_output.py).
The two slice panels come from Slicer's own slice pipeline (vtkMRMLSliceLogic: reslice, window/level,
colour table, "Add" compositing of the Jacobian overlay), exactly as the module sets the views up; the
colour bar and the volume-vs-age plot are drawn by matplotlib from the scene's colour table and table nodes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1] / "InBrainSynSlicer"), str(HERE)]

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap, Normalize  # noqa: E402

from InBrainSynSlicerLib import layout, scene as scene_lib, snapshot  # noqa: E402
from InBrainSynSlicerLib.headless import new_headless_slicer  # noqa: E402


def colour_map(color_node) -> ListedColormap:
    rgba = [0.0] * 4
    colours = []
    for k in range(color_node.GetNumberOfColors()):
        color_node.GetColor(k, rgba)
        colours.append(tuple(rgba[:3]))
    return ListedColormap(colours)


def render(manifest_path: Path, output: Path, size: int = 420) -> None:
    headless = new_headless_slicer()
    scene = headless.scene
    result = scene_lib.load_results_into_scene(scene, manifest_path)
    layout.show_side_by_side(scene, result.baseline, result.synthetic_proxy, result.jacobian_proxy, result.chart)
    sequence = result.sequence
    last = sequence.GetNumberOfDataNodes() - 1
    result.browser.SetSelectedItemNumber(last)
    left = snapshot.render_slice_view(headless.slice_logic(layout.LEFT_VIEW), size, size)
    right = snapshot.render_slice_view(headless.slice_logic(layout.RIGHT_VIEW), size, size)

    fig = plt.figure(figsize=(11, 7.6), dpi=100, facecolor="black")
    grid = fig.add_gridspec(2, 3, width_ratios=[1, 1, 0.06], height_ratios=[1, 0.62], hspace=0.28, wspace=0.04)
    for column, (image, title) in enumerate((
        (left, f"Baseline {sequence.GetNthIndexValue(0)} y  (Red view)"),
        (right, f"{result.synthetic_proxy.GetName().split(' (')[0]} at {sequence.GetNthIndexValue(last)} y + Jacobian  (Yellow view)"),
    )):
        ax = fig.add_subplot(grid[0, column])
        ax.imshow(image[..., :3])
        ax.set_title(title, color="white", fontsize=10)
        ax.axis("off")
    bar = fig.add_subplot(grid[0, 2])
    low, high = scene_lib.JACOBIAN_RANGE
    fig.colorbar(plt.cm.ScalarMappable(Normalize(low, high), colour_map(result.jacobian_colors)), cax=bar)
    bar.set_title("J", color="white", fontsize=10)
    bar.tick_params(colors="white", labelsize=8)

    plot = fig.add_subplot(grid[1, :2])
    plot.set_facecolor("#202020")
    plot.tick_params(colors="white")
    for spine in plot.spines.values():
        spine.set_color("#808080")
    table = result.table.GetTable()
    ages = [table.GetValueByName(r, "age (years)").ToDouble() for r in range(table.GetNumberOfRows())]
    for i in range(result.chart.GetNumberOfPlotSeriesNodes()):
        series = result.chart.GetNthPlotSeriesNode(i)
        column = series.GetYColumnName()
        values = [table.GetValueByName(r, column).ToDouble() for r in range(table.GetNumberOfRows())]
        plot.plot(ages, values, "o-", color=series.GetColor(), label=column.replace(" (% of baseline)", ""))
    plot.set_xlabel(result.chart.GetXAxisTitle(), color="white")
    plot.set_ylabel(result.chart.GetYAxisTitle(), color="white")
    plot.set_title(result.chart.GetTitle() + "  (Plot view)", fontsize=10, color="white")
    plot.legend(fontsize=8, ncol=3, facecolor="#303030", labelcolor="white")
    plot.grid(alpha=0.3)
    fig.text(0.5, 0.965, "InBrainSyn in 3D Slicer: baseline | synthetic scan at the browser's age, linked axial views",
             color="white", ha="center", fontsize=12)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, facecolor=fig.get_facecolor())
    print(f"wrote {output}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, help="an engine run's manifest.json (default: a phantom result)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = args.manifest
        if manifest is None:
            from engine_output import write_engine_output

            manifest = write_engine_output(Path(tmp) / "run", age=70.0, cohort="HC", targets=(75.0, 80.0, 85.0),
                                           transition_age=80.0, input_image="/data/phantom_T1.nii.gz",
                                           size_xyz=(128, 112, 96), spacing=(1.1, 0.9, 1.3))
        render(manifest, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
