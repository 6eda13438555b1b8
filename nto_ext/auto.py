"""budget="auto": the largest budget whose measured peak fits the memory (issue 23).

`NTO(params, budget="auto")` fits the device's memory (CUDA: free memory from
`torch.cuda.mem_get_info` plus what torch already holds; CPU: `MemAvailable` plus this
process's resident memory, lowered to an RLIMIT_DATA or cgroup limit when one is set);
`NTO(params, budget="auto", memory="20GiB")` fits the stated memory instead. The budget is
`fit.find_fit`'s answer (the same memory model and packing as `nto plan --fit`) for

    memory >= other + weights + training state(budget) + activations + margin

- weights: the params' bytes; training state: the policy's bytes per element at the budget;
  margin: `fit.MARGIN_FRACTION` of the memory;
- other: what the process holds beyond the weights when NTO is built (CPU: interpreter,
  libraries, data; CUDA: other tensors), measured then;
- activations: measured on the first real batch, never guessed. Until then the plan is
  provisional: the smallest budget the policy accepts, so the first forward/backward runs
  with (almost) nothing else held. At each step() the peak of the forward/backward just
  run is read (`MemoryProbe`), less what NTO itself added meanwhile (the gradients of the
  active set): that is the activation figure. A later batch that needs more than planned
  (by more than `REPLAN_TOLERANCE` of the memory) re-plans to a smaller budget.

The first batch's figure is an upper bound for later ones: before the first step() no
param is frozen yet, so every weight gradient is made (and dropped in NTO's hook) and every
op saves its inputs for its weight's gradient; later steps freeze inactive params. So the
second batch, the first run under a plan, settles the figure: if it needed less (by more
than the tolerance) the budget is re-planned once, upward, to use the memory the first
batch's upper bound left idle (measured on a 1.7B Llama: 1.6 GiB on the first batch, 0.5
GiB settled). From then on only a batch needing more re-plans (downward).

How the peak is measured, and why: CUDA: `torch.cuda.max_memory_allocated` after
`reset_peak_memory_stats` (exact for tensors). CPU: torch's CPU allocator keeps no
statistics, so the kernel's: the high-water mark of the resident set (VmHWM in
/proc/self/status) after resetting it by writing 5 to /proc/self/clear_refs (Linux >= 4.0).
It counts every page the process touches (tensors, interpreter, libraries), which is what
a memory limit sees; large tensors are freed back to the kernel (glibc unmaps them), so it
follows the tensors. The memory is never exceeded by NTO's plan, but the user's own other
allocations after NTO is built are theirs.
"""

from __future__ import annotations

import logging
import resource
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .blocks import ParamInfo
from .budget import Budget, format_bytes, storage_bytes
from .fit import Fit, find_fit, margin_bytes, parse_memory, smallest_budget, state_peak
from .policies import Policy

log = logging.getLogger("nto_ext")

AUTO = "auto"
REPLAN_TOLERANCE = 0.01  # of the memory: a later batch this much above plan re-plans
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def is_auto(budget: object) -> bool:
    return isinstance(budget, str) and budget.strip().lower() == AUTO


def check_auto_args(budget: object, memory: object) -> None:
    """`memory` goes with budget="auto" only, and must be a memory size."""
    if memory is None:
        return
    if not is_auto(budget):
        raise ValueError(f"memory={memory!r} applies with budget='auto' only (got "
                         f"budget={budget!r}); pass budget='auto', or drop memory and state "
                         "the budget itself (e.g. budget='2GiB')")
    parse_memory(memory, "memory")


# ------------------------------------------------------------------ measuring memory

