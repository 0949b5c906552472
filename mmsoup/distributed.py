"""Distributed evaluation on torch.distributed: evaluation sets sharded across ranks.

Under `torchrun --nproc_per_node=K [--nnodes=N ...]` every rank builds the same model and one
`DistributedEvaluator` per evaluation set over its shard of whole batches. Rank 0 runs the recipe
unchanged (e.g. `manifold_mixing_soup`, MMS Alg. 1, whose optimizer lives there) against the
evaluators, which are `Evaluator`s: each call broadcasts a command, any state dict the workers do
not hold yet (Ψ and θ_i once per candidate, not per λ) and λ; the other ranks sit in `serve()`.
Correct counts are all-reduced, so each accuracy is the single-process one (same batches, same
integer count, same division) and the soup, its trace and its files are identical. Only rank 0
writes files. Without torchrun (no WORLD_SIZE) everything runs in one process. The command
`mmsoup distributed` (mmsoup.distributed_cli) builds one soup this way; torchrun starts it through
the package's entry point, as `mmsoup finetune`, so this module is imported once per rank:

    torchrun --nproc_per_node=2 -m mmsoup distributed --ingredients runs/embedded/sweep --out mms.safetensors
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmsoup.determinism import pin_process
from mmsoup.errors import MMSoupError
from mmsoup.evaluate import Evaluator, StateDict

T = TypeVar("T")
_EVALUATORS: dict[str, DistributedEvaluator] = {}  # name -> evaluator, the same on every rank


RENDEZVOUS_S = 300.0  # how long a rank waits for the others to start


def init(
    backend: str | None = None, timeout_s: float = 1800.0, rendezvous_s: float = RENDEZVOUS_S
) -> tuple[int, int]:
    """Join the process group torchrun describes (env://); (rank, world size), (0, 1) without it.

    Ranks started by hand (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT) wait at most
    `rendezvous_s` for each other, then fail in one sentence naming the ranks that never came;
    `timeout_s` bounds each collective once all are there. In pinned mode (mmsoup.isa) oneDNN is
    switched off for the process, as in a single pinned process."""
    pin_process()
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return 0, 1
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun started them all
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        else:
            rank = int(os.environ.get("RANK", "0"))
            store = _rendezvous(rank, world, rendezvous_s)
            store.set_timeout(timedelta(seconds=timeout_s))
            dist.init_process_group(
                backend,
                store=store,
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=timeout_s),
            )
    return dist.get_rank(), dist.get_world_size()


def _rendezvous(rank: int, world: int, seconds: float) -> dist.Store:
    """The TCP store every rank meets at (rank 0 serves it), waited for at most `seconds`."""
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT")
    if not port:
        raise MMSoupError(
            f"WORLD_SIZE={world} but MASTER_PORT is not set; start the ranks with torchrun, or set MASTER_ADDR and MASTER_PORT."
        )
    try:
        return dist.TCPStore(
            host,
            int(port),
            world,
            is_master=rank == 0,
            timeout=timedelta(seconds=seconds),
            wait_for_workers=True,
        )
    except (RuntimeError, OSError) as e:  # DistStoreError / DistNetworkError: nobody came
        text = str(e)
        if rank == 0:
            import re

            joined = re.search(r"(\d+)/(\d+) clients joined", text)
            came = int(joined.group(1)) if joined else 1
            others = ", ".join(str(r) for r in range(1, world))
            who = (
                f"rank{'s' if world > 2 else ''} {others} never started"
                if came <= 1
                else f"only {came} of the {world} ranks started (of ranks {others})"
            )
        else:
            who = f"rank 0 (the store at {host}:{port}) never started"
        raise MMSoupError(
            f"Rank {rank} of WORLD_SIZE={world} waited {seconds:g} s and {who}; start every rank "
            f"(torchrun --nproc_per_node={world} ...) or raise --timeout."
        ) from e


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the current torch.distributed group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank's shard: a contiguous run of whole batches, so every batch is the same."""
    n_batches = -(-n // batch_size)
    per, extra = divmod(n_batches, world)
    first = rank * per + min(rank, extra)
    last = first + per + (rank < extra)
    return min(first * batch_size, n), min(last * batch_size, n)


def _comm_device(device: torch.device) -> torch.device:
    """Where collectives run: the GPU for NCCL, the CPU otherwise (gloo)."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _bcast_object(obj: Any = None) -> Any:
    """Rank 0's `obj` on every rank (a small header: op, evaluator, specs, λ)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _spec(state: StateDict) -> list[tuple[str, list[int], str]]:
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]


def _signature(state: StateDict) -> tuple:
    """Identity + in-place version of each tensor: equal iff the workers' copy is still valid."""
    return tuple((id(v), v._version) for v in state.values())


class DistributedEvaluator(Evaluator):
    """An Evaluator over this rank's shard whose results are all-reduced across ranks."""

    def __init__(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        *,
        name: str = "heldout",
        batch_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        self.rank, self.world = rank_world()
        self._spread = self.world > 1
        lo, hi = shard_bounds(images.shape[0], batch_size, self.rank, self.world)
        empty = hi <= lo  # fewer batches than ranks: this rank only joins the reductions
        sl = slice(0, 1) if empty else slice(lo, hi)
        super().__init__(model, images[sl], labels[sl], batch_size=batch_size, **kwargs)
        self._probe = self.images[:1]  # one image: the logits' width on a rank without batches
        if empty:
            self.images, self.labels = self.images[:0], self.labels[:0]
        self._targets = labels.to(self.device, torch.long)  # every label: ensembles score on rank 0
        self._total = images.shape[0]
        self._shard_sizes = [
            b - a
            for a, b in (
                shard_bounds(self._total, batch_size, r, self.world) for r in range(self.world)
            )
        ]
        if self._total and int(self._targets.max()) >= self.num_classes:
            raise MMSoupError(
                f"The labels go up to {int(self._targets.max())} but the head has {self.num_classes} "
                "classes; use a head or projection that matches the data."
            )
        self.name = name
        self._sent: dict[str, tuple[Any, tuple]] = {}  # rank 0: slot -> (state, signature)
        self._held: dict[str, Any] = {}  # workers: slot -> last received state / components
        _EVALUATORS[name] = self

    @property
    def n(self) -> int:
        """Number of examples over all ranks."""
        return self._total

    @property
    def targets(self) -> Tensor:
        """Every rank's labels, in order: the rows of `logits()` (this rank runs only its shard)."""
        return self._targets

    # -- rank 0: the Evaluator API, one broadcast command per call -------------------------------
    def _fresh(self, slot: str, state: StateDict) -> list | None:
        """state's spec if the workers do not hold it yet, else None (sent once per candidate)."""
        held = self._sent.get(slot)
        if held is not None and held[0] is state and held[1] == _signature(state):
            return None
        self._sent[slot] = (state, _signature(state))  # a strong ref: its id cannot be reused
        return _spec(state)

    def _command(self, header: dict[str, Any], local: dict[str, Any]) -> Any:
        header["ev"] = self.name
        _bcast_object(header)
        return self._handle(header, local)

    def mixed_accuracy(self, base: StateDict, other: StateDict, components, lambdas) -> float:
        """ValAcc(Ψ'(λ)) over all ranks: only λ travels once Ψ and θ_i are held (MMS Alg. 1)."""
        if not self._spread:
            return super().mixed_accuracy(base, other, components, lambdas)
        self._check_keys(base)
        self._check_keys(other)
        lam = (
            {k: float(v) for k, v in lambdas.items()}
            if isinstance(lambdas, Mapping)
            else [float(v) for v in lambdas]
        )
        comps = None
        if self._sent.get("components", (None,))[0] is not components:
            self._sent["components"] = (components, ())
            comps = {str(c): list(keys) for c, keys in components.items()}
        header = {"op": "mix", "lambdas": lam, "components": comps}
        header |= {"base": self._fresh("base", base), "other": self._fresh("other", other)}
        return self._command(header, {"base": base, "other": other, "components": components})

    def __call__(self, state: StateDict) -> float:
        """Load `state` on every rank and return the all-reduced held-out accuracy."""
        if not self._spread:
            return super().__call__(state)
        self._check_keys(state)
        return self._command({"op": "call", "state": _spec(state)}, {"state": state})

    def load(self, state: StateDict) -> None:
        """Copy a state dict into the live parameters of every rank."""
        if not self._spread:
            return super().load(state)
        self._check_keys(state)
        self._command({"op": "load", "state": _spec(state)}, {"state": state})

    def accuracy(self) -> float:
        """Top-1 accuracy of the current parameters over all ranks' shards."""
        if not self._spread:
            return super().accuracy()
        return self._command({"op": "acc"}, {})

    def logits(self, project: bool = True) -> Tensor:
        """(N, C') logits over all ranks, in the original order (CPU float32)."""
        if not self._spread:
            return super().logits(project)
        return self._command({"op": "logits", "project": project}, {})

    # -- every rank: execute one command -------------------------------------------------------
    def _bcast_state(self, spec: list, state: StateDict | None) -> dict[str, Tensor]:
        """Rank 0's state dict on every rank, one flat broadcast per dtype."""
        comm, out = _comm_device(self.device), {}
        for dtype_name in dict.fromkeys(d for _, _, d in spec):
            dtype = getattr(torch, dtype_name)
            rows = [(k, shape) for k, shape, d in spec if d == dtype_name]
            sizes = [int(torch.Size(shape).numel()) for _, shape in rows]
            if state is not None:  # rank 0
                flat = torch.cat([state[k].reshape(-1).to(comm, dtype) for k, _ in rows])
            else:
                flat = torch.empty(sum(sizes), dtype=dtype, device=comm)
            dist.broadcast(flat, src=0)
            if state is None:
                for (k, shape), part in zip(rows, flat.split(sizes)):
                    out[k] = part.view(shape).to(self.device)
        return dict(state) if state is not None else {k: out[k] for k, _, _ in spec}

    def _inputs(self, header: dict[str, Any], local: dict[str, Any] | None) -> dict[str, Any]:
        """The op's state dicts: rank 0's own objects, the workers' received (or held) copies."""
        got = {}
        for slot in ("base", "other", "state"):
            if slot not in header:
                continue
            if header[slot] is not None:
                recv = self._bcast_state(header[slot], None if local is None else local[slot])
                if local is None:
                    self._held[slot] = recv
            got[slot] = local[slot] if local is not None else self._held[slot]
        if header.get("op") == "mix":
            if local is None and header["components"] is not None:
                self._held["components"] = header["components"]  # a stable object: _Plan cached
            got["components"] = (
                local["components"] if local is not None else self._held["components"]
            )
        return got

    def _handle(self, header: dict[str, Any], local: dict[str, Any] | None) -> Any:
        op, args = header["op"], self._inputs(header, local)
        value, error, rows = torch.zeros((), dtype=torch.long), None, None
        try:
            with torch.inference_mode():
                if op == "mix":
                    self.mix(args["base"], args["other"], args["components"], header["lambdas"])
                    value = self._mixed_hits()
                elif op in ("call", "load"):
                    Evaluator.load(self, args["state"])
                    value = self._hits() if op == "call" else value
                elif op == "acc":
                    value = self._hits()
                elif op == "logits":
                    if self.images.shape[0]:
                        rows = Evaluator.logits(self, header["project"])
                    else:
                        rows = self.forward(self._probe, header["project"]).float().cpu()[:0]
        except Exception as e:  # noqa: BLE001 (reported through the status reduction below)
            error = e
            if self.rank:
                print(
                    f"mmsoup.distributed rank {self.rank}: {type(e).__name__}: {e}", file=sys.stderr
                )
        comm = _comm_device(self.device)
        status = torch.stack(
            [value.to(comm, torch.long), torch.tensor(int(error is not None), device=comm)]
        )
        dist.all_reduce(status)  # correct counts and error flags of every rank
        hits, failed = int(status[0]), int(status[1])
        if failed:
            if error is not None and self.rank == 0:
                raise error
            if self.rank == 0:
                raise MMSoupError(f"{failed} worker rank(s) failed on {op!r}; see their stderr.")
            return None
        if op == "logits":
            return self._gather_rows(rows)
        return hits / self._total if op in ("mix", "call", "acc") else None

    def _gather_rows(self, rows: Tensor) -> Tensor:
        """Concatenate every rank's (n_r, C) rows in rank order (all_gather of padded blocks)."""
        comm, width = _comm_device(self.device), rows.shape[1:]
        pad = max(self._shard_sizes)
        block = torch.zeros((pad, *width), dtype=rows.dtype, device=comm)
        block[: rows.shape[0]] = rows.to(comm)
        parts = [torch.empty_like(block) for _ in range(self.world)]
        dist.all_gather(parts, block)
        return torch.cat([p[:n].cpu() for p, n in zip(parts, self._shard_sizes)])


def serve() -> None:
    """Worker ranks: execute rank 0's commands until it says stop."""
    while True:
        header = _bcast_object()
        if header["op"] == "stop":
            return
        _EVALUATORS[header["ev"]]._handle(header, None)


def run_on_rank0(fn: Callable[[], T]) -> T | None:
    """Run fn on rank 0 while the other ranks serve its evaluations; None on the workers."""
    rank, world = rank_world()
    if world == 1:
        return fn()
    if rank != 0:
        serve()
        return None
    try:
        return fn()
    finally:
        _bcast_object({"op": "stop"})


if __name__ == "__main__":  # the older spelling `-m mmsoup.distributed`, still accepted
    # It runs this file as __main__ and imports it again as mmsoup.distributed (through
    # mmsoup.distributed_cli): two copies of the module. `-m mmsoup distributed` imports it once.
    from mmsoup.cli import main as cli_main

    sys.exit(cli_main(["distributed", *sys.argv[1:]]))
