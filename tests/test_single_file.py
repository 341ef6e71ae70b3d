"""Single-file checkpoints with nothing cached: the configs ship with embedpin, chosen from the
file's keys and shapes (``models.checkpoint``). The checkpoints have the families' real widths and
cut depth (``sd_checkpoints``); the published full-size layouts are checked from headers alone."""

import json
from pathlib import Path

import pytest
import torch
from support.sd_checkpoints import build, header_only, published_layout, shapes_of

from embedpin.cli import main
from embedpin.models.checkpoint import FAMILIES_DIR, check_fit, choose, read_weights
from embedpin.models.loader import load_components


@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache (the environment is offline already: tests/conftest.py)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))


def _models(path, capsys, *more) -> list[str]:
    assert main(["models", "--model", str(path), *more]) == 0
    return capsys.readouterr().out.strip().splitlines()[-2:]


def test_sd1_checkpoint_loads_with_nothing_cached_and_models_says_which_config_and_why(sd_checkpoints, no_cache,
                                                                                      capsys):
    described, why = _models(sd_checkpoints["sd15"], capsys)
    assert described.endswith("SD 1.x, native 512px, epsilon prediction, text 768, image towers: none (pass --clip "
                              "for image guidance and the CLIP loss)")
    assert why == ("  loaded with the shipped config sd15 (SD 1.x, 512 px, epsilon, as "
                   "stable-diffusion-v1-5/stable-diffusion-v1-5 publishes it): the checkpoint has a text encoder under "
                   "cond_stage_model.transformer (768 wide) and a UNet of 320 channels with 768-wide cross-attention; "
                   "epsilon prediction: the config's; UNet depth from the file: levels [320] (published [320, 640, "
                   "1280, 1280]), resnets per level 1 (published 2), transformer blocks [1] (published [1, 1, 1, 0])")


def test_sd2_checkpoint_is_v_prediction_unless_the_file_says_otherwise(sd_checkpoints, no_cache, capsys, tmp_path):
    path = sd_checkpoints["sd21"]
    described, why = _models(path, capsys)
    assert "SD 2.x, native 768px, v-prediction, text 1024" in described
    assert "shipped config sd21 (SD 2.x, 768 px, v-prediction" in why and "v-prediction: assumed, the file does " \
        "not say" in why and "text encoder layers from the file: 2 (published 23)" in why
    forced = choose(read_weights(path), path.name, "sd21-base")
    assert forced.source.startswith("shipped config sd21-base (SD 2.x, 512 px, epsilon") and \
        "epsilon prediction: the config's" in forced.describe() and forced.configs["unet"]["sample_size"] == 64
    shapes, _ = shapes_of(path)
    for metadata, config, said in [({"modelspec.prediction_type": "epsilon"}, "sd21-base", "prediction_type=epsilon"),
                                   ({"modelspec.architecture": "stable-diffusion-v2-512"}, "sd21-base", "architecture"),
                                   ({"modelspec.prediction_type": "v"}, "sd21", "prediction_type=v")]:
        choice = choose(read_weights(header_only(tmp_path / "said.safetensors", shapes, metadata)), "said")
        assert choice.source.startswith(f"shipped config {config} ") and said in choice.describe()
    # the weights are the file's: OpenCLIP's fused q/k/v and the unused last block undone
    loaded, source = load_components(str(path)), build("sd21", dtype=torch.float16, levels=1, text_layers=(2,))
    for name in ("unet", "vae", "text_encoder"):
        ours, ref = getattr(loaded, name).state_dict(), getattr(source, name).state_dict()
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k].float()) for k in ref)


