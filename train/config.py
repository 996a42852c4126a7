"""The typed training configuration: one schema for every stage, composed by Hydra from a recipe.

A recipe (``recipes/stage0_align.yaml`` ...) is YAML merged onto ``Qwen3VLTrainConfig`` (registered in
Hydra's ConfigStore as ``qwen3vl_train_schema``), so a misspelt key or a wrong type fails at compose time.
Config groups: ``model=<preset>`` (recipes/model/), ``data=<mix>`` (recipes/data/, ``data=demo`` is the
demo corpus built on first use). Everything that can be checked without a process group is checked by
``validate`` (qwen3vl.train.config_checks) before any rank starts.

Entry points: ``load_config(recipe, overrides, world_size)`` for the launcher, tests and scripts;
``config_from_hydra(dictconfig)`` for a ``@hydra.main`` app; ``run_shape(cfg, world_size)`` for the
numbers derived from the config (dp, rows, micro-batches, steps, the schedule's horizon, warmup).
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qwen3vl.parallel.layout import ParallelLayout
from qwen3vl.train import config_paths
from qwen3vl.train.schedule import plan_of

SCHEMA_NAME = "qwen3vl_train_schema"
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# Parts of the model that can be trained or frozen (train.trainable); "all" means every part.
TRAINABLE_PARTS = ("vision", "merger", "deepstack_merger", "llm")


class ConfigError(ValueError):
    """A training config that cannot run; the message names each field and what to change."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid training config ({len(self.problems)} problem(s)):\n{lines}")


class DecayStyle(str, enum.Enum):
    cosine = "cosine"
    linear = "linear"
    wsd = "wsd"  # warmup-stable-decay: constant after warmup, then a final decay phase
    constant = "constant"


class Device(str, enum.Enum):
    # The GPU of each rank when torch sees one, the CPU on a machine without NVIDIA GPUs (or with them
    # hidden, CUDA_VISIBLE_DEVICES=); an error on a machine whose GPUs torch cannot use. Slurm jobs: cuda.
    auto = "auto"
    cuda = "cuda"  # a GPU per rank, or an error saying why there is none
    cpu = "cpu"  # gloo and megatron's CPU backend, even where GPUs exist (they are hidden from the ranks)


class OnResume(str, enum.Enum):
    refuse = "refuse"  # a resume that would change the saved schedule stops with an error (the default)
    replan = "replan"  # continue from the resumed step under the new schedule; recorded in metrics.jsonl


class Precision(str, enum.Enum):
    auto = "auto"  # bf16 on GPU, fp32 on CPU
    bf16 = "bf16"
    fp32 = "fp32"


@dataclass
class ModelCfg:
    preset: str = "8B"  # a name from qwen3vl.model.presets.PRESET_NAMES
    # Architecture numbers changed on the preset, e.g. +model.overrides.text.num_layers=8 on the command line.
    overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ParallelCfg:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # virtual stages per pipeline rank (interleaved 1F1B); null = off
    cp: int = 1
    ep: int = 1
    etp: Optional[int] = None  # expert tensor parallel; null = same as tp
    sequence_parallel: bool = False
    # Explicit uneven split: LLM layers per (virtual) pipeline stage, 0 allowed; null = even split.
    pipeline_layers: Optional[List[int]] = None
    cp_comm_type: str = "p2p"  # p2p is the one that supports packed (THD) rows on every TE 2.x
    # Data-parallel gradient reduction (megatron DDP): overlapped with the backward pass, in buckets of
    # ddp_bucket_size parameters (null: megatron's default, max(40M, 1M·dp)). The same on CPU and GPU.
    overlap_grad_reduce: bool = True
    ddp_bucket_size: Optional[int] = None

    def layout(self) -> ParallelLayout:
        """The layout these fields describe (the one conversion; validate it with the model's sizes)."""
        return ParallelLayout(tp=self.tp, pp=self.pp, vpp=self.vpp, cp=self.cp, ep=self.ep, etp=self.etp,
                              sequence_parallel=self.sequence_parallel,
                              pipeline_layers=None if self.pipeline_layers is None else tuple(self.pipeline_layers))


@dataclass
class DatasetCfg:
    name: str = "data"
    # Shard addresses: a brace pattern, a directory of .tar files, pipe:/http URLs, or "demo".
    shards: str = "???"
    weight: float = 1.0


