"""Resident experts: every target module's LoRA factors of up to `capacity` experts in preallocated tensors.

Per module: A [capacity, r_max, in] and B [capacity, out, r_max] on the runtime's device, with each expert's
scaling folded into its B (so ΔW_e = B_e @ A_e exactly) and lower ranks zero-padded to r_max (zero rows of A
and zero columns of B add exactly nothing). Experts live in slots; adding to a full stack evicts the least
recently used one. `hits` / `misses` count `slots()` lookups.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from loramint.adapters import LoraAdapter
from loramint.errors import AdapterError, NotFoundError


def linear_shapes(model: torch.nn.Module, target_modules: Sequence[str]) -> dict[str, tuple[int, int]]:
    """module path -> (out, in) of every nn.Linear whose leaf name is in `target_modules`."""
    targets = set(target_modules)
    return {
        name: tuple(layer.weight.shape)
        for name, layer in model.named_modules()
        if isinstance(layer, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }


class ExpertStack:
    """`stack.add("id", adapter)`; `stack.slots(["id", ...])` -> slot indices [n] (LongTensor)."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        capacity: int,
        max_rank: int = 16,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """shapes: module path -> (out, in) of every linear layer experts may target."""
        if capacity < 1 or max_rank < 1:
            raise ValueError(f"capacity and max_rank must be >= 1, got {capacity}, {max_rank}")
        self.shapes, self.capacity, self.max_rank = dict(shapes), capacity, max_rank
        self.device, self.dtype = torch.device(device), dtype
        # torch.empty: on the CPU the pages of a slot are only touched (and resident) once an expert is
        # added to it, so a server at rest holds no memory for its empty capacity. Nothing reads a slot
        # that holds no expert: every read goes through the slots of resident experts, zeroed when filled.
        self.A = {
            m: torch.empty(capacity, max_rank, i, device=device, dtype=dtype) for m, (o, i) in shapes.items()
        }
        self.B = {
            m: torch.empty(capacity, o, max_rank, device=device, dtype=dtype) for m, (o, i) in shapes.items()
        }
        self._slot: OrderedDict[str, int] = OrderedDict()  # id -> slot, least recently used first
        self._free = list(range(capacity - 1, -1, -1))
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, expert_id: object) -> bool:
        return expert_id in self._slot

    @property
    def ids(self) -> list[str]:
        return list(self._slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def slots_accounted(self) -> bool:
        """Every slot is either free or held by exactly one resident expert (a leak breaks this)."""
        held = list(self._slot.values())
        return sorted(held + self._free) == list(range(self.capacity))

    def nbytes_per_expert(self) -> int:
        """Bytes one slot occupies across all modules."""
        return sum(a[0].nbytes + self.B[m][0].nbytes for m, a in self.A.items())

    def add(self, expert_id: str, adapter: LoraAdapter) -> int:
        """Make `adapter` resident under `expert_id` (replacing a resident one of that id); returns its slot."""
        unknown = sorted(set(adapter.weights) - set(self.shapes))
        if unknown:
            raise AdapterError(f"adapter targets modules the runtime does not serve: {unknown[:3]}")
        for module, (a, b) in adapter.weights.items():
            out_f, in_f = self.shapes[module]
            if a.shape[1] != in_f or b.shape[0] != out_f:
                raise AdapterError(
                    f"{module}: adapter is [{b.shape[0]}x{a.shape[1]}], the base layer is [{out_f}x{in_f}]: "
                    "was it trained for another base model?"
                )
            if a.shape[0] > self.max_rank:
                raise AdapterError(
                    f"{module}: rank {a.shape[0]} exceeds the runtime's max_rank {self.max_rank}"
                )
        # everything that can fail (a pattern's scaling, a device copy) happens before a slot is taken
        staged = {
            module: (
                a.to(self.device, self.dtype),
                (b * adapter.config.scaling(module)).to(self.device, self.dtype),
            )
            for module, (a, b) in adapter.weights.items()
        }  # module: (A [r, in], B * scale [out, r])
        if expert_id in self._slot:
            slot = self._slot.pop(expert_id)
        elif self._free:
            slot = self._free.pop()
        else:
            _, slot = self._slot.popitem(last=False)
            self.evictions += 1
        try:
            for module in self.shapes:
                self.A[module][slot].zero_()
                self.B[module][slot].zero_()
            for module, (a, b) in staged.items():
                self.A[module][slot, : a.shape[0]] = a
                self.B[module][slot, :, : a.shape[0]] = b
        except BaseException:
            self._free.append(slot)  # every path gives the slot back
            raise
        self._slot[expert_id] = slot
        return slot

    def remove(self, expert_id: str) -> None:
        slot = self._slot.pop(expert_id, None)
        if slot is None:
            raise NotFoundError(f"expert {expert_id!r} is not resident")
        self._free.append(slot)

    def slots(
        self, expert_ids: Sequence[str], load: Callable[[str], LoraAdapter] | None = None
    ) -> torch.Tensor:
        """Slot index of each id [n], marking them recently used. A non-resident id is a miss: `load(id)`
        brings it in (evicting the least recently used expert not in this call), or NotFoundError."""
        wanted = list(dict.fromkeys(expert_ids))
        if len(wanted) > self.capacity:
            raise ValueError(
                f"{len(wanted)} distinct experts in one call exceed the resident capacity {self.capacity}"
            )
        found: dict[str, int] = {}
        for eid in wanted:
            slot = self._slot.get(eid)
            if slot is not None:
                self.hits += 1
                self._slot.move_to_end(eid)
            else:
                self.misses += 1
                if load is None:
                    raise NotFoundError(f"expert {eid!r} is not resident (resident: {len(self)})")
                slot = self.add(eid, load(eid))
            found[eid] = slot
        return torch.tensor([found[e] for e in expert_ids], dtype=torch.long, device=self.device)
