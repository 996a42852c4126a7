"""qwen3vl-convert assemble: a Qwen3-VL checkpoint from a Qwen3 / Qwen3-MoE LLM and a SigLIP-2 vision tower.

The parts are tiny random models built and saved by transformers: a dense Qwen3, a tied one, and a
Qwen3-MoE of the ``tiny`` / ``tiny-moe`` shapes (rope theta 1e6 and a 40K context, as the released Qwen3
LLMs), and SigLIP-2 vision towers in the three forms the hub has: a NaFlex tower alone
(``Siglip2VisionModel`` saved by 5.x, a 4 x 4 position table), a full NaFlex model (``Siglip2Model``:
the tower under ``vision_model.`` next to a text tower, 8 x 8) and a full fixed-resolution model
(``SiglipModel``, as the ``-256``/``-512`` SigLIP-2 releases: a Conv2d patch embedding, 8 x 8). Three
assemblies cover every LLM kind and every vision form: dense + tower with ``--preset tiny`` (its 8 x 8
grid: the table is resampled), MoE + full NaFlex and tied + fixed-resolution without a preset (SigLIP's
own grid, the flags instead). transformers is the reference throughout; S0 runs through the public
commands.
"""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from qwen3vl_testing.distributed import run_distributed

TEXT_TOL = 1e-5
VIT_TOL = 1e-5
_TINY_LLM = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=40960,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False)
_TINY_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, patch_size=16)
_SIGLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
# kind -> (LLM, vision tower, flags): one assembly each.
ASSEMBLIES = {
    "dense": ("qwen3", "siglip2-tower", ["--preset", "tiny"]),
    "moe": ("qwen3-moe", "siglip2-full", ["--mrope-section", "6,5,5", "--deepstack-visual-indexes", "0,1,2"]),
    "tied": ("qwen3-tied", "siglip-fixed", ["--mrope-section", "6,5,5", "--deepstack-visual-indexes", "1,2,3"]),
}


