"""A batch on a Ray cluster: one actor per worker, each opening the model once.

Each actor holds a `PromptRunner` (its node reads its own copy of the GGUF file, by the
path or hub reference given, so every node needs it at that path or hub access); the
driver sends prompts, a few at a time per actor, and gets each prompt's `PromptResult`
back as soon as it is done. Only the driver writes the store, so its guarantees (every
prompt complete or absent, none twice) hold as for a local run. An actor that dies takes
its prompts in flight with it: they are sent again to a fresh actor, and a prompt that
has killed `MAX_ATTEMPTS` workers is stored as failed, naming that.

Ray is optional (`pip install 'ggufjac[ray]'`); environment variables starting GGUFJAC_
(GGUFJAC_NO_REPACK, say) are passed to the actors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .batch import BatchSettings, PromptResult, PromptRunner, Provenance
from .errors import GgufjacError
from .prompt_sets import PromptItem
from .ray_cluster import alive_nodes, connect

MAX_ATTEMPTS = 2  # workers a prompt may take down before it is stored as failed
IN_FLIGHT = 2  # prompts queued per actor (the next is ready when one finishes)


class _Worker:
    """What runs in each actor."""

    def __init__(self, model: str, settings: BatchSettings, device: str) -> None:
        self.runner = PromptRunner(model, settings, device)

    def provenance(self) -> Provenance:
        return self.runner.provenance()

    def check_targets(self, items: list[PromptItem]) -> None:
        self.runner.check_targets(items)

    def run(self, item: PromptItem) -> PromptResult:
        return self.runner.run(item)


class RayExecutor:
    """The batch's prompts on the Ray cluster at `address` ("auto": the one this machine
    belongs to), `workers` actors (default: one per node)."""

    def __init__(self, address: str, model: str, settings: BatchSettings,
                 workers: int | None = None, device: str = "cpu",
                 cpus_per_worker: float = 1) -> None:
        ray = self.ray = connect(address)
        self.n_workers = workers or alive_nodes(ray)
        self.args = (model, settings, device)
        self.options = {"num_cpus": cpus_per_worker, "max_restarts": 0}
        self.actor_class = ray.remote(_Worker)
        self.actors = [self._new_actor() for _ in range(self.n_workers)]
        self._call(lambda a: [a.provenance.remote() for a in self.actors])  # opened, or why

    def _new_actor(self):
        return self.actor_class.options(**self.options).remote(*self.args)

    def _call(self, make: Callable):
        try:
            return self.ray.get(make(self.actors))
        except self.ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else None
            if isinstance(cause, GgufjacError):
                raise cause from None
            raise GgufjacError(f"a Ray worker failed: {cause or e}") from None
        except self.ray.exceptions.RayActorError as e:
            raise GgufjacError(f"a Ray worker died while opening the model ({e})") from None

    def check_targets(self, items: list[PromptItem]) -> None:
        self._call(lambda actors: actors[0].check_targets.remote(items))

    def provenance(self) -> Provenance:
        """The model file as every worker sees it: one file, or a clear refusal."""
        seen = self._call(lambda actors: [a.provenance.remote() for a in actors])
        if len({p.model_sha256 for p in seen}) > 1:
            raise GgufjacError("the Ray workers read different model files: " + ", ".join(
                sorted({f"{p.model_path} (sha256 {p.model_sha256[:12]}…)" for p in seen})))
        return seen[0]

    def run(self, items: list[PromptItem], write: Callable[[PromptResult], None]) -> None:
        """Every item's result through `write`, in completion order."""
        ray = self.ray
        queue = deque(items)
        attempts: dict[str, int] = {}
        flying: dict[object, tuple[int, PromptItem]] = {}  # object ref -> (actor, item)

        def feed(slot: int) -> None:
            while queue and sum(1 for s, _ in flying.values() if s == slot) < IN_FLIGHT:
                item = queue.popleft()
                flying[self.actors[slot].run.remote(item)] = (slot, item)

        for slot in range(len(self.actors)):
            feed(slot)
        while flying:
            ready, _ = ray.wait(list(flying), num_returns=1)
            ref = ready[0]
            slot, item = flying.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError:
                attempts[item.id] = attempts.get(item.id, 0) + 1
                lost = [ref2 for ref2, (s, _) in flying.items() if s == slot]
                for ref2 in lost:  # the dead actor's other prompts come back too
                    queue.appendleft(flying.pop(ref2)[1])
                if attempts[item.id] >= MAX_ATTEMPTS:
                    write(PromptResult(item.id, item.prompt, item.target, status="failed",
                                       error=f"the Ray worker running it died "
                                             f"{attempts[item.id]} times"))
                else:
                    queue.appendleft(item)
                self.actors[slot] = self._new_actor()
            except ray.exceptions.RayTaskError as e:
                write(PromptResult(item.id, item.prompt, item.target, status="failed",
                                   error=f"the Ray worker raised {e.cause!r}"))
            else:
                write(result)
            feed(slot)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.ray.shutdown()