def _diffusers_folder(choice, comp, folder: Path) -> Path:
    """A diffusers config folder of the configs embedpin chose (and its tokenizers)."""
    names = {"model_index": "model_index.json", "scheduler": "scheduler/scheduler_config.json"}
    for component, config in choice.configs.items():
        path = folder / names.get(component, f"{component}/config.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
    comp.tokenizer.save_pretrained(str(folder / "tokenizer"))
    comp.tokenizer_2.save_pretrained(str(folder / "tokenizer_2"))
    return folder


def test_sdxl_checkpoint_loads_as_diffusers_loads_it_with_the_same_configs(sd_checkpoints, no_cache, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    path = sd_checkpoints["sdxl"]
    described, why = _models(path, capsys)
    assert "SDXL, native 1024px, epsilon prediction, text 768 + 1280 (pooled 1280)" in described
    assert "text encoders under conditioner.embedders.0.transformer and conditioner.embedders.1.model (768 + 1280 " \
        "wide)" in why and "2816-wide pooled input" in why
    ours = load_components(str(path))
    choice = choose(read_weights(path), path.name)
    ref = StableDiffusionXLPipeline.from_single_file(str(path), config=str(_diffusers_folder(choice, ours, tmp_path)),
                                                     local_files_only=True, torch_dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ours, name).state_dict(), getattr(ref, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert ours.tokenizer_2.pad_token == "!" and ours.tokenizer.pad_token == "<|endoftext|>"
    shapes, _ = shapes_of(path)
    flagged = header_only(tmp_path / "vpred.safetensors", {**shapes, "v_pred": (0,)})
    assert "v-prediction: the file has a v_pred key" in choose(read_weights(flagged), "vpred").describe()


@pytest.mark.parametrize("shipped, diffusers_type", [("sd15", "v1"), ("sd21", "v2"), ("sdxl-base", "xl_base")])
def test_the_published_full_size_layouts_choose_their_published_configs(shipped, diffusers_type, tmp_path):
    """Headers of the published architectures (data never read): the shipped config is chosen as it
    is, every shape fits, and diffusers' own detector names the same family."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    path = header_only(tmp_path / f"{shipped}.safetensors", published_layout(shipped))
    weights = read_weights(path)
    choice = choose(weights, path.name)
    assert choice.source.startswith(f"shipped config {shipped} ") and "from the file" not in choice.describe()
    published = json.loads((FAMILIES_DIR / shipped / "unet" / "config.json").read_text())
    assert choice.configs["unet"]["block_out_channels"] == published["block_out_channels"]
    check_fit(weights, choice, path.name)
    meta = {k: torch.empty(s, device="meta") for k, s in shapes_of(path)[0].items()}
    assert infer_diffusers_model_type(meta) == diffusers_type


def _edited(tmp_path, changes: dict, drop: str = "") -> Path:
    shapes = {k: v for k, v in published_layout("sd15").items() if not (drop and k.startswith(drop))}
    return header_only(tmp_path / "edited.safetensors", {**shapes, **changes})


@pytest.mark.parametrize("changes, words", [
    ({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 512)},
     "fits no shipped config: its text encoder's width is 512, SD 1.x's is 768"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (256, 4, 3, 3)},
     "fits no shipped config: its UNet's model channels is 256, SD 1.x's is 320"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)},
     "its UNet's latent channels in is 9, SD 1.x's is 4 (an inpainting model: embedpin renders text-to-image models)"),
    ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
     "its UNet's cross-attention width is 1024, SD 1.x's is 768"),
])
def test_a_checkpoint_that_fits_no_shipped_config_is_one_error_line_naming_what(changes, words, tmp_path, capsys):
    assert main(["models", "--model", str(_edited(tmp_path, changes))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: edited.safetensors ") and words in err[0], err


def test_an_sdxl_refiner_and_a_checkpoint_without_vae_are_named(tmp_path, capsys):
    refiner = header_only(tmp_path / "refiner.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
        "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)})
    assert main(["models", "--model", str(refiner)]) == 2
    assert "refiner.safetensors is an SDXL refiner checkpoint" in capsys.readouterr().err
    assert main(["models", "--model", str(_edited(tmp_path, {}, drop="first_stage_model."))]) == 2
    assert "no VAE weights (first_stage_model.*)" in capsys.readouterr().err


def test_the_shipped_tokenizer_is_clips_and_rebuilds_from_clips_bpe_file(tmp_path):
    import gzip

    from embedpin.models.tokenizers import BPE_DIR, build_clip_bpe, clip_tokenizer

    merges = (BPE_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    bpe = tmp_path / "bpe.txt.gz"
    bpe.write_bytes(gzip.compress(("\n".join(["\"bpe_simple_vocab_16e6.txt#version: 0.2", *merges, "z z"])).encode()))
    vocab, merges_file = build_clip_bpe(bpe, tmp_path / "out")
    assert vocab.read_bytes() == (BPE_DIR / "vocab.json").read_bytes()
    assert merges_file.read_bytes() == (BPE_DIR / "merges.txt").read_bytes()
    tok = clip_tokenizer(FAMILIES_DIR / "sd15" / "tokenizer" / "tokenizer_config.json")
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 49407] and len(tok) == 49408
    sd2 = clip_tokenizer(FAMILIES_DIR / "sd21" / "tokenizer" / "tokenizer_config.json")
    assert sd2("a photo of a cat", padding="max_length", max_length=77).input_ids[6:8] == [49407, 0]


def test_the_shipped_tokenizer_files_are_byte_identical_to_the_ones_comfyui_ships():
    from support.comfy_env import comfyui_dir

    from embedpin.models.tokenizers import BPE_DIR

    source = comfyui_dir() / "comfy" / "sd1_tokenizer"
    for name in ("vocab.json", "merges.txt"):
        assert (source / name).read_bytes() == (BPE_DIR / name).read_bytes(), name
