"""The node pack (``comfyui/``) against ComfyUI's own code (``comfy_env``): ComfyUI's checkpoint
loader loads the real-width SD 1.x test checkpoint, its CLIPTextEncode equals embedpin's encoding of
the same file, the example workflow passes its prompt validation and runs in its executor (the Pin
node interrupted by its interrupt flag and resumed, its KSampler rendering the pinned
CONDITIONING), its ``load_embed`` reads the embedding the Pin node wrote, and bad input is its usual
node error with embedpin's one-line message."""

import asyncio
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.comfy_env import NODE_PACK, ROOT, import_comfyui, pack

from embedpin.config import SearchConfig

EXAMPLE = ROOT / "examples" / "comfyui_pin.json"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # the example's name for it
PROMPT = "a large yellow star in the center on a blue striped background"
NAME = "pinned_star"


class Browser:
    """The web server's part of ComfyUI's executor: what it would send to the browser, kept."""
    client_id = None
    last_node_id = None

    def send_sync(self, event, data, sid=None):
        pass


@pytest.fixture(scope="module")
def env(tmp_path_factory, sd_checkpoints):
    """ComfyUI imported with its folders in a temporary place, the node pack loaded as ComfyUI loads
    custom nodes, the test checkpoint and the example's target image in its folders."""
    folders = tmp_path_factory.mktemp("comfyui")
    nodes = import_comfyui(folders)
    if "EmbedpinPin" not in nodes.NODE_CLASS_MAPPINGS:
        assert asyncio.run(nodes.load_custom_node(str(NODE_PACK)))
    (folders / "models" / "checkpoints" / CHECKPOINT).symlink_to(sd_checkpoints["sd15"])
    shutil.copy(ROOT / "examples" / "star.png", folders / "input" / "embedpin_target.png")
    small = np.zeros((16, 16, 4), np.uint8)
    small[4:12, 4:12] = 255
    Image.fromarray(small, "RGBA").save(folders / "input" / "small_alpha.png")
    return nodes, folders


@pytest.fixture(scope="module")
def ours(sd_checkpoints):
    """embedpin's own load of the same file."""
    from embedpin.models.loader import load_components

    return load_components(str(sd_checkpoints["sd15"]))


@pytest.fixture(scope="module")
def loaded(env):
    nodes, _ = env
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT)


def tiny(prompt: dict) -> dict:
    """The example workflow at test scale: 2 generations of 2 candidates x 2 images, 2 steps, 32 px."""
    p = copy.deepcopy(prompt)
    p["3"]["inputs"].update(generations=2, population=2, batch=2, steps=2, cfg=5.0, sampler="euler", width=32,
                            height=32, validation_seeds=0, inversion_steps=2)
    p["4"]["inputs"].update(width=32, height=32, batch_size=1)
    p["5"]["inputs"].update(steps=2)
    return p


def events(executor) -> dict:
    return {event: data for event, data in executor.status_messages}


def execute(executor, prompt: dict, outputs: list[str]) -> dict:
    executor.execute(prompt, "test", {}, outputs)
    return events(executor)


@pytest.fixture(scope="module")
def workflow(env):
    """The example workflow validated by ComfyUI, then (at test scale) run by ComfyUI's executor:
    the interrupt flag set (what the interrupt button does) as the Pin node's progress bar moves
    within its second generation, then queued again. Returns (executor, first events, second
    events, progress values seen)."""
    import comfy.utils
    import execution

    nodes, folders = env
    prompt = json.loads(EXAMPLE.read_text())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("example", prompt, None))
    assert valid and not node_errors and outputs == ["7"], (error, node_errors)
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((node_id, value, total))
        if node_id == "3" and 1 < value < 2 and len([s for s in seen if 1 < s[1] < 2]) == 1:
            nodes.interrupt_processing()  # mid-generation: the run stops at the next UNet call

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        executor = execution.PromptExecutor(Browser(), cache_type=execution.CacheType.CLASSIC)
        first = execute(executor, tiny(prompt), ["7"])
        second = execute(executor, tiny(prompt), ["7"])
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    return executor, first, second, seen


