"""Shard writing (rollover), addressing (braces, directories, pipe:) and reading, including broken tars."""
import hashlib
import io
import tarfile

import pytest

from qwen3vl.data.sample_format import RawSample
from qwen3vl.data.shards import ShardWriter, SkippedRecord, check_shards_exist, expand_shards, read_shard


def write(out, n, **kw):
    with ShardWriter(out, "part", **kw) as writer:
        for i in range(n):
            writer.write(f"s{i:03d}", {"kind": "caption", "images": ["0.jpg"], "text": f"t{i}"},
                         {"0.jpg": bytes([i % 256]) * (100 + i)})
    return writer.paths


def test_round_trip_keeps_json_media_and_order(tmp_path):
    paths = write(tmp_path, 5, max_samples=None)
    records = list(read_shard(str(paths[0])))
    assert [r.key for r in records] == [f"s{i:03d}" for i in range(5)]
    assert all(isinstance(r, RawSample) and r.shard == str(paths[0]) for r in records)
    assert records[3].meta == {"kind": "caption", "images": ["0.jpg"], "text": "t3"}
    assert records[3].media == {"0.jpg": bytes([3]) * 103}


def test_rollover_by_samples_and_by_bytes(tmp_path):
    assert [len(list(read_shard(str(p)))) for p in write(tmp_path / "n", 10, max_samples=4)] == [4, 4, 2]
    # each sample is 4 tar blocks of 512 bytes: a header and a data block for its json and its image
    by_bytes = write(tmp_path / "b", 10, max_samples=None, max_bytes=3 * 2048)
    counts = [len(list(read_shard(str(p)))) for p in by_bytes]
    assert counts == [3, 3, 3, 1]


def test_writer_is_deterministic(tmp_path):
    a, b = write(tmp_path / "a", 6, max_samples=4), write(tmp_path / "b", 6, max_samples=4)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert [digest(p) for p in a] == [digest(p) for p in b]


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ValueError, match="dot"):
        ShardWriter(tmp_path).write("a.b", {"kind": "text", "text": "x"})


def test_expand_braces_directories_and_lists(tmp_path):
    paths = [str(p) for p in write(tmp_path, 9, max_samples=3)]
    assert expand_shards(str(tmp_path / "part-{000000..000002}.tar")) == paths
    assert expand_shards(str(tmp_path)) == paths
    assert expand_shards(f"{paths[2]}::{paths[0]}") == [paths[2], paths[0]]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shards"):
        expand_shards(str(tmp_path / "empty"))


def test_missing_shard_is_an_error_naming_it(tmp_path):
    write(tmp_path, 3, max_samples=3)
    urls = expand_shards(str(tmp_path / "part-{000000..000001}.tar"))
    with pytest.raises(FileNotFoundError, match="part-000001.tar does not exist"):
        check_shards_exist(urls)
    check_shards_exist(["pipe:cat whatever.tar"])  # remote addresses are checked when read


def test_pipe_urls_are_read(tmp_path):
    (path,) = write(tmp_path, 3, max_samples=None)
    assert [r.key for r in read_shard(f"pipe:cat {path}")] == ["s000", "s001", "s002"]


def test_failing_pipe_and_empty_file_are_records(tmp_path):
    (failed,) = read_shard(f"pipe:cat {tmp_path}/no-such-shard.tar 2>/dev/null")
    assert failed.reason == "unreadable_shard" and "no-such-shard" in failed.shard
    (tmp_path / "empty.tar").write_bytes(b"")
    (empty,) = read_shard(str(tmp_path / "empty.tar"))
    assert empty.reason == "truncated_tar"


def test_truncated_tar_yields_samples_before_the_cut_then_one_record(tmp_path):
    (path,) = write(tmp_path, 6, max_samples=None)
    with tarfile.open(path) as tar:
        cut = tar.getmember("s004.0.jpg").offset_data + 50
    path.write_bytes(path.read_bytes()[:cut])  # cut inside the 5th sample's image
    records = list(read_shard(str(path)))
    assert [r.key for r in records[:4]] == ["s000", "s001", "s002", "s003"]
    assert all(isinstance(r, RawSample) for r in records[:4])
    last = records[-1]
    assert isinstance(last, SkippedRecord) and last.reason == "truncated_tar" and last.shard == str(path)
    assert len(records) == 5


def test_missing_and_invalid_json_are_records_not_crashes(tmp_path):
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.0.jpg", b"x"), ("b.json", b"{not json"), ("c.json", b"[1, 2]"),
                           ("d.json", b'{"kind": "text", "text": "ok"}')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    records = list(read_shard(str(path)))
    assert [(r.key, getattr(r, "reason", "ok")) for r in records] == [
        ("a", "missing_json"), ("b", "bad_json"), ("c", "bad_json"), ("d", "ok")]
