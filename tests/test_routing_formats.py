import sys

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.routing.formats import read_trace, write_trace
from moesim.routing.trace import Trace


def _ids():
    rng = np.random.default_rng(0)
    return rng.integers(0, 16, size=(300, 4, 2)).astype(np.int16)


def test_exflow_round_trip(tmp_path):
    top1 = _ids()[:, :, :1]
    path = write_trace(tmp_path / "trace.npy", Trace(num_experts=16, topk_ids=top1), "exflow")
    assert np.load(path).shape == (300, 4)  # ExFlow's [tokens, layers]
    back = read_trace(path, num_experts=16)
    assert np.array_equal(back.topk_ids, top1)


def test_csv_counts_round_trip(tmp_path):
    trace = Trace(num_experts=16, topk_ids=_ids())
    path = write_trace(tmp_path / "counts.csv", trace, batch=100)
    assert path.read_text().splitlines()[0] == "step,layer,expert,count"
    back = read_trace(path, num_experts=16)
    assert np.array_equal(back.counts, trace.loads(100))


def test_bad_inputs_are_named(tmp_path):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("step,layer,count\n0,0,1\n")
    with pytest.raises(InputError, match="missing columns expert"):
        read_trace(bad_csv)
    bad_csv.write_text("step,layer,expert,count\n0,0,x,1\n")
    with pytest.raises(InputError, match="not an integer"):
        read_trace(bad_csv)
    floats = tmp_path / "f.npy"
    np.save(floats, np.ones((3, 2)))
    with pytest.raises(InputError, match="integer expert ids"):
        read_trace(floats)
    with pytest.raises(InputError, match="cannot tell the format"):
        read_trace(_touch(tmp_path / "x.bin"))
    with pytest.raises(InputError, match="16 experts; --experts says 8"):
        read_trace(write_trace(tmp_path / "t.npz", Trace(num_experts=16, topk_ids=_ids())), num_experts=8)


def _touch(path):
    path.write_bytes(b"")
    return path


def test_sglang_without_torch_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    dump = _touch(tmp_path / "dump.pt")
    with pytest.raises(InputError, match="needs PyTorch"):
        read_trace(dump)


def test_sglang_stat_and_per_token_dumps(tmp_path):
    torch = pytest.importorskip("torch", reason="reading SGLang dumps needs PyTorch (optional)")
    counts = np.zeros((3, 5, 16), dtype=np.int32)
    counts[:, 1:] = np.random.default_rng(0).integers(0, 9, size=(3, 4, 16))  # layer 0 dense: no counts
    stat = tmp_path / "stat.pt"
    torch.save({"rank": 0, "logical_count": torch.from_numpy(counts), "average_utilization_rate_over_window": None}, stat)
    trace = read_trace(stat)
    assert trace.level == "count" and trace.metadata["sglang_layers"] == [1, 2, 3, 4]
    assert np.array_equal(trace.counts, counts[:, 1:])

    ids = _ids()  # [tokens, layers, k]
    full = np.zeros((300, 5, 2), dtype=np.int32)
    full[:, 1:] = ids
    records = [{"forward_pass_id": i, "rank": 0, "topk_ids_of_layer": torch.from_numpy(full[i * 100:(i + 1) * 100].transpose(1, 0, 2).copy())}
               for i in range(3)]
    per_token = tmp_path / "per_token.pt"
    torch.save({"records": records, "last_physical_to_logical_map": torch.arange(16).repeat(5, 1)}, per_token)
    trace = read_trace(per_token)
    assert trace.num_experts == 16 and np.array_equal(trace.topk_ids, ids)
    out = write_trace(tmp_path / "converted.npz", trace)
    assert np.array_equal(read_trace(out).topk_ids, ids)

    # physical slots: 20 slots per layer, slot s holding logical expert s % 16
    physical = tmp_path / "physical.pt"
    slots = np.where(full % 2 == 0, full, full + 16 * (full < 4))  # odd experts below 4 use their redundant slot
    records = [{"forward_pass_id": 0, "rank": 0, "topk_ids_of_layer": torch.from_numpy(slots.transpose(1, 0, 2).copy())}]
    torch.save({"records": records, "last_physical_to_logical_map": (torch.arange(20) % 16).repeat(5, 1)}, physical)
    mapped = read_trace(physical, num_experts=16, physical=True)
    assert np.array_equal(mapped.topk_ids, ids)