def _run(folders: Path) -> Path:
    (run,) = (folders / "output" / "embedpin").glob(f"{NAME}-*/0001-*")
    return run


def test_comfyuis_loader_takes_the_test_checkpoint_for_sd15_and_the_published_layouts_for_their_families(loaded):
    from comfy import model_detection
    from support.sd_checkpoints import published_layout

    model, clip, vae = loaded
    assert type(model.model.model_config).__name__ == "SD15" and model.model.model_type.name == "EPS"
    for shipped, family in (("sd15", "SD15"), ("sd21", "SD20"), ("sdxl-base", "SDXL")):
        state = {k[len("model.diffusion_model."):]: torch.empty(s, device="meta")
                 for k, s in published_layout(shipped).items() if k.startswith("model.diffusion_model.")}
        assert type(model_detection.model_config_from_unet(state, "")).__name__ == family, shipped


@pytest.mark.parametrize("prompt", [PROMPT, ", ".join(["a red apple on a wooden table, oil painting"] * 12)])
def test_clip_text_encode_equals_embedpins_conditioning_of_the_same_file(env, loaded, ours, prompt):
    """Tolerance 2e-5 on values up to about 4 (the same float16 weights computed in float32 by two
    implementations; measured: 2.3e-6, and 2.4e-6 for a 2-chunk prompt); long prompts in 75-token
    chunks alike."""
    from embedpin.guidance.encode import encode_prompt

    nodes, _ = env
    _, clip, _ = loaded
    with torch.inference_mode():
        ((cond, extras),) = nodes.CLIPTextEncode().encode(clip, prompt)[0]
        enc = encode_prompt(ours, prompt).hidden
    assert cond.shape == enc.shape and cond.shape[1] == (77 if prompt == PROMPT else 154)
    assert (cond - enc).abs().max() <= 2e-5, (cond - enc).abs().max()


def test_the_pin_node_uses_comfyuis_weights_in_place_loras_applied(env, loaded):
    """The UNet and VAE are ComfyUI's tensors (the model is held once), as ComfyUI samples with
    them: a LoRA applied by its LoraLoader is in them. The text encoder, which ComfyUI keeps in
    float16, is cast to the UNet's float32 (a copy of its 123 M parameters)."""
    from safetensors.torch import save_file

    nodes, folders = env
    model, clip, vae = loaded
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    base = model.model.diffusion_model.state_dict()[key].clone()
    lora = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
    down, up = torch.full((4, 768), 0.01), torch.full((320, 4), 0.5)
    save_file({f"{lora}.lora_down.weight": down, f"{lora}.lora_up.weight": up, f"{lora}.alpha": torch.tensor(4.0)},
              str(folders / "models" / "loras" / "test-lora.safetensors"))
    with torch.inference_mode():
        patched, patched_clip = nodes.LoraLoader().load_lora(model, clip, "test-lora.safetensors", 1.0, 0.0)
        comp = pack("bridge").components(patched, patched_clip, vae, "test")
        theirs = patched.model.diffusion_model.state_dict()
        assert comp.unet.conv_in.weight.data_ptr() == theirs["input_blocks.0.0.weight"].data_ptr()
        assert comp.unet.conv_out.weight.data_ptr() == theirs["out.2.weight"].data_ptr()
        assert comp.vae.decoder.conv_out.weight.data_ptr() == vae.first_stage_model.decoder.conv_out.weight.data_ptr()
        ours = comp.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight
        assert ours.data_ptr() == theirs[key].data_ptr() and torch.allclose(ours, base + up @ down, atol=1e-6)
        assert comp.text_encoder.dtype == torch.float32 and comp.family == "SD 1.x"
        patched.unpatch_model()  # (ComfyUI restores the base weights when it unloads; the next tests use them)
    assert torch.equal(model.model.diffusion_model.state_dict()[key], base)


