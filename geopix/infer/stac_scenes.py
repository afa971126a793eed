"""Scenes from STAC: a static catalog or collection, an ItemCollection, or a STAC API search →
one :class:`StacScene` per item, to segment as any scene file is.

Which asset is read (``segment.stac_assets``, ``segment.stac_band_assets``):

1. the first of ``stac_assets`` (asset keys, default ``["visual"]``) that the item has;
2. else an asset with role ``visual`` and a GeoTIFF media type (the first by key);
3. else one asset per colour of ``stac_band_assets`` (default ``["red", "green", "blue"]``), each
   found by key or by the ``common_name`` of its single band (``eo:bands``, or STAC 1.1 ``bands``
   with ``eo:common_name``), read together as R, G, B on one grid.

An item without any of them is a scene that fails with reason ``no asset``; an item whose id an
earlier item of the same source had fails with ``duplicate scene id``. Neither stops the others.
Relative hrefs are resolved against the file that names them; ``s3://`` is read with GeoPix's S3
endpoint and credentials (geopix/storage.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from geopix import storage
from geopix.config import SegmentConfig
from geopix.infer.scene_reader import SceneError, SceneInfo, open_scene

if TYPE_CHECKING:
    import pystac

log = logging.getLogger(__name__)

GEOTIFF_MEDIA_TYPE = "image/tiff; application=geotiff"  # COGs add "; profile=cloud-optimized"
NO_ASSET, DUPLICATE_ID = "no asset", "duplicate scene id"


class StacError(RuntimeError):
    """A STAC source that cannot be read at all (the file, the API, the search): the whole run stops.
    One bad item is no StacError: it becomes a :class:`StacScene` with a reason."""


@dataclass(frozen=True)
class StacScene:
    """One STAC item as a scene: what to read, which version of the item it is, and (for an item
    that cannot be segmented) why not.

    ``version`` identifies the item as published, so a re-published item is segmented again: a hash
    of the read assets' ``file:checksum`` where each has one, else of the item's ``updated``
    property (``datetime`` when it has none) and the read assets' hrefs. An item without a usable
    asset takes the hrefs of all its assets, so publishing the missing one changes its version."""

    scene_id: str  # the item id
    uris: tuple[str, ...]  # one COG, or one file per colour (R, G, B) when the item splits its bands
    version: str
    item_href: str | None = None  # where the item was read (None: an API item without a self link)
    collection: str | None = None
    bbox: tuple[float, ...] | None = None
    datetime: str | None = None
    assets: tuple[str, ...] = ()  # the asset keys behind ``uris``
    reason: str | None = None  # set for an item that cannot be segmented: "no asset", "duplicate scene id"
    detail: str | None = None

    @property
    def where(self) -> str:
        """The item's href, or ``stac item <collection>/<id>`` when it has none (names it in errors)."""
        return self.item_href or f"stac item {self.collection or '?'}/{self.scene_id}"

    def open(self, cfg: SegmentConfig) -> SceneInfo:
        """:func:`open_scene` on the item's asset(s); :class:`SceneError` for an item that has none."""
        if self.reason:
            raise SceneError(self.where, self.reason, self.detail or "")
        return open_scene(self.uris, cfg, self.scene_id)

    def describe(self) -> dict[str, Any]:
        """What run.json records as the scene's ``source`` (enough to describe the output as an item)."""
        return {
            "stac_item": self.scene_id, "item_href": self.item_href, "collection": self.collection,
            "bbox": list(self.bbox) if self.bbox else None, "datetime": self.datetime,
            "assets": dict(zip(self.assets, self.uris, strict=True)), "version": self.version,
        }  # fmt: skip