@dataclass
class DataCfg:
    root: str = "/data/qwen3vl"  # the mixes in recipes/data/ put their shards under this directory
    datasets: List[DatasetCfg] = field(default_factory=list)
    # Where `shards: demo` builds the demo corpus the first time it is used (relative to the cwd).
    demo_dir: str = ".demo_data"
    shuffle_buffer: int = 1000  # samples held for shuffling, per rank
    pack_buffer: int = 256  # encoded samples the packer chooses from (fill ~98% at 8K, see docs)
    max_patches_per_row: Optional[int] = None  # ViT patch budget per packed row; null = no cap
    num_workers: int = 2  # background decode worker processes per rank (0: decode in the training process)
    prefetch: int = 4  # batches each worker may run ahead
    trace: bool = False  # write <run_dir>/data_trace/rank-<R>.jsonl: the samples of every trained row
    balance: bool = True  # assign the rows of a global batch to DP ranks by cost (qwen3vl/train/balance.py)
    tokenizer: Optional[str] = None  # a Hugging Face tokenizer dir; null = the built-in Qwen3 tokenizer
    max_consecutive_failures: int = 100  # bad samples in a row before the run stops
    # A dataset none of whose shards gives a readable sample: "stop" the run (naming it and the cause)
    # or "drop" it from the mixture (the other weights renormalise; docs/data_format.md#bad-input).
    on_empty_dataset: str = "stop"
    # ProcessingConfig fields (qwen3vl.data.processing_config), e.g. {max_pixels: 1048576}.
    processing: Dict[str, Any] = field(default_factory=dict)

    def loader_config(self):
        """This section as the loader's ``LoaderConfig``; ``shards: demo`` is the demo corpus (built on first
        use, by rank 0)."""
        from qwen3vl.data.demo import demo_datasets  # lazy: imports torch; the launcher reads configs
        from qwen3vl.data.loader import DatasetSpec, LoaderConfig  # lazy: imports torch; the launcher reads configs
        from qwen3vl.data.processing_config import ProcessingConfig  # lazy: imports torch; the launcher reads configs

        datasets = []
        for d in self.datasets:
            datasets += (demo_datasets(self.demo_dir, d.weight) if d.shards == "demo"
                         else [DatasetSpec(d.shards, d.weight, d.name)])
        return LoaderConfig(datasets=datasets, shuffle_buffer=self.shuffle_buffer, pack_buffer=self.pack_buffer,
                            max_patches_per_row=self.max_patches_per_row,
                            processing=ProcessingConfig(**dict(self.processing)), tokenizer_path=self.tokenizer,
                            max_consecutive_failures=self.max_consecutive_failures,
                            on_empty_dataset=self.on_empty_dataset, prefetch=self.prefetch)


@dataclass
class EvalDatasetCfg:
    name: str = "heldout"
    # Shard addresses like data.datasets' shards; "demo" is the demo corpus's held-out split.
    shards: str = "???"


@dataclass
class EvalCfg:
    """Held-out loss per dataset during training (qwen3vl.train.evaluate); nothing runs without datasets."""

    datasets: List[EvalDatasetCfg] = field(default_factory=list)
    interval: int = 0  # evaluate after every N-th step; 0 = no periodic evaluation
    # Each dataset's pass: its first `samples` samples, or its first samples up to `tokens` tokens (give one
    # of them at most; neither: every sample of the shards).
    samples: Optional[int] = None
    tokens: Optional[int] = None
    at_start: bool = True  # before the first step of a stage (a fresh run or init_from; not on a resume)
    at_end: bool = True  # after the last step of the stage's schedule, unless the interval just evaluated it

    def eval_sets(self, data: "DataCfg", seq_length: int, pad_multiple: int) -> list:
        """Each dataset as a ``qwen3vl.data.eval_set.EvalSet`` packed like ``data``'s loader at
        ``seq_length``."""
        from qwen3vl.data.demo import demo_heldout  # lazy: imports torch; the launcher reads configs
        from qwen3vl.data.eval_set import EvalSet  # lazy: imports torch; the launcher reads configs
        from qwen3vl.data.loader import DatasetSpec  # lazy: imports torch; the launcher reads configs

        base = data.loader_config()
        specs = [demo_heldout(data.demo_dir, d.name) if d.shards == "demo" else DatasetSpec(d.shards, 1.0, d.name)
                 for d in self.datasets]
        return [EvalSet(spec, base, seq_length=seq_length, pad_multiple=pad_multiple, samples=self.samples,
                        tokens=self.tokens) for spec in specs]


