"""The record format: round trip, random access from worker processes, atomic and idempotent writes."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from medvlp.data.records import DatasetWriter, Records, StoredImage, read_manifest
from medvlp.errors import DataError


def write_small(out, n=50, captions_per=2, name="toy"):
    with DatasetWriter(out, name=name, family="pretrain", source={"kind": "test"}, shard_rows=16) as writer:
        rows = []
        for i in range(n):
            image = writer.add_image(f"img{i % 10}", StoredImage(bytes([i % 10]) * 5, "png", 1, 1))
            rows.append({"id": f"r{i}", "image": image, "captions": [f"caption {i} {j}" for j in range(captions_per)]})
        writer.write_split("train", rows)
        writer.write_split("test", rows[:3])
        return writer.commit(note="hello")


def test_round_trip_and_shards(tmp_path):
    manifest = write_small(tmp_path / "ds")
    assert manifest["splits"]["train"]["rows"] == 50
    assert len(manifest["splits"]["train"]["shards"]) == 4  # 16 rows a shard
    assert manifest["images"]["rows"] == 10 and manifest["note"] == "hello"
    records = Records(tmp_path / "ds", "train")
    assert len(records) == 50
    for i in (0, 15, 16, 31, 49):  # across shard borders
        r = records[i]
        assert r["id"] == f"r{i}" and r["captions"] == [f"caption {i} 0", f"caption {i} 1"]
        assert r["image_bytes"] == bytes([i % 10]) * 5
    assert records.column("id") == [f"r{i}" for i in range(50)]
    with pytest.raises(IndexError):
        records[50]


def test_same_input_same_bytes_and_unchanged_dataset_is_left_alone(tmp_path):
    first = write_small(tmp_path / "ds")
    mtime = os.stat(tmp_path / "ds" / "manifest.json").st_mtime_ns
    second = write_small(tmp_path / "ds")
    assert first["content_hash"] == second["content_hash"]
    assert os.stat(tmp_path / "ds" / "manifest.json").st_mtime_ns == mtime
    third = write_small(tmp_path / "ds", captions_per=1)
    assert third["content_hash"] != first["content_hash"]
    assert Records(tmp_path / "ds", "train")[0]["captions"] == ["caption 0 0"]


def test_failed_write_leaves_previous_dataset_and_no_partial(tmp_path):
    write_small(tmp_path / "ds")
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path / "ds", name="toy", family="pretrain", source={}) as writer:
            writer.add_image("a", StoredImage(b"x", "png", 1, 1))
            writer.write_split("train", [{"id": "x", "image": 0, "captions": ["new"]}])
            raise RuntimeError("killed half-way")
    assert Records(tmp_path / "ds", "train")[0]["captions"] == ["caption 0 0", "caption 0 1"]
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_killed_writer_leftovers_are_never_read_and_are_cleaned(tmp_path):
    stale = tmp_path / ".ds.partial-99999"
    stale.mkdir()
    (stale / "train-00000.arrow").write_bytes(b"half a shard")
    with pytest.raises(DataError, match="not a prepared dataset"):
        Records(tmp_path / "ds", "train")
    write_small(tmp_path / "ds")
    assert not stale.exists()


def test_manifest_errors_are_one_line(tmp_path):
    write_small(tmp_path / "ds")
    with pytest.raises(DataError, match="no split 'val'; it has train, test"):
        Records(tmp_path / "ds", "val")
    (tmp_path / "ds" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable manifest"):
        read_manifest(tmp_path / "ds")


class _Ids(Dataset):
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        return torch.tensor([int(r["id"][1:]), r["image_bytes"][0], os.getpid()])


def test_random_access_from_worker_processes_and_distributed_sampler(tmp_path):
    write_small(tmp_path / "ds", n=64)
    records = Records(tmp_path / "ds", "train")
    records[0]  # open the maps in the parent: workers must open their own
    assert len(pickle.dumps(records)) < 4000  # only paths travel, never the data
    seen = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(_Ids(records), num_replicas=2, rank=rank, shuffle=True, seed=1)
        loader = DataLoader(_Ids(records), batch_size=8, sampler=sampler, num_workers=2)
        rows = torch.cat(list(loader))
        assert (rows[:, 1] == rows[:, 0] % 10).all()
        assert set(rows[:, 2].tolist()) - {os.getpid()}  # read in the workers
        seen += rows[:, 0].tolist()
    assert sorted(seen) == list(range(64))
