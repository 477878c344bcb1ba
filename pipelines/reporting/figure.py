"""The comparison figure: one row per image, one column per method, the image itself first
(the layout of the literature's comparisons, e.g. ABELE's abele / lime / sal / elrp / grad /
intg on handwritten digits).

Size: ``LABEL_WIDTH + (1 + methods) * cell`` by ``HEADER_HEIGHT + images * cell`` pixels.
"""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from saliency_audit.pipelines.reporting import render
from saliency_audit.pipelines.reporting.aggregate import SmallestIds
from saliency_audit.pipelines.reporting.audit_dir import AuditDir, saliency_map
from saliency_audit.transforms.io import storage

LABEL_WIDTH, HEADER_HEIGHT, PADDING = 150, 24, 3
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)


def figure_size(rows: int, methods: int, cell: int) -> tuple[int, int]:
    return LABEL_WIDTH + (1 + methods) * cell, HEADER_HEIGHT + rows * cell


def _paste(canvas: Image.Image, rgb: np.ndarray, x: int, y: int, cell: int) -> None:
    """Scale ``rgb`` to fit the cell (keeping its aspect) and centre it there."""
    inner = cell - 2 * PADDING
    height, width = rgb.shape[:2]
    scale = inner / max(height, width)
    tile = render.resize(rgb, max(1, round(height * scale)), max(1, round(width * scale)))
    canvas.paste(Image.fromarray(tile), (x + (cell - tile.shape[1]) // 2, y + (cell - tile.shape[0]) // 2))


def comparison_figure(audit: AuditDir, image_ids: list[str], methods: list[str] | None = None, *,
                      cell: int = 112, overlay: bool = False) -> Image.Image:
    """The grid as a PIL image. Raises ValueError naming unknown image ids or methods."""
    methods = methods or audit.methods
    unknown = [m for m in methods if m not in audit.methods]
    if unknown:
        raise ValueError(f"method(s) {', '.join(unknown)} not in this audit; it has {', '.join(audit.methods)}")
    rows = audit.main_view().map_rows(image_ids, methods)  # several targets: the main request's maps
    present = {image_id for image_id, _ in rows}
    missing = [i for i in image_ids if i not in present]
    if missing:
        raise ValueError(f"image id(s) {', '.join(missing)} not in {audit.path}/saliency")
    first = {image_id: row for (image_id, _), row in sorted(rows.items())}
    images = audit.images({i: first[i]["source"] for i in image_ids})

    canvas = Image.new("RGB", figure_size(len(image_ids), len(methods), cell), BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for column, title in enumerate(["image", *methods]):
        draw.text((LABEL_WIDTH + column * cell + cell // 2, HEADER_HEIGHT // 2), title, fill=INK, font=font,
                  anchor="mm")
    for r, image_id in enumerate(image_ids):
        y, meta = HEADER_HEIGHT + r * cell, first[image_id]
        label = "-" if meta["label"] is None else meta["label"]
        draw.text((6, y + cell // 2 - 8), image_id, fill=INK, font=font)
        draw.text((6, y + cell // 2 + 6), f"label {label}, predicted {meta['predicted']}", fill=INK, font=font)
        image = images.get(image_id)
        height, width = meta["height"], meta["width"]
        _paste(canvas, render.as_rgb(image) if image is not None else render.placeholder(height, width),
               LABEL_WIDTH, y, cell)
        for c, method in enumerate(methods, start=1):
            row = rows.get((image_id, method))
            if row is None:  # this method failed on the image: see errors/
                tile = render.placeholder(height, width)
            elif overlay and image is not None:
                tile = render.overlay(image, saliency_map(row), audit.signed(method))
            else:
                tile = render.colour_map(saliency_map(row), audit.signed(method))
            _paste(canvas, tile, LABEL_WIDTH + c * cell, y, cell)
    return canvas


def save_figure(audit: AuditDir, image_ids: list[str], output: str, methods: list[str] | None = None,
                **options) -> str:
    """Write the figure as PNG to ``output`` (any fsspec URL); returns it."""
    image = comparison_figure(audit, image_ids, methods, **options)
    storage.write_bytes_atomic(output, render.png(np.asarray(image)), audit.storage_options)
    return output


def example_ids(audit: AuditDir, classes: tuple[int, ...] = (9, 0)) -> list[str]:
    """The first correctly classified image of each class, by id (the literature's figure shows a
    handwritten 9 and 0); the first images of the audit where a class is missing. Streamed: per
    class, and overall, the len(classes) smallest ids are all the choice below can reach for."""
    correct, first = SmallestIds(len(classes)), SmallestIds(len(classes))
    for batch in audit.scan("saliency", ["image_id", "label", "predicted"]):
        right = pc.fill_null(pc.equal(batch.column("label"), batch.column("predicted")), False)
        correct.add(batch.column("image_id").filter(right), batch.column("label").filter(right))
        first.add(batch.column("image_id"))
    chosen = []
    for cls in classes:
        match = next((i for i in correct.ids(cls) if i not in chosen), None)
        fallback = next((i for i in first.ids() if i not in chosen), None)
        if match or fallback:
            chosen.append(match or fallback)
    return chosen
