"""Reward names -> factories. Built-in rewards are imported only when asked for (so that `shapes` never
pays for torch or transformers); `register_reward` adds a plug-in; installed packages add theirs through
the `vgrpo.rewards` entry-point group; and a name of the form `package.module:attr` loads a user's
Reward class (built with the options as keyword arguments) or a plain scoring function
`fn(images, prompts, metadata, **options) -> list[float]` (wrapped as a FunctionReward) directly."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from vgrpo.reward_servers.base import Reward, ScoredItem

RewardFactory = Callable[[dict[str, Any]], Reward]

# built-in rewards: name -> a loader of its class, which imports the reward's module on first use (plain
# imports: a role never reaches project code through importlib)


def _shapes() -> Any:
    from vgrpo.reward_servers.shapes import ShapesReward

    return ShapesReward


def _geneval() -> Any:
    from vgrpo.reward_servers.geneval import GenEvalReward

    return GenEvalReward


def _pickscore() -> Any:
    from vgrpo.reward_servers.pickscore import PickScoreReward

    return PickScoreReward


def _ocr() -> Any:
    from vgrpo.reward_servers.ocr import OcrReward

    return OcrReward


def _remote() -> Any:
    from vgrpo.reward_servers.remote import RemoteReward

    return RemoteReward


def _jpeg_compressibility() -> Any:
    from vgrpo.reward_servers.jpeg import JpegCompressibility

    return JpegCompressibility


def _jpeg_incompressibility() -> Any:
    from vgrpo.reward_servers.jpeg import JpegIncompressibility

    return JpegIncompressibility


def _clipscore() -> Any:
    from vgrpo.reward_servers.clip_rewards import ClipScoreReward

    return ClipScoreReward


def _aesthetic() -> Any:
    from vgrpo.reward_servers.clip_rewards import AestheticReward

    return AestheticReward


def _hpsv2() -> Any:
    from vgrpo.reward_servers.hpsv2 import HPSv2Reward

    return HPSv2Reward


def _imagereward() -> Any:
    from vgrpo.reward_servers.imagereward import ImageRewardReward

    return ImageRewardReward


def _vlm_judge() -> Any:
    from vgrpo.reward_servers.vlm_judge import VlmJudgeReward

    return VlmJudgeReward


_BUILTIN: dict[str, Callable[[], Any]] = {
    "shapes": _shapes,
    "geneval": _geneval,
    "pickscore": _pickscore,
    "ocr": _ocr,
    "remote": _remote,
    "jpeg_compressibility": _jpeg_compressibility,
    "jpeg_incompressibility": _jpeg_incompressibility,
    "clipscore": _clipscore,
    "aesthetic": _aesthetic,
    "hpsv2": _hpsv2,
    "imagereward": _imagereward,
    "vlm_judge": _vlm_judge,
}
_REGISTERED: dict[str, RewardFactory] = {}
ENTRY_POINT_GROUP = "vgrpo.rewards"


class UnknownRewardError(KeyError, ValueError):
    """A reward name that is neither built in, registered, nor a `module:Class` path."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _entry_points() -> dict[str, str]:
    """Installed plug-ins: entry points of group `vgrpo.rewards`, name -> "module:attr"."""
    try:
        return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # a broken distribution's metadata must not break the built-in rewards
        return {}


def available_rewards() -> list[str]:
    """The names `get_reward` accepts (besides `module:attr` paths), sorted: built-ins, rewards given to
    `register_reward`, and installed entry points of group `vgrpo.rewards`."""
    return sorted({*_BUILTIN, *_REGISTERED, *_entry_points()})


