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

from qwen3vl_testing import wandb_offline
from qwen3vl.train.loss_plot import STAGE_COLOUR
from qwen3vl.train.metrics import METRICS_FILE, MetricsWriter, plot_loss, read_events, read_metrics
from qwen3vl.train.wandb_run import WandbError, WandbRun

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
        _log(w, step, model_flops=1e13, skipped={"too_long": step}, peak_memory_bytes=3 * 2 ** 29)
    line = w.stream.getvalue().splitlines()[-1]
    assert line.startswith("stage0_align step 3/100 (3%) | loss 3.3333 | lr 1.00e-04 | gnorm 0.500")
    assert "500 tok/s" in line and "5 TFLOP/s/GPU" in line and "skipped 3" in line and "mem 1.50 GiB" in line
    assert line.endswith("ETA 0:03:14")  # 97 steps left at 2 s each
    stops_early = _writer(tmp_path / "b", total_steps=30, horizon=100)
    _log(stops_early, 3)
    assert stops_early.stream.getvalue().startswith("step 3/30 of 100 (10%) |")  # where it stops, of the stage


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


def test_wandb_offline_records_every_field_at_its_step_in_one_run_across_resumes(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    first = _writer(tmp_path, wandb_cfg=_WandbCfg(), config={"stage": "s0"})
    logged = [_log(first, step, skipped={"too_long": step}, peak_memory_bytes=2 ** 30, data_wait_s=0.25)
              for step in (1, 2, 3)]
    first.close(plot=False)
    resumed = _writer(tmp_path, wandb_cfg=_WandbCfg(), start_step=2)  # the checkpoint was at step 2
    logged[2] = _log(resumed, 3, loss=0.5)  # step 3 runs again after the resume
    resumed.close(plot=False)
    assert read_metrics(tmp_path) == logged
    runs = wandb_offline.offline_runs(tmp_path)
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert [wandb_offline.run_id(r) for r in runs] == [run_id, run_id]  # one wandb run, resumed
    before, after = wandb_offline.history(runs[0]), wandb_offline.history(runs[1])
    assert sorted(before) == [1, 2, 3] and sorted(after) == [3]
    for record, row in zip(logged, (before[1], before[2], after[3])):
        flat = wandb_offline.flatten(record)
        assert {k: row.get(k, "missing") for k in flat} == flat  # nested as skipped.too_long, nulls kept
    summary = wandb_offline.summary(runs[1])
    assert (summary["run_id"], summary["summary"]["loss"]) == (run_id, 0.5)
    assert wandb_offline.summary(runs[0])["config"] == {"stage": "s0"}


def test_wandb_that_cannot_start_is_said_once_offline_and_an_error_online(tmp_path, monkeypatch):
    broken = types.ModuleType("wandb")

    def init(**kw):
        raise RuntimeError("no network")

    broken.init, broken.Settings = init, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "wandb", broken)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    w = _writer(tmp_path, wandb_cfg=_WandbCfg())
    _log(w, 1)
    _log(w, 2)
    said = [line for line in w.stream.getvalue().splitlines() if line.startswith("wandb:")]
    assert said == [f"wandb: the offline run could not start (RuntimeError: no network); this run is NOT "
                    f"recorded in wandb, {tmp_path / METRICS_FILE} has every step (wandb.mode=disabled silences "
                    "this)"]
    assert len(read_metrics(tmp_path)) == 2
    with pytest.raises(WandbError, match="wandb.mode=online but wandb could not start: no network.*WANDB_API_KEY"):
        _writer(tmp_path, wandb_cfg=_WandbCfg(mode="online"), start_step=2)
    monkeypatch.setenv("WANDB_MODE", "online")  # the environment counts when the config keeps the default
    with pytest.raises(WandbError):
        _writer(tmp_path, wandb_cfg=_WandbCfg(), start_step=2)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _writer(tmp_path, wandb_cfg=_WandbCfg(), start_step=2)._wandb is None


def test_a_failing_wandb_log_is_said_once_and_never_stops_training(tmp_path):
    class Run:
        def log(self, record, step):
            raise OSError("disk full")

        def finish(self):
            pass

    w = _writer(tmp_path)
    w._wandb = WandbRun(Run(), w.stream)
    for step in (1, 2, 3):
        _log(w, step)
    assert len(read_metrics(tmp_path)) == 3
    assert [line for line in w.stream.getvalue().splitlines() if line.startswith("wandb:")] == [
        "wandb: logging failed at step 1 (disk full); later steps go to metrics.jsonl only"]


def test_events_are_lines_of_their_own(tmp_path):
    w = _writer(tmp_path)
    _log(w, 1)
    _log(w, 2)
    w.event("schedule_replanned", 2, changes=["optim.lr: saved 1, new 2"])
    w2 = _writer(tmp_path, start_step=2)  # a resume keeps the event at the resumed step
    _log(w2, 3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3] and read_metrics(tmp_path)[-1]["tokens_total"] == 3000
    assert [(e["event"], e["step"], e["changes"]) for e in read_events(tmp_path)] == [
        ("schedule_replanned", 2, ["optim.lr: saved 1, new 2"])]


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


def test_the_all_stages_plot_marks_where_each_stage_starts(tmp_path):
    lines = [{"step": step, "loss": 5.0 - step / 30, "stage": "s0" if step <= 30 else "s1"} for step in range(1, 91)]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    image = Image.open(plot_loss(tmp_path)).convert("RGB")
    grey = [x for x in range(image.width) if sum(image.getpixel((x, y)) == STAGE_COLOUR for y in range(image.height)) > 100]
    x0, x1 = 80, 900 - 30  # the plot area (steps 1 .. 90); the first stage's line is the y axis
    assert [round(x0 + (31 - 1) / 89 * (x1 - x0))] == grey  # s1 starts at step 31


