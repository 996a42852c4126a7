"""Exact resume of the whole loader: shuffle blocks, mixture, packer buffer, worker processes.

A loader restored from ``state_dict()`` taken after k batches must yield exactly batches k+1... of
the uninterrupted loader (tokens, labels, positions, pixels compared bitwise)."""
import io
from collections import Counter

import pytest
import torch

from qwen3vl.data.demo import write_demo
from qwen3vl.data.loader import LoaderConfig, build_loader
from qwen3vl.data.shards import expand_shards, read_shard

FIELDS = ("tokens", "labels", "position_ids", "mm_token_type_ids", "cu_seqlens", "cu_seqlens_padded",
          "sample_loss_tokens", "pixel_values", "grid_thw")
SEQ = 512


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    manifest = write_demo(out, seed=4, captions=24, videos=4, interleaved=6, texts=16, samples_per_shard=8)
    return manifest["subsets"]


def config(corpus, kinds=("caption", "text", "interleaved", "video"), **kw):
    weights = {"caption": 2.0, "text": 1.0, "interleaved": 1.0, "video": 0.5}
    datasets = [(corpus[kind]["pattern"], weights[kind]) for kind in kinds]
    kw = {"shuffle_buffer": 5, "pack_buffer": 6, "num_epochs": 1, **kw}
    return LoaderConfig(datasets=datasets, **kw)


def assert_same(a, b):
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def run(cfg, skip=0, state=None, **layout):
    loader = build_loader(cfg, SEQ, pad_multiple=2, seed=7, **layout)
    if state is not None:
        loader.load_state_dict(state)
    for _ in range(skip):
        next(loader)
    return loader


@pytest.fixture(scope="module")
def uninterrupted(corpus):
    return list(run(config(corpus)))


def test_restored_loader_yields_exactly_the_remaining_batches(corpus, uninterrupted):
    cfg, full = config(corpus), uninterrupted
    assert len(full) >= 8
    for k in (3, len(full) - 2):
        interrupted = run(cfg, skip=k)
        buffer = io.BytesIO()
        torch.save(interrupted.state_dict(), buffer)  # as a checkpoint holds it: builtins only
        assert buffer.tell() < 20_000  # positions and provenance, never pixels
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        rest = list(run(cfg, state=state))
        assert len(rest) == len(full) - k
        for a, b in zip(rest, full[k:]):
            assert_same(a, b)
        assert interrupted.skipped_counts() == {}


def test_two_epochs_resume_across_the_epoch_boundary(corpus):
    cfg = config(corpus, kinds=("caption", "text"), num_epochs=2, shuffle_buffer=3)
    full = list(run(cfg))
    k = len(full) // 2 + 1
    rest = list(run(cfg, state=run(cfg, skip=k).state_dict()))
    assert len(rest) == len(full) - k
    for a, b in zip(rest, full[k:]):
        assert_same(a, b)


def test_worker_processes_resume_exactly(corpus):
    cfg = config(corpus)
    full = run(cfg, num_workers=2)
    batches = list(full)
    full.close()
    interrupted = run(cfg, skip=5, num_workers=2)
    state = interrupted.state_dict()
    interrupted.close()
    restored = run(cfg, state=state, num_workers=2)
    rest = list(restored)
    restored.close()
    assert len(rest) == len(batches) - 5
    for a, b in zip(rest, batches[5:]):
        assert_same(a, b)


def real_tokens(batches):
    return sum(int(b.cu_seqlens[-1]) for b in batches)


def test_ranks_and_workers_share_an_epoch_without_overlap(corpus, uninterrupted):
    """Every sample is packed by exactly one (rank, worker): the real tokens add up to one epoch's."""
    cfg = config(corpus)
    single = real_tokens(uninterrupted)
    split = 0
    for rank in range(2):
        loader = run(cfg, dp_rank=rank, dp_size=2, num_workers=2)
        split += real_tokens(loader)
        loader.close()
    assert split == single


def corpus_records(cfg) -> Counter:
    """Every (dataset, "<shard>:<key>") of the corpus, read straight from the shards."""
    return Counter((d.name, f"{url}:{record.key}") for d in cfg.datasets for url in expand_shards(d.path)
                   for record in read_shard(url))


def trained(batches) -> Counter:
    """(dataset, id, epoch) of every packed sample (chunks of one document count once: chunk 0)."""
    return Counter((o.dataset, o.id, o.epoch) for b in batches for o in b.samples if o.chunk == 0)


@pytest.mark.parametrize("hops", [[(2, 0, [3, 5]), (1, 0, None)],  # DP2 -> DP1
                                  [(1, 0, [4]), (3, 0, [2, 1, 3]), (2, 0, None)],  # DP1 -> DP3 -> DP2
                                  [(2, 0, [2, 6]), (1, 2, None)]],  # DP2 -> DP1 with two worker processes
                         ids=["dp2-dp1", "dp1-dp3-dp2", "dp2-dp1-workers2"])
def test_a_changed_layout_continues_with_every_sample_exactly_once(corpus, hops):
    """Stop mid-epoch (each rank at its own position, samples in the packers' buffers), continue under
    other data-parallel sizes and worker counts: over the whole run each sample of each of the two
    epochs is trained on exactly once."""
    cfg = config(corpus, num_epochs=2)
    seen, states = Counter(), None
    for dp_size, workers, steps in hops:
        loaders = [run(cfg, state=states, dp_rank=r, dp_size=dp_size, num_workers=workers) for r in range(dp_size)]
        for r, loader in enumerate(loaders):
            batches = list(loader) if steps is None else [next(loader) for _ in range(steps[r])]
            seen += trained(batches)
        states = [loader.state_dict() for loader in loaders]
        for loader in loaders:
            loader.close()
    records = corpus_records(cfg)
    assert set(records.values()) == {1}
    expected = Counter({(name, key, epoch): 1 for name, key in records for epoch in (0, 1)})
    assert seen == expected, (sorted((seen - expected).items())[:5], sorted((expected - seen).items())[:5])


def test_states_of_only_some_ranks_cannot_change_the_layout(corpus):
    cfg = config(corpus, num_epochs=None)
    state = run(cfg, skip=3, dp_rank=0, dp_size=2).state_dict()
    with pytest.raises(ValueError, match=r"saved with \{'dp_size': 2, 'num_workers': 0\}.*every one of the 2"):
        run(cfg, state=state)
    with pytest.raises(ValueError, match="version"):
        run(cfg, state={**state, "version": 1})
