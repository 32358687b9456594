"""Several data sources as named sites: parsing `data.ultrasound`, scanning each source, one Discovery.

A site is one hospital, scanner or public collection. `data.ultrasound` names one source (a folder of
class folders or a CSV manifest) or several; each item is `NAME=PATH` or a bare `PATH`, which is named
after its folder (or the manifest's file stem). Every image record carries its site.

With one source nothing else changes: relative paths, groups and the data fingerprint are those of a
plain `discover`, so splits saved before sites existed are still reused. With several, each record's
relative path is prefixed with its site (`busi/benign/x.png`) so keys stay unique across sites, and the
absolute path of every file stays on its record (the sites have different roots). No Ray, no TensorFlow.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from msbt.data.discovery import DataError, Discovery, Reject, discover, label_conflicts, text_name

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Site:
    name: str
    path: str


def parse_sources(value: str | Sequence[str]) -> list[Site]:
    """Named sites from `data.ultrasound`: a string (one source) or a list of `NAME=PATH` / `PATH` items.

    Raises:
        DataError: an empty item, a bad or repeated site name (the message names the item).
    """
    items = [value] if isinstance(value, str) else list(value)
    sites: list[Site] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise DataError(f"data.ultrasound: empty source in {items!r}")
        name, sep, path = item.partition("=")
        if not sep:
            path, name = item, default_name(item)
        name, path = name.strip(), path.strip()
        if not _NAME.match(name):
            raise DataError(f"data.ultrasound: site name {name!r} (from {item!r}) must be letters, digits, '_', "
                            "'.' or '-', starting with a letter or digit")
        if any(s.name == name for s in sites):
            raise DataError(f"data.ultrasound: two sources named {name!r}; name them NAME=PATH")
        same = [s for s in sites if _real(s.path) == _real(path)]
        if same:  # every image twice, once per site: two "sites" that are one
            raise DataError(f"data.ultrasound: sites {same[0].name!r} and {name!r} are the same source ({path})")
        sites.append(Site(name, path))
    return sites


def _real(path: str) -> str:
    # realpath, not Path.resolve: no error on a symbolic-link loop (discovery reports those)
    return os.path.realpath(Path(path).expanduser())


def default_name(path: str | Path) -> str:
    """A site's name when none is given: the folder's name, or the manifest's stem."""
    p = Path(path).expanduser()
    name = (p.stem if p.suffix.lower() == ".csv" else p.name) or "site"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("_.-") or "site"


def discover_sites(sources: str | Sequence[str] | Sequence[Site], classes: Sequence[str] = (), **kwargs) -> Discovery:
    """Scan every site with :func:`msbt.data.discovery.discover` and join them into one Discovery.

    Args:
        sources: as :func:`parse_sources` takes them, or already parsed sites.
        classes: classes to keep (every site must have each of them).
        kwargs: passed to `discover` (strict, mask_suffixes, sixteen_bit, workers).

    Returns:
        A Discovery whose records carry `site`, with `sites` = {name: root}. With several sites, relpaths
        are `<site>/<relpath>` and `root` is the sites' common folder (informative only).
    """
    sites = sources if sources and isinstance(list(sources)[0], Site) else parse_sources(sources)  # type: ignore
    found = []
    for site in sites:
        try:  # each site's progress bar named (several sites' scans were all "scan")
            found.append(discover(site.path, classes, progress_label=f"scan {site.name}", **kwargs))
        except DataError as err:
            raise DataError(f"site {site.name!r}: {err}") from None
    if len(sites) == 1:
        d, name = found[0], sites[0].name
        d.records = [replace(r, site=name) for r in d.records]
        d.sites = {name: d.root}
        return d
    keep = tuple(classes) if classes else tuple(sorted({c for d in found for c in d.classes}))
    records, hashes, thumbs, rejects, skipped = [], [], [], [], {}
    for site, d in zip(sites, found):
        records += [replace(r, site=site.name, relpath=f"{site.name}/{r.relpath}") for r in d.records]
        hashes.append(d.hashes)
        thumbs.append(d.thumbs)
        rejects += d.rejects
        for reason, n in d.skipped.items():
            skipped[f"{site.name}: {reason}"] = n
    _refuse_shared_files(records)
    # The same content under two labels at two sites: each site's scan could not see it (discovery applies
    # data.on_conflict within a source); the joined set must not train on both labels.
    conflicting = label_conflicts(records, kwargs.get("on_conflict", "reject"))
    rejects += [Reject(text_name(records[i].path), f"site {records[i].site!r}: {reason}")
                for i, reason in conflicting.items()]
    kept = [i for i in range(len(records)) if i not in conflicting]
    roots = {site.name: d.root for site, d in zip(sites, found)}
    common = str(Path(*_common_parts([Path(r).parts for r in roots.values()])))
    used = {text_name(records[i].path) for i in kept}
    peaks = {path: peak for d in found for path, peak in d.sixteen_bit_peaks.items() if path in used}
    # files used only in part (data.on_partial: warn) are said for the joined set as for one site (they were
    # dropped here until 2026-12-07, so several sites' scans used such files without a word)
    warnings = sorted((w for d in found for w in d.warnings if w.path in used), key=lambda w: w.path)
    return Discovery(root=common, classes=keep, records=[records[i] for i in kept],
                     rejects=sorted(rejects, key=lambda r: r.path), hashes=np.concatenate(hashes)[kept],
                     thumbs=np.concatenate(thumbs)[kept], skipped=skipped, warnings=warnings, sites=roots,
                     sixteen_bit_peaks=peaks)


def _refuse_shared_files(records) -> None:
    """One file listed by two sites (two manifests naming it, or a site folder inside another) would be two
    images of two sites: a curation mistake to fix, not something to guess about.

    Raises:
        DataError: naming the file and both sites.
    """
    first: dict[str, str] = {}
    for r in records:
        real = _real(r.path.split("#frame=")[0])  # the frames of one DICOM file are one file's
        other = first.setdefault(real, r.site)
        if other != r.site:
            raise DataError(f"{text_name(r.path)} is listed by two sites, {other!r} and {r.site!r}: a file belongs "
                            "to one site (list it in one manifest, or keep the sites' folders apart)")


def _common_parts(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    out = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        out.append(column[0])
    return tuple(out) or ("/",)


def site_of(discovery: Discovery) -> list[str]:
    """The site of every record, in record order ("" for a Discovery made without sites)."""
    return [r.site for r in discovery.records]
