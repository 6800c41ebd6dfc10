"""Training data from healthy CTs: a cache of lung-box axial slices on disk.

Reading a CT and segmenting its lungs takes seconds; training reads each slice many times.
So every case is read once into a cache folder: int16 HU slices (N, size, size), their lung
masks as packed bits, and per slice the case index, the slice index and the in-plane spacing.
The arrays are raw files opened as numpy memmaps (training on thousands of slices never holds
them in memory). A JSON manifest records each input's identity (path, size, modification
time), so the cache is rebuilt only when the inputs or the settings change.

Slices are cropped the way inference crops them (the case's in-plane lung box with a margin,
air beyond it) and padded with air or centre-cropped to size x size.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import move_into_place, scratch_folder
from .errors import InputError
from .inference import BOX_MARGIN
from .progress import NO_PROGRESS, Progress
from .volume_io import _dirs_with_files, _holds_dicom, is_volume_file, read_ct

CACHE_VERSION = 2  # 2: shifted HU scales corrected
AIR_HU = -1000
HU_RANGE = (-1024, 3071)  # 12-bit CT; outside-field padding (-2048, -3024) becomes -1024
MIN_LUNG_PIXELS = 64  # a slice needs this much lung ...
MIN_LUNG_SHARE = 0.05  # ... and this share of the case's largest lung section
ONE_CASE_BLOCKS = 10  # a single case is split into this many contiguous blocks of slices

FILES = {"hu": "hu.int16", "lungs": "lungs.bits", "case": "case.int32",
         "slice": "slice.int32", "spacing": "spacing.float32"}
MANIFEST = "manifest.json"


# --- finding the cases --------------------------------------------------------------------
def cases_below(folder) -> list[Path]:
    """Every CT below `folder`: each volume file, and each folder that directly holds DICOM
    files, is one case. Hidden files and folders are ignored. A volume file is one case."""
    root = Path(folder)
    if not root.exists():
        raise InputError(f"{root}: no such file or folder.")
    if root.is_file():
        if is_volume_file(root):
            return [root]
        raise InputError(f"{root}: is not a CT volume file (NIfTI, NRRD, MHA/MHD) or folder.")
    cases = []
    for directory in sorted(_dirs_with_files(root)):
        if any(part.startswith(".") for part in directory.relative_to(root).parts):
            continue
        files = sorted(f for f in directory.iterdir() if not f.name.startswith("."))
        volumes = [f for f in files if is_volume_file(f)]
        cases.extend(volumes)
        if len(volumes) < len([f for f in files if f.is_file()]) and _holds_dicom(directory):
            cases.append(directory)
    if not cases:
        raise InputError(f"{root}: holds no CT: no NIfTI/NRRD/MHA/MHD file and no DICOM "
                         "series in it or its subfolders.")
    return cases


def find_training_cases(folders) -> list[Path]:
    """The cases below several folders (`cases_below`), each case once."""
    seen, cases = set(), []
    for folder in folders:
        for case in cases_below(folder):
            key = case.resolve()
            if key not in seen:
                seen.add(key)
                cases.append(case)
    return cases


def case_identity(case: Path) -> dict:
    """What changes when a case changes: path, size and modification time of its files."""
    path = Path(case).resolve()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        stats = [p.stat() for p in files]
        return {"path": str(path), "files": len(files),
                "bytes": sum(s.st_size for s in stats),
                "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}
    if not path.exists():
        return {"path": str(path), "missing": True}
    stat = path.stat()
    identity = {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if path.name.lower().endswith((".mhd", ".nhdr")):  # header + data file
        data = [p for p in path.parent.iterdir()
                if p.stem == path.stem and p != path and p.is_file()]
        identity["data"] = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in data]
    return identity


# --- the cache ----------------------------------------------------------------------------
class SliceCache:
    """The slices of a built cache. Arrays open lazily as read-only memmaps; pickling keeps
    only the folder, so DataLoader workers reopen them instead of copying the data."""

    def __init__(self, folder, manifest: dict):
        self.folder = Path(folder)
        self.manifest = manifest
        self._maps: dict[str, np.memmap] = {}

    @classmethod
    def open(cls, folder) -> "SliceCache":
        folder = Path(folder)
        return cls(folder, json.loads((folder / MANIFEST).read_text()))

    def __getstate__(self):
        return {"folder": self.folder, "manifest": self.manifest}

    def __setstate__(self, state):
        self.__init__(state["folder"], state["manifest"])

    def _map(self, key: str, dtype, shape) -> np.memmap:
        if key not in self._maps:
            self._maps[key] = np.memmap(self.folder / FILES[key], dtype=dtype, mode="r",
                                        shape=shape)
        return self._maps[key]

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    def __len__(self) -> int:
        return int(self.manifest["slices"])

    @property
    def cases(self) -> list[dict]:
        return self.manifest["cases"]

    @property
    def skipped(self) -> list[dict]:
        return self.manifest["skipped"]

    @property
    def n_cases(self) -> int:
        return len(self.cases)

    @property
    def hu(self) -> np.memmap:
        return self._map("hu", np.int16, (len(self), self.size, self.size))

    @property
    def lungs_bits(self) -> np.memmap:
        return self._map("lungs", np.uint8, (len(self), self.size, self.size // 8))

    @property
    def case_index(self) -> np.memmap:
        return self._map("case", np.int32, (len(self),))

    @property
    def spacing(self) -> np.memmap:
        """In-plane (y, x) spacing of each slice in mm."""
        return self._map("spacing", np.float32, (len(self), 2))

    def lungs(self, index: int) -> np.ndarray:
        """The lung mask (uint8 0/1) of one slice."""
        return np.unpackbits(self.lungs_bits[index], axis=-1, count=self.size)

    def split_by_case(self, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation) slice indices, with no case in both. A single case cannot be
        split by case: its slices are split into contiguous blocks instead (adjacent slices
        are alike, so this validation is less independent)."""
        if not 0.0 < val_fraction < 1.0:
            raise InputError(f"the validation fraction must lie between 0 and 1 "
                             f"(got {val_fraction}).")
        rng = np.random.default_rng(seed)
        if self.n_cases == 1:
            blocks = np.array_split(np.arange(len(self)), min(ONE_CASE_BLOCKS, len(self)))
            n_val = min(max(1, round(val_fraction * len(blocks))), len(blocks) - 1)
            chosen = set(rng.choice(len(blocks), n_val, replace=False).tolist())
            val = [b for i, b in enumerate(blocks) if i in chosen]
            train = [b for i, b in enumerate(blocks) if i not in chosen]
            return np.concatenate(train), np.concatenate(val)
        n_val = min(max(1, round(val_fraction * self.n_cases)), self.n_cases - 1)
        val_cases = rng.choice(self.n_cases, n_val, replace=False)
        is_val = np.isin(np.asarray(self.case_index), val_cases)
        return np.flatnonzero(~is_val), np.flatnonzero(is_val)


