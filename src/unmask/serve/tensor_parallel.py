"""`unmask serve --tp N`: rank 0 serves HTTP, the other ranks follow its batches.

Every rank holds one shard of the model, so each sampler call has to run on all ranks at once with
the same inputs. Rank 0 runs the server unchanged except for its batch runner's sampler, which
`Leader` wraps: before each call it broadcasts the call (the sampler, canvas, attention mask,
keywords and the generator's state), and after each denoising step whether the batch goes on,
because only rank 0 knows when every row's text has ended or its client left (the server then
stops the batch early). The other ranks (`follow`) receive each call, run it with a step callback
that takes rank 0's decision, and wait for the next, until rank 0 sends the end of service.

Failures end the service instead of hanging it: the collectives of a batch time out
(`BATCH_TIMEOUT`; a dead peer's closed connection fails them at once), the failure marks the group
lost, rank 0 stops its server (SIGTERM to itself: the usual drain, every waiting request gets an
error) and says which, and a follower exits with a message. torchrun also stops the remaining
ranks once one exits with an error. Followers ignore SIGTERM and SIGINT: torchrun forwards a
signal to every rank, and they must keep serving rank 0's batches while it drains.
"""

from __future__ import annotations

import logging
import os
import signal
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("unmask.serve")

BATCH_TIMEOUT = timedelta(seconds=120)     # a collective inside a batch: a peer this late is lost
IDLE_TIMEOUT = timedelta(days=365)         # followers wait for the next batch as long as the server idles


class GroupLost(RuntimeError):
    """A rank of the tensor-parallel group died or stopped answering; the service cannot go on."""


class _Stop(Exception):
    """Raised in a follower's step callback when rank 0 stopped the batch there."""


def announcement_group():
    """The gloo group calls are announced on, without the batch timeout (created on every rank)."""
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def _is_collective_failure(e: BaseException) -> bool:
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(
        word in str(e) for word in ("Gloo", "gloo", "NCCL", "Connection closed", "Timed out", "timed out")))


class Leader:
    """Rank 0's sampler: announces each call to the followers and each step's go-on decision."""

    def __init__(self, sampler, device: torch.device, group):
        self.sampler, self.device, self.group = sampler, device, group
        self.lost: str | None = None   # why the group is gone, once it is

    def __call__(self, model, ids: torch.Tensor, *, callback, generator=None, **kwargs):
        if self.lost:
            raise GroupLost(self.lost)
        if generator is None:   # every rank must draw the same noise
            generator = torch.Generator(ids.device).manual_seed(int(torch.randint(2**62, ())))
        call = dict(sampler=self.sampler, ids=ids.cpu(), generator=generator.get_state(),
                    kwargs={k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        try:
            dist.broadcast_object_list([call], src=0, group=self.group)
            return self.sampler(model, ids, generator=generator, callback=self._stepper(callback), **kwargs)
        except Exception as e:
            if _is_collective_failure(e):
                self._lose(f"a tensor-parallel rank failed or stopped answering ({type(e).__name__}: {e})")
                raise GroupLost(self.lost) from e
            raise

    def _stepper(self, callback):
        def step(state) -> None:
            go_on = False
            try:
                callback(state)
                go_on = True
            finally:   # the followers stop where rank 0 stops, whatever stopped it
                dist.broadcast(torch.tensor([go_on], dtype=torch.uint8, device=self.device), src=0)
        return step

    def _lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            log.error("unmask serve: %s; stopping the server", why)
            os.kill(os.getpid(), signal.SIGTERM)   # the server's own drain: waiting requests get an error

    def close(self) -> None:
        """Tell the followers the service has ended (unless the group is already lost)."""
        if self.lost is None:
            try:
                dist.broadcast_object_list([None], src=0, group=self.group)
            except Exception as e:
                self.lost = f"the end of service could not reach every rank ({type(e).__name__}: {e})"


def follow(model, device: torch.device, group) -> None:
    """A follower rank's service: run each call rank 0 announces, until it announces the end.
    Raises GroupLost when rank 0 is gone or a collective failed."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=group)
        except Exception as e:
            raise GroupLost(f"rank 0 is gone ({type(e).__name__}: {e})") from None
        call = box[0]
        if call is None:
            return
        generator = torch.Generator(device)
        generator.set_state(call["generator"])
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in call["kwargs"].items()}
        try:
            call["sampler"](model, call["ids"].to(device), generator=generator, callback=_follower_step(device),
                            **kwargs)
        except _Stop:
            pass
        except Exception as e:
            if _is_collective_failure(e):
                raise GroupLost(f"a collective failed ({type(e).__name__}: {e})") from None
            # anything else fails the same way on rank 0, which answers the client with it


def _follower_step(device: torch.device):
    def step(state) -> None:
        go_on = torch.zeros(1, dtype=torch.uint8, device=device)
        dist.broadcast(go_on, src=0)
        if not go_on.item():
            raise _Stop
    return step