def is_resolvable(name: str, known: set[str] | None = None, elsewhere: bool = False) -> bool:
    """Whether ``name`` is an available reward or a ``module:Class`` whose module can be found — checked
    without importing any reward model, so a typo fails before anything starts. ``elsewhere``: the
    reward's replicas bring their own code (a runtime_env), so a ``module:Class`` is taken as given
    (a wrong one fails its deployment at start-up, with Serve's error)."""
    import importlib.util

    if name in (known if known is not None else set(available_rewards())):
        return True
    module = name.partition(":")[0] if ":" in name else ""
    if elsewhere and module:
        return True
    try:
        return bool(module) and importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def reward_factory(name: str) -> RewardFactory | None:
    """The factory `register_reward` holds for `name` in this process (None for built-ins, entry points
    and paths, which every process resolves by itself)."""
    return _REGISTERED.get(name)


class FunctionReward(Reward):
    """A plain Python function as a Reward: `fn(images, prompts, metadata, **options)` returns one value
    per image: a float, None or NaN (that image gets an item error), or a ScoredItem."""

    def __init__(self, fn: Callable[..., Any], name: str, options: dict[str, Any] | None = None) -> None:
        self.fn = fn
        self.name = name
        self.options = dict(options or {})

    def score(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None = None
    ) -> list[ScoredItem]:
        self.check_batch(images, prompts, metadata)
        values = list(self.fn(images, prompts, metadata, **self.options))
        if len(values) != len(images):
            raise ValueError(
                f"reward function {self.name!r} returned {len(values)} values for {len(images)} images; "
                "return one per image, in order"
            )
        out = []
        for i, v in enumerate(values):
            if isinstance(v, ScoredItem):
                out.append(v)
            elif v is None or not math.isfinite(float(v)):
                out.append(ScoredItem(None, error=f"{self.name} returned {v!r} for image {i}"))
            else:
                out.append(ScoredItem(float(v)))
        return out


def register_reward(name: str, factory: RewardFactory, replace: bool = False) -> None:
    """Makes `factory(options) -> Reward` available as `name`; refuses to shadow one unless `replace`."""
    if not replace and name in available_rewards():
        raise ValueError(f"reward {name!r} is already registered; pass replace=True to override it")
    _REGISTERED[name] = factory


def _import(path: str) -> Any:
    """A user's ``package.module:attr`` (a plug-in path or an entry point's value)."""
    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _build(obj: Any, name: str, opts: dict[str, Any]) -> Any:
    """A class is built with the options as keyword arguments; any other callable is a scoring function."""
    if inspect.isclass(obj):
        return obj(**opts)
    if callable(obj):
        return FunctionReward(obj, name, opts)
    raise TypeError(f"reward {name!r} names a {type(obj).__name__}, not a Reward class or a function")


def get_reward(name: str, options: dict[str, Any] | None = None) -> Reward:
    """The reward called `name`, built with `options` (reward-specific settings, e.g. from
    `reward.servers.<name>.options`). Raises UnknownRewardError listing the available names."""
    opts = dict(options or {})
    if name in _REGISTERED:
        reward = _REGISTERED[name](opts)
    elif name in _BUILTIN:
        reward = _BUILTIN[name]()(**opts)
    elif name in (plugins := _entry_points()):
        try:
            target = _import(plugins[name])
        except (ImportError, AttributeError) as e:
            raise UnknownRewardError(
                f"reward {name!r} (entry point {plugins[name]!r} of group {ENTRY_POINT_GROUP}) "
                f"cannot be imported: {e}"
            ) from e
        reward = _build(target, name, opts)
    elif ":" in name:
        try:
            target = _import(name)
        except (ImportError, AttributeError) as e:
            raise UnknownRewardError(
                f"cannot load reward {name!r} ({e}); expected package.module:ClassName or "
                "package.module:function"
            ) from e
        reward = _build(target, name, opts)
    else:
        raise UnknownRewardError(
            f"unknown reward {name!r}; available: {', '.join(available_rewards())} "
            "(or a plug-in as package.module:ClassName or package.module:function)"
        )
    if not isinstance(reward, Reward):
        raise TypeError(
            f"reward {name!r} built a {type(reward).__name__}, not a vgrpo.reward_servers.base.Reward"
        )
    return reward