def test_the_example_workflow_pins_is_interrupted_resumes_and_ksampler_renders_the_pinned_conditioning(env,
                                                                                                       workflow):
    from embedpin.store import RunStore

    nodes, folders = env
    executor, first, second, seen = workflow
    assert "execution_interrupted" in first and first["execution_interrupted"]["node_id"] == "3"
    assert "execution_success" in second, second.get("execution_error")
    assert any(n == "3" and 1 < v < 2 for n, v, t in seen)  # interrupted within generation 2, resumed from 1
    state = RunStore.open(_run(folders)).read_state()
    assert state.status == "finished" and state.generation == 2 and len(state.history) == 2
    # ComfyUI runs nodes in inference mode: no gradient, so the run went on gradient-free, and says so
    assert state.inversion.steps == 0 and "inference mode" in state.inversion.note
    assert [v for n, v, t in seen if n == "3" and v == int(v)][-2:] == [1, 2]  # the progress bar, by generation
    (saved,) = (folders / "output").glob("embedpin_pinned_*.png")
    image = np.asarray(Image.open(saved))
    assert image.shape == (32, 32, 3) and image.std() > 0


def test_the_pin_nodes_outputs_its_embedding_and_load_pinned(env, loaded, workflow, tmp_path):
    """Queued again with the same inputs, the Pin node returns the finished run's result (it is not
    run again); its CONDITIONING is the run's pinned tensors in ComfyUI's format, its embedding is
    what ComfyUI's ``load_embed`` reads, and Load pinned gives both back with the prompt to use."""
    from comfy.sd1_clip import load_embed
    from PIL import ImageOps

    from embedpin.cli import main
    from embedpin.exports import load_pinned

    nodes, folders = env
    model, clip, vae = loaded
    run = _run(folders)
    before = (run / "state.json").read_bytes()
    target = np.asarray(ImageOps.exif_transpose(Image.open(folders / "input" / "embedpin_target.png")).convert("RGB"))
    images = torch.from_numpy(target.astype(np.float32) / 255)[None]
    pin = nodes.NODE_CLASS_MAPPINGS["EmbedpinPin"]()
    with torch.inference_mode():
        positive, negative, folder = pin.pin(model, clip, vae, images, PROMPT, "", NAME, 2, 2, 2, 2, 5.0, "euler", 0,
                                             width=32, height=32, validation_seeds=0, inversion_steps=2,
                                             graph=json.loads(EXAMPLE.read_text()), node_id="3")
    assert Path(folder) == run and (run / "state.json").read_bytes() == before
    tensors, recipe = load_pinned(run)
    assert torch.equal(positive[0][0], tensors["prompt_embeds"]) and positive[0][1] == {}
    assert torch.equal(negative[0][0], tensors["negative_prompt_embeds"])
    assert recipe["model"].endswith(CHECKPOINT)  # traced to the loader's file: the CLI renders it from there
    assert main(["render", str(run), "-n", "1", "--steps", "2", "--device", "cpu", "-o", str(tmp_path)]) == 0
    assert (tmp_path / "pinned_seed0.png").is_file()
    embedding = load_embed(NAME, [str(folders / "models" / "embeddings")], 768)
    assert torch.equal(embedding, tensors["token_vectors"]) and embedding.shape == (SearchConfig().n_vectors, 768)
    assert sorted(p.name for p in (folders / "models" / "embeddings").iterdir()) == [f"{NAME}.safetensors"]
    loader = nodes.NODE_CLASS_MAPPINGS["EmbedpinLoadPinned"]
    choice = f"{run.parent.name}/{run.name}"
    assert choice in loader.INPUT_TYPES()["required"]["run"][0]
    pos, neg, text = loader().load(choice)
    assert torch.equal(pos[0][0], positive[0][0]) and torch.equal(neg[0][0], negative[0][0])
    assert text == f"embedding:{NAME} {PROMPT}"  # the placeholders stand before the words (placement)
    assert torch.equal(loader().load("(no runs yet)", run_folder=str(run))[0][0][0], positive[0][0])
    with torch.inference_mode():
        ((cond, _),) = nodes.CLIPTextEncode().encode(clip, text)[0]
    assert cond.shape == (1, 77, 768)  # ComfyUI reads embedding:pinned_star from models/embeddings


