import json
import zipfile

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.routing.generate import generate_tokens
from moesim.routing.profile import RoutingProfile
from moesim.routing.trace import Trace, load_trace, save_trace


def test_round_trip_is_memory_mapped_and_keeps_metadata(tmp_path):
    profile = RoutingProfile(num_experts=16, top_k=2, num_layers=3, skew=1.0)
    ids = generate_tokens(profile, 1000, seed=4)
    path = save_trace(tmp_path / "t.npz", Trace(num_experts=16, topk_ids=ids, metadata={"seed": 4, "generator": profile.metadata()}))
    back = load_trace(path)
    assert isinstance(back.topk_ids, np.memmap)
    assert np.array_equal(back.topk_ids, ids)
    assert back.metadata["seed"] == 4 and back.metadata["generator"]["skew"] == 1.0
    assert back.metadata["num_layers"] == 3 and back.top_k == 2
    assert back.loads(batch=100).shape == (10, 3, 16)
    assert back.loads(batch=100).sum() == ids.size


def test_count_level_round_trip(tmp_path):
    counts = np.random.default_rng(0).integers(0, 50, size=(5, 4, 8))
    back = load_trace(save_trace(tmp_path / "c.npz", Trace(num_experts=8, counts=counts)))
    assert back.level == "count" and np.array_equal(back.counts, counts)


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_corrupt_or_mismatched_files(tmp_path):
    meta = np.array(json.dumps({"num_experts": 8}))
    cases = [
        (_write(tmp_path / "a.npz", metadata=meta, topk_ids=np.full((4, 2, 2), 8, dtype=np.int16)), "expert ids in \\[8, 8\\]"),
        (_write(tmp_path / "b.npz", metadata=meta, topk_ids=np.zeros((4, 2), dtype=np.int16)), "expected \\[tokens, layers, k\\]"),
        (_write(tmp_path / "c.npz", metadata=meta, counts=np.zeros((4, 2, 7))), "expected \\[steps, layers, 8\\]"),
        (_write(tmp_path / "d.npz", metadata=meta, counts=-np.ones((4, 2, 8))), "negative"),
        (_write(tmp_path / "e.npz", metadata=np.array(json.dumps({"num_experts": 0})), counts=np.zeros((1, 1, 1))), "num_experts"),
    ]
    for path, message in cases:
        with pytest.raises(InputError, match=message):
            load_trace(path)
    truncated = tmp_path / "f.npz"
    good = save_trace(tmp_path / "g.npz", Trace(num_experts=8, counts=np.ones((2, 2, 8))))
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(InputError, match="not a readable"):
        load_trace(truncated)
    with pytest.raises(InputError, match="not found"):
        load_trace(tmp_path / "missing.npz")


def test_saved_archive_is_uncompressed(tmp_path):
    path = save_trace(tmp_path / "t.npz", Trace(num_experts=4, counts=np.ones((2, 2, 4))))
    with zipfile.ZipFile(path) as archive:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist())
