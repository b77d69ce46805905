"""save/load: bit-identical round trips, optimizer state, atomic writes, hostile files."""

from __future__ import annotations

import io as _io
import json
import os
import zipfile

import numpy as np
import pytest

import chainrule as cr
from chainrule.data import make_circles


def _model(dtype="float32"):
    return cr.Sequential(cr.Dense(2, 6), cr.LeakyReLU(0.2), cr.Dense(6, 4, bias=False), cr.Tanh(),
                         cr.Dense(4, 3), cr.Softmax(), dtype=dtype, seed=0)


def _write_npz(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _record(arrays):
    return json.loads(arrays["architecture"].tobytes())


def _with_record(arrays, record):
    out = dict(arrays)
    out["architecture"] = np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_predicts_bit_identically(tmp_path, dtype, rng):
    model = _model(dtype)
    path = tmp_path / "model.npz"
    cr.save(model, path)
    loaded = cr.load(path)
    assert loaded.config() == model.config() and loaded.dtype == model.dtype
    assert loaded.flat_data.tobytes() == model.flat_data.tobytes()
    X = rng.normal(size=(50, 2))
    assert loaded(X).tobytes() == model(X).tobytes()
    assert [f for f in os.listdir(tmp_path)] == ["model.npz"]  # no temporary file left behind


def test_a_single_layer_round_trips(tmp_path):
    layer = cr.Dense(3, 2, seed=1, dtype="float64")
    cr.save(layer, tmp_path / "d.npz")
    again = cr.load(tmp_path / "d.npz")
    assert isinstance(again, cr.Dense) and again.weight.data.tobytes() == layer.weight.data.tobytes()


def test_optimizer_state_round_trip_resumes_training_exactly(tmp_path):
    X, y = make_circles(200, noise=0.1, factor=0.5, seed=0)

    def fresh():
        m = cr.Sequential(cr.Dense(2, 8), cr.Tanh(), cr.Dense(8, 1), seed=0)
        return m, cr.Adam(m.parameters(), lr=1e-2)

    model, opt = fresh()
    cr.fit(model, X, y, optimizer=opt, epochs=3, seed=1, progress=False)
    cr.save(model, tmp_path / "m.npz", optimizer=opt)
    cr.fit(model, X, y, optimizer=opt, epochs=2, seed=2, progress=False)

    loaded, opt2 = cr.load(tmp_path / "m.npz", with_optimizer=True)
    assert isinstance(opt2, cr.Adam) and opt2.steps == opt.steps - 2 * 7
    cr.fit(loaded, X, y, optimizer=opt2, epochs=2, seed=2, progress=False)
    assert loaded.flat_data.tobytes() == model.flat_data.tobytes()
    assert cr.load(tmp_path / "m.npz", with_optimizer=False).flat_data.size == model.flat_data.size
    cr.save(model, tmp_path / "plain.npz")
    assert cr.load(tmp_path / "plain.npz", with_optimizer=True)[1] is None


def test_save_overwrites_atomically_and_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    first = _model()
    cr.save(first, path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        cr.save(cr.Sequential(cr.Dense(2, 1)), path)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.npz"]
    cr.save(cr.Sequential(cr.Dense(2, 1), seed=0), path)
    assert cr.load(path).config()["layers"][0]["d_out"] == 1


def test_save_rejects_a_foreign_optimizer(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match=r"save: optimizer must be built on model\.parameters\(\)"):
        cr.save(model, tmp_path / "m.npz", optimizer=cr.SGD(model.parameters()[:2], lr=0.1))


# -- hostile and broken files ----------------------------------------------------------------------

INVALID = r"load: '.*' is not a valid chainrule model file: "


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        cr.load(tmp_path / "nope.npz")


def test_truncated_and_garbage_files(tmp_path):
    path = tmp_path / "m.npz"
    cr.save(_model(), path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 30):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=INVALID):
            cr.load(path)
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match=INVALID + "not a readable \\.npz"):
        cr.load(path)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # inside a weight array: the zip CRC catches it
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=INVALID):
        cr.load(path)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(format="keras"), r"format is 'keras'; expected 'chainrule\.model'"),
    (lambda r: r.update(version=99), r"format version 99 is not supported"),
    (lambda r: r.pop("parameters"), r"the record lacks \['parameters'\]"),
    (lambda r: r["model"]["layers"].__setitem__(0, {"type": "Lambda", "code": "import os"}),
     r"bad architecture: layer_from_config: unknown layer type 'Lambda'"),
    (lambda r: r["model"]["layers"][0].update(d_out=7), r"bad architecture: Sequential: layer 2"),
    (lambda r: r["model"]["layers"][0].update(d_in=-2), r"bad architecture: Dense: d_in must be a positive integer; got -2"),
    (lambda r: r.update(dtype="float16"), r"dtype must be 'float32' or 'float64'; got 'float16'"),
    (lambda r: r.update(dtype="float64"), r"dtype 'float64' does not match the model's 'float32'"),
    (lambda r: r["parameters"][0].update(shape=[6, 2]), r"the parameter list .* does not match the architecture"),
])
def test_inconsistent_records_are_rejected(tmp_path, mutate, message):
    path = tmp_path / "m.npz"
    cr.save(_model(), path)
    arrays = _arrays(path)
    record = _record(arrays)
    mutate(record)
    _write_npz(path, _with_record(arrays, record))
    with pytest.raises(ValueError, match=INVALID + message):
        cr.load(path)


