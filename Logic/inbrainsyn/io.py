"""Reading, validating and atomically writing images and fields (ITK geometry kept).

Every file the engine reads goes through :func:`read_image` or :func:`read_field`, so that bad input
gets one clear message naming the file and what to do; every file it writes goes through
:func:`write_image` (temporary file + rename) or :func:`staged_output_dir` (temporary folder moved
into place at the end), so a failure never leaves half-written outputs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inbrainsyn.errors import InputError, OutputBusyError, OutputError, OutputExistsError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

# Spacing outside this range (mm) is almost surely a broken header, not a brain MRI.
MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 20.0


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder}: folder holds no DICOM series; give a NIfTI/NRRD/MHA file or a DICOM series folder")
    if len(series) > 1:
        raise InputError(
            f"{folder}: folder holds {len(series)} DICOM series ({', '.join(series[:4])}...); "
            "put the T1 series alone in a folder"
        )
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()


def read_any(path: str | os.PathLike, name: str | None = None) -> sitk.Image:
    """Read an image file or a DICOM series folder; a clear error when it is missing or unreadable."""
    path = Path(path)
    label = name or str(path)
    if not path.exists():
        raise InputError(f"{label}: no such file or folder")
    try:
        if path.is_dir():
            return _read_dicom_series(path)
        return sitk.ReadImage(str(path))
    except InputError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise InputError(
            f"{label}: cannot be read as an image ({first[:200]}); "
            f"give a NIfTI, NRRD or MHA file or a DICOM series folder"
        ) from None


def validate_scalar_volume(image: sitk.Image, label: str) -> sitk.Image:
    """Check that ``image`` is a usable 3D scalar volume; returns it as float32.

    Rejects 2D/4D images, vector images, NaN/Inf, empty or constant volumes and absurd spacing.
    A 4D image whose last axis has length 1 is accepted as 3D (common in NIfTI exports).
    """
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise InputError(
            f"{label}: is {image.GetDimension()}D (size {image.GetSize()}); a single 3D T1-weighted volume is needed"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{label}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "a scalar (grey-level) 3D volume is needed"
        )
    if min(image.GetSize()) < 8:
        raise InputError(f"{label}: size {image.GetSize()} is too small for a 3D brain volume (need >= 8 voxels per axis)")
    spacing = image.GetSpacing()
    if min(spacing) < MIN_SPACING_MM or max(spacing) > MAX_SPACING_MM:
        raise InputError(
            f"{label}: voxel spacing {tuple(round(s, 4) for s in spacing)} mm is outside "
            f"[{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm; fix the header (spacing in mm)"
        )
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputError(f"{label}: contains {bad} NaN or infinite voxels; fix or mask them before use")
    if array.size == 0 or float(array.max()) == float(array.min()):
        raise InputError(f"{label}: is empty or constant (all voxels {float(array.min()) if array.size else 'n/a'}); no anatomy to use")
    return sitk.Cast(image, sitk.sitkFloat32)


def read_image(path: str | os.PathLike, name: str | None = None) -> sitk.Image:
    """Read and validate a 3D scalar volume (file or DICOM folder) as float32."""
    label = name or str(path)
    return validate_scalar_volume(read_any(path, label), label)


def read_label_map(path: str | os.PathLike, name: str | None = None) -> sitk.Image:
    """Read a 3D integer label map."""
    label = name or str(path)
    image = read_any(path, label)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{label}: a label map must be a 3D scalar image")
    return sitk.Cast(image, sitk.sitkInt16)


def read_field(path: str | os.PathLike, name: str | None = None):
    """Read an ITK displacement-field image as ``(voxel-unit field (3, Z, Y, X), Grid)``."""
    from inbrainsyn import fields

    label = name or str(path)
    image = read_any(path, label)
    try:
        field, grid = fields.field_from_sitk(image, name=label)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if not np.isfinite(field.numpy()).all():
        raise InputError(f"{label}: field contains NaN or infinite vectors")
    return field, grid


def _temporary_sibling(path: Path) -> Path:
    """An empty temporary file beside ``path`` with the usual permissions (mkstemp makes it 0600)."""
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# gzip level of a .nii.gz by pixel type (measured on the demo subject's 1 mm outputs, 2 cores):
# integer maps (labels, masks) shrink 70x at level 1 for 0.04 s; float32 images (synthetic scans,
# differences, Jacobians, fields) keep ~93% of their size at any level for 0.6 s of CPU each, so
# they are stored (level 0: a valid gzip stream, read by every NIfTI reader, CRC-checked).
INTEGER_GZIP_LEVEL = 1
FLOAT_GZIP_LEVEL = 0


def gzip_level(image: sitk.Image) -> int:
    """The gzip level :func:`write_image` uses for ``image`` (integer pixels 1, floating-point 0)."""
    floating = {sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64}
    return FLOAT_GZIP_LEVEL if image.GetPixelID() in floating else INTEGER_GZIP_LEVEL


def _write_nifti_gz(image: sitk.Image, path: Path, level: int) -> None:
    """``.nii.gz`` with our gzip level (SimpleITK's NIfTI writer ignores the level it is given)."""
    import gzip

    plain = _temporary_sibling(path.with_name(path.name[: -len(".gz")]))
    try:
        sitk.WriteImage(image, str(plain), False)
        with open(plain, "rb") as source, open(path, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=raw, mtime=0) as target:
                shutil.copyfileobj(source, target, 1 << 22)
    finally:
        plain.unlink(missing_ok=True)


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write atomically: to a temporary file in the same folder, then rename over ``path``.

    ``.nii.gz`` files are gzipped at :func:`gzip_level` (compression only where it pays); other
    formats use SimpleITK's compression when ``compress``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            if compress and path.name.lower().endswith(".nii.gz"):
                _write_nifti_gz(image, tmp, gzip_level(image))
            else:
                sitk.WriteImage(image, str(tmp), compress)
        except RuntimeError as exc:  # ITK reports a full disk or a read-only folder as a RuntimeError
            raise OutputError(write_failure_message(path, str(exc))) from None
        except OSError as exc:  # the gzip stream (Python) reports them as OSError
            if exc.errno not in WRITE_ERRNOS:
                raise
            raise OutputError(write_failure_message(path, exc.strerror or str(exc))) from None
        # ITK's NIfTI writer may cut a file short on a full disk without failing; a gzip of such a
        # file is complete as a stream but short of data, which the size in its trailer shows.
        if not _nifti_complete(tmp, image):
            raise OutputError(write_failure_message(path, "the file was cut short: No space left on device?"))
    return Path(path)


def _nifti_complete(path: Path, image: sitk.Image) -> bool:
    """Whether a NIfTI file just written holds all its voxels.

    ITK's NIfTI writer does NOT fail on a full disk: it prints ``NWAD: wrote only 0 of N bytes`` and
    leaves a truncated file (measured on a 200 kB tmpfs; NRRD and MHA writers do raise).  A complete
    ``.nii`` is at least header + data long; a complete ``.nii.gz`` ends with the gzip trailer whose
    last 4 bytes are the uncompressed size mod 2^32 (header + data), which a cut file lacks.
    """
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return True
    data = int(np.prod(image.GetSize())) * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    size = path.stat().st_size
    if name.endswith(".nii"):
        return size >= data + 348
    if size < 18:
        return False
    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        isize = int.from_bytes(handle.read(4), "little")
    header = (isize - data) % 2**32  # header + extensions: 348..(a few kB)
    return 348 <= header <= 65536


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO)


