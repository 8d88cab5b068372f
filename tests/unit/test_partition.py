import numpy as np
import pytest

from securemark.errors import ConfigError
from securemark.partition import NUM_CLASSES, PartitionSpec, manifest, split

TRAIN = np.repeat(np.arange(NUM_CLASSES), 6000)
TEST = np.repeat(np.arange(NUM_CLASSES), 1000)


def spec(**kw):
    base = dict(owners=3, owner_size=1000, aux_size=500, attacker_size=700, test_size=400)
    base.update(kw)
    return PartitionSpec(**base)


def test_sizes_names_and_disjointness():
    s = spec()
    parts = split(TRAIN, TEST, s, seed=1)
    assert list(parts) == ["owner_1", "owner_2", "owner_3", "aux", "attacker", "test"]
    for name, idx in parts.items():
        assert len(idx) == s.size_of(name)
        assert len(np.unique(idx)) == len(idx)
    train_idx = np.concatenate([parts[n] for n in parts if n != "test"])
    assert len(np.unique(train_idx)) == len(train_idx) == s.train_total


def test_iid_partitions_are_stratified():
    parts = split(TRAIN, TEST, spec(owner_size=1003), seed=2)
    for name, idx in parts.items():
        counts = np.bincount((TEST if name == "test" else TRAIN)[idx], minlength=NUM_CLASSES)
        assert counts.max() - counts.min() <= 1, name


def test_same_seed_same_split_other_seed_other_split():
    a, b, c = (split(TRAIN, TEST, spec(), seed=s) for s in (5, 5, 6))
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert not np.array_equal(a["owner_1"], c["owner_1"])


def test_dirichlet_skews_owner_labels_but_keeps_sizes():
    s = spec(mode="dirichlet", dirichlet_alpha=0.1, owner_size=3000)
    parts = split(TRAIN, TEST, s, seed=3)
    for name in s.owner_names:
        counts = np.bincount(TRAIN[parts[name]], minlength=NUM_CLASSES)
        assert counts.sum() == 3000
        assert counts.max() / counts.sum() > 0.3  # far from the IID 0.1
    aux = np.bincount(TRAIN[parts["aux"]], minlength=NUM_CLASSES)
    assert aux.max() - aux.min() <= 1


def test_full_dataset_fits_exactly():
    s = PartitionSpec(owners=4, owner_size=12500, aux_size=5000, attacker_size=5000)
    parts = split(TRAIN, TEST, s, seed=0)
    assert sum(len(v) for k, v in parts.items() if k != "test") == 60000


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(owners=0), "prepare.owners"),
        (dict(owner_size=20000), "prepare.owner_size"),
        (dict(mode="stratified"), "prepare.mode"),
        (dict(aux_size=-1), "prepare.aux_size"),
        (dict(test_size=10001), "prepare.test_size"),
        (dict(dirichlet_alpha=0), "prepare.dirichlet_alpha"),
    ],
)
def test_impossible_params_name_the_key(kw, key):
    with pytest.raises(ConfigError) as err:
        spec(**kw)
    assert err.value.key == key
    assert key in str(err.value)


def test_manifest_rows():
    idx = np.array([3, 10])
    df = manifest("owner_1", idx, TRAIN)
    assert list(df.columns) == ["sample_id", "label", "source_index", "partition"]
    assert df["sample_id"].tolist() == ["train-00003", "train-00010"]
    assert manifest("test", idx, TEST)["sample_id"][0] == "test-00003"


def test_budget_subsets_are_balanced_nested_and_reproducible():
    from securemark.errors import ConfigError
    from securemark.partition import stratified_subset

    labels = np.random.default_rng(0).integers(0, 10, 5000)
    small, large = stratified_subset(labels, 1000, 3), stratified_subset(labels, 2500, 3)
    assert np.bincount(labels[small], minlength=10).tolist() == [100] * 10
    assert set(small) <= set(large) and len(set(large)) == 2500
    assert np.array_equal(small, stratified_subset(labels, 1000, 3))
    assert not np.array_equal(small, stratified_subset(labels, 1000, 4))
    with pytest.raises(ConfigError, match="attacker.budget"):
        stratified_subset(labels, 6000, 3)
