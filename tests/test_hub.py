"""Hub ids as the ecosystem treats them, against a hub served on 127.0.0.1 (``hub_server``),
never the internet: an id not in the cache is downloaded (only what a run loads, with a progress
bar), a cached one loads offline, and with HF_HUB_OFFLINE=1 a missing one is one error line whose
``hf download`` command fetches exactly what embedpin needs."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

NEEDED = {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
          "text_encoder/model.safetensors", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
          "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer.json",
          "tokenizer/tokenizer_config.json"}
UNWANTED = {"unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
            "safety_checker/model.safetensors", "safety_checker/config.json", "v1-5-pruned.safetensors",
            "text_encoder/flax_model.msgpack"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Two repos of the tiny SD 1.x pipeline as the hub keeps them: what a run loads, beside what
    it does not (another precision, a pickle, a safety checker, a single-file copy, Flax weights)."""
    from support.families import save_family
    from support.hub_server import Hub

    folder = save_family(tmp_path_factory.mktemp("repo") / "tiny-sd", "SD 1.x")
    for name in UNWANTED:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(os.urandom(64))
    assert NEEDED <= {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    server = Hub({"tester/tiny-sd": folder, "tester/tiny-sd-copy": folder})
    yield server
    server.close()


def _env(hub, home, offline: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                            "HF_HUB_DISABLE_PROGRESS_BARS", "HF_HUB_CACHE")}
    return {**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), **({"HF_HUB_OFFLINE": "1"} if offline else {})}


def _embedpin(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedpin", *args], capture_output=True, text=True, env=env,
                          timeout=240)


def test_a_hub_id_is_downloaded_once_then_loads_offline_and_offline_a_missing_one_is_one_error_line(
        hub, tmp_path, monkeypatch, capsys):
    """...whose ``hf download`` command fetches exactly what embedpin loads."""
    from huggingface_hub import constants

    from embedpin.cli import main

    home = tmp_path / "hf"
    r = _embedpin(["models", "--model", "tester/tiny-sd"], _env(hub, home, offline=False))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tester/tiny-sd: SD 1.x, native 32px" in r.stdout
    assert "Fetching 10 files" in r.stderr and "100%" in r.stderr  # huggingface_hub's progress bar
    assert hub.fetched("tester/tiny-sd") == NEEDED  # no other precision, pickle, safety checker, single file
    before = len(hub.requests)
    # offline (this process: tests/conftest.py), with that cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    assert main(["models", "--model", "tester/tiny-sd"]) == 0
    assert "tester/tiny-sd: SD 1.x" in capsys.readouterr().out and len(hub.requests) == before
    assert main(["models", "--model", "tester/tiny-sd-copy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: tester/tiny-sd-copy is not in the local Hugging Face cache "
                                               f"({home / 'hub'}) and HF_HUB_OFFLINE=1 forbids downloading it"), err
    words = shlex.split(err[0].split("fetch it with: ", 1)[1])
    assert words[:3] == ["hf", "download", "tester/tiny-sd-copy"] and not hub.fetched("tester/tiny-sd-copy")
    hf = shutil.which("hf")
    assert hf, "the hf command comes with huggingface_hub"
    done = subprocess.run([hf, *words[1:]], capture_output=True, text=True, env=_env(hub, home, offline=False),
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert hub.fetched("tester/tiny-sd-copy") == NEEDED  # exactly what embedpin downloads itself
    assert main(["models", "--model", "tester/tiny-sd-copy"]) == 0  # and now it loads offline
    assert "tester/tiny-sd-copy: SD 1.x" in capsys.readouterr().out
