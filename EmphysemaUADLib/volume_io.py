"""Reading, validating and writing CT volumes and label maps.

Every volume travels as a :class:`Volume`: a numpy array in (z, y, x) order plus the
geometry SimpleITK read from the file. The geometry is copied, never re-derived, so every
output written with :func:`write_volume` overlays its input exactly.
"""
from __future__ import annotations

import errno
import gzip
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .atomic import move_into_place, scratch_folder
from .errors import InputError
from .progress import NO_PROGRESS, Progress

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a (z, y, x) voxel grid, in SimpleITK's (x, y, z) conventions."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def apply(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


@dataclass
class Volume:
    array: np.ndarray  # (z, y, x)
    geometry: Geometry
    source: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.array.shape  # type: ignore[return-value]


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(VOLUME_SUFFIXES)


def _as_3d(image: sitk.Image, source: str) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{source}: has {image.GetNumberOfComponentsPerPixel()} components per "
                         "voxel (colour or vector image); a CT volume has one.")
    dim = image.GetDimension()
    if dim == 2:  # one axial slice: a volume of one slice 1 mm thick
        return sitk.JoinSeries([image])
    if dim == 4 and image.GetSize()[3] == 1:
        return image[:, :, :, 0]
    if dim != 3:
        raise InputError(f"{source}: is a {dim}-D image of size {image.GetSize()}; "
                         "expected a 3-D volume (or one 2-D slice).")
    return image


