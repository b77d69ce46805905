"""Save and load models as one ``.npz`` file: a JSON record plus the arrays.

File layout (a plain NumPy ``.npz``, i.e. an uncompressed zip of ``.npy``):

``architecture``
    uint8 bytes of a UTF-8 JSON object::

        {"format": "chainrule.model", "version": 1, "chainrule": "0.1.0",
         "model": {"type": "Sequential", "dtype": "float32", "layers": [...]},
         "parameters": [{"name": "0.weight", "shape": [2, 8]}, ...],
         "optimizer": null or {"type": "SGD", "hyper": ..., "schedule": ...,
                               "steps": 120, "epoch": 9, "lr": 0.1,
                               "state": ["momentum_buffer.0", ...]}}

``param.<name>``
    one array per parameter, in :meth:`Sequential.parameters` order.
``optim.<key>``
    optimizer buffers, when an optimizer was saved.

Safety: arrays are read with ``allow_pickle=False``, so loading never runs
code. Every field is checked (types, layer settings, shapes implied by the
architecture, dtypes, finite values) and every array's stored size must be
what the architecture implies before it is read, so a forged header cannot
make ``load`` allocate more than the file justifies. Any problem raises
``ValueError`` naming the file and what is wrong.

Atomicity: :func:`save` writes a temporary file in the target directory,
flushes and fsyncs it, then ``os.replace``-s it over the target, so a crash
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import TYPE_CHECKING, Any, Literal, NoReturn, cast, overload

import numpy as np

from .layers import Layer, Sequential, layer_from_config

if TYPE_CHECKING:
    from .optim import Optimizer

__all__ = ["save", "load"]

FORMAT = "chainrule.model"
VERSION = 1
_MAX_RECORD_BYTES = 1 << 20  # the JSON record; real ones are a few KiB
_NPY_HEADER_MAX = 1 << 16  # .npy headers are at most 64 KiB


def _version() -> str:
    from . import __version__

    return __version__


def save(model: Layer, path: str | os.PathLike[str], *, optimizer: Optimizer | None = None) -> None:
    """Write ``model`` (and optionally ``optimizer``'s state) to ``path``.

    Parameters
    ----------
    model : Sequential or Layer
    path : str or os.PathLike
        Written as given (no ``.npz`` is appended). Replaced atomically if it
        exists.
    optimizer : Optimizer, optional
        Its :meth:`~chainrule.optim.Optimizer.state_dict` is stored too;
        restore it with ``load(path, with_optimizer=True)``.
    """
    if not isinstance(model, Layer):
        raise TypeError(f"save: model must be a chainrule layer or Sequential; got {type(model).__name__}")
    named = model.named_parameters()
    arrays: dict[str, Any] = {f"param.{name}": p.data for name, p in named}
    record: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "chainrule": _version(),
        "model": model.config(),
        "dtype": model.dtype.name,
        "parameters": [{"name": name, "shape": list(p.shape)} for name, p in named],
        "optimizer": None,
    }
    if optimizer is not None:
        own = {id(p) for _, p in named}
        if [id(p) for p in optimizer.params] != [id(p) for _, p in named] or len(own) != len(optimizer.params):
            raise ValueError("save: optimizer must be built on model.parameters() (all of them, in order)")
        sd = optimizer.state_dict()
        record["optimizer"] = {k: v for k, v in sd.items() if k != "state"}
        record["optimizer"]["state"] = sorted(sd["state"])
        arrays.update({f"optim.{k}": v for k, v in sd["state"].items()})
    text = json.dumps(record, sort_keys=True).encode("utf-8")
    arrays["architecture"] = np.frombuffer(text, dtype=np.uint8)

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); not possible everywhere
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


class _Reader:
    """Reads members of an npz after checking their stored sizes."""

    def __init__(self, path: str, zf: zipfile.ZipFile, file_size: int) -> None:
        self.path, self.zf, self.file_size = path, zf, file_size
        self.infos: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            name = info.filename
            if not name.endswith(".npy"):
                self.fail(f"unexpected member {name!r}")
            if name[:-4] in self.infos:
                self.fail(f"member {name!r} appears twice")
            self.infos[name[:-4]] = info

    def fail(self, what: str) -> NoReturn:
        raise ValueError(f"load: {self.path!r} is not a valid chainrule model file: {what}")

    def read(self, key: str, max_data_bytes: int) -> np.ndarray:
        info = self.infos.get(key)
        if info is None:
            self.fail(f"missing array {key!r}")
        if info.file_size > max_data_bytes + _NPY_HEADER_MAX or info.compress_size > self.file_size:
            self.fail(f"array {key!r} is {info.file_size} bytes; at most {max_data_bytes} expected")
        try:
            with self.zf.open(info) as f:
                a = np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, UnicodeError,
                NotImplementedError, RuntimeError) as e:
            self.fail(f"array {key!r} cannot be read ({e})")
        return a


def _implied_parameters(config: Any) -> int:
    """Parameter count a (not yet validated) layer record implies; 0 where it is malformed."""
    if not isinstance(config, dict):
        return 0
    if config.get("type") == "Sequential" and isinstance(config.get("layers"), list):
        return sum(_implied_parameters(c) for c in config["layers"])
    if config.get("type") == "Dense":
        d_in, d_out = config.get("d_in"), config.get("d_out")
        if isinstance(d_in, int) and isinstance(d_out, int) and d_in > 0 and d_out > 0:
            return d_in * d_out + (d_out if config.get("bias") is True else 0)
    return 0


def _expect(cond: object, reader: _Reader, what: str) -> None:
    if not cond:
        reader.fail(what)


@overload
def load(path: str | os.PathLike[str], *, with_optimizer: Literal[False] = ...) -> Layer: ...
@overload
def load(path: str | os.PathLike[str], *,
         with_optimizer: Literal[True]) -> tuple[Layer, Optimizer | None]: ...
@overload
def load(path: str | os.PathLike[str], *,
         with_optimizer: bool) -> Layer | tuple[Layer, Optimizer | None]: ...


def load(path: str | os.PathLike[str], *,
         with_optimizer: bool = False) -> Layer | tuple[Layer, Optimizer | None]:
    """Read a model written by :func:`save`.

    Parameters
    ----------
    path : str or os.PathLike
    with_optimizer : bool, default False
        Also rebuild the saved optimizer over the loaded model's parameters.

    Returns
    -------
    model : Sequential or Layer
        Same architecture, dtype and bit-identical weights, so it predicts
        bit-identically.
    (model, optimizer) when ``with_optimizer`` is True; optimizer is None if
    none was saved.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        When the file is truncated, not a zip/npz, or inconsistent in any way.
    """
    path = os.fspath(path)
    file_size = os.path.getsize(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise ValueError(f"load: {path!r} is not a valid chainrule model file: not a readable .npz ({e})") from None
    with zf:
        r = _Reader(path, zf, file_size)
        raw = r.read("architecture", _MAX_RECORD_BYTES)
        _expect(raw.dtype == np.uint8 and raw.ndim == 1, r, "the architecture record must be 1-D uint8 bytes")
        try:
            record = json.loads(raw.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            r.fail(f"the architecture record is not JSON ({e})")
        _expect(isinstance(record, dict), r, "the architecture record must be a JSON object")
        _expect(record.get("format") == FORMAT, r, f"format is {record.get('format')!r}; expected {FORMAT!r}")
        _expect(record.get("version") == VERSION, r,
                f"format version {record.get('version')!r} is not supported (this chainrule reads {VERSION})")
        missing = {"model", "dtype", "parameters", "optimizer"} - set(record)
        _expect(not missing, r, f"the record lacks {sorted(missing)}")
        dtype = record["dtype"]
        _expect(dtype in ("float32", "float64"), r, f"dtype must be 'float32' or 'float64'; got {dtype!r}")
        # Check the weight bytes the architecture implies before building (allocating) it.
        total = _implied_parameters(record["model"]) * np.dtype(dtype).itemsize
        _expect(total <= file_size, r, f"the architecture needs {total} bytes of weights; the file has {file_size}")
        try:
            model = layer_from_config(record["model"])
        except (ValueError, TypeError) as e:
            r.fail(f"bad architecture: {e}")
        if not isinstance(model, Sequential):
            model._set_dtype(np.dtype(dtype))
        _expect(model.dtype.name == dtype, r, f"dtype {dtype!r} does not match the model's {model.dtype.name!r}")
        named = model.named_parameters()
        listed = record["parameters"]
        expected = [{"name": n, "shape": list(p.shape)} for n, p in named]
        _expect(listed == expected, r, f"the parameter list {listed!r:.200} does not match the architecture, "
                                       f"which implies {expected!r:.200}")

        opt_record = record["optimizer"]
        opt_keys = []
        if opt_record is not None:
            _expect(isinstance(opt_record, dict) and isinstance(opt_record.get("state"), list), r,
                    "the optimizer record must be an object with a 'state' list")
            opt_keys = opt_record["state"]
            _expect(all(isinstance(k, str) for k in opt_keys), r, "optimizer state keys must be strings")
        members = {"architecture"} | {f"param.{n}" for n, _ in named} | {f"optim.{k}" for k in opt_keys}
        _expect(set(r.infos) == members, r,
                f"arrays {sorted(set(r.infos) ^ members)} are unexpected or missing")

        for name, p in named:
            a = r.read(f"param.{name}", p.size * p.dtype.itemsize)
            _expect(a.dtype == p.dtype and a.shape == p.shape, r,
                    f"param.{name} has dtype {a.dtype} and shape {a.shape}; expected {p.dtype} {p.shape}")
            _expect(bool(np.isfinite(a).all()), r, f"param.{name} contains NaN or inf")
            p.data = a

        optimizer: Optimizer | None = None
        if opt_record is not None:
            from .optim import OPTIMIZERS

            kind = opt_record.get("type")
            _expect(kind in OPTIMIZERS, r, f"unknown optimizer type {kind!r}")
            shapes = {}
            for k in opt_keys:
                _, _, i = k.rpartition(".")
                _expect(i.isdigit() and int(i) < len(named), r, f"bad optimizer state key {k!r}")
                shapes[k] = named[int(i)][1]
            state = {}
            for k in opt_keys:
                p = shapes[k]
                state[k] = r.read(f"optim.{k}", p.size * p.dtype.itemsize)
            sd = {**{k: v for k, v in opt_record.items() if k != "state"}, "state": state}
            try:
                hyper = sd.get("hyper")
                _expect(isinstance(hyper, dict) and "lr" in hyper, r, "optimizer hyper-parameters lack lr")
                optimizer = OPTIMIZERS[kind](model.parameters(), **cast(dict[str, Any], hyper))
                optimizer.load_state_dict(sd)
            except (TypeError, ValueError) as e:
                if isinstance(e, ValueError) and str(e).startswith("load:"):
                    raise
                r.fail(f"bad optimizer state: {e}")
    return (model, optimizer) if with_optimizer else model