def write_failure_message(path: Path, reason: str, measure_at: Path | None = None) -> str:
    """What went wrong writing ``path`` and what to do (free space is measured, not guessed)."""
    try:
        free = shutil.disk_usage(measure_at or path.parent).free
        space = f"{free / 2**20:.0f} MiB free there"
    except OSError:
        space = "free space unknown"
    reason = reason.strip().splitlines()[-1][:200] if reason.strip() else "unknown reason"
    return (f"{path}: could not be written ({reason}; {space}). Free disk space or choose another output folder; "
            "nothing was published and earlier results are untouched")


def write_json(data, path: str | os.PathLike) -> Path:
    """Write JSON atomically (indented, UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return Path(path)


def check_output_path(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; say how to proceed."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists; choose another output or pass --overwrite to replace it")
    return path


# ------------------------------------------------------------------------------------------------
# Output folders that cannot be lost: an exclusive claim from the start, staging, one atomic publish
# ------------------------------------------------------------------------------------------------

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h
_claimed_in_process: set = set()  # paths claimed by this process (threads of one batch worker included)
_claimed_guard = threading.Lock()


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux ``renameat2(source, target, flags)``; False when the call or the flag is unsupported here.

    Raises ``OSError`` for real failures (e.g. ``EEXIST`` with RENAME_NOREPLACE).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if func(at_fdcwd, os.fsencode(str(source)), at_fdcwd, os.fsencode(str(target)), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):  # old kernel, or a filesystem without the flag
        return False
    raise OSError(err, os.strerror(err), str(target))


def _lock_file(handle) -> bool:
    """Non-blocking exclusive lock on an open file; released by the OS when the process dies."""
    try:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # Windows (untested): lock the first byte
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


class OutputClaim:
    """Exclusive ownership of an output folder for the whole run, then one atomic publish.

    ``claim = OutputClaim(outdir, overwrite).acquire()`` (or ``with OutputClaim(...) as claim``):

    * takes an OS lock on ``.<name>.lock`` beside ``outdir`` (``flock``; the OS drops it when the
      process dies, even by SIGKILL, so no stale lock ever blocks a later run). A second claim on the
      same folder -- another process, another thread, another Slicer window, a retried batch task --
      fails at once with :class:`OutputBusyError`;
    * refuses an existing ``outdir`` unless ``overwrite`` (:class:`OutputExistsError`);
    * removes staging folders that killed runs left beside ``outdir`` (only the lock holder can);
    * ``with claim.staging() as stage:`` yields a hidden folder beside ``outdir``; when the block
      succeeds it is published as ``outdir`` by one rename: ``RENAME_NOREPLACE`` when not
      overwriting (a folder that appeared meanwhile is never replaced: OutputExistsError), an atomic
      ``RENAME_EXCHANGE`` with the old folder when overwriting (old results stay until the new ones
      are complete); when the block fails the stage is deleted;
    * ``release()`` (or leaving the ``with``) drops the lock and deletes the lock file.
    """

    def __init__(self, outdir: str | os.PathLike, overwrite: bool = False) -> None:
        self.outdir = Path(outdir).absolute()
        self.overwrite = bool(overwrite)
        self.lock_path = self.outdir.parent / f".{self.outdir.name}.lock"
        self._handle = None
        self.published = False

    # -- the claim

    def acquire(self) -> "OutputClaim":
        if self._handle is not None:
            return self
        key = str(self.outdir)
        with _claimed_guard:
            if key in _claimed_in_process:
                raise OutputBusyError(self._busy_message())
            _claimed_in_process.add(key)
        try:
            self._lock()
            check_output_path(self.outdir, self.overwrite)
            for stale in self.outdir.parent.glob(f".{self.outdir.name}.partial-*"):
                shutil.rmtree(stale, ignore_errors=True)
        except BaseException:
            self.release()
            raise
        return self

    def _busy_message(self) -> str:
        return (f"{self.outdir}: another inbrainsyn run is writing this output folder right now; "
                "wait for it to finish or choose another output folder")

    def _lock(self) -> None:
        try:
            self.outdir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.outdir.parent}: cannot create the output's parent folder ({exc.strerror})") from None
        for _ in range(20):
            try:
                handle = open(self.lock_path, "a+b")
            except OSError as exc:
                raise OutputError(f"{self.outdir}: cannot write beside the output folder ({exc.strerror}); "
                                  "choose a writable location") from None
            if not _lock_file(handle):
                handle.close()
                raise OutputBusyError(self._busy_message())
            # The holder before us may have deleted the lock file after we opened it: then our lock
            # is on an orphan inode and a third run could lock a new file. Retry until the path is ours.
            try:
                same = os.path.samestat(os.fstat(handle.fileno()), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if same:
                self._handle = handle
                try:
                    handle.seek(0)
                    handle.truncate()
                    handle.write(f"{os.getpid()}\n".encode())
                    handle.flush()
                except OSError:
                    pass  # the pid is informative only (a full disk must not block the claim)
                return
            handle.close()
        raise OutputBusyError(self._busy_message())

    def release(self) -> None:
        """Drop the claim (idempotent). The lock file is deleted while still locked."""
        if self._handle is not None:
            try:
                os.unlink(self.lock_path)
            except OSError:
                pass
            self._handle.close()  # closing releases the lock
            self._handle = None
        with _claimed_guard:
            _claimed_in_process.discard(str(self.outdir))

    def __enter__(self) -> "OutputClaim":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- staging and publishing

    @contextlib.contextmanager
    def staging(self):
        """Yield a hidden staging folder; publish it as ``outdir`` if the block succeeds, else delete it."""
        if self._handle is None:
            raise RuntimeError("OutputClaim.staging() needs acquire() first")
        staging = Path(tempfile.mkdtemp(prefix=f".{self.outdir.name}.partial-", dir=self.outdir.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        try:
            yield staging
            self._publish(staging)
        except OSError as exc:
            message = None
            if exc.errno in WRITE_ERRNOS:
                where = Path(str(exc.filename)) if exc.filename else staging
                try:  # name the output file the user will look for, not the hidden staging path
                    where = self.outdir / where.relative_to(staging)
                except ValueError:
                    pass
                message = write_failure_message(where, exc.strerror or str(exc), measure_at=staging)
            shutil.rmtree(staging, ignore_errors=True)
            if message:
                raise OutputError(message) from None
            raise
        except OutputError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise OutputError(str(exc).replace(str(staging), str(self.outdir))) from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _publish(self, staging: Path) -> None:
        _fsync_tree(staging)
        if self.outdir.exists() or self.outdir.is_symlink():
            if not self.overwrite:
                raise OutputExistsError(f"{self.outdir}: appeared while this run was working; nothing was replaced. "
                                        "Choose another output or pass --overwrite")
            if _renameat2(staging, self.outdir, _RENAME_EXCHANGE):
                shutil.rmtree(staging, ignore_errors=True)  # now holds the old results
            else:
                trash = Path(tempfile.mkdtemp(prefix=f".{self.outdir.name}.partial-old-", dir=self.outdir.parent))
                os.replace(self.outdir, trash / "old")
                os.replace(staging, self.outdir)
                shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                if not _renameat2(staging, self.outdir, _RENAME_NOREPLACE):
                    if self.outdir.exists():
                        raise FileExistsError(errno.EEXIST, "exists", str(self.outdir))
                    os.rename(staging, self.outdir)
            except FileExistsError:
                raise OutputExistsError(f"{self.outdir}: appeared while this run was working; nothing was replaced. "
                                        "Choose another output or pass --overwrite") from None
        _fsync_dir(self.outdir.parent)
        self.published = True


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":
        return
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` to disk before it is published (a crash after the rename then
    never shows a folder with truncated files)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def claim_output_dir(outdir: str | os.PathLike, overwrite: bool = False) -> OutputClaim:
    """Claim ``outdir`` exclusively now (see :class:`OutputClaim`); use as a context manager."""
    return OutputClaim(outdir, overwrite).acquire()


@contextlib.contextmanager
def staged_output_dir(outdir: str | os.PathLike, overwrite: bool = False):
    """Claim ``outdir``, yield a staging folder, publish it atomically on success, delete it on failure.

    An existing ``outdir`` is refused unless ``overwrite`` (then it is replaced only after the new
    results are complete, so a failed run leaves the old results intact). A run already writing
    ``outdir`` makes this fail at once (OutputBusyError).
    """
    with OutputClaim(outdir, overwrite) as claim, claim.staging() as stage:
        yield stage


def is_complete_output(outdir: str | os.PathLike, marker: str = "manifest.json") -> bool:
    """True when ``outdir`` is a published result (it holds ``marker``): a retried task can skip it."""
    return (Path(outdir) / marker).is_file()
