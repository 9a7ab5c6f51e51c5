"""Data-parallel training on torch.distributed (`torchrun`): the ranks of a run and what they reduce.

Under `torchrun --nproc_per_node R`, every rank runs the same script on its own rows; trainSAE
keeps a copy of each trainer on every rank, and the copies stay identical because every step
equals one step on the global batch, the rows of all ranks (rank 0's first, then rank 1's, ...):

- gradients: g = Σ_r (N_r / N) g_r, where rank r's loss is a mean over its N_r rows and N = Σ_r N_r
  (the gradient of the mean over all N rows, whatever the ranks' shares);
- what a recipe reads from the whole batch is reduced: BatchTopK's k·N largest pre-activations (a
  global threshold from every rank's candidates), the latents that fired and the tokens seen,
  AuxK's error variance, the thresholds' batch statistics, the L0 of target_l0, p-annealing's
  penalty measurements, the ghost-grad loss ratio, normalize_activations' E‖x‖²;
- what a recipe computes once from the whole batch (b_dec's geometric median at the first step,
  a transcoder's mean output, the inputs that resampling draws from) runs on the rows of all
  ranks gathered, identically on every rank, with each trainer's own generator, whose state is the
  same on every rank.

`Replicas` is the handle a trainer does this through; `SINGLE_PROCESS` makes no torch.distributed
call, so one process runs exactly the code it always ran.

With several sites, `SitePlan` spreads them over the ranks instead (sparsify's distribute_modules):
each site's trainers live on one rank only, every rank reads all sites of its own rows, and one
all-to-all per step sends each site's rows to the rank that trains it, which then steps its
trainers on the site's global batch, exactly as one process would.
"""
from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from .kernels import SparseCodes, largest_entries

__all__ = ["Replicas", "SINGLE_PROCESS", "RankLost", "SitePlan", "DEFAULT_TIMEOUT", "launched", "init_process_group",
           "destroy_process_group", "world_replicas", "rank_shard", "this_rank", "is_writer"]

DEFAULT_TIMEOUT = timedelta(minutes=10)
"""How long a collective waits for the other ranks before the run stops with an error (a rank that
died or hangs); it must cover rank 0 writing a checkpoint while the others wait."""