@dataclass
class PartLrCfg:
    vision: float = 2e-5
    merger: float = 1e-4  # the merger and the three DeepStack mergers
    llm: float = 1e-4


@dataclass
class OptimCfg:
    # AdamW; weight decay is never applied to norms and biases (see qwen3vl.train.freeze).
    lr: PartLrCfg = field(default_factory=PartLrCfg)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0


@dataclass
class ScheduleCfg:
    # The horizon in steps (where the decay ends); null: train.token_budget / train.global_batch_tokens.
    # Fixed when the stage starts and saved with every checkpoint (qwen3vl.train.schedule).
    total_steps: Optional[int] = None
    warmup_steps: Optional[int] = None  # wins over warmup_fraction when set
    warmup_fraction: float = 0.01  # of the horizon
    decay_style: DecayStyle = DecayStyle.cosine
    min_lr_ratio: float = 0.1  # the final lr of each part, as a fraction of its peak lr
    wsd_decay_fraction: float = 0.1  # wsd: fraction of the steps spent in the final decay
    on_resume: OnResume = OnResume.refuse  # a resume whose config changes the saved schedule


# What selective recompute may redo in the LLM's layers (megatron's recompute_modules): the attention core,
# both norms (their outputs are dropped once the next linear has read them), the dense MLP, the MoE layer.
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "moe")


@dataclass
class RecomputeCfg:
    granularity: Optional[str] = None  # null, "selective" (the parts in ``modules``) or "full"
    method: str = "uniform"  # full: "uniform" or "block"
    num_layers: int = 1  # full: layers per recompute unit (uniform) or recomputed layers (block)
    vision: bool = False  # also recompute the ViT blocks
    # selective: which of RECOMPUTE_MODULES; e.g. [layernorm, mlp] keeps less than the attention core alone
    modules: List[str] = field(default_factory=lambda: ["core_attn"])

    def megatron_overrides(self) -> dict[str, Any]:
        """The TransformerConfig fields of this setting (for the LLM; the ViT follows ``vision``)."""
        if self.granularity is None:
            return {}
        if self.granularity == "selective":
            return dict(recompute_granularity="selective", recompute_modules=list(self.modules))
        return dict(recompute_granularity="full", recompute_method=self.method, recompute_num_layers=self.num_layers)

    def redoes(self, module: str, moe_layer: bool = False) -> bool:
        """Whether selective recompute redoes ``module`` of an LLM layer; ``"mlp"`` asks for the layer's MLP,
        which in an MoE layer (``moe_layer``) is megatron's "moe" module (its "mlp" covers dense ones)."""
        if module == "mlp" and moe_layer:
            module = "moe"
        return self.granularity == "selective" and module in self.modules


@dataclass
class TrainCfg:
    # Where this invocation stops (a step of the stage, not a schedule length); null: the end of the
    # schedule. The same command with a larger train.steps continues the run exactly.
    steps: Optional[int] = None
    stop_at_step: Optional[int] = None  # also stop (with a checkpoint) after this step; nothing else changes
    # Checkpoint and exit 0 before this much wall time of the rank process (a Slurm time limit without a signal).
    stop_after_minutes: Optional[float] = None
    token_budget: Optional[float] = None  # tokens the stage trains on (the report's table): the schedule's horizon
    seq_length: int = 8192
    global_batch_tokens: int = 4 * 1024 * 1024
    micro_batch_rows: int = 1  # packed rows per micro-batch
    save_interval: int = 1000
    keep_last_k: int = 3
    async_save: bool = False  # write checkpoints in a background process; the tracker moves once written
    log_interval: int = 1  # the console line and wandb every N steps (metrics.jsonl has every step)
    seed: int = 1234
    device: Device = Device.auto
    precision: Precision = Precision.auto
    recompute: RecomputeCfg = field(default_factory=RecomputeCfg)
    loss_exponent: float = 0.5  # sample i's tokens weigh n_i^-exponent: 0 token mean, 1 sample mean
    max_consecutive_nan: int = 5  # non-finite steps in a row (each one skipped) before the run stops
    trainable: List[str] = field(default_factory=lambda: ["all"])  # "all" or parts of TRAINABLE_PARTS


