"""Read several arrays of an ``.npz`` file into one preallocated array.

``np.load(...)[name]`` materialises each member, and stacking them copies
everything once more (2x the data at the peak). :func:`read_stacked` reads
the members' ``.npy`` payloads straight into consecutive rows of one array
(stored or deflated members alike), so the peak is the data itself.
"""

from __future__ import annotations

import zipfile

import numpy as np

__all__ = ["read_stacked"]

_BLOCK = 1 << 24  # bytes per read


def _header(fp) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fp)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy format version {version}")
    return read(fp)


def read_stacked(path: str, names: list[str]) -> tuple[np.ndarray, list[int]] | None:
    """``(np.concatenate([npz[n] for n in names]), [len(npz[n]) ...])`` without
    the copy, or None
    when the members cannot be stacked that way (dtypes or trailing shapes
    differ, object or Fortran-ordered arrays): the caller then reads them
    one by one. Never unpickles.
    """
    with zipfile.ZipFile(path) as z:
        heads = []
        for name in names:
            with z.open(name + ".npy") as fp:
                heads.append(_header(fp))
        shapes = [h[0] for h in heads]
        dtypes = {h[2] for h in heads}
        if (len(dtypes) != 1 or any(h[1] for h in heads) or next(iter(dtypes)).hasobject
                or any(len(s) < 1 for s in shapes) or len({s[1:] for s in shapes}) != 1):
            return None
        out = np.empty((sum(s[0] for s in shapes),) + shapes[0][1:], next(iter(dtypes)))
        flat = out.reshape(-1).view(np.uint8)
        pos = 0
        for name, shape in zip(names, shapes):
            nbytes = int(np.prod(shape)) * out.itemsize
            with z.open(name + ".npy") as fp:
                _header(fp)
                end = pos + nbytes
                while pos < end:
                    got = fp.readinto(memoryview(flat[pos:min(end, pos + _BLOCK)]))
                    if not got:
                        raise ValueError(f"{path}: member {name!r} is truncated")
                    pos += got
    return out, [s[0] for s in shapes]
