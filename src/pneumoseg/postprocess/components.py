"""Every connected component of every OOF map at every threshold level, from one max-tree per
map: :class:`ComponentTable`, and its cache file beside the working copy.

The component filter of the triplet rule (``min_component_area``) needs, for a bottom level
``l``, the area and ground-truth overlap of each 8-connected component of ``map > l``. Those
components nest: as ``l`` falls they grow and merge. The max-tree of a map (higra's
``component_tree_max_tree``) holds all of them at once: a tree node of altitude ``h`` whose
parent has altitude ``p`` *is* one component of ``map > l`` for every ``l`` in ``[p, h)``, with
the same pixels, so its area and truth overlap are the same at all those levels. One tree per
map therefore replaces the 256 labellings (one per level) that scoring every bottom level
costs with ``cv2.connectedComponentsWithStats``; a level's components are a vector selection
over the table's nodes.

Table size: a few hundred to a few thousand nodes per smooth probability map (16 bytes each),
more on noisy maps (at most one per pixel).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# Bump when the table's meaning or layout changes: cache files of another version are rebuilt.
TABLE_VERSION = 1
_ROUND = 32  # crops are zero-padded to multiples of this (fewer distinct graph shapes)
_KEEP_CACHE_FILES = 3  # newest tables kept per cache folder (one per OOF set in use)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComponentTable:
    """The components of ``n`` maps at every level: node ``k`` is a component of
    ``maps[image[k]] > l`` for every ``lo[k] <= l < hi[k]``, with ``area[k]`` pixels of which
    ``overlap[k]`` are ground truth. Nodes are ordered by image."""

    n: int
    image: np.ndarray  # int32 (K,)
    lo: np.ndarray  # int16 (K,): the parent's altitude, -1 for a tree's root
    hi: np.ndarray  # int16 (K,): the node's altitude (the smallest map value inside it)
    area: np.ndarray  # int32 (K,)
    overlap: np.ndarray  # int32 (K,)

    def at(self, lvl: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The components of every map above ``lvl``: ``(ptr (n+1,), areas, overlaps)``;
        image ``i``'s components are ``areas[ptr[i]:ptr[i+1]]``."""
        alive = (self.lo <= lvl) & (lvl < self.hi)
        counts = np.bincount(self.image[alive], minlength=self.n)
        ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return ptr, self.area[alive], self.overlap[alive]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.image, self.lo, self.hi, self.area, self.overlap))

    def save(self, path: str | Path, key: str) -> None:
        """Write the table (uncompressed ``.npz``, atomically) with the ``key`` it belongs to."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as fh:
            np.savez(
                fh,
                key=np.array(key),
                n=np.array(self.n),
                image=self.image,
                lo=self.lo,
                hi=self.hi,
                area=self.area,
                overlap=self.overlap,
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, key: str) -> ComponentTable | None:
        """The table saved in ``path`` for ``key``; None when the file is missing, unreadable
        or of another key (it is rebuilt then)."""
        try:
            with np.load(path) as data:
                if str(data["key"]) != key:
                    return None
                return cls(
                    int(data["n"]),
                    *(data[f] for f in ("image", "lo", "hi", "area", "overlap")),
                )
        except (OSError, KeyError, ValueError, EOFError):
            return None


def _map_nodes(prob: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(lo, hi, area, overlap)`` of every component of one uint8 map at every level."""
    import higra as hg

    x, y, w, h = cv2.boundingRect((prob > 0).view(np.uint8))
    if w == 0 or h == 0:  # nothing above level 0: no component at any level
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    # Every pixel above level 0 lies in the box; pixels of value 0 are never in a component,
    # so padding the crop with zeros (to a rounded shape) changes no component.
    rows, cols = -(-h // _ROUND) * _ROUND, -(-w // _ROUND) * _ROUND
    crop = np.zeros((rows, cols), dtype=np.uint8)
    crop[:h, :w] = prob[y : y + h, x : x + w]
    gt = np.zeros((rows, cols), dtype=np.int64)
    gt[:h, :w] = truth[y : y + h, x : x + w]
    graph = hg.get_8_adjacency_implicit_graph((rows, cols))
    tree, altitude = hg.component_tree_max_tree(graph, crop)
    leaves = tree.num_leaves()
    parents = tree.parents()[leaves:]  # the nodes above the pixels
    hi = altitude[leaves:].astype(np.int64)
    lo = altitude[parents].astype(np.int64)
    lo[tree.root() - leaves] = -1  # the root (its own parent): the whole crop, below its altitude
    area = hg.attribute_area(tree)[leaves:].astype(np.int64)
    overlap = hg.accumulate_sequential(tree, gt.ravel(), hg.Accumulators.sum)[leaves:]
    alive = lo < hi  # a node spans at least one level (higra's tree is canonical: always)
    return lo[alive], hi[alive], area[alive], overlap[alive].astype(np.int64)


def build_table(chunks: Iterator[tuple[int, np.ndarray, np.ndarray]], n: int) -> ComponentTable:
    """The table of ``n`` maps streamed as ``(start, uint8 maps, 0/1 truths)`` chunks."""
    parts: list[tuple[np.ndarray, ...]] = []
    images: list[np.ndarray] = []
    for start, probs, truths in chunks:
        for j in range(len(probs)):
            nodes = _map_nodes(probs[j], truths[j])
            parts.append(nodes)
            images.append(np.full(len(nodes[0]), start + j, dtype=np.int32))
    if not parts:
        parts, images = [(np.zeros(0, np.int64),) * 4], [np.zeros(0, np.int32)]
    lo, hi, area, overlap = (np.concatenate([p[k] for p in parts]) for k in range(4))
    return ComponentTable(
        n,
        np.concatenate(images),
        lo.astype(np.int16),
        hi.astype(np.int16),
        area.astype(np.int32),
        overlap.astype(np.int32),
    )


def file_fingerprint(*paths: str | Path) -> str:
    """A key for the content of memory-mapped ``.npy`` files, cheap at any size: each file's
    resolved path, size, modification time and its first, middle and last MiB."""
    digest = hashlib.sha256(f"components-v{TABLE_VERSION}".encode())
    for path in paths:
        path = Path(path).resolve()
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        with path.open("rb") as fh:
            for offset in (0, max(stat.st_size // 2 - 2**19, 0), max(stat.st_size - 2**20, 0)):
                fh.seek(offset)
                digest.update(fh.read(2**20))
    return digest.hexdigest()[:32]


def cached_table(
    folder: str | Path, key: str, build: Callable[[], ComponentTable]
) -> ComponentTable:
    """The table of ``key`` from ``folder`` (``<key>.npz``), else ``build()`` saved there; only
    the newest few tables are kept."""
    folder = Path(folder)
    path = folder / f"{key}.npz"
    table = ComponentTable.load(path, key)
    if table is not None:
        os.utime(path)  # newest use first when pruning
        return table
    table = build()
    try:
        table.save(path, key)
        old = sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for stale in old[_KEEP_CACHE_FILES:]:
            stale.unlink(missing_ok=True)
    except OSError as exc:  # a read-only or full disk: the table still serves this process
        log.warning("component table not cached in %s: %s", folder, exc)
    return table
