"""deploy/ and configs/: every manifest parses and names only this project's image and commands, every
launcher turns on Ray token auth, every recipe validates through the real config loader, and
`vgrpo train --dry-run` plans against described clusters (exit 0 fits, 2 config error, 3 does not fit)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from vgrpo import placement, storage
from vgrpo.cli import app
from vgrpo.proto.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CONFIGS = ROOT / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("*.yml"))
SD35M = [r for r in RECIPES if r.name.startswith("sd35m_")]  # the paper recipes (the rest: other families)
IMAGE = "vgrpo:0.1.0"  # the tag deploy/docker/Dockerfile's build line gives
GPU64 = '{"GPU": 64, "CPU": 1024}'
NODE8 = {"GPU": 8, "CPU": 96}


def deploy_docs() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for f in sorted(DEPLOY.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if isinstance(doc, dict):
                out.append((f, doc))
    return out


def walk(node: Any, key: str) -> list[Any]:
    """Every value stored under ``key`` anywhere in a parsed YAML tree."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            found += walk(v, key)
    elif isinstance(node, list):
        for v in node:
            found += walk(v, key)
    return found


def kuberay(kind: str) -> dict[str, Any]:
    docs = [d for _, d in deploy_docs() if d.get("apiVersion") == "ray.io/v1" and d.get("kind") == kind]
    assert len(docs) == 1, f"want one {kind} under deploy/, found {len(docs)}"
    return docs[0]


def dry_run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["train", *args, "--dry-run"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is never an answer
    return result.exit_code, result.output


# ----------------------------------------------------------------------------------------------- manifests


def test_every_manifest_parses_and_the_launchers_exist() -> None:
    files = {f.relative_to(DEPLOY).as_posix() for f in DEPLOY.rglob("*") if f.is_file()}
    for f in sorted(DEPLOY.rglob("*.y*ml")):
        list(yaml.safe_load_all(f.read_text()))  # raises on a parse error
    assert kuberay("RayCluster")["spec"]["workerGroupSpecs"]
    assert kuberay("RayJob")["spec"]["entrypoint"]
    rayup = [d for _, d in deploy_docs() if "cluster_name" in d and "available_node_types" in d]
    assert len(rayup) == 1
    assert "docker/Dockerfile" in files
    assert "slurm/vgrpo.sbatch" in files
    assert subprocess.run(["bash", "-n", str(DEPLOY / "slurm/vgrpo.sbatch")]).returncode == 0
    # the existing observability files are still there
    assert "prometheus/prometheus.yml" in files and "grafana/dashboards/vgrpo.json" in files


def test_manifests_name_only_the_project_image() -> None:
    images = {img for _, d in deploy_docs() for img in walk(d, "image")}
    assert images == {IMAGE}, images
    dockerfile = (DEPLOY / "docker/Dockerfile").read_text()
    assert f"-t {IMAGE}" in dockerfile
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:[\w.-]+-cuda[\w.-]+-devel$", dockerfile, re.M)
    assert "pip install -c /opt/torch-constraint.txt /opt/vgrpo" in dockerfile
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert not any("torchvision" in line for line in installs)


def _vgrpo_commands(text: str) -> list[list[str]]:
    return [shlex.split(part) for part in text.split("&&") if part.strip()]


def _config_of(argv: list[str]) -> RunConfig:
    """The RunConfig a `vgrpo train` command line would run with (its --config mapped into the checkout)."""
    assert argv[:2] == ["vgrpo", "train"], argv
    config = argv[argv.index("--config") + 1]
    assert config.startswith("/opt/vgrpo/configs/"), config  # where the image keeps the recipes
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return load_config(ROOT / config.removeprefix("/opt/vgrpo/"), sets)


def test_rayjob_runs_recipes_that_validate_and_pins_roles_to_the_cluster_groups() -> None:
    job = kuberay("RayJob")
    cluster = kuberay("RayCluster")
    commands = _vgrpo_commands(job["spec"]["entrypoint"])
    assert len(commands) == 2 and "--dry-run" in commands[0] and "--dry-run" not in commands[1]
    cfg = _config_of(commands[1])
    assert cfg.model.path == "stabilityai/stable-diffusion-3.5-medium"
    assert cfg.train.storage == "/shared/runs"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    # the custom resources the run asks for are the ones the node groups advertise
    groups = {}
    for g in cluster["spec"]["workerGroupSpecs"]:
        res = json.loads(json.loads(g["rayStartParams"]["resources"]))  # KubeRay's quoted-JSON form
        groups[g["groupName"]] = (res, int(g["rayStartParams"]["num-gpus"]) * g["replicas"])
    asked = {
        "rollout": cfg.rollout.custom_resources,
        "learner": cfg.learner.custom_resources,
        "reward": cfg.reward.server("geneval").custom_resources,
    }
    nodes = []
    for g in cluster["spec"]["workerGroupSpecs"]:
        res, _ = groups[g["groupName"]]
        nodes += [
            {
                "CPU": float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]),
                "GPU": float(g["rayStartParams"]["num-gpus"]),
                **res,
            }
        ] * g["replicas"]
    for role, custom in asked.items():
        assert set(custom) == set(groups[role][0]), role
    # and the pinned plan fits the manifest's cluster, node by node
    plan = placement.plan_placement(cfg, nodes)
    assert plan.fits, plan.problem