def _save_parts(root: str) -> None:
    from transformers import (Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, Siglip2Config,
                              Siglip2Model, Siglip2VisionConfig, Siglip2VisionModel, SiglipConfig, SiglipModel)

    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**_TINY_LLM)).save_pretrained(f"{root}/qwen3")
    Qwen3ForCausalLM(Qwen3Config(**dict(_TINY_LLM, tie_word_embeddings=True))).save_pretrained(f"{root}/qwen3-tied")
    moe = Qwen3MoeForCausalLM(Qwen3MoeConfig(**_TINY_LLM, num_experts=8, num_experts_per_tok=2,
                                             moe_intermediate_size=24, norm_topk_prob=True))
    with torch.no_grad():  # transformers starts routers at zero (every expert tied): make routing defined
        for layer in moe.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.02)
    moe.save_pretrained(f"{root}/qwen3-moe")
    Siglip2VisionModel(Siglip2VisionConfig(**_TINY_VIT, num_patches=16)).save_pretrained(f"{root}/siglip2-tower")
    text = dict(_SIGLIP_TEXT, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    Siglip2Model(Siglip2Config(vision_config=dict(_TINY_VIT, num_patches=64), text_config=text)).save_pretrained(
        f"{root}/siglip2-full")
    SiglipModel(SiglipConfig(vision_config=dict(_TINY_VIT, image_size=128), text_config=text)).save_pretrained(
        f"{root}/siglip-fixed")


def _assemble(jobs: list[list[str]]) -> list[str]:
    """Run ``qwen3vl-convert assemble`` for each argument list; returns what each printed."""
    from qwen3vl.launch.convert import main

    printed = []
    for args in jobs:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(["assemble", *args])
        printed.append(out.getvalue())
    return printed


@pytest.fixture(scope="module")
def assembled(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("parts")
    _save_parts(str(root))
    out = {kind: root / f"{kind}.mcore" for kind in ASSEMBLIES}
    jobs = [["--llm", str(root / llm), "--vision", str(root / vision), *flags, "--out", str(out[kind])]
            for kind, (llm, vision, flags) in ASSEMBLIES.items()]
    printed = run_distributed(_assemble, world_size=1, timeout=300, jobs=jobs)[0]
    return dict(root=root, out=out, printed=dict(zip(ASSEMBLIES, printed)))


# ---------------------------------------------------------------------------------------------
# Against the parts, in transformers


def _compare(ckpt: str, llm_dir: str, vision_dir: str) -> dict:
    """Our model from the checkpoint against the LLM (text-only logits) and the ViT (weights, patch
    embeddings of a still image, the last block's output with RoPE off on SigLIP's own grid)."""
    import numpy as np
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    from qwen3vl.data.image_processing import patchify
    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.model.interop.mcore_checkpoint import read_checkpoint_architecture
    from qwen3vl.model.vision_grid import block_major_index
    from qwen3vl.parallel.context_parallel import model_inputs
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout
    from qwen3vl.train.checkpoint import load_weights
    from qwen3vl_testing.model_cases import make_case, pack_samples, stage_forward

    initialize_parallel(ParallelLayout())
    config = read_checkpoint_architecture(ckpt).model
    [model] = build_model_chunks(config)
    load_weights(ckpt, [model])
    model.eval()
    result = {}
    with torch.no_grad():
        llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
        sample = make_case("text", config, seed=3)
        ours = stage_forward(model, model_inputs(pack_samples([sample])))
        result["text"] = float((ours - llm(sample.input_ids[None]).logits[0]).abs().max())

        full = AutoConfig.from_pretrained(vision_dir).model_type in ("siglip2", "siglip")
        siglip = AutoModel.from_pretrained(vision_dir, dtype=torch.float32).eval()
        tower = siglip.vision_model if full else siglip
        theirs = {k.removeprefix("vision_model."): v for k, v in tower.state_dict().items()}
        params = dict(model.named_parameters())
        v = config.vision
        unequal = []
        for n in range(v.depth):
            ours_block, block = f"vision.layers.{n}.", f"encoder.layers.{n}."
            pairs = [("input_layernorm", "layer_norm1"), ("pre_mlp_layernorm", "layer_norm2"),
                     ("self_attention.linear_proj", "self_attn.out_proj"), ("mlp.linear_fc1", "mlp.fc1"),
                     ("mlp.linear_fc2", "mlp.fc2")]
            for kind in ("weight", "bias"):
                for a, b in pairs:
                    if not torch.equal(params[f"{ours_block}{a}.{kind}"], theirs[f"{block}{b}.{kind}"]):
                        unequal.append(f"{ours_block}{a}.{kind}")
                # our linear_qkv rows, head by head: [q_h | k_h | v_h]
                qkv = params[f"{ours_block}self_attention.linear_qkv.{kind}"].reshape(v.num_heads, 3, v.head_dim, -1)
                for j, x in enumerate("qkv"):
                    source = theirs[f"{block}self_attn.{x}_proj.{kind}"].reshape(v.num_heads, v.head_dim, -1)
                    if not torch.equal(qkv[:, j], source):
                        unequal.append(f"{ours_block}self_attention.linear_qkv.{kind} ({x})")
        kernel = params["vision.patch_embed.proj.weight"].reshape(v.hidden_size, 3, 2, 16, 16)
        source = theirs["embeddings.patch_embedding.weight"]
        if source.dim() == 2:  # SigLIP-2 NaFlex: a Linear over (row, column, channel); else a Conv2d
            source = source.reshape(v.hidden_size, 16, 16, 3).permute(0, 3, 1, 2)
        if not (torch.equal(kernel[:, :, 0], source / 2) and torch.equal(kernel[:, :, 1], source / 2)):
            unequal.append("vision.patch_embed.proj.weight")
        if not torch.equal(params["vision.patch_embed.proj.bias"], theirs["embeddings.patch_embedding.bias"]):
            unequal.append("vision.patch_embed.proj.bias")
        table = theirs["embeddings.position_embedding.weight"]
        side, grid = int(table.shape[0] ** 0.5), v.position_grid_side
        if grid == side and not torch.equal(params["vision.pos_embed.weight"], table):
            unequal.append("vision.pos_embed.weight")
        result["unequal_vision_weights"] = unequal
        resampled = F.interpolate(table.T.reshape(1, -1, side, side), size=(grid, grid), mode="bilinear",
                                  align_corners=True).reshape(-1, grid * grid).T
        result["positions"] = float((params["vision.pos_embed.weight"] - resampled).abs().max())

        # A still image on SigLIP's own grid: patch embeddings, then the ViT with RoPE off.
        image = np.random.default_rng(0).uniform(-1, 1, (3, side * 16, side * 16)).astype(np.float32)
        pixels, grid_thw = patchify(np.broadcast_to(image[None], (2, *image.shape)))
        order = block_major_index(side, side, 2)  # SigLIP's patches are row-major, ours in 2x2 blocks
        if source is theirs["embeddings.patch_embedding.weight"]:  # fixed resolution: the image itself
            inputs = dict(pixel_values=torch.from_numpy(image)[None])
            siglip_embed = tower.embeddings.patch_embedding(inputs["pixel_values"]).flatten(2)[0].T
        else:  # NaFlex: its own patches, a mask and the grid
            patches = torch.from_numpy(convert_image_to_patches(image, 16))[None]
            inputs = dict(pixel_values=patches, pixel_attention_mask=torch.ones(1, side * side, dtype=torch.long),
                          spatial_shapes=torch.tensor([[side, side]]))
            siglip_embed = tower.embeddings.patch_embedding(patches)[0]
        result["patch_embed"] = float((model.vision.patch_embed(pixels) - siglip_embed[order]).abs().max())
        if grid == side:
            captured = []
            model.vision.layers[-1].register_forward_hook(lambda m, i, o: captured.append(o[0]))
            # RoPE off: zero frequencies make every rotation the identity (cos 1, sin 0).
            model.vision.rotary.inv_freq = torch.zeros_like(model.vision.rotary.inv_freq)
            model.vision(pixels, torch.tensor([grid_thw]))
            out = tower(**inputs, output_hidden_states=True)
            result["vit"] = float((captured[0][:, 0] - out.hidden_states[-1][0][order]).abs().max())
    return result


@pytest.fixture(scope="module")
def compared(assembled) -> dict:
    root = assembled["root"]
    return {kind: run_distributed(_compare, world_size=1, timeout=300, ckpt=str(assembled["out"][kind]),
                                  llm_dir=str(root / llm), vision_dir=str(root / vision))[0]
            for kind, (llm, vision, _) in ASSEMBLIES.items()}


@pytest.mark.parametrize("kind", ASSEMBLIES)
def test_text_only_logits_equal_the_llm(compared, kind):
    assert compared[kind]["text"] <= TEXT_TOL


@pytest.mark.parametrize("kind", ASSEMBLIES)
def test_carried_vision_weights_are_bitwise_and_positions_resampled(compared, kind):
    assert compared[kind]["unequal_vision_weights"] == []
    assert compared[kind]["positions"] <= 1e-6


@pytest.mark.parametrize("kind", ASSEMBLIES)
def test_still_image_patch_embeddings_equal_siglip(compared, kind):
    assert compared[kind]["patch_embed"] <= VIT_TOL


@pytest.mark.parametrize("kind", ["moe", "tied"])  # the two on SigLIP's own grid
def test_vit_without_rope_on_the_native_grid_equals_siglip(compared, kind):
    assert compared[kind]["vit"] <= VIT_TOL


def test_output_lists_what_is_new_and_what_is_not_used(assembled):
    from qwen3vl.model.interop.mcore_checkpoint import read_checkpoint_architecture

    printed, out = assembled["printed"], assembled["out"]
    report = json.loads((out["dense"] / "assembled_from.json").read_text())
    assert len(report["fresh"]) == 6 * 4 and "vision.deepstack_merger_list.2.linear_fc2.bias" in report["fresh"]
    assert "vision.merger.linear_fc1.weight" in printed["dense"]
    assert "not used from the vision tower: head.* (11), post_layernorm.* (2)" in printed["dense"]
    # the rope theta is the LLM's; the context length, which no weight carries, the preset's
    assert "differs from preset tiny: text.rope_theta=1000000.0 (preset 5000000.0)" in printed["dense"].splitlines()
    assert read_checkpoint_architecture(out["dense"]).model.text.max_position_embeddings == 4096
    assert read_checkpoint_architecture(out["moe"]).model.text.max_position_embeddings == 40960
    for kind in ("moe", "tied"):  # full SigLIP checkpoints: their text tower and the pooling head are left out
        assert "not used from the vision tower: logit_bias.* (1), logit_scale.* (1), text_model.* (" in printed[kind]
        assert "vision_model.head.* (11), vision_model.post_layernorm.* (2)" in printed[kind]
        assert "not used from the LLM: nothing" in printed[kind]
    tied = read_checkpoint_architecture(out["tied"]).model
    assert tied.tie_word_embeddings and tied.vision.deepstack_visual_indexes == (1, 2, 3)


# ---------------------------------------------------------------------------------------------
# Refusals


def test_parts_that_do_not_fit_the_preset_are_refused_with_every_mismatch(assembled, capsys, tmp_path):
    from qwen3vl.launch.convert import main

    root = assembled["root"]
    with pytest.raises(SystemExit) as exit_info:
        main(["assemble", "--llm", str(root / "qwen3"), "--vision", str(root / "siglip2-tower"), "--preset", "2B",
              "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "the parts do not fit preset 2B" in err
    assert "text.hidden_size: preset 2B has 2048, the parts give 64" in err
    assert "vision.depth: preset 2B has 24, the parts give 4" in err
    assert not (tmp_path / "out").exists()


def test_without_a_preset_the_release_values_are_required(assembled, capsys, tmp_path):
    from qwen3vl.launch.convert import main

    root = assembled["root"]
    with pytest.raises(SystemExit):
        main(["assemble", "--llm", str(root / "qwen3"), "--vision", str(root / "siglip2-tower"),
              "--out", str(tmp_path / "out")])
    assert "pass --mrope-section and --deepstack-visual-indexes (or --preset NAME)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# S0 from the assembled checkpoint, through the public commands


@pytest.fixture(scope="module")
def demo_corpus(tmp_path_factory) -> str:
    from qwen3vl.data.demo import write_demo

    path = tmp_path_factory.mktemp("demo_corpus")
    write_demo(path, captions=48, videos=4, interleaved=8, texts=8)  # a fifth of it: 8 steps read less
    return str(path)


def test_stage0_from_the_assembled_checkpoint_trains_only_the_mergers(assembled, demo_corpus, tmp_path):
    from qwen3vl.launch import launcher
    from qwen3vl.model.interop.dist_reader import DistCheckpointReader
    from qwen3vl.model.interop.hf_weights import qwen3vl_mappings
    from qwen3vl.model.interop.mcore_checkpoint import read_checkpoint_architecture
    from qwen3vl.train.checkpoint import find_latest
    from qwen3vl.train.metrics import read_metrics

    run_dir = tmp_path / "s0"
    steps, rows, seq = 8, 4, 512
    code = launcher.main([
        "--nproc", "1", "--recipe", "stage0_align", "--", "model=tiny", "data=demo", "parallel.cp=1", f"run_dir={run_dir}",
        f"data.demo_dir={demo_corpus}", f"init_from={assembled['out']['dense']}",
        "+model.overrides.text.rope_theta=1000000.0",  # the LLM's, as assembled
        f"train.seq_length={seq}", f"train.global_batch_tokens={seq * rows}",
        f"train.token_budget={seq * rows * steps}", "train.precision=fp32", "data.num_workers=0",
        "wandb.mode=disabled"])
    assert code == 0
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert len(losses) == steps and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses

    config = read_checkpoint_architecture(assembled["out"]["dense"]).model
    before, after = DistCheckpointReader(assembled["out"]["dense"]), DistCheckpointReader(find_latest(run_dir))
    names = [name for m in qwen3vl_mappings(config) for name in m.ours]
    changed = {name for name in names if not torch.equal(before.read([name])[0], after.read([name])[0])}
    mergers = {name for name in names if name.startswith(("vision.merger.", "vision.deepstack_merger_list."))}
    assert changed == mergers