def test_sdxl_conditioning_carries_its_pooled_output_and_size(env):
    tensors = {"prompt_embeds": torch.ones(1, 77, 2048), "negative_prompt_embeds": torch.zeros(1, 77, 2048),
               "pooled_prompt_embeds": torch.ones(1, 1280), "negative_pooled_prompt_embeds": torch.zeros(1, 1280)}
    positive, negative = pack("bridge").conditioning(tensors, {"height": 832, "width": 1216})
    extras = positive[0][1]
    assert torch.equal(extras["pooled_output"], tensors["pooled_prompt_embeds"])
    assert (extras["width"], extras["height"], extras["target_width"], extras["crop_w"]) == (1216, 832, 1216, 0)
    assert torch.equal(negative[0][1]["pooled_output"], torch.zeros(1, 1280))


def _bad(prompt: dict, **change) -> dict:
    p = tiny(prompt)
    p["3"]["inputs"].update(change)
    return p


def test_bad_input_is_comfyuis_node_error_with_embedpins_line_and_nothing_half_written(env, workflow,
                                                                                      sd_checkpoints, tmp_path):
    import execution
    from safetensors.torch import load_file, save_file

    nodes, folders = env
    prompt = json.loads(EXAMPLE.read_text())
    inpaint = load_file(str(sd_checkpoints["sd15"]))
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(320, 9, 3, 3, dtype=torch.float16)
    save_file(inpaint, str(folders / "models" / "checkpoints" / "inpainting.safetensors"))
    del inpaint
    empty_mask = _bad(prompt, mask=["2", 1])  # a picture without alpha: LoadImage's mask is all 0
    wrong_size = _bad(prompt, mask=["8", 1])
    wrong_size["8"] = {"class_type": "LoadImage", "inputs": {"image": "small_alpha.png"}}
    odd_width = _bad(prompt, width=36)
    unknown = _bad(prompt)
    unknown["1"]["inputs"]["ckpt_name"] = "inpainting.safetensors"
    embeddings = folders / "models" / "embeddings"
    (embeddings / "mine.safetensors").write_bytes(b"")
    save_file({"emb_params": torch.ones(1, 768)}, str(embeddings / "mine.safetensors"))
    taken = _bad(prompt, embedding_name="mine", seed=99)
    before = sorted(p.name for p in embeddings.iterdir())
    runs = sorted((folders / "output" / "embedpin").iterdir())
    expected = {
        "empty mask": (empty_mask, "the mask is empty (all 0): it would pin nothing of the target"),
        "wrong size": (wrong_size, "the mask is 16x16 but the target is 64x64: give a mask of the target's size"),
        "odd width": (odd_width, "--width 36 is not a multiple of 8 (this model's VAE x UNet factor); try 32"),
        "unknown family": (unknown, "its UNet's latent channels in is 9, SD 1.x's is 4 (an inpainting model"),
        "embedding taken": (taken, "mine.safetensors exists and is not an embedpin embedding"),
    }
    executor = execution.PromptExecutor(Browser(), cache_type=execution.CacheType.CLASSIC)
    for case, (graph, words) in expected.items():
        error = execute(executor, graph, ["7"]).get("execution_error")
        assert error and error["node_type"] == "EmbedpinPin", case
        message = error["exception_message"]
        assert words in message and "\n" not in message.strip() and not message.startswith("Traceback"), (case, message)
        assert sorted(p.name for p in embeddings.iterdir()) == before, case
        assert sorted((folders / "output" / "embedpin").iterdir()) == runs, case
    assert torch.equal(load_file(str(embeddings / "mine.safetensors"))["emb_params"], torch.ones(1, 768))


def test_the_node_pack_is_a_comfyui_registry_project_of_embedpins_version(env):
    from comfy_config import config_parser

    from embedpin.version import __version__

    config = config_parser.extract_node_configuration(str(NODE_PACK))
    assert config.project.name == "embedpin" and config.project.version == __version__
    assert config.tool_comfy.display_name == "embedpin" and config.project.dependencies == [f"embedpin>={__version__}"]
    assert (NODE_PACK / "requirements.txt").read_text().split() == [f"embedpin>={__version__}"]
