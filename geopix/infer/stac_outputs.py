"""Scene outputs described in STAC, so that a catalog browser (STAC Browser, QGIS's STAC support)
finds tonight's results.

Every published scene prefix holds ``item.json``: a STAC 1.1 Item for one scene, model version and
request, whose assets are the outputs beside it (relative hrefs, so the prefix can be copied or
served as it is), with the model's registry name and version among its properties. ``<out>/
catalog.json`` is GeoPix's static catalog of every published item under ``<out>``, rewritten at the
end of each batch-segmentation or nightly run; a ``catalog.json`` there that GeoPix did not write is
left alone (the run says so). Items carry only STAC core fields and ``geopix:`` properties: they
validate against the core schemas that pystac ships, with no schema fetched from the network.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from geopix import storage

log = logging.getLogger(__name__)

ITEM_FILE, CATALOG_FILE = "item.json", "catalog.json"
CATALOG_ID = "geopix-scene-outputs"  # what marks a catalog.json as GeoPix's own
COG = "image/tiff; application=geotiff; profile=cloud-optimized"
PARQUET = "application/vnd.apache.parquet"


def scene_item(
    *,
    scene_id: str,
    label: str,
    request: str,
    crs_wkt: str,
    bounds: tuple[float, float, float, float],
    model: dict[str, Any],
    instructions: list[str],
    outputs: dict[str, str],
    finished_at: str,
    acquired_at: str | None = None,
    source_href: str | None = None,
) -> dict[str, Any]:
    """The STAC Item (a dict) of one published scene. ``outputs``: asset key → file name beside it
    (``mask``, ``instances``, ``polygons``, ``instance_polygons``, ``preview``, ``run``).
    ``datetime`` is the acquisition time when the source says it (a STAC item's), else the time the
    scene was segmented; ``created`` is always the latter. A scene read from a STAC item links to it
    (``derived_from``, ``source_href``)."""
    import pystac
    from rasterio.crs import CRS
    from rasterio.warp import transform_geom
    from shapely.geometry import box, mapping, shape

    # The footprint in WGS 84 (densified, so a projected rectangle's curved edges are followed).
    outline = box(*bounds).segmentize(max(bounds[2] - bounds[0], bounds[3] - bounds[1]) / 16)
    footprint = shape(transform_geom(CRS.from_wkt(crs_wkt), "EPSG:4326", mapping(outline)))
    when = datetime.fromisoformat(acquired_at or finished_at)
    item = pystac.Item(
        id=f"{scene_id}.{label}.{request}",
        geometry=mapping(footprint),
        bbox=list(footprint.bounds),
        datetime=when.astimezone(UTC),
        properties={
            "created": finished_at,
            "geopix:scene_id": scene_id,
            "geopix:model": model.get("registered_name") or model["uri"],
            "geopix:model_version": model.get("version"),
            "geopix:model_label": label,
            "geopix:instructions": instructions,
            "geopix:request_hash": request,
        },
    )
    kinds = {
        "mask": (COG, ["data"], "class (0 background, class id + 1, 255 nodata) and confidence %"),
        "instances": (COG, ["data"], "instance id per pixel (uint32, 0 no instance), one id per object"),
        "polygons": (PARQUET, ["data"], "GeoParquet: connected regions of one class"),
        "instance_polygons": (PARQUET, ["data"], "GeoParquet: one polygon per instance"),
        "preview": (pystac.MediaType.PNG, ["overview"], "the mask over the scene, downsampled"),
        "run": (pystac.MediaType.JSON, ["metadata"], "the run's parameters and figures"),
    }
    if source_href:
        item.add_link(pystac.Link("derived_from", source_href, media_type=pystac.MediaType.JSON))
    for key, name in outputs.items():
        media_type, roles, title = kinds[key]
        item.add_asset(key, pystac.Asset(f"./{name}", title=title, media_type=media_type, roles=roles))
    return item.to_dict(include_self_link=False, transform_hrefs=False)


def write_catalog(out_uri: str) -> dict[str, Any]:
    """Rewrite ``<out>/catalog.json`` to list every published scene item under ``out_uri`` (one
    object write: a reader sees the old catalog or the new one). Returns what it did."""
    import pystac

    uri = storage.join_uri(out_uri, CATALOG_FILE)
    if storage.exists(uri):
        try:
            existing = json.loads(storage.read_bytes(uri))
        except ValueError:
            existing = {}
        if existing.get("id") != CATALOG_ID:
            log.warning("%s exists and is not GeoPix's catalog: left as it is", uri)
            return {"catalog": uri, "written": False, "reason": "a catalog.json GeoPix did not write is there"}
    depth = "*/*/*"  # <scene id>/<model label>/<request hash>/
    done = {u.rsplit("/", 1)[0] for u in storage.list_files(out_uri, f"{depth}/{storage.SUCCESS_MARKER}")}
    items = [u for u in storage.list_files(out_uri, f"{depth}/{ITEM_FILE}") if u.rsplit("/", 1)[0] in done]
    catalog = pystac.Catalog(
        CATALOG_ID, f"GeoPix batch-segmentation outputs under {out_uri}: one item per scene, model and request"
    )
    root = out_uri.rstrip("/") + "/"
    for item_uri in items:
        catalog.add_link(pystac.Link("item", "./" + item_uri.removeprefix(root), media_type=pystac.MediaType.JSON))
    payload = catalog.to_dict(include_self_link=False, transform_hrefs=False)
    storage.write_bytes(uri, json.dumps(payload, indent=1).encode())
    return {"catalog": uri, "written": True, "items": len(items)}
