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
from securemark.suspect import expected_shapes, load_suspect

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
    _refused(tmp_path, "not a file")


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
