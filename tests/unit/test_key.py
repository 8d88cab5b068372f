"""Vendor secret files and the secret projection matrix."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from securemark.errors import InsecureSecret, SecretError, SecretExists, SecretMissing, SecureMarkError
from securemark.key import FingerprintKey, create_secret, key_id, load_secret, projection, random_secret

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


@posix_only
def test_created_secret_is_private_and_loads(tmp_path):
    path = tmp_path / "vault" / "nested" / "vendor.key"
    kid = create_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "vault").stat().st_mode) == 0o700
    secret = load_secret(path)
    assert len(secret) == 32 and key_id(secret) == kid
    assert [p.name for p in path.parent.iterdir()] == ["vendor.key"]  # no temp file left behind


def test_create_refuses_to_overwrite(tmp_path):
    path = tmp_path / "vendor.key"
    create_secret(path)
    before = path.read_bytes()
    with pytest.raises(SecretExists, match="refusing to overwrite"):
        create_secret(path)
    assert path.read_bytes() == before


def test_two_secrets_differ(tmp_path):
    assert create_secret(tmp_path / "a.key") != create_secret(tmp_path / "b.key")


@posix_only
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_secret_readable_by_others(tmp_path, mode):
    path = tmp_path / "vendor.key"
    create_secret(path)
    os.chmod(path, mode)
    with pytest.raises(InsecureSecret, match="chmod 600"):
        load_secret(path)


def test_load_missing_secret_says_how_to_create(tmp_path):
    with pytest.raises(SecretMissing, match="create_secret"):
        load_secret(tmp_path / "nope.key")


@pytest.mark.parametrize("content", ["", "zz" * 32, "ab" * 31, "ab" * 33])
def test_load_rejects_malformed_secret(tmp_path, content):
    path = tmp_path / "vendor.key"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(SecretError, match="malformed"):
        load_secret(path)


def test_key_id_is_short_public_and_hides_the_secret():
    secret = random_secret()
    kid = key_id(secret)
    assert len(kid) == 16 and all(c in "0123456789abcdef" for c in kid)
    assert kid == key_id(secret)
    assert kid != key_id(random_secret())
    hexed = secret.hex()
    assert kid not in hexed
    assert not any(hexed[i : i + 8] in kid for i in range(0, len(hexed) - 8))


def test_projection_is_deterministic_and_leaves_global_rng_alone():
    secret = random_secret()
    state = torch.get_rng_state()
    a = projection(secret, "server.fc1", 32, 500)
    b = projection(secret, "server.fc1", 32, 500)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.dtype == torch.float32 and a.shape == (32, 500)
    assert torch.equal(a, b)


def test_projection_depends_on_secret_layer_and_shape():
    secret = random_secret()
    base = projection(secret, "server.fc1", 32, 500)
    others = [
        projection(random_secret(), "server.fc1", 32, 500),
        projection(secret, "server.fc2", 32, 500),
        projection(secret, "server.fc1", 33, 500)[:32],
    ]
    for other in others:
        # unrelated Gaussian matrices: correlation of entries near 0
        corr = torch.corrcoef(torch.stack([base.flatten(), other.flatten()]))[0, 1]
        assert abs(corr) < 0.05


def test_projection_scale():
    n = 4000
    k = projection(random_secret(), "layer", 64, n)
    assert abs(k.mean().item()) < 5 / (n * k.numel()) ** 0.5  # 5 sigma of the mean of N(0, 1/n)
    assert k.var().item() * n == pytest.approx(1.0, rel=0.03)
    row_norms = k.norm(dim=1)
    assert torch.allclose(row_norms, torch.ones(64), atol=0.1)


@pytest.mark.parametrize("bad", [dict(code_length=0), dict(n_weights=-1), dict(layer=""), dict(code_length=2.5)])
def test_projection_rejects_bad_arguments(bad):
    args = dict(layer="l", code_length=4, n_weights=8) | bad
    with pytest.raises(SecureMarkError):
        projection(random_secret(), **args)


def test_fingerprint_key_round_trip_and_secret_check():
    secret = random_secret()
    fk = FingerprintKey.for_secret(secret, "server.fc1", 16, 100)
    data = fk.to_dict()
    assert data == {"key_id": key_id(secret), "layer": "server.fc1", "code_length": 16, "n_weights": 100}
    assert secret.hex() not in repr(data)
    assert FingerprintKey.from_dict(data) == fk
    assert torch.equal(fk.matrix(secret), projection(secret, "server.fc1", 16, 100))
    with pytest.raises(SecretError, match="key id"):
        fk.matrix(random_secret())
    with pytest.raises(SecretError, match="unknown"):
        FingerprintKey.from_dict(data | {"secret": secret.hex()})