def test_bad_arrays_are_rejected(tmp_path):
    path = tmp_path / "m.npz"
    cr.save(_model(), path)
    good = _arrays(path)

    bad = dict(good, **{"param.0.weight": np.full((2, 6), np.nan, np.float32)})
    _write_npz(path, bad)
    with pytest.raises(ValueError, match=INVALID + r"param\.0\.weight contains NaN or inf"):
        cr.load(path)

    bad = dict(good, **{"param.0.weight": np.zeros((2, 6), np.float64)})
    _write_npz(path, bad)
    with pytest.raises(ValueError, match=INVALID + r"param\.0\.weight has dtype float64 and shape \(2, 6\); expected float32"):
        cr.load(path)

    bad = dict(good, **{"param.0.weight": np.zeros((200, 600), np.float32)})
    _write_npz(path, bad)
    with pytest.raises(ValueError, match=INVALID + r"array 'param\.0\.weight' is \d+ bytes; at most 48 expected"):
        cr.load(path)

    bad = dict(good, **{"param.0.weight": np.zeros((3, 4), np.float32)})
    _write_npz(path, bad)
    with pytest.raises(ValueError, match=INVALID + r"param\.0\.weight has dtype float32 and shape \(3, 4\); expected float32 \(2, 6\)"):
        cr.load(path)

    bad = {k: v for k, v in good.items() if k != "param.4.bias"}
    _write_npz(path, bad)
    with pytest.raises(ValueError, match=INVALID + r"arrays \['param\.4\.bias'\] are unexpected or missing"):
        cr.load(path)

    bad = dict(good, extra=np.zeros(3))
    _write_npz(path, bad)
    with pytest.raises(ValueError, match=INVALID + r"arrays \['extra'\] are unexpected or missing"):
        cr.load(path)

    bad = dict(good, architecture=np.frombuffer(b"{not json", dtype=np.uint8))
    _write_npz(path, bad)
    with pytest.raises(ValueError, match=INVALID + r"the architecture record is not JSON"):
        cr.load(path)


def test_pickled_objects_are_never_loaded(tmp_path):
    path = tmp_path / "m.npz"
    cr.save(_model(), path)
    arrays = _arrays(path)
    arrays["param.0.weight"] = np.array([[object()] * 6] * 2, dtype=object)
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, v in arrays.items():
            with zf.open(k + ".npy", "w") as f:
                np.lib.format.write_array(f, v, allow_pickle=True)
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=INVALID + r"array 'param\.0\.weight' cannot be read"):
        cr.load(path)


def test_sizes_must_be_justified_by_the_file(tmp_path):
    path = tmp_path / "m.npz"
    cr.save(_model(), path)
    arrays = _arrays(path)
    record = _record(arrays)
    record["model"] = {"type": "Sequential", "dtype": "float32",
                       "layers": [{"type": "Dense", "d_in": 100000, "d_out": 100000, "bias": True, "init": "auto"}]}
    record["parameters"] = [{"name": "0.weight", "shape": [100000, 100000]}, {"name": "0.bias", "shape": [100000]}]
    _write_npz(path, _with_record(arrays, record))
    with pytest.raises(ValueError, match=INVALID + r"the architecture needs 40000400000 bytes of weights; the file has \d+"):
        cr.load(path)