class MemoryProbe:
    """Memory this process uses on one device, and its peak since `reset_peak()`, in bytes
    (module doc: what is read and why)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if not self.cuda and device.type != "cpu":
            raise ValueError(f"budget='auto' measures CUDA or CPU memory; the params are on "
                             f"{device}; allowed: params on one CUDA device or on the CPU, "
                             "or pass a byte budget such as budget='2GiB'")
        if not self.cuda and not (_STATUS.is_file() and _CLEAR_REFS.exists()):
            raise ValueError("budget='auto' on the CPU reads the process's peak resident "
                             "memory from /proc/self/status (Linux); it is not available "
                             "here: pass a byte budget such as budget='2GiB'")

    @property
    def method(self) -> str:
        return ("torch.cuda.max_memory_allocated" if self.cuda else
                "peak resident memory (VmHWM, reset through /proc/self/clear_refs)")

    def in_use(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else _status_kib("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        return _status_kib("VmHWM")

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _CLEAR_REFS.write_text("5")  # VmHWM := VmRSS now

    def capacity(self) -> tuple[int, str]:
        """(bytes this process could hold in all, where that figure comes from)."""
        if self.cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            return (free + torch.cuda.memory_reserved(self.device),
                    f"free memory of {self.device} (mem_get_info) + what torch holds there")
        rss = _status_kib("VmRSS")
        found = [(_meminfo_kib("MemAvailable") + rss, "available RAM (MemAvailable) + this "
                  "process's resident memory")]
        soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
        if soft != resource.RLIM_INFINITY:  # the limit counts VmData; it is near RSS
            found.append((soft - _status_kib("VmData") + rss, "RLIMIT_DATA of this process"))
        cg = _cgroup_room()
        if cg is not None:
            found.append((cg + rss, "the cgroup's memory.max"))
        return min(found)


def _status_kib(key: str) -> int:
    return _read_kib(_STATUS, key)


def _meminfo_kib(key: str) -> int:
    return _read_kib(Path("/proc/meminfo"), key)


def _read_kib(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"{path} has no {key!r} line; budget='auto' cannot measure memory here: "
                     "pass a byte budget such as budget='2GiB'")


def _cgroup_room() -> int | None:
    """Bytes the cgroup (v2) still allows, or None without a limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ the auto budget

