"""One-step off-policy rollouts (issue 20, the asynchronous mode): the batch of step n + 1 is
sampled and scored from the weights of step n while step n trains.

The train loop asks its batch source for step n's batch with the current weights W(n-1) (the
weights after n - 1 updates), then dispatches the update. `SampleAhead.next(weights, n)`:

  1. returns the batch of step n: the one sampled ahead from W(n-2) during the previous call
     (lag 1), or, when there is none (the stage's first step, the first step after a resume),
     one sampled now from W(n-1) (lag 0);
  2. starts sampling step n + 1's batch from W(n-1) in a background thread (unless n is the
     stage's last step), on a copy of the weights: the loop donates W(n-1)'s buffers to the
     update it dispatches next.

So generation, decoding to text and the graders (sandboxed subprocesses) of step n + 1 overlap
step n's update: on one device group the two threads' programs share the devices (XLA:CPU runs
them concurrently), and every host-side part of a rollout runs while the device trains. Run on
XLA:CPU, on one device and on a data mesh of simulated devices (tests); not yet on an
accelerator, where two threads' multi-device programs must reach every device in one order
(one process only: `RLStage` refuses a lag with several processes).

The rows of step n are one update stale against the weights they train: the step's
`sampler_logprobs` are those of W(n-2), so the GRPO step's mismatch metrics measure the
staleness, and the token-level correction against them (`loss.importance_correction`: TIS or the
ICE-POP mask) is what keeps the update sound.

Every record gets `rollout_lag` (updates between the sampling weights and the trained ones: 0
or 1), `rollout_wait_s` (how long the step waited for its batch: all of the sampling at lag 0,
what did not overlap at lag 1) and `rollout_ahead_s` (the background sampling's wall time).

Resume: the batch sampled ahead is not checkpointed (the weights it came from are not kept), so
the first step after a resume samples on-policy (lag 0) and the run continues one step ahead
from there; its record says so. `settle()` waits for the batch in flight (the stage calls it
before an evaluation, which shares the reward cache), `close()` at the end of the stage.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Make = Callable[[Any, int], tuple[Any, dict[str, Any]]]


class SampleAhead:
    """Step batches sampled one update ahead (see the module docstring). `make(weights, step)
    -> (batch, record)` samples and scores step `step`'s batch from `weights` (a pytree of
    arrays); `last_step` is the stage's last step (nothing is sampled beyond it)."""

    def __init__(self, make: Make, *, last_step: int, name: str = "rollouts"):
        self.make, self.last_step = make, int(last_step)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-ahead")
        self._ahead: tuple[int, concurrent.futures.Future] | None = None

    def _timed(self, weights: Any, step: int) -> tuple[Any, dict[str, Any], float]:
        t0 = time.perf_counter()
        batch, record = self.make(weights, step)
        return batch, record, time.perf_counter() - t0

    def next(self, weights: Any, step: int) -> tuple[Any, dict[str, Any]]:
        """Step `step`'s (batch, record) for the trainer holding `weights`; see the module
        docstring. An error of the background sampling is raised here, at the step it was for."""
        t0 = time.perf_counter()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == step:
            batch, record, ahead_s = ahead[1].result()
            lag = 1
        else:
            if ahead is not None:  # sampled for another step (the loop moved): not used
                concurrent.futures.wait([ahead[1]])
            batch, record = self.make(weights, step)
            lag, ahead_s = 0, 0.0
        waited = time.perf_counter() - t0
        if step < self.last_step:
            copy = jax.tree.map(jnp.copy, weights)  # enqueued before the loop donates `weights`
            self._ahead = (step + 1, self._pool.submit(self._timed, copy, step + 1))
        stats = {"rollout_lag": lag, "rollout_wait_s": waited, "rollout_ahead_s": ahead_s}
        return batch, {**record, **stats}

    def settle(self) -> None:
        """Waits until the batch being sampled ahead (if any) is done; keeps it for its step."""
        if self._ahead is not None:
            concurrent.futures.wait([self._ahead[1]])

    def close(self) -> None:
        """Waits for the background sampling and discards its batch (the stage is over)."""
        self.settle()
        self._ahead = None
        self._pool.shutdown(wait=True)