def test_every_launcher_turns_on_token_auth() -> None:
    for kind in ("RayCluster", "RayJob"):
        for env in walk(kuberay(kind), "env"):
            names = {e["name"]: e for e in env}
            if "HF_TOKEN" in names and "RAY_AUTH_MODE" not in names:
                continue  # not a Ray container (none in these two manifests)
            assert names["RAY_AUTH_MODE"]["value"] == "token", kind
            assert names["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "vgrpo-ray-auth", kind
            if "HF_TOKEN" in names:
                assert "secretKeyRef" in names["HF_TOKEN"]["valueFrom"]
    containers = walk(kuberay("RayCluster"), "containers")
    assert sum(len(c) for c in containers) == 4  # head + 3 groups, each checked above
    rayup = next(d for _, d in deploy_docs() if "cluster_name" in d)
    starts = " ".join(rayup["head_start_ray_commands"] + rayup["worker_start_ray_commands"])
    assert starts.count("export RAY_AUTH_MODE=token") == 2
    assert "~/.ray/auth_token" in rayup["file_mounts"]
    assert any("chmod 600 ~/.ray/auth_token" in c for c in rayup["setup_commands"])
    slurm = (DEPLOY / "slurm/vgrpo.sbatch").read_text()
    assert "export RAY_AUTH_MODE=token" in slurm and "export RAY_AUTH_TOKEN_PATH=" in slurm
    assert "umask 077" in slurm and "#SBATCH" in slurm and "ray start --head" in slurm
    # every command the SLURM script runs from this project exists
    for line in re.findall(r"^vgrpo .*", slurm, re.M):
        assert line.split()[1] == "train"


# ----------------------------------------------------------------------------------------------- recipes


def test_every_recipe_validates_through_the_config_loader() -> None:
    assert len(SD35M) >= 3
    names = set()
    for recipe in SD35M:
        cfg = load_config(recipe)
        names.add(cfg.algorithm.name)
        assert cfg.model.path == "stabilityai/stable-diffusion-3.5-medium", recipe
        assert cfg.rollout.gpus_per_worker >= 1 and cfg.learner.gpus_per_rank >= 1, recipe
        # whole prompt groups per worker and per rank (an uneven split leaves GPUs idle each step)
        assert cfg.rollout.prompts_per_step % cfg.rollout.num_workers == 0, recipe
        assert cfg.rollout.prompts_per_step % cfg.learner.num_ranks == 0, recipe
    assert {"vgrpo", "flow_grpo", "dgpo"} <= names
    rewards = {
        next(iter(load_config(r).reward.weights)) for r in SD35M if load_config(r).algorithm.name == "vgrpo"
    }
    assert {"geneval", "ocr", "pickscore"} <= rewards


def test_family_recipes_name_their_family() -> None:
    """FLUX.1-dev (LoRA and full ZeRO-3), Qwen-Image and Wan2.1-T2V-1.3B recipes set model.family, so a dry
    run reads no model file; the full fine-tune uses ZeRO-3 with activation checkpointing."""
    families = {load_config(r).model.family: r for r in RECIPES if not r.name.startswith("sd35m_")}
    assert {"flux", "qwen_image", "wan"} <= set(families)
    full = load_config(CONFIGS / "flux1dev_full_zero3.yaml")
    assert full.model.lora is None and full.learner.zero_stage == 3 and full.learner.activation_checkpointing
    assert load_config(CONFIGS / "wan21_t2v_1_3b_vgrpo.yaml").model.frames > 1


def test_vgrpo_recipes_follow_the_paper() -> None:
    """docs/algorithms.md §4.5: G 24, P 48, LoRA 32/64, lr 3e-4, 40 ODE steps, no CFG."""
    for recipe in SD35M:
        cfg = load_config(recipe)
        if cfg.algorithm.name != "vgrpo" or "1node" in recipe.name:
            continue
        r = cfg.rollout
        assert (r.group_size, r.prompts_per_step, r.num_steps, r.guidance_scale) == (24, 48, 40, 1.0)
        assert cfg.sampler() == "dpm2" and (r.height, r.width) == (512, 512)
        assert cfg.model.lora is not None and (cfg.model.lora.rank, cfg.model.lora.alpha) == (32, 64.0)
        assert cfg.learner.lr == 3e-4 and cfg.algorithm.vgrpo.n_mc == 4


# ----------------------------------------------------------------------------------------------- dry run


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_dry_run_every_recipe_fits_64_gpus(recipe: Path) -> None:
    code, out = dry_run("--config", str(recipe), "--resources", GPU64)
    assert code == 0, out
    assert "learner" in out and "rollout" in out and "reward:" in out
    assert out.strip().splitlines()[-1].startswith("fits:")


def test_dry_run_64_gpus_node_by_node() -> None:
    nodes = json.dumps([NODE8] * 8)
    code, out = dry_run("--config", str(CONFIGS / "sd35m_vgrpo_geneval.yaml"), "--resources", nodes)
    assert code == 0, out
    assert "8 nodes, GPU 64, CPU 768" in out
    assert "node 0:" in out and "rollout worker x8" in out and "reward:geneval replica x8" in out


def test_dry_run_8_gpu_node() -> None:
    code, out = dry_run(
        "--config", str(CONFIGS / "sd35m_vgrpo_pickscore_1node.yaml"), "--resources", json.dumps([NODE8])
    )
    assert code == 0, out
    assert re.search(r"learner\s+3\s+GPU 1, CPU 8", out), out
    assert re.search(r"rollout\s+4\s+GPU 1, CPU 8", out), out
    assert re.search(r"reward:pickscore\s+2\s+GPU 0.5, CPU 4", out), out
    assert "fits: 8/8 GPU, 64/96 CPU" in out


def test_dry_run_too_small_names_the_short_resource() -> None:
    geneval = str(CONFIGS / "sd35m_vgrpo_geneval.yaml")
    code, out = dry_run("--config", geneval, "--resources", json.dumps([NODE8]))
    assert code == 3, out
    assert "short of GPU: the plan needs 48" in out and "the cluster has 8" in out
    code, out = dry_run("--config", geneval, "--resources", '{"GPU": 64, "CPU": 100}')
    assert code == 3 and "short of CPU" in out and "short of GPU" not in out, out


def test_dry_run_packing_failure_names_the_resource_per_node() -> None:
    # 16 GPUs in all (enough), but one GPU per node: a 2-GPU learner bundle fits on no node
    nodes = json.dumps([{"GPU": 1, "CPU": 96}] * 16)
    recipe = str(CONFIGS / "sd35m_vgrpo_pickscore_1node.yaml")
    code, out = dry_run("--config", recipe, "--resources", nodes, "--set", "learner.gpus_per_rank=2")
    assert code == 3, out
    assert "short of GPU on any one node" in out and "learner rank" in out
    code, _ = dry_run("--config", recipe, "--resources", nodes)
    assert code == 0  # the same cluster holds 1-GPU bundles


def test_dry_run_custom_resources_must_exist_on_the_cluster() -> None:
    recipe = str(CONFIGS / "sd35m_vgrpo_geneval.yaml")
    pin = ["--set", "rollout.custom_resources.vgrpo_rollout=1"]
    code, out = dry_run("--config", recipe, "--resources", GPU64, *pin)
    assert code == 3 and "vgrpo_rollout" in out, out
    cluster = json.dumps([{**NODE8, "vgrpo_rollout": 8}] * 3 + [{**NODE8, "vgrpo_learner": 8}] * 3)
    code, out = dry_run("--config", recipe, "--resources", cluster, *pin)
    # the learners' group is placed first (as Ray does): first fit puts it on the rollout nodes
    assert code == 3 and "pin it elsewhere with learner.custom_resources" in out, out
    code, out = dry_run(
        "--config", recipe, "--resources", cluster, *pin, "--set", "learner.custom_resources.vgrpo_learner=1"
    )
    assert code == 0, out


def test_strict_pack_needs_one_node() -> None:
    cfg = load_config(
        CONFIGS / "sd35m_vgrpo_pickscore_1node.yaml", ["resources.placement_strategy=STRICT_PACK"]
    )
    assert placement.plan_placement(cfg, [NODE8]).fits
    # STRICT_PACK keeps the learners' group (3 ranks of 1 GPU) on one node; rollout workers have their own
    assert placement.plan_placement(cfg, [{"GPU": 4, "CPU": 96}, {"GPU": 4, "CPU": 96}]).fits
    plan = placement.plan_placement(cfg, [{"GPU": 2, "CPU": 96}] * 4)
    assert not plan.fits and plan.short == ["GPU"] and "STRICT_PACK" in plan.problem


def test_dry_run_config_errors_exit_2() -> None:
    recipe = str(CONFIGS / "sd35m_vgrpo_geneval.yaml")
    code, out = dry_run("--config", recipe, "--resources", GPU64, "--set", "rollout.num_wrokers=3")
    assert code == 2 and "rollout.num_wrokers: unknown key" in out and "num_workers" in out, out
    code, out = dry_run("--config", recipe, "--resources", GPU64, "--set", "reward.weights={nosuch: 1}")
    assert code == 2 and "unknown reward" in out, out
    code, out = dry_run("--config", recipe, "--resources", "GPU=64")
    assert code == 2 and "--resources" in out and "not JSON" in out, out
    code, out = dry_run("--config", recipe, "--resources", '[{"GPU": -1}]')
    assert code == 2 and "want a number >= 0" in out, out
    code, out = dry_run("--set", "train.storage=nosuchproto://bucket/runs", "--resources", GPU64)
    assert code == 2 and "train.storage" in out, out
    code, out = dry_run("--config", recipe, "--resources", GPU64, "--set", "learner.gpus_per_rank=0")
    assert code == 2 and "learner.backend = 'nccl' needs GPUs" in out, out
    code, out = dry_run("--config", recipe, "--resources", GPU64, "--set", "rollout.gpus_per_worker=1.5")
    assert code == 2 and "rollout.gpus_per_worker = 1.5" in out, out


def test_dry_run_defaults_to_this_machine_and_imports_no_ray() -> None:
    """The console script, as a user runs it: the embedded default on the local resources; neither Ray
    nor torch is imported (nothing starts)."""
    code = (
        "import sys\n"
        "from vgrpo.cli import app\n"
        "try:\n"
        "    app(['train', '--dry-run', '--set', 'resources.num_cpus=2', '--set', 'resources.num_gpus=0'])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code)\n"
        "print('imported', sorted(m for m in ('ray', 'torch', 'deepspeed') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "exit 0" in out.stdout, out.stdout + out.stderr
    assert "imported []" in out.stdout
    assert "this machine" in out.stdout and "GPU 0, CPU 2" in out.stdout


def test_placement_bundles_order_matches_the_driver() -> None:
    cfg = load_config(None, ["learner.num_ranks=2", "rollout.num_workers=3", "rollout.cpus_per_worker=0"])
    bundles = placement.placement_bundles(cfg)
    assert bundles == [{"CPU": 0.5}] * 2 + [{"CPU": 0.01}] * 3  # ranks first; an empty request gets 0.01 CPU
    assert placement.parse_resources('{"GPU": 2}') == ([{"GPU": 2.0}], True)


def test_plan_notes_uneven_splits() -> None:
    assert placement.balance_notes(load_config(CONFIGS / "sd35m_vgrpo_geneval.yaml")) == []
    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.num_workers=3", "learner.num_ranks=6"])
    notes = placement.balance_notes(cfg)
    assert len(notes) == 2
    assert "4 prompts over 3 rollout workers: 1-2 groups each" in notes[0]
    assert "6 learner ranks for 4 prompts per step: 2 of them get no prompt group" in notes[1]


# ----------------------------------------------------------------------------------------------- storage


def test_storage_local_path_holds_the_run_dir(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "runs"
    code, out = dry_run(
        "--set", f"train.storage={shared}", "--set", "train.run_name=r1", "--resources", GPU64
    )
    assert code == 0 and f"run directory: {shared / 'r1'}" in out, out
    assert storage.default_run_dir(str(shared), "r1") == shared / "r1"
    assert storage.default_run_dir("file://" + str(shared), "r1") == shared / "r1"
    assert storage.default_run_dir(None, "r1") == Path("runs/r1")
    storage.check_storage(str(shared))  # does not exist yet: created under a writable folder
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"train\.storage.*not a folder"):
        storage.check_storage(str(tmp_path / "afile"))


def test_storage_url_is_validated_and_mirrored(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a protocol fsspec knows"):
        storage.check_storage("nosuchproto://bucket/runs")
    storage.check_storage("memory://bucket/runs")
    url = storage.remote_run_dir("memory://bucket/runs/", "r1")
    assert url == "memory://bucket/runs/r1"
    assert storage.default_run_dir("memory://bucket/runs", "r1") == Path("runs/r1")
    run = tmp_path / "r1"
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    (run / "checkpoints" / ".step_3.tmp").mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "checkpoints" / "step_2" / "driver_state.json").write_text("{}")
    (run / "checkpoints" / ".step_3.tmp" / "partial").write_text("x")
    assert storage.mirror_run_dir(run, url) == 2
    import fsspec

    fs = fsspec.filesystem("memory")
    assert fs.cat("/bucket/runs/r1/metrics.jsonl") == b'{"step": 1}\n'
    assert not fs.exists("/bucket/runs/r1/checkpoints/.step_3.tmp/partial")
    assert storage.mirror_run_dir(run, url) == 0  # nothing changed
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    assert storage.mirror_run_dir(run, url) == 1
