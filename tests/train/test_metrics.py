"""metrics.jsonl (one fsynced line per step, cut back on resume), the progress line, wandb, the loss plot."""
from __future__ import annotations

import io
import json
import math
import sys
import types
from dataclasses import dataclass, field

import pytest
from PIL import Image

from qwen3vl.train.metrics import METRICS_FILE, MetricsWriter, plot_loss, read_metrics

REQUIRED = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_total", "tokens_per_s", "tflops_per_s", "mfu",
            "skipped"}


def _writer(run_dir, **kw) -> MetricsWriter:
    kw.setdefault("total_steps", 10)
    return MetricsWriter(run_dir, stream=io.StringIO(), **kw)


def _log(w: MetricsWriter, step: int, **kw) -> dict:
    args = dict(loss=10.0 / step, lr=1e-4, grad_norm=0.5, tokens=1000, step_time_s=2.0)
    args.update(kw)
    return w.log(step, **args)


def test_one_line_per_step_with_the_required_fields(tmp_path):
    w = _writer(tmp_path, world_size=4, peak_tflops=989.0)
    _log(w, 1, model_flops=4 * 989e12, skipped={"corrupt_image": 2})
    records = read_metrics(tmp_path)
    assert len(records) == 1 and REQUIRED <= set(records[0])
    r = records[0]
    assert (r["step"], r["tokens"], r["tokens_total"], r["tokens_per_s"]) == (1, 1000, 1000, 500.0)
    assert r["tflops_per_s"] == pytest.approx(989.0 / 2) and r["mfu"] == pytest.approx(0.5)  # per GPU
    assert r["skipped"] == {"corrupt_image": 2}


def test_progress_line_has_loss_rates_and_eta(tmp_path):
    w = _writer(tmp_path, total_steps=100, label="stage0_align")
    for step in range(1, 4):
        _log(w, step, model_flops=1e13, skipped={"too_long": step})
    line = w.stream.getvalue().splitlines()[-1]
    assert line.startswith("stage0_align step 3/100 (3%) | loss 3.3333 | lr 1.00e-04 | gnorm 0.500")
    assert "500 tok/s" in line and "5 TFLOP/s/GPU" in line and "skipped 3" in line
    assert line.endswith("ETA 0:03:14")  # 97 steps left at 2 s each


def test_resume_cuts_the_file_back_to_the_resumed_step(tmp_path):
    w = _writer(tmp_path)
    for step in range(1, 9):
        _log(w, step)
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 9, "loss": 1.')  # torn by a crash mid-write
    w2 = _writer(tmp_path, start_step=5)  # the checkpoint was at step 5: steps 6-8 run again
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    for step in range(6, 9):
        _log(w2, step)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["tokens_total"] == 8000  # the running total continues from step 5
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 8


def test_non_finite_loss_is_written_as_null_and_other_ranks_write_nothing(tmp_path):
    w = _writer(tmp_path)
    _log(w, 1, loss=math.nan, grad_norm=math.inf, skipped={"nonfinite_loss": 1})
    assert read_metrics(tmp_path)[0]["loss"] is None
    assert "loss nan" in w.stream.getvalue()
    other = tmp_path / "rank1"
    off = _writer(other, enabled=False)
    assert _log(off, 1)["tokens_per_s"] == 500.0
    assert not other.exists() and off.close() is None


@dataclass
class _WandbCfg:
    mode: str = "offline"
    project: str = "p"
    entity: str | None = None
    name: str | None = "n"
    tags: list = field(default_factory=list)


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}
    module = types.ModuleType("wandb")
    module.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    module.init = lambda **kw: calls["init"].append(kw)
    module.log = lambda data, step: calls["log"].append((step, data))
    module.finish = lambda: calls.__setitem__("finish", calls["finish"] + 1)
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return calls


def test_wandb_is_offline_unless_configured_and_keeps_its_run_id(tmp_path, fake_wandb, monkeypatch):
    w = _writer(tmp_path, wandb_cfg=_WandbCfg(), config={"stage": "s0"})
    _log(w, 1)
    w.close(plot=False)
    init = fake_wandb["init"][0]
    assert (init["mode"], init["id"], init["resume"], init["config"]) == ("offline", "abc123", "allow", {"stage": "s0"})
    assert fake_wandb["log"][0][0] == 1 and fake_wandb["log"][0][1]["loss"] == 10.0 and fake_wandb["finish"] == 1
    monkeypatch.setenv("WANDB_MODE", "online")
    module = sys.modules["wandb"]
    module.util.generate_id = lambda: "other"
    _writer(tmp_path, wandb_cfg=_WandbCfg(), start_step=1)
    assert (fake_wandb["init"][1]["mode"], fake_wandb["init"][1]["id"]) == ("online", "abc123")  # resumed run
    _writer(tmp_path, wandb_cfg=_WandbCfg(mode="disabled"), start_step=1)
    assert len(fake_wandb["init"]) == 2


def test_a_failing_wandb_never_stops_training(tmp_path, fake_wandb):
    def broken(**kw):
        raise RuntimeError("no network")

    sys.modules["wandb"].init = broken
    with pytest.warns(UserWarning, match="wandb is not available"):
        w = _writer(tmp_path, wandb_cfg=_WandbCfg())
    _log(w, 1)
    assert len(read_metrics(tmp_path)) == 1


def test_loss_plot_is_a_drawn_png(tmp_path):
    w = _writer(tmp_path, total_steps=60)
    for step in range(1, 61):
        _log(w, step, loss=3.0 * math.exp(-step / 20) + 0.5 + 0.05 * math.sin(step))
    path = w.close()
    assert path == tmp_path / "loss.png"
    image = Image.open(path).convert("RGB")
    assert image.size == (900, 500)
    colours = {c for _, c in image.getcolors(maxcolors=100000)}
    assert (8, 81, 156) in colours and (158, 202, 225) in colours  # the average and the raw loss
    # The curve falls: the smoothed line's pixels sit lower (larger y) on the right than on the left.
    pixels = image.load()
    ys = lambda x0, x1: [y for x in range(x0, x1) for y in range(500) if pixels[x, y] == (8, 81, 156)]  # noqa: E731
    assert min(ys(90, 150)) < min(ys(800, 860)) - 200


def test_plot_without_points_still_writes_a_png(tmp_path):
    path = plot_loss(tmp_path)
    assert Image.open(path).size == (900, 500)
    (tmp_path / METRICS_FILE).write_text(json.dumps({"step": 1, "loss": None}) + "\n")
    assert Image.open(plot_loss(tmp_path, tmp_path / "x.png")).size == (900, 500)