@dataclass
class WandbCfg:
    mode: str = "offline"  # offline (default), online, disabled
    project: str = "qwen3vl"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class Qwen3VLTrainConfig:
    stage: str = "custom"
    model: ModelCfg = field(default_factory=ModelCfg)
    parallel: ParallelCfg = field(default_factory=ParallelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    run_dir: str = "runs/${stage}"
    # Weights of a previous stage (a run dir or a checkpoint dir): loaded once, fresh optimizer and
    # schedule, any layout. Ignored when run_dir already has a checkpoint (then the run resumes).
    init_from: Optional[str] = None
    wandb: WandbCfg = field(default_factory=WandbCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)


ConfigStore.instance().store(name=SCHEMA_NAME, node=Qwen3VLTrainConfig)


@dataclass(frozen=True)
class RunShape:
    """Numbers that follow from the config and the world size."""

    world_size: int
    dp: int
    global_rows: int  # packed rows per step, over all DP ranks
    num_microbatches: int  # per DP rank and step
    steps: int  # where this invocation stops (train.steps, else the end of the schedule)
    total_steps: int  # the schedule's horizon
    warmup_steps: int
    pad_multiple: int  # every packed segment is a multiple of this (2·cp, ×tp with sequence parallel)


def run_shape(cfg: Qwen3VLTrainConfig, world_size: int) -> RunShape:
    """Derived sizes; assumes ``validate`` passed."""
    layout, t = cfg.parallel.layout(), cfg.train
    dp = layout.dp(world_size)
    rows = t.global_batch_tokens // t.seq_length
    plan = plan_of(cfg)
    return RunShape(world_size=world_size, dp=dp, global_rows=rows,
                    num_microbatches=rows // (dp * t.micro_batch_rows),
                    steps=t.steps if t.steps is not None else plan.total_steps, total_steps=plan.total_steps,
                    warmup_steps=plan.warmup_steps, pad_multiple=layout.sequence_multiple)


def trains(cfg: Qwen3VLTrainConfig, part: str) -> bool:
    """Whether ``part`` (one of TRAINABLE_PARTS) receives updates under ``train.trainable``."""
    return "all" in cfg.train.trainable or part in cfg.train.trainable


# --- loading -----------------------------------------------------------------------------------------
def _recipe_location(recipe: str) -> tuple[Path, str]:
    """(config dir, config name) of a recipe given by name (packaged) or by path to a YAML file."""
    candidate = Path(recipe)
    if candidate.suffix in (".yaml", ".yml") or candidate.parent != Path("."):
        if not candidate.is_file():
            raise ConfigError([f"recipe file {recipe} does not exist: give a packaged recipe name "
                               f"({', '.join(available_recipes())}) or a path to a YAML file"])
        return candidate.resolve().parent, candidate.stem
    if not (RECIPES_DIR / f"{recipe}.yaml").is_file():
        raise ConfigError([f"unknown recipe {recipe!r}: choose one of {', '.join(available_recipes())} "
                           "or give a path to a YAML file"])
    return RECIPES_DIR, recipe


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def compose_recipe(recipe: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The recipe composed with Hydra (schema, config groups, command-line overrides), unresolved."""
    config_dir, name = _recipe_location(recipe)
    extra = [] if config_dir == RECIPES_DIR else [f"hydra.searchpath=[file://{RECIPES_DIR}]"]
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides) + extra)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError([f"recipe {recipe!r} with overrides {list(overrides)} does not compose: "
                           f"{_describe(err)} (check the key names and types against docs/training.md)"
                           f"{_removed_key_hint(err)}"]
                          ) from err


def config_from_hydra(cfg: DictConfig, saved_in: Optional[Path] = None,
                      overridden: Sequence[str] = ()) -> Qwen3VLTrainConfig:
    """The typed config object from a composed DictConfig (e.g. the one ``@hydra.main`` passes).

    ``saved_in``: the run directory of a saved config used as the recipe; its relative paths (except
    the ``overridden`` keys) resolve against it instead of the working directory."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Qwen3VLTrainConfig), cfg)
        OmegaConf.resolve(merged)
        typed = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError([f"config does not match the schema: {_describe(err)}{_removed_key_hint(err)}"]) from err
    if saved_in is not None:
        typed = config_paths.rebase(typed, saved_in, overridden)
    typed.run_dir = os.path.abspath(typed.run_dir)
    typed.data.demo_dir = os.path.abspath(typed.data.demo_dir)
    return typed


def load_config(recipe: str, overrides: Sequence[str] = (), world_size: Optional[int] = None,
                check_paths: bool = True) -> Qwen3VLTrainConfig:
    """Compose ``recipe`` with ``overrides`` and validate it for ``world_size`` ranks.

    ``world_size`` defaults to $WORLD_SIZE (set by torchrun) or 1. Raises ``ConfigError`` naming every
    problem before anything distributed happens. ``train.steps`` is filled with the end of the schedule when
    not given. With ``check_paths``, a resume that would change the saved schedule is refused here too.
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    overridden = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    cfg = config_from_hydra(compose_recipe(recipe, overrides), config_paths.saved_run_dir(recipe), overridden)
    return validate(cfg, world_size, check_paths=check_paths)


def validate(cfg: Qwen3VLTrainConfig, world_size: int, *, check_paths: bool = True) -> Qwen3VLTrainConfig:
    """Every check that needs no process group; see ``qwen3vl.train.config_checks.validate``."""
    from qwen3vl.train.config_checks import validate as _validate  # lazy: an import cycle (it imports this module)

    return _validate(cfg, world_size, check_paths=check_paths)


def parse_app_argv(argv: Sequence[str]) -> tuple[str, list[str]]:
    """(recipe, overrides) from an app command line: ``--config-name NAME [--config-path DIR] k=v ...``.

    This is the form ``qwen3vl-launch`` starts ranks with; a recipe path is split into both options.
    """
    name, path, rest = None, None, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        for flags, setter in ((("--config-name", "-cn"), "name"), (("--config-path", "-cp"), "path")):
            flag = next((f for f in flags if arg == f or arg.startswith(f + "=")), None)
            if flag is not None:
                value = arg.split("=", 1)[1] if "=" in arg else args.pop(0)
                name, path = (value, path) if setter == "name" else (name, value)
                break
        else:
            rest.append(arg)
    if name is None:
        raise ConfigError(["no recipe given: pass --config-name <recipe> (e.g. stage0_align)"])
    recipe = str(Path(path) / f"{name}.yaml") if path else name
    return recipe, rest


def app_argv(recipe: str, overrides: Sequence[str]) -> list[str]:
    """The inverse of ``parse_app_argv``: the arguments that make an app load ``recipe``."""
    if Path(recipe).suffix in (".yaml", ".yml") or Path(recipe).parent != Path("."):
        p = Path(recipe).resolve()
        return ["--config-path", str(p.parent), "--config-name", p.stem, *overrides]
    return ["--config-name", recipe, *overrides]


def to_yaml(cfg: Qwen3VLTrainConfig, in_run_dir: bool = False) -> str:
    """The resolved config as YAML. ``in_run_dir``: for the copies saved in the run directory and its
    checkpoints, with the paths inside the run directory relative to it (qwen3vl.train.config_paths)."""
    if not in_run_dir:
        return OmegaConf.to_yaml(OmegaConf.structured(cfg))
    return f"{config_paths.MARKER}\n" + OmegaConf.to_yaml(OmegaConf.structured(config_paths.relative_to_run_dir(cfg)))


def to_dict(cfg: Qwen3VLTrainConfig) -> dict:
    """The resolved config as plain data (enums as strings), e.g. for wandb's run config."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def _removed_key_hint(err: BaseException) -> str:
    """What replaced a key this schema no longer has (a recipe or a saved config.yaml may still name it)."""
    if "eval_interval" in str(err):
        return (" train.eval_interval was replaced by the eval section: eval.interval=N with eval.datasets "
                "(docs/training.md#evaluation); remove it")
    return ""


def _describe(err: BaseException) -> str:
    """Hydra/OmegaConf errors wrap the useful reason: the first line of each error in the chain."""
    lines: list[str] = []
    while err is not None:
        for line in str(err).strip().splitlines()[:2]:
            line = line.strip()
            if line and "$VALUE" not in line and not line.startswith(("full_key", "object_type")) \
                    and line not in lines:
                lines.append(line)
        err = err.__cause__
    return "; ".join(lines) or "unknown error"