def _read_dicom_folder(folder: Path) -> tuple[sitk.Image, str]:
    """Read the largest CT series below `folder` (of several as large, the smoothest: one
    acquisition reconstructed with a soft and a sharp kernel); returns the image and a note
    saying which."""
    candidates = []
    for directory in _dirs_with_files(folder):
        for sid in _quietly(sitk.ImageSeriesReader.GetGDCMSeriesIDs, str(directory)) or ():
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), sid)
            info = _dicom_info(files[0]) if files else None
            if info is not None:
                modality, description = info
                candidates.append((modality == "CT", len(files), sid, files, description,
                                   modality))
    if not candidates:
        raise InputError(f"{folder}: no readable DICOM series found in this folder.")
    if not any(c[0] for c in candidates):
        found = ", ".join(sorted({c[5] or "unknown" for c in candidates}))
        raise InputError(f"{folder}: holds DICOM series of modality {found} but no CT series.")
    most = max(c[1] for c in candidates if c[0])
    largest = sorted(c for c in candidates if c[0] and c[1] == most)
    noise = {c[2]: _fine_noise_hu(c[3][len(c[3]) // 2]) for c in largest} \
        if len(largest) > 1 else {}
    _, count, sid, files, description, _ = min(largest, key=lambda c: noise.get(c[2], 0.0))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = _quietly(reader.Execute)
    except RuntimeError:
        raise InputError(f"{folder}: DICOM series {sid} could not be read; a file of it is "
                         "damaged or not an image.") from None
    _check_slice_positions(reader, len(files), folder)
    note = ""
    if len(candidates) > 1:
        note = (f"{folder}: {len(candidates)} DICOM series found; using the largest CT series "
                f"{sid} ({count} images{', ' + description if description else ''})")
        if noise:  # the model reads smooth kernels most reliably (README, "Noise")
            def hu(value):
                return f"{value:.0f} HU" if np.isfinite(value) else "not measured"

            others = ", ".join(f"{c[2]}{' (' + c[4] + ')' if c[4] else ''} {hu(noise[c[2]])}"
                               for c in largest if c[2] != sid)
            note += (f", the smoothest of {len(largest)} that large: lung noise "
                     f"{hu(noise[sid])} against {others}")
        note += "."
    return image, note


def _fine_noise_hu(filename: str) -> float:
    """The lung noise (measurements.lung_noise_hu) of one DICOM image, in the parts of it at
    lung density (-950 to -500 HU smoothed over 2 pixels); a sharp kernel's is several times
    a smooth one's. Infinite where the image holds too little lung or cannot be read."""
    from .measurements import lung_noise_hu  # here: measurements -> lungs -> this module

    try:
        image = np.squeeze(sitk.GetArrayFromImage(_quietly(sitk.ReadImage, filename)))
    except RuntimeError:
        return float("inf")
    if image.ndim != 2:
        return float("inf")
    smooth = ndimage.gaussian_filter(image.astype(np.float32), 2.0)
    noise = lung_noise_hu(image[None], ((smooth > -950) & (smooth < -500))[None])
    return float("inf") if noise is None else noise


SLICE_GAP_TOLERANCE = 0.2  # share of the slice spacing by which a step may differ


def _check_slice_positions(reader: sitk.ImageSeriesReader, count: int, folder: Path) -> None:
    """Refuse a series whose slices are not evenly spaced (a slice missing, or mixed spacing):
    ITK would stack them on one average spacing and every position would be wrong."""
    if count < 3:
        return
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032")
                               .replace(" ", "").split("\\")] for i in range(count)])
        orientation = [float(v) for v in reader.GetMetaData(0, "0020|0037")
                       .replace(" ", "").split("\\")]
    except (RuntimeError, ValueError):
        return  # no positions to check (ITK then uses the slice thickness)
    if positions.shape != (count, 3) or len(orientation) != 6:
        return
    normal = np.cross(orientation[:3], orientation[3:])
    along = np.sort(positions @ normal)
    steps = np.diff(along)
    typical = float(np.median(steps))
    if typical <= 0:
        raise InputError(f"{folder}: {count - len(np.unique(np.round(along, 3)))} slices of "
                         "the DICOM series share a position (a duplicate or a second series "
                         "with the same ID); remove the duplicates.")
    odd = np.flatnonzero(np.abs(steps - typical) > SLICE_GAP_TOLERANCE * typical)
    if odd.size:
        i = int(odd[0])
        missing = steps[i] / typical - 1
        what = (f"about {missing:.0f} slice{'s' if round(missing) > 1 else ''} missing"
                if missing > 0.5 else "uneven slice spacing")
        raise InputError(f"{folder}: the DICOM series is not evenly spaced: {what} between "
                         f"slice positions {along[i]:.2f} and {along[i + 1]:.2f} mm (spacing "
                         f"{steps[i]:.2f} mm, elsewhere {typical:.2f} mm; {odd.size} such "
                         "step(s)); its geometry would be wrong. Complete the series, or "
                         "resample it to even spacing first.")


def _holds_dicom(folder: Path) -> bool:
    return bool(_quietly(sitk.ImageSeriesReader.GetGDCMSeriesIDs, str(folder)))


def cases_of_input(path: str | os.PathLike) -> list[Path]:
    """The CT cases an input names: a volume file, a DICOM series folder, or a folder of
    cases (each volume file, and each subfolder holding DICOM files, is one case)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder.")
    if p.is_file() or _holds_dicom(p):
        return [p]
    cases = []
    for child in sorted(p.iterdir()):
        if child.name.startswith("."):
            continue
        if is_volume_file(child) or (child.is_dir() and
                                     any(_holds_dicom(d) for d in _dirs_with_files(child))):
            cases.append(child)
    if not cases:
        raise InputError(f"{p}: holds no CT: no NIfTI/NRRD/MHA/MHD file and no DICOM series.")
    return cases


def case_name(path: Path) -> str:
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _quietly(function, *args):
    """Call an ITK function without its console warnings (GDCM warns on every non-DICOM file)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return function(*args)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _dirs_with_files(folder: Path):
    for directory, _, names in os.walk(folder):
        if names:
            yield Path(directory)