@dataclass
class _CaseSlices:
    hu: np.ndarray  # (n, size, size) int16
    lungs: np.ndarray  # (n, size, size // 8) packed bits
    slices: np.ndarray  # z index of each slice in the CT
    spacing: tuple[float, float]


def _fit(image: np.ndarray, size: int, fill) -> np.ndarray:
    """Pad (centred, with `fill`) or centre-crop the last two axes to size x size."""
    out = image
    for axis in (-2, -1):
        n = out.shape[axis]
        if n > size:
            start = (n - size) // 2
            out = np.take(out, np.arange(start, start + size), axis=axis)
        elif n < size:
            pad = [(0, 0)] * out.ndim
            pad[axis] = ((size - n) // 2, size - n - (size - n) // 2)
            out = np.pad(out, pad, constant_values=fill)
    return out


def case_slices(case: Path, size: int, progress: Progress = NO_PROGRESS) -> _CaseSlices:
    """The lung slices of one CT, cropped to its lung box and fitted to size x size, on the
    corrected HU scale (calibration.py), as `detect` reads scans by default."""
    from .calibration import check_hu, corrected
    from .lungs import segment_lungs

    ct = read_ct(case, progress)
    check = check_hu(ct)
    if check.shifted:  # the model learns the true scale, which detect reads by default
        progress.log(f"{case}: {check.describe()}; its HU scale's shift of "
                     f"{check.shift_hu:+.0f} HU is taken off, as detect does unless told "
                     "--no-correct-hu.", "warning")
        ct = corrected(ct, check)
    lungs = segment_lungs(ct) > 0
    area = lungs.sum(axis=(1, 2))
    if area.max(initial=0) == 0:
        raise InputError(f"{case}: no lung found; is this a chest CT?")
    keep = np.flatnonzero(area >= max(MIN_LUNG_PIXELS, MIN_LUNG_SHARE * area.max()))
    if keep.size == 0:
        raise InputError(f"{case}: the lungs are too small in every slice "
                         f"(largest section {area.max()} pixels).")
    in_plane = lungs[keep].any(axis=0)
    ys, xs = (np.flatnonzero(in_plane.any(axis=a)) for a in (1, 0))
    box = (slice(max(ys[0] - BOX_MARGIN, 0), ys[-1] + 1 + BOX_MARGIN),
           slice(max(xs[0] - BOX_MARGIN, 0), xs[-1] + 1 + BOX_MARGIN))
    hu = np.clip(np.rint(ct.array[keep][:, box[0], box[1]]), *HU_RANGE).astype(np.int16)
    mask = lungs[keep][:, box[0], box[1]]
    if max(hu.shape[1:]) > size:
        progress.log(f"{case}: the lung box ({hu.shape[1]} x {hu.shape[2]} voxels) is larger "
                     f"than {size} x {size}; its edges are cropped.")
    return _CaseSlices(_fit(hu, size, AIR_HU), np.packbits(_fit(mask, size, False), axis=-1),
                       keep.astype(np.int32), ct.geometry.spacing_zyx[1:])


def _settings(size: int) -> dict:
    return {"version": CACHE_VERSION, "size": size, "margin": BOX_MARGIN,
            "min_lung_pixels": MIN_LUNG_PIXELS, "min_lung_share": MIN_LUNG_SHARE}


def _current(cache_dir: Path, settings: dict, identities: list[dict]) -> SliceCache | None:
    try:
        cache = SliceCache.open(cache_dir)
    except (OSError, ValueError):
        return None
    m = cache.manifest
    if m.get("settings") != settings or m.get("inputs") != identities:
        return None
    if any(not (cache_dir / name).is_file() for name in FILES.values()):
        return None
    return cache


def build_slice_cache(cases, cache_dir, size: int = 384,
                      progress: Progress = NO_PROGRESS) -> SliceCache:
    """The cache of `cases` in `cache_dir`, reused when the inputs and settings are unchanged.

    Unreadable cases (and CTs without lungs) are skipped with a warning; InputError when none
    is usable. The cache is built in a temporary folder and moved in, manifest last, so an
    interrupted build never leaves a cache that looks valid."""
    if size < 16 or size % 16:
        raise InputError(f"the slice size must be a multiple of 16 (got {size}).")
    cases = [Path(c) for c in cases]
    if not cases:
        raise InputError("no training cases given.")
    cache_dir = Path(cache_dir)
    settings = _settings(size)
    identities = [case_identity(c) for c in cases]
    cached = _current(cache_dir, settings, identities)
    if cached is not None:
        progress.log(f"using the slice cache in {cache_dir} ({len(cached)} slices of "
                     f"{cached.n_cases} cases)")
        _warn_skipped(cached.skipped, progress)
        return cached

    cache_dir.mkdir(parents=True, exist_ok=True)
    with scratch_folder(cache_dir, ".build-") as scratch:
        manifest = _build(cases, identities, scratch, size, progress)
        manifest["settings"] = settings
        (cache_dir / MANIFEST).unlink(missing_ok=True)  # invalid until the new one is in
        for name in FILES.values():
            move_into_place(scratch / name, cache_dir / name)
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=1))
        move_into_place(scratch / MANIFEST, cache_dir / MANIFEST)
    _warn_skipped(manifest["skipped"], progress)
    return SliceCache.open(cache_dir)