def _environment_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched() -> bool:
    """Whether this process is one of several ranks: torch.distributed is initialised with more
    than one, or torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) say so."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return _environment_world_size() > 1 and "RANK" in os.environ


def init_process_group(timeout: timedelta = DEFAULT_TIMEOUT) -> bool:
    """Join the ranks torchrun started (env://), unless torch.distributed is initialised already.
    With CUDA, each rank uses GPU LOCAL_RANK and the backend is "cpu:gloo,cuda:nccl" (NCCL for CUDA
    tensors, gloo for CPU ones); without, gloo. Returns whether this call created the group.

    The group then lives as long as the process (it is destroyed at exit): a default group
    re-created on torchrun's store can pair with the stale addresses of the one before it and hang,
    so later calls reuse it instead."""
    if dist.is_initialized() or not launched():
        return False
    if torch.cuda.is_available() and dist.is_nccl_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timeout)
    atexit.register(destroy_process_group)
    return True


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_replicas() -> "Replicas":
    """The Replicas of every rank when several run, else SINGLE_PROCESS."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Replicas(dist.group.WORLD)
    return SINGLE_PROCESS


def is_writer() -> bool:
    """Whether this process writes the run's files: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def this_rank(rank: int | None = None, world_size: int | None = None, caller: str = "rank_shard") -> tuple[int, int]:
    """(rank, world size): the ones given, else torch.distributed's, else torchrun's RANK and
    WORLD_SIZE (the process group may not exist yet), else (0, 1)."""
    if rank is None and world_size is None:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return (int(os.environ.get("RANK", "0")), _environment_world_size()) if launched() else (0, 1)
    if rank is None or world_size is None:
        raise ValueError(f"{caller}: pass both rank= and world_size=, or neither (then torch.distributed's or "
                         "torchrun's are used)")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{caller}: world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"{caller}: rank must be in [0, world_size={world_size}), got {rank!r}")
    return rank, world_size


def rank_shard(items: Iterable[Any], rank: int | None = None, world_size: int | None = None) -> Iterator[Any]:
    """This rank's share of a stream (texts, batches): items rank, rank + R, rank + 2R, ... of R ranks
    (by default those of torch.distributed, or torchrun's RANK and WORLD_SIZE; everything in one
    process)."""
    rank, world_size = this_rank(rank, world_size)
    for index, item in enumerate(items):
        if index % world_size == rank:
            yield item


class RankLost(RuntimeError):
    """A collective failed: another rank died (its connection closed), stopped with an error, or
    did not answer within the process group's timeout."""


@contextmanager
def _collective():
    """Report a failed collective as RankLost (gloo raises RuntimeError, NCCL DistBackendError, one)."""
    try:
        yield
    except RuntimeError as error:
        raise RankLost(f"{type(error).__name__}: {str(error).strip()[:300]}") from error


class Replicas:
    """The ranks that hold identical copies of one trainer, and the reductions that keep them
    identical (see the module docstring). `group` None: one process, every method is the identity
    and makes no torch.distributed call."""

    def __init__(self, group: Any = None):
        self.group = group
        if group is None:
            self.rank, self.size, self.control_device = 0, 1, torch.device("cpu")
        else:
            self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
            backend = str(dist.get_backend(group))
            self.control_device = (torch.device("cpu") if "gloo" in backend
                                   else torch.device("cuda", torch.cuda.current_device()))

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def __repr__(self) -> str:
        return f"Replicas(rank {self.rank} of {self.size})"

    # -- plain collectives -------------------------------------------------------------------
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Σ over ranks, in place."""
        if self.group is not None:
            with _collective():
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def min_(self, tensor: torch.Tensor) -> torch.Tensor:
        """min over ranks, in place."""
        if self.group is not None:
            with _collective():
                dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        return tensor

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank."""
        if self.group is None:
            return flag
        return bool(self.min_(torch.tensor([int(flag)], device=self.control_device)).item())

    def exchange(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order."""
        if self.group is None:
            return [obj]
        gathered = [None] * self.size
        with _collective():
            dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def gather_to_first(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` (picklable) on rank 0, in rank order; None on the other ranks."""
        if self.group is None:
            return [obj]
        gathered = [None] * self.size if self.rank == 0 else None
        with _collective():
            dist.gather_object(obj, gathered, dst=dist.get_global_rank(self.group, 0), group=self.group)
        return gathered

    def row_counts(self, n_rows: int, device: torch.device | None = None) -> list[int]:
        """Every rank's row count, in rank order."""
        if self.group is None:
            return [n_rows]
        device = device or self.control_device
        counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.size)]
        with _collective():
            dist.all_gather(counts, torch.tensor([n_rows], dtype=torch.long, device=device), group=self.group)
        return [int(c.item()) for c in counts]

    def gather(self, x: torch.Tensor, counts: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Every rank's x [N_r, ...] (row counts may differ; `counts` if known), in rank order."""
        if self.group is None:
            return [x]
        counts = list(counts) if counts is not None else self.row_counts(x.shape[0], x.device)
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        with _collective():
            dist.all_gather(parts, padded, group=self.group)
        return [part[:count] for part, count in zip(parts, counts)]

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The global batch: the rows of every rank's x [N_r, ...], concatenated in rank order."""
        if self.group is None:
            return x
        return torch.cat(self.gather(x.contiguous()))

    # -- means over the global batch ---------------------------------------------------------
    def means(self, values: Sequence[torch.Tensor], n_rows: int) -> list[torch.Tensor]:
        """For scalars that are means over each rank's n_rows rows, their means over the global
        batch Σ_r N_r v_r / Σ_r N_r (detached)."""
        if self.group is None:
            return [value.detach() for value in values]
        packed = torch.stack([*(value.detach().float() * n_rows for value in values),
                              values[0].new_tensor(float(n_rows), dtype=torch.float32)])
        self.sum_(packed)
        return [total / packed[-1] for total in packed[:-1]]

    def mean(self, value: torch.Tensor, n_rows: int) -> torch.Tensor:
        """A per-row mean over this rank's rows with the value of the global mean and the gradient
        of the local one: a term h(mean) then gets the global gradient h'(global mean) ∇mean once
        the gradients are averaged (`reduce_gradients`)."""
        if self.group is None:
            return value
        (total,) = self.means([value], n_rows)
        return value + (total.to(value.dtype) - value).detach()

    def mean_squared_deviation(self, x: torch.Tensor) -> torch.Tensor:
        """(1/N) Σ_n ‖x_n − x̄‖² over the global batch of x [N_r, D], x̄ its global mean (detached)."""
        x = x.detach()
        packed = torch.cat([x.sum(dim=0), x.new_tensor([x.shape[0]])])
        self.sum_(packed)
        n = packed[-1]
        squared = (x - packed[:-1] / n).pow(2).sum().reshape(1)
        return self.sum_(squared)[0] / n

    # -- gradients ---------------------------------------------------------------------------
    @torch.no_grad()
    def reduce_gradients(self, parameters: Iterable[torch.nn.Parameter], n_rows: int,
                         loss: torch.Tensor) -> torch.Tensor:
        """Replace each parameter's gradient by Σ_r (N_r / N) g_r, the gradient of the loss over
        the global batch when each rank's loss is a mean over its N_r rows; returns that global
        loss Σ_r N_r L_r / N (NaN or ±inf when any rank's is). A parameter without a gradient on
        some rank counts as zero there; without one on every rank, it keeps none (Adam then
        leaves it alone, as in one process)."""
        parameters = list(parameters)
        if self.group is None:
            return loss.detach()
        device = parameters[0].device
        header = torch.tensor([float(n_rows), *[float(p.grad is not None) for p in parameters]],
                              dtype=torch.float64, device=device)
        header = torch.cat([header, (loss.detach().double() * n_rows).reshape(1).to(device)])
        self.sum_(header)
        total_rows = header[0].item()
        share = n_rows / total_rows
        pending = []
        with _collective():
            for parameter, has_gradient in zip(parameters, header[1:-1].tolist()):
                if has_gradient == 0:
                    continue
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                else:
                    parameter.grad.mul_(share)
                pending.append(dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
            for work in pending:
                work.wait()
        return (header[-1] / total_rows).to(loss.dtype)

    # -- BatchTopK over the global batch -----------------------------------------------------
    @torch.no_grad()
    def batch_top_k_codes(self, pre_activations: torch.Tensor, k: int) -> SparseCodes:
        """BatchTopK over the global batch (kernels.batch_top_k_codes on the rows of all ranks),
        as this rank's rows' codes: the m = k·N largest pre-activations of all N rows, then ReLU.

        Each rank's m_r largest entries (m_r = min(m, N_r·F)) hold the global top m, so the m-th
        largest of all ranks' candidates is the global cutoff τ; each rank keeps its entries > τ,
        and entries equal to τ go to the ranks in rank order (each its first, in row-major order)
        until m are kept. Selected entries that are ≤ 0 are kept with value 0, as in one process."""
        n_rows, dict_size = pre_activations.shape
        counts = self.row_counts(n_rows, pre_activations.device)
        total_rows = sum(counts)
        m = min(k * total_rows, total_rows * dict_size)
        flat = pre_activations.flatten()
        local_m = [min(m, count * dict_size) for count in counts]
        candidates, _ = largest_entries(flat, local_m[self.rank])
        everyone = torch.stack([
            part if part.shape[0] == max(local_m)
            else torch.cat([part, part.new_full((max(local_m) - part.shape[0],), -float("inf"))])
            for part in self.gather(candidates, local_m)])  # [R, max m_r], -inf padding
        cutoff = largest_entries(everyone.flatten(), m)[0].min()
        above = (everyone > cutoff).sum(dim=1)
        tied = (everyone == cutoff).sum(dim=1)
        ties_left = m - int(above.sum())
        ties_before = int(tied[: self.rank].sum())
        my_ties = max(0, min(int(tied[self.rank]), ties_left - ties_before))
        kept = (flat > cutoff).nonzero().squeeze(1)
        if my_ties > 0:
            kept = torch.cat([kept, (flat == cutoff).nonzero().squeeze(1)[:my_ties]]).sort().values
        return SparseCodes(flat[kept].relu(), kept // dict_size, kept % dict_size, n_rows)


SINGLE_PROCESS = Replicas(None)
"""The Replicas of a trainer that lives in one process: no reduction, no torch.distributed call."""


class SitePlan:
    """Which rank trains each site, and the exchange that gives each rank the global batches of the
    sites it trains.

    Sites go to ranks by decreasing cost (the Σ dict_size of the trainers reading them), each to the
    rank with the least cost so far (ties: the lower rank), so every rank computes the same plan."""

    def __init__(self, site_costs: Mapping[str, float], replicas: Replicas):
        self.replicas = replicas
        load = [0.0] * replicas.size
        self.owner: dict[str, int] = {}
        for site in sorted(site_costs, key=lambda site: -site_costs[site]):  # stable: ties in given order
            rank = min(range(replicas.size), key=lambda r: (load[r], r))
            self.owner[site] = rank
            load[rank] += site_costs[site]
        self.sites_of = [[site for site in site_costs if self.owner[site] == rank] for rank in range(replicas.size)]

    def owns(self, site: str) -> bool:
        return self.owner[site] == self.replicas.rank

    def exchange(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """{site: this rank's rows} of every site -> {site: the global batch} of the sites this rank
        trains (rows of rank 0 first); a site's value is a tensor [N_r, d] or a tuple of them (an
        (input, output) pair). One all-to-all of each rank's rows, in one dtype (the batch's, or
        float32 if its tensors differ)."""
        missing = [site for site in self.owner if site not in batch]
        if missing:
            raise ValueError(f"distribute_sites: the batch has no site {missing[0]!r}; it has {list(batch)}")
        parts = {site: tuple(batch[site]) if isinstance(batch[site], (tuple, list)) else (batch[site],)
                 for site in self.owner}
        tensors = [t for site_parts in parts.values() for t in site_parts]
        dtype = tensors[0].dtype if all(t.dtype == tensors[0].dtype for t in tensors) else torch.float32
        n_rows = tensors[0].shape[0]
        counts = self.replicas.row_counts(n_rows, tensors[0].device)
        chunks = [torch.cat([part.reshape(n_rows, -1).to(dtype) for site in sites for part in parts[site]], dim=1)
                  if sites else tensors[0].new_zeros((n_rows, 0), dtype=dtype) for sites in self.sites_of]
        mine = self.sites_of[self.replicas.rank]
        widths = [part.reshape(n_rows, -1).shape[1] for site in mine for part in parts[site]]
        received = tensors[0].new_empty((sum(counts) * sum(widths),), dtype=dtype)
        with _collective():
            dist.all_to_all_single(received, torch.cat([chunk.flatten() for chunk in chunks]),
                                   [count * sum(widths) for count in counts],
                                   [n_rows * chunk.shape[1] for chunk in chunks], group=self.replicas.group)
        columns = received.reshape(sum(counts), sum(widths)) if widths else received.reshape(sum(counts), 0)
        exchanged, start = {}, 0
        for site in mine:
            site_parts = []
            for part in parts[site]:
                width = part.reshape(n_rows, -1).shape[1]
                site_parts.append(columns[:, start:start + width].reshape(-1, *part.shape[1:]).to(part.dtype))
                start += width
            exchanged[site] = tuple(site_parts) if isinstance(batch[site], (tuple, list)) else site_parts[0]
        return exchanged
