"""Where the dataset comes from, and what a person is told when it is missing."""

from __future__ import annotations

import pytest

from securemark import data as fmnist


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(fmnist.DatasetMissingError) as err:
        fmnist.ensure_staged(tmp_path / "raw", source_dir=tmp_path / "nowhere", allow_download=False)
    assert "apt-get install -y dataset-fashion-mnist" in str(err.value)
