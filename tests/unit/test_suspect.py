"""A suspicious model is hostile input: tensors only, checked against the architecture,
and every refusal is an InvalidModel with a message a person can act on."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from securemark.errors import InvalidModel
from securemark.model import ModelSpec, build_model
from securemark.suspect import expected_shapes, load_suspect, read_tensors

SPEC = ModelSpec(widths=(4, 8), hidden=(8,), cut=1)
EXPECTED = expected_shapes(SPEC)
LAYER = "server.block2.conv.weight"


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in build_model(SPEC, 0).state_dict().items()}


def _safetensors(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file(state, str(path))
    return path


def _refused(path: Path, *fragments: str) -> str:
    with pytest.raises(InvalidModel) as info:
        load_suspect(path, EXPECTED)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in message
    return message


# --------------------------------------------------------------------------- valid files


def _assert_same(loaded: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == (torch.float32 if tensor.is_floating_point() else torch.int64)
        assert torch.equal(loaded[name], tensor), name


def test_valid_safetensors_file_loads(tmp_path, state):
    _assert_same(load_suspect(_safetensors(tmp_path / "model.safetensors", state), EXPECTED), state)


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model.bin"])
def test_valid_torch_state_dict_loads(tmp_path, state, name):
    torch.save(state, tmp_path / name)
    _assert_same(load_suspect(tmp_path / name, EXPECTED), state)


def test_checkpoint_with_nested_state_dict_loads(tmp_path, state):
    torch.save({"state_dict": state}, tmp_path / "ckpt.pt")
    _assert_same(load_suspect(tmp_path / "ckpt.pt", EXPECTED), state)


def test_half_precision_is_accepted_as_float32(tmp_path, state):
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    loaded = load_suspect(_safetensors(tmp_path / "half.safetensors", half), EXPECTED)
    assert all(t.dtype == torch.float32 for k, t in loaded.items() if not k.endswith("num_batches_tracked"))
    assert torch.equal(loaded[LAYER], half[LAYER].float())


# --------------------------------------------------------------------------- wrong content


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_wrong_shape_names_layer_and_shapes(tmp_path, state, fmt):
    state[LAYER] = torch.zeros(16, 8, 5, 5)
    path = tmp_path / f"m.{fmt}"
    _safetensors(path, state) if fmt == "safetensors" else torch.save(state, path)
    _refused(path, LAYER, "(16, 8, 5, 5)", "(8, 4, 3, 3)")


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_missing_layer_is_named(tmp_path, state, fmt):
    del state["server.fc.bias"]
    path = tmp_path / f"m.{fmt}"
    _safetensors(path, state) if fmt == "safetensors" else torch.save(state, path)
    _refused(path, "missing", "server.fc.bias")


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_unknown_layer_is_named(tmp_path, state, fmt):
    state["server.extra.weight"] = torch.zeros(3)
    path = tmp_path / f"m.{fmt}"
    _safetensors(path, state) if fmt == "safetensors" else torch.save(state, path)
    _refused(path, "unknown", "server.extra.weight")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(tmp_path, state, bad):
    state[LAYER][0, 0, 0, 0] = bad
    _refused(_safetensors(tmp_path / "m.safetensors", state), LAYER, "NaN or Inf")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_non_float_dtype_is_refused(tmp_path, state, dtype):
    state["server.fc.weight"] = torch.zeros(state["server.fc.weight"].shape, dtype=dtype)
    _refused(_safetensors(tmp_path / "m.safetensors", state), "server.fc.weight", "dtype", "floating-point")


def test_a_float_counter_or_a_negative_variance_is_refused(tmp_path, state):
    bad = dict(state, **{"client.block1.bn.num_batches_tracked": torch.tensor(3.5)})
    _refused(_safetensors(tmp_path / "a.safetensors", bad), "num_batches_tracked", "integer")
    slightly = dict(state, **{"server.block2.bn.running_var": torch.full_like(state["server.block2.bn.running_var"], -5e-6)})
    load_suspect(_safetensors(tmp_path / "c.safetensors", slightly), EXPECTED)  # var + eps > 0: a rescaled norm, valid
    bad = dict(state, **{"server.block2.bn.running_var": -torch.ones_like(state["server.block2.bn.running_var"])})
    _refused(_safetensors(tmp_path / "b.safetensors", bad), "running_var", "negative")


# --------------------------------------------------------------------------- not a model file


def test_truncated_safetensors_file(tmp_path, state):
    path = _safetensors(tmp_path / "m.safetensors", state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(path, "m.safetensors", "not a readable safetensors file")


def test_truncated_torch_file(tmp_path, state):
    path = tmp_path / "m.pt"
    torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(path, "m.pt")


@pytest.mark.parametrize("name", ["random.safetensors", "random.pt", "random"])
def test_random_bytes(tmp_path, name):
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert not data.startswith(b"PK")
    path = tmp_path / name
    path.write_bytes(data)
    _refused(path, name)


@pytest.mark.parametrize("name", ["notes.txt", "model.safetensors", "model.pt"])
def test_text_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("These are not the weights you are looking for.\n" * 20)
    _refused(path, name)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.touch()
    _refused(path, "empty")


def test_missing_file_and_directory(tmp_path):
    _refused(tmp_path / "nope.safetensors", "does not exist")
    _refused(tmp_path, "not a regular file")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda s: {**s, "server.fc.bias": "a string"}, id="string-value"),
        pytest.param(lambda s: {**s, "server.fc.bias": 3}, id="int-value"),
        pytest.param(lambda s: {**s, "server.fc.bias": [1.0, 2.0]}, id="list-value"),
        pytest.param(lambda s: {**s, 7: torch.zeros(1)}, id="non-string-key"),
        pytest.param(lambda s: list(s.values()), id="list-of-tensors"),
        pytest.param(lambda s: s["server.fc.weight"], id="bare-tensor"),
    ],
)
def test_torch_file_with_non_tensor_content(tmp_path, state, payload):
    path = tmp_path / "m.pt"
    torch.save(payload(state), path)
    _refused(path, "m.pt", "mapping of layer names to tensors")


# --------------------------------------------------------------------------- malicious pickles


class Evil:
    """Unpickling this runs a command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvilTouch:
    """Unpickling this calls ``Path(marker).touch()`` (no shell needed)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("evil", [Evil, EvilTouch])
@pytest.mark.parametrize("container", ["torch-zip", "torch-zip-in-dict", "raw-pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, state, evil, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if container == "torch-zip":
        torch.save(evil(marker), path)
    elif container == "torch-zip-in-dict":
        torch.save({**state, "server.fc.bias": evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(evil(marker)))
    assert not marker.exists()
    # Sanity: the payload is live; a plain unpickler would create the marker.
    if container == "raw-pickle":
        check = tmp_path / "check"
        pickle.loads(pickle.dumps(evil(check)))
        assert check.exists()
    _refused(path, "evil.pt")
    assert not marker.exists()


# --------------------------------------------------------------------------- fuzzing and bombs


def _refused_or_valid(path: Path) -> bool:
    """Loading either raises InvalidModel with a message for a person, or returns a model
    that passed every check (the expected names, shapes and dtypes, finite values);
    never anything else. True when it was refused."""
    try:
        loaded = load_suspect(path, EXPECTED)
    except InvalidModel as exc:
        message = str(exc)
        assert message and "Traceback" not in message and len(message) < 2000, message
        return True
    assert set(loaded) == set(EXPECTED), sorted(set(loaded) ^ set(EXPECTED))
    for name, (shape, _) in EXPECTED.items():
        assert loaded[name].shape == shape, name
        assert loaded[name].dtype in (torch.float32, torch.int64), name
        if loaded[name].is_floating_point():
            assert bool(torch.isfinite(loaded[name]).all()), name
    return False


@pytest.mark.parametrize("name", ["fuzz.pt", "fuzz.safetensors", "fuzz.bin", "fuzz"])
def test_many_random_files_are_refused_cleanly(tmp_path, name):
    rng = np.random.default_rng(42)
    for i in range(150):
        size = int(rng.integers(1, 8192))
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        if i % 3 == 0:
            data = b"PK\x03\x04" + data  # looks like a zip
        elif i % 3 == 1:
            data = b"\x80\x02" + data  # looks like a pickle
        path = tmp_path / name
        path.write_bytes(data)
        assert _refused_or_valid(path), f"random bytes #{i} loaded as a model"  # random bytes are never a model


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_randomly_corrupted_models_are_refused_cleanly(tmp_path, state, fmt):
    path = tmp_path / f"m.{fmt}"
    _safetensors(path, state) if fmt == "safetensors" else torch.save(state, path)
    good = bytearray(path.read_bytes())
    rng = np.random.default_rng(7)
    refused = 0
    for _ in range(200):
        data = bytearray(good)
        for _ in range(int(rng.integers(1, 16))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(1, len(data)))]
        path.write_bytes(bytes(data))
        refused += _refused_or_valid(path)  # a flipped byte inside a weight may still be a valid model
    assert refused >= 40  # truncations and broken headers are refused (about a third of the cases at least)


def test_a_compressed_zip_bomb_is_refused_before_it_expands(tmp_path, state):
    import resource
    import zipfile

    path = tmp_path / "bomb.pt"
    torch.save(state, path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data/999", b"\0" * (200 * 1024 * 1024))  # 200 MiB of zeros, about 200 KB deflated
    assert path.stat().st_size < 2 * 1024 * 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _refused(path, "bomb.pt", "compressed")
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024  # peak memory grew by less than 64 MiB (the bomb expands to 200)


def test_a_storage_larger_than_its_data_is_refused(tmp_path):
    import zipfile

    path = tmp_path / "liar.pt"
    torch.save({"w": torch.zeros(37)}, path)  # one storage of 37 elements: BININT1 37 in the pickle
    with zipfile.ZipFile(path) as z:
        members = {m.filename: z.read(m.filename) for m in z.infolist()}
    name = next(k for k in members if k.endswith("data.pkl"))
    declared = b"cpuq\x06K%"  # ('storage', FloatStorage, '0', 'cpu', 37)
    assert members[name].count(declared) == 1
    members[name] = members[name].replace(declared, b"cpuq\x06J\xff\xff\xff\x7f")  # now it claims 2^31 - 1 elements
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for k, v in members.items():
            z.writestr(k, v)
    with pytest.raises(InvalidModel, match="declares a storage of 2147483647 elements"):
        read_tensors(path)


def test_legacy_torch_files_cannot_be_bounded_and_are_refused(tmp_path, state):
    path = tmp_path / "old.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    _refused(path, "old.pt", "legacy")


def test_devices_fifos_and_links_to_them_are_refused(tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    _refused(fifo, "not a regular file")
    link = tmp_path / "zero.safetensors"
    link.symlink_to("/dev/zero")
    _refused(link, "not a regular file")


def test_the_hash_is_of_the_bytes_that_were_parsed(tmp_path, state):
    import hashlib

    from securemark.suspect import examine

    path = _safetensors(tmp_path / "m.safetensors", state)
    loaded, sha = examine(path, EXPECTED)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() and loaded.keys() == state.keys()
