"""Samples to batches: the resumable sample stream, per-sample seeding, bad samples counted, not fatal."""

from __future__ import annotations

import torch
from helpers import png_bytes

from medvlp.data.collate import Collator
from medvlp.data.loader import Concat, FamilyDataset, collate, make_loader
from medvlp.data.prepare import PrepareConfig
from medvlp.data.records import DatasetWriter, StoredImage
from medvlp.data.registry import prepare
from medvlp.data.sampler import StreamSampler
from medvlp.data.tokenizer import train_tokenizer


def test_stream_resumes_exactly_and_splits_across_ranks():
    full = list(StreamSampler(10, 4, 6, seed=3))
    assert len(full) == 24 and [k for k, _ in full] == list(range(24))
    rows_of_pass = [row for key, row in full if key < 10]
    assert sorted(rows_of_pass) == list(range(10)) and rows_of_pass != list(range(10))  # a permutation
    assert [r for k, r in full if 10 <= k < 20] != rows_of_pass  # each pass reshuffled
    resumed = StreamSampler(10, 4, 6, seed=3)
    resumed.start_batch = 2
    assert list(resumed) == full[8:]
    assert len(resumed) == len(full)  # the loop counts the batches before the checkpoint: the stream's length
    ranks = [list(StreamSampler(10, 4, 3, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(k for rank in ranks for k, _ in rank) == list(range(24))
    assert [k for k, _ in ranks[1][:4]] == [4, 5, 6, 7]  # global batch 1 goes to rank 1


def test_vqa_examples_and_per_key_randomness(raw_vqa_rad, tmp_path):
    prepare("vqa_rad", raw_vqa_rad(), tmp_path / "vqa")
    train = FamilyDataset(tmp_path / "vqa", "train", 32, train=True)
    a, b, other = train[(5, 0)], train[(5, 0)], train[(6, 0)]
    assert a["pixels"].shape[1:] == (32, 32) and a["pixels"].dtype == torch.uint8
    assert torch.equal(a["pixels"], b["pixels"]) and not torch.equal(a["pixels"], other["pixels"])
    assert a["text"] == "Is there a finding 0?" and a["answer"] == train.answer_index["yes"] and a["closed"]
    test = FamilyDataset(tmp_path / "vqa", "test", 32, train=False)
    assert test[0]["answer"] == test.answer_index["left lung"] and not test[0]["closed"]


def _pretrain_with_a_broken_image(out):
    with DatasetWriter(out, name="toy", family="pretrain", source={}) as writer:
        good = writer.add_image("good", StoredImage(png_bytes(), "png", 48, 48))
        broken = writer.add_image("broken", StoredImage(b"\x89PNG broken", "png", 48, 48))
        rows = [{"id": str(i), "image": broken if i == 3 else good, "captions": [f"a scan number {i}", "b"]}
                for i in range(8)]
        writer.write_split("train", rows)
        writer.commit()


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    _pretrain_with_a_broken_image(tmp_path / "pre")
    dataset = FamilyDataset(tmp_path / "pre", "train", 32, train=True)
    assert dataset[3] is None
    tokenizer = train_tokenizer([f"a scan number {i}" for i in range(50)], tmp_path / "tok", vocab_size=300)
    sampler = StreamSampler(len(dataset), 4, 2, shuffle=False)
    loader = make_loader(dataset, Collator(tokenizer), batch_size=4, num_workers=0, sampler=sampler)
    first, second = list(loader)
    assert first["n_bad"] == 1 and first["n"] == 3 and first["pixels"].shape[0] == 3
    assert second["n_bad"] == 0 and second["n"] == 4
    assert collate(Collator(tokenizer), [None, None]) == {"n_bad": 2, "n": 0}


def test_masking_is_seeded_by_the_batch_not_the_worker(tmp_path):
    _pretrain_with_a_broken_image(tmp_path / "pre")
    dataset = FamilyDataset(tmp_path / "pre", "train", 32, train=True)
    tokenizer = train_tokenizer([f"a scan number {i}" for i in range(50)], tmp_path / "tok", vocab_size=300)
    collator = Collator(tokenizer, mlm_probability=0.5)
    batches = []
    for workers in (0, 2):
        loader = make_loader(dataset, collator, batch_size=4, num_workers=workers,
                             sampler=StreamSampler(len(dataset), 4, 4, seed=1))
        batches.append([b["mlm_input_ids"] for b in loader])
    assert all(torch.equal(x, y) for x, y in zip(*batches))


def test_concat_reads_several_datasets_as_one(raw_vqa_rad, tmp_path):
    raw = raw_vqa_rad()
    prepare("vqa_rad", raw, tmp_path / "a")
    prepare("vqa_rad", raw, tmp_path / "b", PrepareConfig(max_short_side=20))
    both = Concat([FamilyDataset(tmp_path / n, "test", 16, train=False) for n in "ab"])
    assert len(both) == 10 and both[7]["text"] == both[2]["text"]
    assert both[(99, 7)]["key"] == 99



def test_decoded_images_are_reused_bounded_and_not_pickled(monkeypatch):
    import pickle

    from medvlp.data import loader

    decoded = []
    real_decode = loader.decode_image
    monkeypatch.setattr(loader, "decode_image", lambda data, size_hint=None: decoded.append(data) or
                        real_decode(data, size_hint))
    images = {k: png_bytes(32, seed=k) for k in range(3)}  # 32 x 32 grey: 1,024 bytes decoded
    cache = loader.DecodedImages(max_bytes=2 * 1024)
    first = cache.get(0, images[0], None)
    assert cache.get(0, images[0], None) is first and len(decoded) == 1  # decoded once, then reused
    cache.get(1, images[1], None)
    cache.get(0, images[0], None)  # 0 is now the most recently used
    cache.get(2, images[2], None)  # over budget: 1, the least recently used, goes
    assert list(cache.images) == [0, 2] and cache.bytes == 2 * 1024 and len(decoded) == 3
    cache.get(1, images[1], None)
    assert len(decoded) == 4  # 1 had to be decoded again
    assert pickle.loads(pickle.dumps(cache)).images == {}  # each worker fills its own
    none = loader.DecodedImages(max_bytes=0)
    none.get(0, images[0], None), none.get(0, images[0], None)
    assert len(decoded) == 6 and not none.images
