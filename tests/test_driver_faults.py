"""The driver's fault handling, fast: the waits (``Roles.get``) on the session's Ray with trivial tasks and
actors, and the replacement / stop decisions of the Trainer with a stand-in for the roles."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vgrpo.driver import Trainer
from vgrpo.proto.config import load_config
from vgrpo.roles import ActorLost, Roles, TrainingError, death_reason


def bare_roles(timeout_s: float) -> Roles:
    roles = Roles.__new__(Roles)  # only the waiting logic: no placement group, no actors
    roles.timeout_s = timeout_s
    return roles


def test_the_first_failure_surfaces_at_once_and_names_its_call(ray_cluster: dict[str, Any]) -> None:
    import ray

    @ray.remote(num_cpus=0)
    def slow() -> int:
        time.sleep(60)
        return 1

    @ray.remote(num_cpus=0)
    def boom() -> int:
        raise RuntimeError("boom")

    class PeerShell:
        def ping(self) -> int:
            return 1

        def die(self) -> int:
            os._exit(1)  # the worker process dies mid-call, as with OOM or a lost node

    Peer: Any = ray.remote(num_cpus=0)(PeerShell)

    roles = bare_roles(30)
    s = slow.remote()
    t0 = time.monotonic()
    with pytest.raises(TrainingError, match=r"(?s)learner rank 1 \(train_step\) failed:.*boom"):
        roles.get(
            [s, boom.remote()],
            "learner",
            names=["learner rank 0 (train_step)", "learner rank 1 (train_step)"],
        )
    assert time.monotonic() - t0 < 20  # not after the slow call
    peer = Peer.remote()
    assert roles.get([peer.ping.remote(), peer.ping.remote()], "peer") == [1, 1]
    with pytest.raises(ActorLost) as e:
        roles.get([s, peer.die.remote()], "x", names=["a", "rollout worker 1 (sampling step 2)"])
    assert e.value.index == 1 and "rollout worker 1 (sampling step 2): the actor died" in str(e.value)
    assert "ActorDiedError" in e.value.reason
    with pytest.raises(TrainingError, match=r"rank 0 \(slow\): no answer within 1 s \(train.timeout_s\)"):
        roles.get([s], "x", names=["rank 0 (slow)"], timeout=1)
    ray.cancel(s, force=True)


def test_death_reason_is_one_line() -> None:
    msg = (
        "The actor died unexpectedly before finishing this task.\n\tclass_name: RolloutWorkerShell\n"
        "\tactor_id: abc\n\tpid: 4242\n\tnamespace: x\nThe actor is dead because it was killed by `ray.kill`."
    )
    assert death_reason(RuntimeError(msg)) == "RuntimeError, pid 4242: it was killed by `ray.kill`"
    oom = msg.replace(
        "it was killed by `ray.kill`.",
        "its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly "
        "exits with a connection error code 2. End of file. Some common causes include: (1) the OOM killer",
    )
    assert (
        death_reason(RuntimeError(oom))
        == "RuntimeError, pid 4242: its worker process has died (SYSTEM_ERROR)"
    )


class Worker:
    """A rollout worker as the Trainer calls it; records the weight updates and calls sent to it, in order."""

    def __init__(self, name: str):
        self.name = name
        self.updates: list[Any] = []
        self.calls: list[str] = []

        def update(w: Any) -> None:
            self.updates.append(w)
            self.calls.append(f"update {w}")

        self.update_weights = SimpleNamespace(remote=update)


class StandIn:
    """The roles as the Trainer sees them: workers, learners, a get that fails as told; ``room``: how many
    replacements a node can take (then a dead worker leaves the run)."""

    def __init__(
        self,
        fail: list[int],
        dead_ranks: list[int] | None = None,
        error: Exception | None = None,
        room: int = 99,
        workers: int = 2,
    ):
        self.workers = [Worker(f"w{i}") for i in range(workers)]
        self.learners = [
            SimpleNamespace(published_weights=SimpleNamespace(remote=lambda v: f"learner-v{v}"))
        ] * 2
        self.worker_bundle = [{"CPU": 1.0}]
        self.fail, self.dead_ranks, self.error, self.room = fail, dead_ranks or [], error, room
        self.replaced: list[tuple[str, int, Any]] = []

    def name(self, worker: Any) -> str:
        return f"rollout worker {worker.name}"

    def get(
        self, refs: list[Any], role: str, timeout: float | None = None, names: list[str] | None = None
    ) -> Any:
        if self.error is not None:
            raise self.error
        if self.fail:
            i = self.fail.pop(0)
            raise ActorLost(f"{names[i] if names else role}: the actor died", i, "ActorDiedError: killed")
        return [f"done:{r}" for r in refs]

    def replace_worker(self, worker: Any, version: int, weights: Any) -> Any:
        i = self.workers.index(worker)
        self.replaced.append((worker.name, version, weights))
        if self.room <= 0:
            del self.workers[i]
            return None
        self.room -= 1
        self.workers[i] = Worker(worker.name + "'")
        return self.workers[i]

    def dead_learner_ranks(self) -> list[int]:
        return self.dead_ranks


@pytest.fixture
def trainer(tmp_path: Path) -> Trainer:
    from vgrpo.run_dir import RunDir

    return Trainer(load_config(None, ["train.max_staleness=1"]), RunDir(tmp_path / "run"))


def test_a_dead_worker_is_replaced_and_only_its_call_redone(
    trainer: Trainer, caplog: pytest.LogCaptureFixture
) -> None:
    roles: Any = StandIn(fail=[1])
    trainer.version = 3
    trainer._publish(2, "ref-v2")
    trainer._publish(3, "ref-v3")
    calls = {0: lambda w: f"{w.name}.sample", 1: lambda w: f"{w.name}.sample"}
    with caplog.at_level(logging.WARNING, logger="vgrpo"):
        got = trainer.on_workers(roles, calls, "sampling step 4", version=2)
    assert got == {0: "done:w0.sample", 1: "done:w1'.sample"}
    # the replacement holds the version the share was to be sampled with (so the batch stays one version)
    assert roles.replaced == [("w1", 2, "ref-v2")]
    # ... and then catches up with the current version, like the others
    assert roles.workers[1].updates == ["ref-v3"] and roles.workers[0].updates == []
    assert "rollout worker w1 died during sampling step 4" in caplog.text
    # versions older than any pending rollout can need are dropped
    trainer._publish(4, "ref-v4")
    assert sorted(trainer.published) == [2, 3, 4]


def test_a_worker_that_keeps_dying_stops_the_run(trainer: Trainer) -> None:
    # the first death is the worker's own (its node may have left: every worker it held dies at once); then
    # its replacements die, and past MAX_WORKER_REPLACEMENTS_PER_STEP of those the run stops
    roles: Any = StandIn(fail=[0, 0, 0, 0, 0])
    with pytest.raises(TrainingError, match="not replacing it any more"):
        trainer.on_workers(roles, {0: lambda w: w.name}, "sampling step 1", version=0)


def test_a_worker_with_no_room_for_a_replacement_leaves_and_its_share_is_redone_by_another(
    trainer: Trainer, caplog: pytest.LogCaptureFixture
) -> None:
    # the node of w1 left and no other has room: w1 leaves the run; its share is sampled by w0 with the
    # share's version (2), and w0 then returns to the current version (3) — actor calls run in order
    roles: Any = StandIn(fail=[1], room=0)
    trainer.version = 3
    trainer._publish(2, "ref-v2")
    trainer._publish(3, "ref-v3")

    def share(k: int) -> Any:
        def fn(w: Any) -> str:
            w.calls.append(f"sample {k}")
            return f"{w.name}.sample{k}"

        return fn

    with caplog.at_level(logging.WARNING, logger="vgrpo"):
        got = trainer.on_workers(roles, {0: share(0), 1: share(1)}, "sampling step 4", version=2)
    assert got == {0: "done:w0.sample0", 1: "done:w0.sample1"}
    assert [w.name for w in roles.workers] == ["w0"]
    assert roles.workers[0].calls == ["sample 0", "update ref-v2", "sample 1", "update ref-v3"]
    assert "rollout worker w1's share of sampling step 4 goes to rollout worker w0" in caplog.text


def test_a_lost_worker_s_weight_update_is_dropped_not_redone(trainer: Trainer) -> None:
    roles: Any = StandIn(fail=[0], room=0)
    trainer.version = 1
    calls = {k: (lambda w: w.update_weights.remote("ref-v1")) for k in range(2)}
    got = trainer.on_workers(roles, calls, "update_weights to version 1", 1, redo_elsewhere=False)
    assert sorted(got) == [1] and [w.name for w in roles.workers] == ["w1"]
    assert roles.workers[0].updates == ["ref-v1"]  # once: the dead worker's update did not go to it


def test_version_0_of_a_late_redo_comes_from_learner_rank_0(trainer: Trainer) -> None:
    # a share of version 0 (the starting policy, published as None) redone on a worker already at version 1
    roles: Any = StandIn(fail=[1], room=0)
    trainer.version = 1
    trainer._publish(1, "ref-v1")
    got = trainer.on_workers(roles, {k: (lambda w: f"{w.name}.s") for k in range(2)}, "sampling step 2", 0)
    assert got == {0: "done:w0.s", 1: "done:w0.s"}
    assert roles.workers[0].updates == ["learner-v0", "ref-v1"]


def test_no_worker_left_stops_the_run_with_the_resume_hint(trainer: Trainer) -> None:
    roles: Any = StandIn(fail=[0], room=0, workers=1)
    with pytest.raises(
        TrainingError, match=r"no rollout worker is left: no node has room for one \(\{\"CPU\": 1.0\}\)"
    ):
        trainer.on_workers(roles, {0: lambda w: "x"}, "sampling step 1", version=0)


def test_a_dead_learner_rank_stops_the_run_naming_the_rank_and_resume(trainer: Trainer) -> None:
    roles: Any = StandIn(fail=[1])
    with pytest.raises(TrainingError) as e:
        trainer.on_learners(roles, ["r0", "r1"], "train_step", 3)
    text = str(e.value)
    assert text.startswith("learner rank 1 died during train_step of step 3 (ActorDiedError: killed)")
    assert f"`vgrpo train --run-dir {trainer.run.root} --resume` continues from step 0" in text
    # the surviving peer's collective error arrives first: the dead rank is found by probing
    peer_error = TrainingError("learner rank 0 (train_step) failed:\nRuntimeError: Connection closed by peer")
    (trainer.run.checkpoints / "step_2").mkdir()
    (trainer.run.checkpoints / "step_2" / "driver_state.json").write_text("{}")
    (trainer.run.checkpoints / "step_2" / "policy.safetensors").write_bytes(b"")  # what a complete one needs
    with pytest.raises(TrainingError, match=r"learner rank 1 died .*the last checkpoint \(step 2\)"):
        trainer.on_learners(StandIn([], dead_ranks=[1], error=peer_error), ["r0", "r1"], "train_step", 3)  # type: ignore[arg-type]
    # no rank is dead: the rank's own error stands
    with pytest.raises(TrainingError, match="Connection closed by peer"):
        trainer.on_learners(StandIn([], error=peer_error), ["r0", "r1"], "train_step", 3)  # type: ignore[arg-type]
