"""The training stream: tasks mixed by ratio, each task's examples in seeded epochs.

Example k of the stream is a pure function of (seed, k), so the data position in a checkpoint is just
k, and a resumed run sees exactly the examples an uninterrupted one would.
"""
from __future__ import annotations

import random


class TaskMixture:
    def __init__(self, records_by_task: dict[str, list[dict]], ratios: dict[str, float], seed: int):
        self.records = records_by_task
        self.names = sorted(records_by_task)
        total = sum(ratios[n] for n in self.names)
        self.weights = [ratios[n] / total for n in self.names]
        self.seed = seed
        self._perms: dict[str, tuple[int, list[int]]] = {}  # task -> (epoch, order): only the current epoch

    def _permutation(self, task: str, epoch: int) -> list[int]:
        if self._perms.get(task, (None,))[0] != epoch:
            perm = list(range(len(self.records[task])))
            random.Random(f"{self.seed}-{task}-{epoch}").shuffle(perm)
            self._perms[task] = (epoch, perm)
        return self._perms[task][1]

    def examples(self, start: int):
        """Yield (k, record) from example index `start` on, forever."""
        counts = dict.fromkeys(self.names, 0)
        for i in range(start):
            counts[self._draw(i)] += 1
        k = start
        while True:
            task = self._draw(k)
            n = len(self.records[task])
            epoch, pos = divmod(counts[task], n)
            counts[task] += 1
            yield k, self.records[task][self._permutation(task, epoch)[pos]]
            k += 1

    def task_of(self, k: int) -> str:
        """The task example k of the stream is drawn from (a record's own `task` field may name another)."""
        return self._draw(k)

    def _draw(self, i: int) -> str:
        if len(self.names) == 1:
            return self.names[0]
        return random.Random(f"{self.seed}-mix-{i}").choices(self.names, self.weights)[0]