@dataclass(frozen=True)
class StacSearch:
    """A STAC API search: items of ``collections`` intersecting ``bbox`` within ``datetime``."""

    url: str
    collections: tuple[str, ...]
    bbox: tuple[float, float, float, float] | None = None
    datetime: str | None = None  # "2026-11-01/2026-11-30", "2026-11-27T00:00:00Z/..", …
    max_items: int | None = None

    def describe(self) -> str:
        """The search in words, for logs and errors (a password in the URL is not shown)."""
        from urllib.parse import urlsplit

        url = urlsplit(self.url)
        shown = url._replace(
            netloc=f"{url.username}:***@{url.hostname}" + (f":{url.port}" if url.port else "")
        )
        parts = [
            f"STAC API {shown.geturl() if url.password else self.url}",
            f"collections {list(self.collections)}",
        ]
        parts += [f"bbox {list(self.bbox)}"] if self.bbox else []
        parts += [f"datetime {self.datetime}"] if self.datetime else []
        parts += [f"max {self.max_items} items"] if self.max_items else []
        return ", ".join(parts)


def stac_source(
    stac: str | None,
    stac_api: str | None,
    collections: list[str] | None = None,
    bbox: str | None = None,
    datetime: str | None = None,
    max_items: int | None = None,
) -> str | StacSearch | None:
    """The command-line STAC arguments (``--stac`` or ``--stac-api`` with ``--collection``,
    ``--bbox W,S,E,N``, ``--datetime A/B``, ``--max-items``) as a source; None when neither is given.
    ValueError says what is wrong with the combination."""
    search_only = {
        "--collection": collections,
        "--bbox": bbox,
        "--datetime": datetime,
        "--max-items": max_items,
    }
    given = [flag for flag, value in search_only.items() if value]
    if stac and stac_api:
        raise ValueError(
            "give --stac (a catalog, collection or ItemCollection) or --stac-api (a search), not both"
        )
    if not stac_api:
        if given:
            raise ValueError(f"{', '.join(given)} narrow a STAC API search: give --stac-api URL with them")
        return stac or None
    if not collections:
        raise ValueError("--stac-api needs at least one --collection to search")
    if max_items is not None and max_items < 1:
        raise ValueError(f"--max-items must be at least 1, got {max_items}")
    return StacSearch(stac_api, tuple(collections), parse_bbox(bbox) if bbox else None, datetime, max_items)


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """``"W,S,E,N"`` in degrees (W > E crosses the antimeridian) → a tuple; ValueError otherwise."""
    try:
        west, south, east, north = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--bbox {text!r}: give four numbers west,south,east,north in degrees") from None
    if not (-180 <= west <= 180 and -180 <= east <= 180 and -90 <= south <= north <= 90):
        raise ValueError(f"--bbox {text!r}: west and east must lie in [-180, 180], -90 ≤ south ≤ north ≤ 90")
    return west, south, east, north


def list_stac_scenes(source: str | StacSearch, cfg: SegmentConfig) -> list[StacScene]:
    """Every item of ``source`` (a catalog, collection, ItemCollection or item JSON as a local path
    or S3 URI, or a :class:`StacSearch`) as a scene, in the source's order."""
    if isinstance(source, StacSearch):
        items = [(item, item.get_self_href()) for item in _search(source)]
    else:
        items = _read_static(storage.normalize_uri(source))
    scenes, first_href = [], {}
    for entry in items:
        if isinstance(entry, StacScene):  # an item link that could not be read
            scenes.append(entry)
            continue
        item, base = entry
        scene = scene_of_item(item, base, cfg)
        if scene.scene_id in first_href:  # one id, one output prefix: the first listed wins
            scene = _with_reason(scene, DUPLICATE_ID, f"item {scene.scene_id} at {scene.where} has the id of "
                                 f"the item at {first_href[scene.scene_id]}, listed first")  # fmt: skip
        else:
            first_href[scene.scene_id] = scene.where
        scenes.append(scene)
    bad = sum(s.reason is not None for s in scenes)
    log.info("%s: %d STAC items, %d of them without a scene to segment", _name(source), len(scenes), bad)
    return scenes


def _name(source: str | StacSearch) -> str:
    return source.describe() if isinstance(source, StacSearch) else source