def _dicom_info(filename: str) -> tuple[str, str] | None:
    """(modality, series description) of one DICOM file, or None when it is unreadable."""
    header = sitk.ImageFileReader()
    header.SetFileName(filename)
    try:
        header.ReadImageInformation()
    except RuntimeError:
        return None
    def tag(key):
        return header.GetMetaData(key).strip() if header.HasMetaDataKey(key) else ""
    return tag("0008|0060").upper(), tag("0008|103e")


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with a file/line banner; the description is the informative part
    for ln in lines:
        if ln.lower().startswith("description:"):
            return ln.split(":", 1)[1].strip()
    return lines[-1] if lines else type(exc).__name__


def read_image(path: str | os.PathLike, what: str = "image") -> tuple[sitk.Image, str]:
    """Read a volume file or DICOM folder as a 3-D SimpleITK image (no CT checks)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder.")
    note = ""
    if p.is_dir():
        image, note = _read_dicom_folder(p)
    else:
        try:
            size = p.stat().st_size
        except OSError as exc:
            raise InputError(f"{p}: cannot be read ({exc.strerror}).") from None
        if size == 0:
            raise InputError(f"{p}: the file is empty (0 bytes); copy it again from its "
                             "source.")
        try:
            image = _quietly(sitk.ReadImage, str(p))
        except RuntimeError as exc:
            text = str(exc).lower()
            if "spacing" in text:  # ITK refuses zero spacing while reading
                raise InputError(f"{p}: voxel spacing is zero or negative; the file's header "
                                 "is damaged.") from None
            if "unable to determine imageio reader" in text:
                raise InputError(f"{p}: not a supported {what} format (NIfTI .nii/.nii.gz, "
                                 "NRRD, MHA/MHD, or a DICOM series folder).") from None
            raise InputError(f"{p}: cannot read this {what}; the file is truncated or "
                             "damaged, or not a supported format (NIfTI, NRRD, MHA/MHD, "
                             "DICOM folder).") from None
    if p.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_complete(p, image)
    if image.GetDimension() == 2:
        note = (f"{p}: a 2-D image does not say how thick its slice is; it is taken as 1 mm, "
                "so volumes (mL) are per mm of thickness (percentages do not depend on it).")
    return _as_3d(image, str(p)), note


def _check_nifti_complete(path: Path, image: sitk.Image) -> None:
    """ITK zero-fills a truncated NIfTI (.nii and .nii.gz) silently; check the data length."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(540)
            length = len(header)
            while chunk := f.read(1 << 24):
                length += len(chunk)
    except (EOFError, OSError, zlib.error):
        raise InputError(f"{path}: the compressed file is truncated or damaged; copy it again "
                         "from its source.") from None
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0]
        if size == 348:  # NIfTI-1: vox_offset is a float32 at byte 108
            offset = struct.unpack(order + "f", header[108:112])[0]
            break
        if size == 540:  # NIfTI-2: int64 at byte 168
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return
    needed = int(offset) + image.GetNumberOfPixels() * image.GetSizeOfPixelComponent() * \
        image.GetNumberOfComponentsPerPixel()
    if length < needed:
        raise InputError(f"{path}: the file is truncated ({length} of {needed} bytes of "
                         "image data); copy it again from its source.")


def _check_geometry(image: sitk.Image, source: str) -> None:
    spacing = image.GetSpacing()
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"{source}: voxel spacing {tuple(spacing)} is zero or negative; the "
                         "file's header is damaged.")
    if min(image.GetSize()) < 1:
        raise InputError(f"{source}: the image is empty (size {image.GetSize()}).")