def _build(cases, identities, scratch: Path, size: int, progress: Progress) -> dict:
    used, skipped, total = [], [], 0
    handles = {key: open(scratch / name, "wb") for key, name in FILES.items()}
    try:
        for number, (case, identity) in enumerate(zip(cases, identities), 1):
            progress.event("cache", f"reading case {number}/{len(cases)}: {case}",
                           case=str(case), done=number - 1, total=len(cases))
            try:
                data = case_slices(case, size, progress)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # any unreadable case is skipped, not fatal
                reason = str(exc) if isinstance(exc, InputError) else \
                    f"{type(exc).__name__}: {exc}"
                skipped.append({"path": str(case), "reason": reason})
                continue
            n = len(data.slices)
            handles["hu"].write(np.ascontiguousarray(data.hu).tobytes())
            handles["lungs"].write(np.ascontiguousarray(data.lungs).tobytes())
            handles["case"].write(np.full(n, len(used), np.int32).tobytes())
            handles["slice"].write(data.slices.tobytes())
            handles["spacing"].write(np.tile(np.float32(data.spacing), (n, 1)).tobytes())
            used.append({"path": str(case), "first": total, "slices": n,
                         "spacing_yx": list(map(float, data.spacing))})
            total += n
    finally:
        for handle in handles.values():
            handle.close()
    if not used:
        listed = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped)
        raise InputError(f"no usable training CT among {len(cases)} case(s): {listed}")
    return {"size": size, "slices": total, "cases": used, "skipped": skipped,
            "inputs": identities}


def _warn_skipped(skipped: list[dict], progress: Progress) -> None:
    if skipped:
        listed = "; ".join(f"{s['path']} ({s['reason']})" for s in skipped)
        progress.log(f"skipped {len(skipped)} case(s) that could not be used: {listed}", "warning")