def scene_of_item(item: pystac.Item, base: str | None, cfg: SegmentConfig) -> StacScene:
    """The scene of one item, its asset(s) chosen by the rule of this module's docstring; ``base``:
    the file that named the item (resolves relative hrefs when the item has no self link)."""
    chosen = _choose_assets(item, cfg)
    props = item.properties
    common = {
        "scene_id": item.id, "item_href": item.get_self_href() or base, "collection": item.collection_id,
        "bbox": tuple(item.bbox) if item.bbox else None, "datetime": props.get("datetime") or props.get("start_datetime"),
    }  # fmt: skip
    if chosen is None:
        hrefs = [_href(asset, base) for _, asset in sorted(item.assets.items())]
        detail = (f"item {item.id} has no asset among {cfg.stac_assets}, no asset with role 'visual' and a GeoTIFF "
                  f"media type, and no {'/'.join(cfg.stac_band_assets)} band assets; its assets: "
                  f"{_asset_summary(item)}")  # fmt: skip
        return StacScene(
            uris=(), version=_version(props, hrefs, []), reason=NO_ASSET, detail=detail, **common
        )
    uris = tuple(_href(asset, base) for _, asset in chosen)
    checksums = [asset.extra_fields.get("file:checksum") for _, asset in chosen]
    return StacScene(uris=uris, version=_version(props, list(uris), checksums),
                     assets=tuple(key for key, _ in chosen), **common)  # fmt: skip


def _choose_assets(item: pystac.Item, cfg: SegmentConfig) -> list[tuple[str, pystac.Asset]] | None:
    for key in cfg.stac_assets:
        if key in item.assets:
            return [(key, item.assets[key])]
    for key, asset in sorted(item.assets.items()):
        if "visual" in (asset.roles or []) and (asset.media_type or "").startswith(GEOTIFF_MEDIA_TYPE):
            return [(key, asset)]
    bands = []
    for colour in cfg.stac_band_assets:
        if colour in item.assets:
            bands.append((colour, item.assets[colour]))
            continue
        found = next(((k, a) for k, a in sorted(item.assets.items()) if _common_names(a) == [colour]), None)
        if found is None:
            return None
        bands.append(found)
    return bands


def _common_names(asset: pystac.Asset) -> list[str]:
    """The band common names an asset declares: ``eo:bands`` (STAC 1.0) or ``bands`` (STAC 1.1)."""
    fields = asset.extra_fields
    if isinstance(fields.get("eo:bands"), list):
        return [b.get("common_name") for b in fields["eo:bands"] if isinstance(b, dict)]
    if isinstance(fields.get("bands"), list):
        return [b.get("eo:common_name") for b in fields["bands"] if isinstance(b, dict)]
    return []


def _asset_summary(item: pystac.Item) -> list[str]:
    return [f"{key} ({asset.media_type or 'no media type'}; roles {asset.roles or []})"
            for key, asset in sorted(item.assets.items())]  # fmt: skip


def _href(asset: pystac.Asset, base: str | None) -> str:
    """The asset's absolute href: against its item's self link, else against the file that named it."""
    from pystac.utils import make_absolute_href

    href = asset.get_absolute_href()
    if href is None:
        href = make_absolute_href(asset.href, base) if base else asset.href
    return href


def _version(props: dict[str, Any], hrefs: list[str], checksums: list[str | None]) -> str:
    if checksums and all(checksums):
        basis: dict[str, Any] = {"file:checksum": checksums}
    else:
        basis = {"updated": props.get("updated") or props.get("datetime"), "hrefs": hrefs}
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]


def _with_reason(scene: StacScene, reason: str, detail: str) -> StacScene:
    from dataclasses import replace

    return replace(scene, reason=reason, detail=detail)