def looks_like_hu(array: np.ndarray) -> bool:
    """CT in Hounsfield units holds air or lung (below -900 HU) and tissue (above -200 HU).

    Padding outside the scan field (-2000 HU and below, e.g. -3024) is ignored. MR, raw
    detector values (0..4095) and normalised images have no voxels near -1000 and fail.
    """
    sample = array[:: max(1, array.shape[0] // 64)]
    valid = sample[sample > -1500]
    if valid.size == 0:
        return False
    air = np.count_nonzero((valid > -1100) & (valid < -900)) / valid.size
    tissue = np.count_nonzero((valid > -200) & (valid < 3500)) / valid.size
    return air >= 0.002 and tissue >= 0.002 and np.percentile(valid, 99) < 4000


# A parenchyma ROI (roi.py): an image this small along every axis, at least this share of it
# at lung density (below -500 HU: lung parenchyma, emphysematous or not, and airways)
ROI_MAX_EXTENT_MM = 100.0
PARENCHYMA_HU = -500.0
MIN_LUNG_SHARE = 0.2


def roi_sized(shape, spacing_zyx) -> bool:
    """Whether an image is small enough along every axis to be an ROI of parenchyma."""
    return all(n * s <= ROI_MAX_EXTENT_MM for n, s in zip(shape, spacing_zyx))


def looks_like_parenchyma(array: np.ndarray) -> bool:
    """An ROI of CT in HU: at least MIN_LUNG_SHARE of its voxels at lung density (between
    -1100 and -500 HU), none beyond what CT holds. It need not hold air or soft tissue, which
    looks_like_hu asks of a whole CT; MR and raw or normalised values still fail."""
    valid = array[array > -1500]
    if valid.size == 0:
        return False
    lung = np.count_nonzero((valid > -1100) & (valid < PARENCHYMA_HU)) / valid.size
    return lung >= MIN_LUNG_SHARE and np.percentile(valid, 99) < 4000


def read_ct(path: str | os.PathLike, progress: Progress = NO_PROGRESS) -> Volume:
    """Read and validate a CT volume in HU. Raises InputError with a one-line reason."""
    image, note = read_image(path, "CT")
    if note:
        progress.log(note)
    source = str(path)
    _check_geometry(image, source)
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise InputError(f"{source}: contains NaN or infinite values; it is not a valid CT.")
    if array.size == 0 or float(array.min()) == float(array.max()):
        raise InputError(f"{source}: every voxel has the same value; the image holds no data.")
    geometry = Geometry.of(image)
    roi = roi_sized(array.shape, geometry.spacing_zyx)
    if not (looks_like_hu(array) or roi and looks_like_parenchyma(array)):
        raise InputError(f"{source}: does not look like CT in Hounsfield units (no air near "
                         "-1000 HU and soft tissue near 0 HU"
                         + (", nor a fifth of it at lung density as in an ROI of lung"
                            if roi else "")
                         + "); expected a CT rescaled to HU, not MR or raw scanner values.")
    return Volume(array, geometry, source)


def read_labels(path: str | os.PathLike, what: str = "label map") -> Volume:
    """Read an integer label map (lung mask, lobes) with its own geometry."""
    image, _ = read_image(path, what)
    _check_geometry(image, str(path))
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.isfinite(array).all() or not np.all(array == np.round(array)):
            raise InputError(f"{path}: a {what} must hold whole-number labels.")
        array = array.astype(np.int32)
    return Volume(array, Geometry.of(image), str(path))


def to_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    return geometry.apply(sitk.GetImageFromArray(array))


def write_volume(array: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> Path:
    """Write atomically: into a temporary folder beside the target, then renamed into place.

    Header + data formats (.mhd/.raw, .nhdr) produce two files; the header moves last so a
    reader never sees a header without its data.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with scratch_folder(target.parent) as scratch:
        try:
            _quietly(sitk.WriteImage, to_image(array, geometry), str(scratch / target.name),
                     True)
        except RuntimeError:  # ITK says "wrote only 0 of N bytes": say why, without ITK
            free = shutil.disk_usage(target.parent).free
            needed = array.nbytes
            if free < needed + (1 << 20):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from None
            raise OSError(errno.EIO, "the image could not be written", str(target)) from None
        written = sorted(scratch.iterdir(), key=lambda f: f.name == target.name)
        for f in written:
            move_into_place(f, target.parent / f.name)
    return target
