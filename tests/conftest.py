import os

import pytest

# OpenMP threads that sleep instead of spinning between parallel regions (set before torch loads its
# OpenMP runtime): on a busy 2-core machine a spinning team cost a UNet call of the SD 1.x test
# checkpoint 3.7 s against 0.32 s passive (1 thread: 0.40 s); idle, both are the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """The small run (``micro_run``) in this process, finished: the reference other runs are compared with."""
    from support.micro_run import optimize_args, runs

    from embedpin.cli import main

    out = tmp_path_factory.mktemp("runs")
    assert main(optimize_args(out, "--json")) == 0
    (run,) = runs(out)
    return run


@pytest.fixture(scope="session")
def finished_analysed(finished, tmp_path_factory):
    """A copy of ``finished`` with its token analysis measured (``analyze``) and its report rebuilt:
    (the run folder, the analysis)."""
    import shutil

    from embedpin.analysis import analyze
    from embedpin.reports.builder import rebuild

    run = shutil.copytree(finished, tmp_path_factory.mktemp("analysed") / finished.name)
    analysis = analyze(run)
    rebuild(run)
    return run, analysis


@pytest.fixture(scope="session")
def sd_checkpoints(request, tmp_path_factory):
    """{name: path} of real-width single-file checkpoints (``sd_checkpoints.SPECS``: SD 1.x, SD 2.x,
    SDXL), made once and kept in pytest's cache between sessions (when it is on), keyed by what
    makes them."""
    from support.sd_checkpoints import SPECS, cache_key, write

    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir(f"sd-checkpoints-{cache_key()}") if cache else tmp_path_factory.mktemp("sd-checkpoints")
    out = {}
    for name, spec in SPECS.items():
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            write(spec["shipped"], path.with_suffix(".tmp"), levels=spec["levels"], text_layers=spec["text_layers"])
            path.with_suffix(".tmp").rename(path)
        out[name] = path
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster of two nodes with a CPU each (``ray.cluster_utils.Cluster``: each node its own
    raylet) for the whole session, with the settings embedpin gives its own local clusters; this
    process is connected to it. Yields the Cluster (``.address`` for --ray-address; nodes can be
    removed and added). Token authentication is off for it (a test setting: it would write
    ~/.ray/auth_token)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'embedpin[ray]'; the test extra has it)")
    from ray.cluster_utils import Cluster

    from embedpin.evaluation.ray_workers import LOCAL_SYSTEM

    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "_system_config": LOCAL_SYSTEM})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()