def test_plot_without_points_still_writes_a_png(tmp_path):
    path = plot_loss(tmp_path)
    assert Image.open(path).size == (900, 500)
    (tmp_path / METRICS_FILE).write_text(json.dumps({"step": 1, "loss": None}) + "\n")
    assert Image.open(plot_loss(tmp_path, tmp_path / "x.png")).size == (900, 500)


def slow_rank_body(cfg, rows) -> int:
    """Rank 1's batch of step 2 arrives 0.4 s late; returns this rank's peak RSS after the run."""
    import resource
    import time

    import torch.distributed as dist

    from qwen3vl.train import loop
    from qwen3vl_testing.training import train_on_rows

    draws, original = {"n": 0}, loop.draw_microbatches

    def draw(loader, n):
        draws["n"] += 1
        if dist.get_rank() == 1 and draws["n"] == 2:
            time.sleep(0.4)
        return original(loader, n)

    loop.draw_microbatches = draw  # this pool worker runs other tests later: restored below
    try:
        train_on_rows(cfg, rows, metrics=True)
    finally:
        loop.draw_microbatches = original
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_data_wait_and_peak_memory_are_the_largest_over_the_ranks(demo_dir, tmp_path):
    """data_wait_s is the time a step waited for its batch (here rank 1's late one), peak_memory_bytes the
    peak RSS of the largest rank (CPU), both in every metrics.jsonl line."""
    from qwen3vl_testing.distributed import run_distributed
    from qwen3vl_testing.training import fixed_rows, tiny_config

    cfg = tiny_config(str(tmp_path / "run"), demo_dir, world_size=2, steps=3)
    peaks = run_distributed(slow_rank_body, world_size=2, timeout=300, cfg=cfg, rows=fixed_rows(cfg, 3, 2))
    records = read_metrics(tmp_path / "run")
    waits = [r["data_wait_s"] for r in records]
    assert waits[1] >= 0.4 and waits[0] < 0.4 and waits[2] < 0.4, waits
    memory = [r["peak_memory_bytes"] for r in records]
    assert memory == sorted(memory) and 2 ** 20 < memory[-1] <= max(peaks), (memory, peaks)


@dataclass
class _EvalResult:  # what qwen3vl.train.evaluate gives the writer
    dataset: str
    loss_token_mean: float
    loss_sqrt: float
    tokens: int

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "loss_token_mean": self.loss_token_mean, "loss_sqrt": self.loss_sqrt,
                "tokens": self.tokens, "perplexity": math.exp(self.loss_token_mean)}


class _RecordingRun:
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log(self, record, step):
        self.logged.append((step, dict(record)))

    def finish(self):
        pass


def test_an_evaluation_is_an_event_per_dataset_a_wandb_entry_and_one_console_line(tmp_path):
    w = _writer(tmp_path, label="s1")
    run = _RecordingRun()
    w._wandb = WandbRun(run, w.stream)
    _log(w, 1)
    w.eval(1, [_EvalResult("heldout", 2.0, 2.5, 300), _EvalResult("text", float("nan"), float("nan"), 0)])
    events = read_events(tmp_path)
    assert [{k: e[k] for k in ("event", "step", "dataset", "loss_token_mean", "loss_sqrt", "tokens")} for e in events] == [
        {"event": "eval", "step": 1, "dataset": "heldout", "loss_token_mean": 2.0, "loss_sqrt": 2.5, "tokens": 300},
        {"event": "eval", "step": 1, "dataset": "text", "loss_token_mean": None, "loss_sqrt": None, "tokens": 0}]
    assert events[0]["perplexity"] == pytest.approx(math.exp(2.0))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]  # evaluations are not steps
    line = w.stream.getvalue().splitlines()[-1]
    assert line == "s1 eval step 1 | heldout loss 2.0000 (sqrt 2.5000, ppl 7.389, 300 tokens) | text loss nan " \
                   "(sqrt nan, ppl nan, 0 tokens)"
    step, logged = run.logged[-1]
    assert step == 1 and logged["eval/heldout/loss_token_mean"] == 2.0 and logged["eval/heldout/loss_sqrt"] == 2.5
    assert logged["eval/heldout/tokens"] == 300 and logged["eval/heldout/perplexity"] == pytest.approx(math.exp(2.0))
    assert logged["eval/text/loss_sqrt"] is None


def test_log_interval_thins_the_console_and_wandb_but_not_the_file(tmp_path):
    w = _writer(tmp_path, total_steps=7, log_interval=3)
    run = _RecordingRun()
    w._wandb = WandbRun(run, w.stream)
    for step in range(1, 8):
        _log(w, step)
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 8))
    assert [line.split("/")[0] for line in w.stream.getvalue().splitlines()] == ["step 3", "step 6", "step 7"]
    assert [step for step, _ in run.logged] == [3, 6, 7]  # every 3rd step and the last


def test_evaluations_are_points_on_the_loss_plot(tmp_path):
    from qwen3vl.train.loss_plot import EVAL_COLOURS

    w = _writer(tmp_path, total_steps=20)
    for step in range(1, 21):
        _log(w, step, loss=3.0 - step / 10)
        if step % 10 == 0:
            w.eval(step, [_EvalResult("heldout", 2.5, 2.6, 100)])
    image = Image.open(w.close()).convert("RGB")
    points = [(x, y) for x in range(image.width) for y in range(image.height) if image.getpixel((x, y)) == EVAL_COLOURS[0]]
    assert points, "no evaluation point drawn"
    x0, x1 = 80, 900 - 30
    centres = {round(x0 + (s - 1) / 19 * (x1 - x0)) for s in (10, 20)}
    assert all(any(abs(x - c) <= 4 for x, _ in points) for c in centres)  # one point at each evaluated step
