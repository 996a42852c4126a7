"""``qwen3vl-data`` commands through their entry point, with the ``--json`` last-line contract."""
import io
import json

import pytest
from PIL import Image

from qwen3vl.data.cli import main
from qwen3vl.data.shards import expand_shards, read_shard


def run(capsys, *argv):
    assert main(list(argv)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return out, json.loads(out[-1]) if "--json" in argv else None


def jpeg(size=(48, 40)):
    out = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(out, format="JPEG")
    return out.getvalue()


def keys_and_meta(out_dir):
    return [(r.key, r.meta, r.media) for u in expand_shards(str(out_dir)) for r in read_shard(u)]


def test_build_llava(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "cat.jpg").write_bytes(jpeg())
    (tmp_path / "img" / "dog.png").write_bytes(jpeg())
    entries = [
        {"id": "a1", "image": "cat.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A blue card."}]},
        {"id": "a2", "image": "dog.png", "conversations": [  # no marker: the image goes first
            {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Blue."}]},
        {"id": "a3", "image": "missing.jpg", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "?"}]},
        {"id": "a4", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    _, report = run(capsys, "build", "--llava", str(tmp_path / "llava.json"), "--image-root", str(tmp_path / "img"),
                    "--out", str(tmp_path / "out"), "--samples-per-shard", "2", "--json")
    assert report["samples"] == 3 and report["skipped"] == {"missing_image": 1} and len(report["shards"]) == 2
    samples = keys_and_meta(tmp_path / "out")
    (_, first, media), (_, second, media2), (_, third, _) = samples
    assert first["messages"] == [
        {"role": "user", "content": [{"image": "0.jpg"}, {"text": "What is this?"}]},
        {"role": "assistant", "content": [{"text": "A blue card."}]}]
    assert first["kind"] == "conversation" and first["id"] == "a1" and media["0.jpg"] == jpeg()
    assert second["messages"][0]["content"] == [{"image": "0.png"}, {"text": "Describe."}] and "0.png" in media2
    assert third["messages"][1]["content"] == [{"text": "Hello!"}]


def test_build_jsonl_and_image_folder_with_bytes_per_shard(tmp_path, capsys):
    lines = [json.dumps({"text": f"document {i} " * 50}) for i in range(6)] + ["", json.dumps({"text": ""})]
    (tmp_path / "t.jsonl").write_text("\n".join(lines))
    _, report = run(capsys, "build", "--jsonl", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "text"),
                    "--bytes-per-shard", "3000", "--json")
    assert report["samples"] == 6 and report["skipped"] == {"empty_text": 1} and len(report["shards"]) >= 2
    assert [m["kind"] for _, m, _ in keys_and_meta(tmp_path / "text")] == ["text"] * 6

    folder = tmp_path / "pairs"
    folder.mkdir()
    for name in ("b", "a"):
        (folder / f"{name}.jpg").write_bytes(jpeg())
        (folder / f"{name}.txt").write_text(f"caption {name}\n")
    (folder / "lonely.png").write_bytes(jpeg())
    _, report = run(capsys, "build", "--image-folder", str(folder), "--out", str(tmp_path / "cap"), "--json")
    assert report["samples"] == 2 and report["skipped"] == {"empty_text": 1}
    metas = [m for _, m, _ in keys_and_meta(tmp_path / "cap")]
    assert metas == [{"kind": "caption", "images": ["0.jpg"], "text": "caption a", "id": "a.jpg"},
                     {"kind": "caption", "images": ["0.jpg"], "text": "caption b", "id": "b.jpg"}]


def test_demo_then_inspect(tmp_path, capsys):
    out, manifest = run(capsys, "demo", "--out", str(tmp_path), "--json")
    subsets = manifest["subsets"]
    assert set(subsets) == {"caption", "video", "interleaved", "text", "heldout"}
    assert 300 <= sum(s["samples"] for s in subsets.values()) <= 500
    text, report = run(capsys, "inspect", subsets["video"]["pattern"], subsets["heldout"]["pattern"], "--json")
    assert report["samples"] == subsets["video"]["samples"] + subsets["heldout"]["samples"]
    assert report["skipped"] == {} and report["by_kind"] == {"caption": subsets["heldout"]["samples"],
                                                              "video": subsets["video"]["samples"]}
    assert report["image_longest_side_hist"] == {"<=256": subsets["heldout"]["samples"]}
    assert any(line.startswith("skipped: none") for line in text)


def test_demo_captions_sets_the_number_of_captioned_pictures(tmp_path, capsys):
    _, manifest = run(capsys, "demo", "--out", str(tmp_path), "--captions", "100", "--json")
    assert manifest["subsets"]["caption"]["samples"] == 100
    assert manifest["subsets"]["heldout"]["samples"] == 9  # the held-out split does not grow with it


def test_inspect_reports_skipped_samples_by_reason(tmp_path, capsys):
    from qwen3vl.data.shards import ShardWriter

    with ShardWriter(tmp_path, "x", max_samples=None) as writer:
        writer.write("ok", {"kind": "text", "text": "fine"})
        writer.write("broken", {"kind": "caption", "images": ["0.jpg"], "text": "x"}, {"0.jpg": b"not an image"})
        writer.write("empty", {"kind": "text", "text": ""})
    text, report = run(capsys, "inspect", str(tmp_path), "--json")
    assert report["samples"] == 1 and report["skipped"] == {"corrupt_image": 1, "empty_text": 1}
    assert any("corrupt_image: 1" in line and ":broken" in line for line in text)


def test_bench_json_contract(capsys):
    _, result = run(capsys, "bench", "--seq-length", "2048", "--rows", "2", "--samples", "12", "--pack-buffer", "16",
                    "--json")
    assert result["tokens_per_s_per_core"] > 0 and 0 < result["packing_efficiency"] <= 1
    assert result["skipped"] == {} and result["rows"] == 2


def test_build_needs_image_root_for_llava(tmp_path):
    with pytest.raises(SystemExit, match="--image-root"):
        main(["build", "--llava", str(tmp_path / "x.json"), "--out", str(tmp_path)])