class AutoBudget:
    """budget="auto" of one optimizer: the memory, what was measured, the plan. The
    optimizer calls `plan()` where it plans, `measure()` at the start of step() (True:
    re-plan now) and `restart()` at its end; `report()` goes into memory_report()."""

    def __init__(self, memory: int | str | None, params: Iterable[torch.Tensor]) -> None:
        params = list(params)
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"budget='auto' measures one device; the params are on "
                             f"{', '.join(sorted(map(str, devices)))}; allowed: params on "
                             "one device, or pass a byte budget such as budget='2GiB'")
        self.probe = MemoryProbe(devices.pop())
        self.stated = parse_memory(memory, "memory") if memory is not None else None
        weights = storage_bytes(params)
        self.restart(storage_bytes(p.grad for p in params))
        # What the process holds beyond the weights now (CPU: interpreter, libraries, data)
        self.other = max(0, self._baseline - weights)
        if self.stated is not None:
            self.memory, self.source = self.stated[0], f"stated (memory={self.stated[1]!r})"
        else:
            self.memory, self.source = self.probe.capacity()
        self.activations: int | None = None  # measured; None until the first batch
        self.first_activations: int | None = None  # the first batch's (upper bound) figure
        self.settled = False  # a batch under a plan was measured (module doc)
        self.replans = 0
        self.fit: Fit | None = None
        self.budget_elements = 0
        self._fixed: int | None = None  # a budget taken from a checkpoint (resume)

    def adopted(self) -> tuple[int | None, int | None]:
        return self._fixed, self.activations

    def adopt(self, elements: int | None, activations: int | None) -> None:
        """Plan `elements` with `activations` measured (a resumed run's choice) until a
        batch needs more; (None, None): back to measuring."""
        self._fixed, self.activations = elements, activations
        self.settled = activations is not None  # the saved run's figure stands

    @property
    def text(self) -> str:
        return self.stated[1] if self.stated is not None else format_bytes(self.memory)

    def restart(self, held: int) -> None:
        """Start a measuring window: `held` = NTO's training-state bytes now."""
        self._baseline, self._held = self.probe.in_use(), held
        self.probe.reset_peak()

    def measure(self, held: int, backward_seen: bool) -> bool:
        """At step(): the peak of the forward/backward since `restart`, less what NTO added
        meanwhile (`held` now minus at restart: the active set's gradients). True when the
        plan must change: the first batch's figure, the settled one below it (module
        doc), or a later one above plan."""
        if not backward_seen:
            return False  # no forward/backward ran yet: nothing to measure
        act = max(0, self.probe.peak() - self._baseline - max(0, held - self._held))
        tolerance = REPLAN_TOLERANCE * self.memory
        if self.activations is None:
            self.activations = self.first_activations = act
            return True
        if not self.settled:
            self.settled = True
            if act < self.activations - tolerance:
                log.info("NTO budget=auto: a batch under the plan needed %s of activations, "
                         "the first batch (nothing frozen yet) %s; re-planning upward",
                         format_bytes(act), format_bytes(self.activations))
                self.activations, self.replans = act, self.replans + 1
                return True
            return False
        if act > self.activations + tolerance:
            self._fixed = None
            log.info("NTO budget=auto: this batch needed %s of activations, %s were planned; "
                     "re-planning", format_bytes(act), format_bytes(self.activations))
            self.activations, self.replans = act, self.replans + 1
            return True
        return False

    def plan(self, infos: list[ParamInfo], policy: str,
             make: Callable[[Budget], Policy]) -> tuple[Budget, Policy]:
        """The budget and policy for the figures known now (provisional before the first
        batch: the smallest budget, once the weights and the rest are known to fit)."""
        dtypes = "/".join(sorted({str(i.dtype).removeprefix("torch.") for i in infos}))
        label = ("activations (measured) + other process memory" if self.activations
                 is not None else "process memory beyond the weights")
        fit = find_fit(infos, policy, make, self.memory, self.text,
                       self.other + (self.activations or 0), dtypes, arg="memory",
                       activation_label=label)
        self.fit = fit
        self.budget_elements = (self._fixed if self._fixed is not None else
                                fit.budget_elements if self.activations is not None
                                else smallest_budget(infos, policy, make))
        budget = Budget("elements", self.budget_elements, repr(AUTO))
        pol = make(budget)
        self.state = sum(state_peak(pol))
        self.predicted = fit.weights_bytes + self.state + self.other + (self.activations or 0)
        log.info("NTO budget=auto: %s", self.describe())
        msg = getattr(pol, "too_big_message", lambda: None)()
        if msg and self.activations is not None:  # provisional: too small on purpose
            warnings.warn(f"NTO budget=auto: {msg}", UserWarning, stacklevel=2)
        return budget, pol

    def describe(self) -> str:
        """One line: what was chosen, and why."""
        f = self.fit
        assert f is not None
        share = 100.0 * self.budget_elements / f.total_elements
        head = (f"{self.budget_elements:,} elements ({share:.2f}%) for memory "
                f"{format_bytes(self.memory)} ({self.source})")
        if self.activations is None:
            return (f"provisional {head}: the smallest budget until the first batch's "
                    f"activations are measured (weights {format_bytes(f.weights_bytes)}, "
                    f"other process memory {format_bytes(self.other)}; at 0 activations "
                    f"{f.budget_elements:,} elements would fit)")
        return (f"{head} = weights {format_bytes(f.weights_bytes)} + training state "
                f"{format_bytes(self.state)} + activations {format_bytes(self.activations)} "
                f"(measured: {self.probe.method}) + other process memory "
                f"{format_bytes(self.other)} + margin {format_bytes(f.margin_bytes)}; "
                f"predicted peak {format_bytes(self.predicted)}")

    def report(self) -> dict[str, Any]:
        """memory_report()["budget_auto"]: the memory, the figures and the choice (bytes)."""
        f = self.fit
        assert f is not None
        return {"memory_bytes": self.memory, "memory_source": self.source,
                "weights_bytes": f.weights_bytes, "other_bytes": self.other,
                "activation_bytes": self.activations, "measured_by": self.probe.method,
                "first_batch_activation_bytes": self.first_activations,
                "state_bytes": self.state, "margin_bytes": margin_bytes(self.memory),
                "predicted_peak_bytes": self.predicted,
                "budget_elements": self.budget_elements,
                "budget_percent": 100.0 * self.budget_elements / f.total_elements,
                "provisional": self.activations is None, "replans": self.replans,
                "why": self.describe()}


def make_auto(budget: object, memory: object,
              params: Iterable[torch.Tensor]) -> AutoBudget | None:
    """An AutoBudget for budget="auto", else None (`check_auto_args` ran before)."""
    return AutoBudget(memory, params) if is_auto(budget) else None  # type: ignore[arg-type]