# ------------------------------------------------------------------------------ static files
def stac_io():
    """A pystac StacIO that reads ``s3://`` through geopix.storage (the stack's endpoint and
    credentials) and local paths as files; it never writes."""
    from pystac.stac_io import DefaultStacIO

    class GeoPixStacIO(DefaultStacIO):
        def read_text_from_href(self, href: str) -> str:
            href = storage.normalize_uri(href)
            if storage.is_s3_uri(href):
                return storage.read_bytes(href).decode()
            return super().read_text_from_href(href)

        def write_text_to_href(self, href: str, txt: str) -> None:
            raise NotImplementedError("GeoPix reads STAC catalogs; it never writes them")

    return GeoPixStacIO()


def _read_static(uri: str) -> list[tuple[pystac.Item, str] | StacScene]:
    """(item, the file that named it) for every item under a catalog or collection (child catalogs
    and item links followed), in an ItemCollection, or the one item of an item file."""
    import pystac

    io = stac_io()
    try:
        data = json.loads(io.read_text(uri))
    except (OSError, storage.StorageError, ValueError) as exc:
        raise StacError(f"{uri}: cannot read it as STAC JSON: {type(exc).__name__}: {exc}") from None
    kind = data.get("type") if isinstance(data, dict) else None
    try:
        if kind == "FeatureCollection":
            return [(item, uri) for item in pystac.ItemCollection.from_dict(data, preserve_dict=False)]
        if kind == "Feature":
            return [(pystac.Item.from_dict(data, href=uri, preserve_dict=False), uri)]
        if kind in ("Catalog", "Collection"):
            return _walk(pystac.read_dict(data, href=uri, stac_io=io), io, seen=set())
    except (pystac.STACError, KeyError, TypeError, ValueError) as exc:
        raise StacError(f"{uri}: not a valid STAC {kind}: {type(exc).__name__}: {exc}") from None
    raise StacError(f"{uri}: type {kind!r} is no STAC Catalog, Collection, FeatureCollection or Feature")


def _walk(catalog: pystac.Catalog, io, seen: set[str]) -> list[tuple[pystac.Item, str] | StacScene]:
    """Depth first, in link order. An item link that cannot be read becomes a scene that fails with
    reason ``unreadable item``; a child catalog that cannot be read stops the listing (StacError):
    its items are unknown, and a run without them would report them nowhere."""
    import pystac

    here = catalog.get_self_href()
    found: list[tuple[pystac.Item, str] | StacScene] = []
    for link in catalog.links:
        if link.rel not in ("item", "child"):
            continue
        href = link.get_absolute_href() or link.href
        if href in seen:  # a catalog linked twice is walked once
            continue
        seen.add(href)
        try:
            href = storage.normalize_uri(href)
            obj = pystac.read_dict(json.loads(io.read_text(href)), href=href, stac_io=io)
        except Exception as exc:  # noqa: BLE001 - one unreadable link never stops the rest
            message = f"{link.rel} link of {here} to {href} cannot be read: {type(exc).__name__}: {exc}"
            if link.rel == "child":
                raise StacError(message) from None
            item_id = href.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json")
            found.append(StacScene(item_id, (), version=_version({}, [href], []), item_href=href,
                                   collection=catalog.id, reason="unreadable item", detail=message))  # fmt: skip
            continue
        if isinstance(obj, pystac.Item):
            found.append((obj, href))
        elif isinstance(obj, pystac.Catalog):
            found += _walk(obj, io, seen)
    return found


# ------------------------------------------------------------------------------ API search
def _search(search: StacSearch) -> list[pystac.Item]:
    """The items a STAC API search returns (all pages, up to ``max_items``). POST: a GET search with
    list parameters is refused by some servers (rustac answers 500)."""
    from pystac_client import Client
    from pystac_client.exceptions import APIError

    try:
        client = Client.open(search.url)
        found = client.search(
            collections=list(search.collections), bbox=search.bbox, datetime=search.datetime,
            max_items=search.max_items, method="POST",
        )  # fmt: skip
        return list(found.items())
    except (APIError, OSError, ValueError) as exc:
        raise StacError(f"{search.describe()}: the search failed: {type(exc).__name__}: {exc}") from None
