"""A picture of a stitched output over its scene: both read decimated (GDAL serves the overviews),
so it costs a few reads whatever the scene size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geopix.infer.scene_reader import SceneInfo, read_pixels
from geopix.infer.stitch import NODATA

# Per class id (cycled): colours rare in imagery (magenta, cyan, …), so masks stand out from red
# roofs, blue water and green fields; background stays the image.
CLASS_COLOURS = np.array(
    [[255, 0, 255], [0, 255, 255], [255, 255, 0], [128, 0, 255], [0, 255, 128], [255, 128, 0],
     [255, 255, 255], [0, 128, 255]], np.float32,
)  # fmt: skip


def scene_preview(
    scene: SceneInfo, mask_path: str | Path, out_path: str | Path, class_names: list[str], side: int = 1024
) -> Path:
    """PNG: the scene (as the model saw it, after band selection and scaling) at ≤ ``side`` px with
    each class filled in its colour (70 % opacity), nodata hatched dark, and a legend with counts."""
    import rasterio
    from matplotlib.patches import Patch

    from geopix.plotting import pyplot

    plt = pyplot()

    scale = max(scene.width, scene.height) / side
    shape = (max(1, round(scene.height / scale)), max(1, round(scene.width / scale))) if scale > 1 else (
        scene.height, scene.width)  # fmt: skip
    image = scene.scaling.apply(read_pixels(scene, out_shape=shape)[0]).transpose(1, 2, 0)
    with rasterio.open(mask_path) as ds:
        classes = ds.read(1, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)
    shown = image.astype(np.float32)
    legend = []
    for value in sorted(set(np.unique(classes).tolist()) - {0, NODATA}):
        colour = CLASS_COLOURS[(value - 1) % len(CLASS_COLOURS)]
        where = classes == value
        shown[where] = 0.3 * shown[where] + 0.7 * colour
        name = class_names[value - 1] if value - 1 < len(class_names) else f"class {value - 1}"
        legend.append(Patch(color=colour / 255, label=f"{name} ({where.mean() * 100:.2f} % of pixels)"))
    shown[classes == NODATA] *= 0.25
    height, width = shape
    fig, ax = plt.subplots(figsize=(9, 9 * height / width + 0.6), dpi=120)
    ax.imshow(shown.astype(np.uint8), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{scene.scene_id}: {scene.width}×{scene.height} px, mask over scene (1:{max(scale, 1):.0f})",
                 fontsize=10)  # fmt: skip
    if legend:
        ax.legend(handles=legend, loc="lower left", fontsize=8, framealpha=0.85)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
