"""MRoPE position ids equal transformers' Qwen3-VL get_rope_index."""
import pytest
import torch

from qwen3vl.data.batch import IMAGE, TEXT, VIDEO
from qwen3vl_testing.hf_processing import hf_rope_index
from qwen3vl.data.rope_index import get_rope_index

VS, VE, IMG, VID = 151652, 151653, 151655, 151656


def build(items, seed=0):
    """items: ints (text tokens), ("image", h, w) or ("video", t, h, w) in the 5.x video layout."""
    g = torch.Generator().manual_seed(seed)
    ids, types, images, videos = [], [], [], []

    def text(n):
        ids.extend(torch.randint(0, 1000, (n,), generator=g).tolist())
        types.extend([TEXT] * n)

    for item in items:
        if isinstance(item, int):
            text(item)
        elif item[0] == "image":
            _, h, w = item
            images.append([1, h, w])
            ids.extend([VS] + [IMG] * (h * w // 4) + [VE])
            types.extend([TEXT] + [IMAGE] * (h * w // 4) + [TEXT])
        else:
            _, t, h, w = item
            videos.append([t, h, w])
            ids.append(VS), types.append(TEXT)
            for _ in range(t):
                text(5)  # timestamp text such as "<1.3 seconds>"
                ids.extend([VS] + [VID] * (h * w // 4) + [VE])
                types.extend([TEXT] + [VIDEO] * (h * w // 4) + [TEXT])
            ids.append(VE), types.append(TEXT)
    grids = lambda rows: torch.tensor(rows, dtype=torch.long) if rows else None  # noqa: E731
    return torch.tensor(ids), torch.tensor(types), grids(images), grids(videos)


def test_spec_example():
    ids, types, image, _ = build([2, ("image", 4, 6), 1])
    positions = get_rope_index(ids, image, None, types)
    assert positions.tolist() == [[0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7],
                                  [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],
                                  [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]]


@pytest.mark.parametrize("items", [
    [7],
    [("image", 2, 2)],
    [3, ("image", 4, 6), 2, ("image", 8, 2), 4],
    [("video", 3, 4, 4), 6],
    [4, ("image", 6, 10), 3, ("video", 2, 8, 6), 2, ("image", 2, 4), ("video", 4, 2, 2), 1],
])
def test_matches_transformers(items):
    ids, types, image, video = build(items, seed=len(items))
    ours = get_rope_index(ids, image, video, types)
    assert ours.dtype == torch.long and ours.shape == (3, ids.numel())
    assert torch.equal(ours, hf_rope_index(ids, types, image, video))


def test_text_only_is_arange_on_all_rows():
    ids, types, _, _ = build([9])
    assert torch.equal(get_rope_index(ids, None, None, types), torch.arange(9).expand(3, 9))


def test_inconsistent_grids_say_what_is_wrong():
    ids, types, image, _ = build([2, ("image", 4, 6), 1])
    with pytest.raises(ValueError, match="its grid needs"):
        get_rope_index(ids, torch.tensor([[1, 4, 4]]), None, types)
    with pytest.raises(ValueError, match="more image runs"):
        get_rope_index(ids, None, None, types)
    with pytest.raises(ValueError, match="2 image grids given but 1"):
        get_rope_index(ids, torch.cat([image, image]), None, types)
