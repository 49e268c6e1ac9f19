"""The configuration tree: defaults, YAML round trip, --set coercion, errors that name field and fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from vgrpo.proto.config import ConfigError, RunConfig, dump_config, load_config

CONTRACT_KEYS = [
    "train.steps",
    "train.seed",
    "algorithm.name",
    "rollout.num_workers",
    "rollout.group_size",
    "rollout.prompts_per_step",
    "rollout.num_steps",
    "learner.num_ranks",
    "learner.zero_stage",
    "reward.weights",
    "train.max_staleness",
    "train.checkpoint_every",
    "train.eval_every",
]


def get(d, dotted):
    for p in dotted.split("."):
        d = d[p]
    return d


def test_default_has_contract_keys_and_every_objective_section():
    d = RunConfig().model_dump()
    for k in CONTRACT_KEYS:
        get(d, k)
    for name in ("vgrpo", "dgpo", "flow_grpo", "nft", "flow_grpo_fast", "mixgrpo"):
        assert isinstance(d["algorithm"][name], dict)
    assert d["algorithm"]["name"] == "vgrpo" and d["learner"]["zero_stage"] == 2


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["train.steps=7", "algorithm.name=dgpo", "reward.weights.shapes=2.5"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg
    assert (
        again.train.steps == 7 and again.algorithm.name == "dgpo" and again.reward.weights == {"shapes": 2.5}
    )


def test_set_coerces_types_and_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 3, "seed": 5}, "model": {"lora": None}}))
    cfg = load_config(path, ["train.steps=11", "learner.lr=1e-3", "observability.tensorboard=false"])
    assert cfg.train.steps == 11 and cfg.train.seed == 5
    assert cfg.learner.lr == pytest.approx(1e-3) and cfg.observability.tensorboard is False
    assert cfg.model.lora is None


def test_switching_objective_alone_picks_its_sampler():
    assert load_config(None, []).sampler() == "dpm2"
    assert load_config(None, ["algorithm.name=flow_grpo"]).sampler() == "sde"
    assert load_config(None, ["algorithm.name=mixgrpo"]).sampler() == "sde_window"
    assert load_config(None, ["algorithm.name=flow_grpo_fast"]).sampler() == "sde_window"


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("train.steps=abc", ["train.steps", "abc", "integer"]),
        ("train.stepz=3", ["train.stepz", "steps"]),
        ("algorithm.name=foo", ["algorithm.name", "foo", "vgrpo"]),
        ("rollout.group_size=1", ["rollout.group_size", ">= 2"]),
        ("reward.weights.shapes=.nan", ["reward.weights", "finite"]),
        ("model.lora.rnk=4", ["model.lora.rnk", "rank"]),
        ("bogus.key=1", ["bogus", "Valid keys"]),
        ("learner.zero_stage=5", ["learner.zero_stage"]),
        ("rollout.sampler=sde", ["sde", "flow_grpo"]),
    ],
)
def test_bad_values_name_field_and_fix(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    text = str(info.value)
    for w in words:
        assert w in text, (w, text)


def test_malformed_set_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_cli_config_prints_yaml_and_rejects_fast_without_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "vgrpo.cli", "config", "--set", "train.steps=3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["train"]["steps"] == 3
    bad = subprocess.run(
        [sys.executable, "-m", "vgrpo.cli", "config", "--set", "train.stepz=3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "train.stepz" in bad.stderr and "steps" in bad.stderr and "Traceback" not in bad.stderr


def test_yaml_words_stay_words(tmp_path):
    assert load_config(None, ["observability.progress=off"]).observability.progress == "off"
    path = tmp_path / "c.yaml"
    path.write_text("observability:\n  progress: off\n")
    assert load_config(path).observability.progress == "off"
    assert load_config(None, ["observability.tensorboard=false"]).observability.tensorboard is False


def test_a_renamed_key_still_loads_and_names_its_new_name(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="vgrpo"):
        cfg = load_config(None, ["algorithm.vgrpo.clip_eps=0.02", "algorithm.dgpo.clip=0.03"])
    assert cfg.algorithm.vgrpo.clip_range == 0.02 and cfg.algorithm.dgpo.clip_range == 0.03
    assert "algorithm.vgrpo.clip_eps is now called algorithm.vgrpo.clip_range" in caplog.text
    assert "algorithm.dgpo.clip is now called algorithm.dgpo.clip_range" in caplog.text
    with pytest.raises(ConfigError, match=r"give only algorithm\.vgrpo\.clip_range"):
        load_config(None, ["algorithm.vgrpo.clip_eps=0.02", "algorithm.vgrpo.clip_range=0.03"])


def _float_fields(model: type, prefix: str = "") -> list[str]:
    """Dotted paths of every float field of the configuration tree (float or float | None)."""
    from pydantic import BaseModel

    paths = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        sub = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None:
            paths += _float_fields(sub, f"{prefix}{name}.")
        elif ann is float or (float in args and not any(a in (tuple, list, dict) for a in args)):
            paths.append(prefix + name)
    return paths


def test_every_float_of_the_tree_refuses_inf_and_nan():
    paths = _float_fields(RunConfig)
    assert len(paths) > 40 and "learner.lr" in paths and "algorithm.vgrpo.clip_range" in paths
    for path in paths:
        for bad in (".inf", "-.inf", ".nan"):
            with pytest.raises(ConfigError) as e:
                load_config(None, [f"{path}={bad}"])
            assert path in str(e.value), (path, bad, str(e.value))
    with pytest.raises(ConfigError, match=r"reward\.weights\.shapes"):
        load_config(None, ["reward.weights.shapes=.inf"])


def test_ranges_that_cross_fields_are_checked():
    with pytest.raises(ConfigError, match="betas"):
        load_config(None, ["learner.betas=[1.5, 2]"])
    with pytest.raises(ConfigError, match="t_min"):
        load_config(None, ["algorithm.vgrpo.t_min=0.9", "algorithm.vgrpo.t_max=0.5"])
    assert load_config(None, ["learner.betas=[0.8, 0.99]"]).learner.betas == (0.8, 0.99)
