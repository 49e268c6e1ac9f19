"""Reward names -> factories. Built-in rewards are imported only when asked for (so that `shapes` never
pays for torch or open_clip); `register_reward` adds a plug-in, and a name of the form
`package.module:ClassName` loads a user's Reward class directly."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from vgrpo.reward_servers.base import Reward

RewardFactory = Callable[[dict[str, Any]], Reward]

# built-in rewards: name -> "module:factory", imported on first use
_BUILTIN: dict[str, str] = {
    "shapes": "vgrpo.reward_servers.shapes:ShapesReward",
}
_REGISTERED: dict[str, RewardFactory] = {}


class UnknownRewardError(KeyError, ValueError):
    """A reward name that is neither built in, registered, nor a `module:Class` path."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def available_rewards() -> list[str]:
    """The names `get_reward` accepts (besides `module:Class` paths), sorted."""
    return sorted({*_BUILTIN, *_REGISTERED})


def register_reward(name: str, factory: RewardFactory, replace: bool = False) -> None:
    """Makes `factory(options) -> Reward` available as `name`; refuses to shadow one unless `replace`."""
    if not replace and name in available_rewards():
        raise ValueError(f"reward {name!r} is already registered; pass replace=True to override it")
    _REGISTERED[name] = factory


def _import(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def get_reward(name: str, options: dict[str, Any] | None = None) -> Reward:
    """The reward called `name`, built with `options` (reward-specific settings, e.g. from
    `reward.servers.<name>.options`). Raises UnknownRewardError listing the available names."""
    opts = dict(options or {})
    if name in _REGISTERED:
        reward = _REGISTERED[name](opts)
    elif name in _BUILTIN:
        reward = _import(_BUILTIN[name])(**opts)
    elif ":" in name:
        try:
            reward = _import(name)(**opts)
        except (ImportError, AttributeError) as e:
            raise UnknownRewardError(
                f"cannot load reward {name!r} ({e}); expected package.module:ClassName"
            ) from e
    else:
        raise UnknownRewardError(
            f"unknown reward {name!r}; available: {', '.join(available_rewards())} "
            "(or a plug-in as package.module:ClassName)"
        )
    if not isinstance(reward, Reward):
        raise TypeError(
            f"reward {name!r} built a {type(reward).__name__}, not a vgrpo.reward_servers.base.Reward"
        )
    return reward
