"""Torch-only helpers for multi-process training with NTO (no transformers needed).

DDP needs `find_unused_parameters=True` (inactive params stop producing gradients after the
model was wrapped): `check_ddp` says so, `ddp_bucket_bytes` measures the reducer's buckets
(gradient memory DDP allocates for every param, active or not). FSDP2 (`fully_shard`) works
on local shards; save and load NTO's state with `save_optimizer_state` /
`load_optimizer_state` (torch.distributed.checkpoint). The Trainer integration
(`nto_ext.hf`) builds on these and re-exports them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .checkpoint import local_tensor
from .optimizer import NTO

log = logging.getLogger(__name__)

__all__ = ["check_ddp", "dcp_optimizer_state", "ddp_bucket_bytes", "load_optimizer_state",
           "nto_of", "save_optimizer_state", "track_ddp"]


def nto_of(optimizer: Any) -> NTO:
    """The NTO inside `optimizer` (itself, or behind accelerate's AcceleratedOptimizer and
    similar wrappers that keep the wrapped one in `.optimizer`)."""
    seen = optimizer
    for _ in range(8):
        if isinstance(seen, NTO):
            return seen
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    raise TypeError(f"expected an nto_ext.NTO (or a wrapper with .optimizer), got "
                    f"{type(optimizer).__name__}; build it with nto_ext.NTO(...) or, for "
                    "transformers.Trainer, nto_ext.hf.nto_optimizer(...)")


# ----------------------------------------------------------------------------- DDP


def _ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    raise TypeError(f"expected a torch DistributedDataParallel module, got "
                    f"{type(model).__name__}")


def ddp_bucket_bytes(model: nn.Module) -> int:
    """Bytes of DDP's gradient reduction buckets (measured: the reducer's bucket sizes).

    DDP allocates buckets for every parameter that required grad when it was wrapped, so
    these bytes cover the whole model even when NTO trains a small part; they are outside
    NTO's budget (FSDP2 reduces per parameter and shards instead).
    """
    data = _ddp(model)._get_ddp_logging_data()
    sizes = str(data.get("bucket_sizes", "") or "")
    return sum(int(s) for s in sizes.split(",") if s.strip())


def track_ddp(optimizer: Any, model: nn.Module) -> None:
    """Tell NTO the DDP module: its `memory_report()` then has `ddp_bucket_bytes` (measured
    at each report), so the picture includes the gradient memory DDP holds for every param,
    outside NTO's budget. Only a weak reference to `model` is kept."""
    import weakref

    opt, ref = nto_of(optimizer), weakref.ref(_ddp(model))
    opt.extra_reports = {**opt.extra_reports, "ddp_bucket_bytes":
                         lambda: ddp_bucket_bytes(m) if (m := ref()) is not None else 0}


def check_ddp(model: nn.Module, optimizer: Any = None) -> dict[str, Any]:
    """Check that a DDP-wrapped model works with NTO; return its settings and bucket bytes.
    With `optimizer` (NTO), also `track_ddp(optimizer, model)`.

    Raises ValueError if `find_unused_parameters` is False or `static_graph` is on.
    """
    ddp = _ddp(model)
    info = {
        "find_unused_parameters": bool(ddp.find_unused_parameters),
        "static_graph": bool(getattr(ddp, "static_graph", False)),
        "gradient_as_bucket_view": bool(ddp.gradient_as_bucket_view),
        "bucket_bytes": ddp_bucket_bytes(ddp),
    }
    if not info["find_unused_parameters"] or info["static_graph"]:
        raise ValueError(
            f"NTO under DDP needs DistributedDataParallel(model, find_unused_parameters=True) "
            f"and no static_graph (got find_unused_parameters={info['find_unused_parameters']}, "
            f"static_graph={info['static_graph']}): the parameters that receive gradients "
            "change when NTO switches its active set.")
    if optimizer is not None:
        track_ddp(optimizer, ddp)
    return info


# ----------------------------------------------------------------------------- FSDP2 / DCP
#
# torch's get_optimizer_state_dict / set_optimizer_state_dict assume a static optimizer: when
# the state is empty they run a fake step (lr=0, zero grads), which would advance NTO's
# schedule, and loading builds its template from the *current* optimizer, whose active set
# (hence its state entries) differs from the saved one; they also keep only "state" and
# "param_groups", dropping NTO's schedule position. So these helpers write the same layout
# (state keyed by parameter FQN, FSDP2 state as DTensors sharded like their params, groups
# with FQNs) plus NTO's own entry, with plain dcp.save / dcp.load, and build the load template
# from the checkpoint's metadata. DCP reshards DTensors: another world size can load it
# (not the quantized formats' rows per shard, below).

_OPT_KEY = "optimizer"


def _param_fqns(model: nn.Module, opt: NTO) -> tuple[list[torch.Tensor], list[str]]:
    """NTO's params in state_dict index order, and their names in `model`."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"{len(missing)} of the optimizer's {len(params)} parameters are not "
                         f"parameters of the given model (first: index {missing[0]}); pass "
                         "the model the optimizer was built on (after fully_shard)")
    return params, [names[id(p)] for p in params]


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _shard_like(v: Any, p: torch.Tensor) -> Any:
    """A local state tensor of a DTensor param, as a DTensor sharded like the param."""
    if not (_is_dtensor(p) and isinstance(v, torch.Tensor) and v.dim() > 0
            and tuple(v.shape) == tuple(p.to_local().shape)):
        return v
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


# The blockwise quantized formats (int8, int4) keep a sharded param's state as flat codes and
# per-block scales of its local shard: the blocks are the shard's, not pieces of one global
# tensor, so they cannot be a DTensor sharded like the param. Saved as plain tensors, DCP would
# take them for replicated and write one rank's (every rank would load that one). They are
# saved as one row per shard instead: a (shards, L) DTensor sharded on its rows like the
# param on its shard dim (zero padded to the longest row), with each row's length beside it,
# and load back only on as many shards.
_ROWS, _NUMEL = "rows_per_shard", "numel_per_shard"


def _shard_dim(p: Any) -> tuple[int, int]:
    """(mesh dim, shard count) of a DTensor param sharded on one mesh dim (FSDP2, HSDP)."""
    dims = [d for d, pl in enumerate(p.placements) if pl.is_shard()]
    if len(dims) != 1 or any(not (pl.is_replicate() or pl.is_shard(0)) for pl in p.placements):
        raise ValueError(f"a parameter with placements {p.placements}: NTO's quantized state "
                         "(state_dtype 'int8' / 'int4') saves only params sharded on dim 0 "
                         "over one mesh dim (fully_shard, HSDP)")
    return dims[0], p.device_mesh.size(dims[0])


def _row_dtensor(local: torch.Tensor, p: Any, shards: int) -> Any:
    from torch.distributed.tensor import DTensor

    width = local.shape[1]
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=(shards, width), stride=(width, 1))


def _rows_per_shard(state: dict[str, dict[str, Any]], by_fqn: dict[str, Any]) -> None:
    """In place: the plain (local) state tensors of DTensor params as rows per shard."""
    todo = [(f, k) for f, st in state.items() for k, v in st.items()
            if _is_dtensor(by_fqn[f]) and isinstance(v, torch.Tensor)
            and not _is_dtensor(v) and v.dim() > 0]
    if not todo:
        return
    p0 = by_fqn[todo[0][0]]
    widths = torch.tensor([state[f][k].numel() for f, k in todo], dtype=torch.int64,
                          device=local_tensor(p0).device)
    for d in range(p0.device_mesh.ndim):  # the longest row over every rank (same order)
        torch.distributed.all_reduce(widths, op=torch.distributed.ReduceOp.MAX,
                                     group=p0.device_mesh.get_group(d))
    for (f, k), width in zip(todo, widths.tolist()):
        p, v = by_fqn[f], state[f][k]
        _, shards = _shard_dim(p)
        row = v.new_zeros((1, width))
        row[0, :v.numel()] = v.reshape(-1)
        numel = torch.tensor([[v.numel()]], dtype=torch.int64, device=v.device)
        state[f][k] = {_ROWS: _row_dtensor(row, p, shards),
                       _NUMEL: _row_dtensor(numel, p, shards)}


def _row_template(fqn: str, p: Any, size: tuple[int, ...], dtype: torch.dtype) -> Any:
    """An empty row-per-shard DTensor to load a saved one into; refused (before anything
    is loaded) on another shard count: a quantized state's blocks belong to its shard."""
    if not _is_dtensor(p) or _shard_dim(p)[1] != size[0]:
        now = _shard_dim(p)[1] if _is_dtensor(p) else "not sharded"
        raise ValueError(f"the checkpoint's quantized state of {fqn} (state_dtype 'int8' / "
                         f"'int4') was saved on {size[0]} FSDP2 shards; this run has {now}. "
                         "Its blocks belong to their shard: resume on as many shards, or "
                         "use state_dtype='fp32' (which DCP reshards); nothing was loaded")
    return _row_dtensor(torch.empty((1, size[1]), dtype=dtype, device=local_tensor(p).device),
                        p, size[0])


def dcp_optimizer_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """NTO's state as a dict torch.distributed.checkpoint can save: params keyed by their
    name in `model`, the moments of FSDP2 params as DTensors sharded like them. What
    `save_optimizer_state` writes; frameworks that save one DCP checkpoint of model and
    optimizer (nto_ext.lightning) put it under their own key and load it back with
    `load_optimizer_state(..., key=...)`."""
    opt = nto_of(optimizer)
    params, fqns = _param_fqns(model, opt)
    sd = opt.state_dict()
    extra = [k for k in sd["state"] if not isinstance(k, int)]
    if extra:  # keys a user or hook put in opt.state: DCP keys the state by param name
        log.warning("nto_ext: the distributed checkpoint leaves out non-param keys of "
                    "opt.state: %s", extra[:4])
    state = {fqns[i]: {k: _shard_like(v, params[i]) for k, v in st.items()}
             for i, st in sd["state"].items() if isinstance(i, int)}
    _rows_per_shard(state, dict(zip(fqns, params)))
    groups = [{**g, "params": [fqns[j] for j in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups, "nto": sd["nto"]}


def save_optimizer_state(model: nn.Module, optimizer: Any, path: str) -> None:
    """Save NTO's state to the directory `path` with torch.distributed.checkpoint.

    Every rank calls it. Under FSDP2 each rank writes its shards of the moments; in one
    process (or DDP) it works the same. Load with `load_optimizer_state`.
    """
    import torch.distributed.checkpoint as dcp

    dcp.save({_OPT_KEY: dcp_optimizer_state(model, optimizer)}, checkpoint_id=path)


def _state_template(metadata: Any, params: list[torch.Tensor], fqns: list[str],
                    key: str) -> dict[str, dict[str, Any]]:
    """{fqn: {key: empty tensor}} for every state tensor the checkpoint holds (and a
    placeholder for every other value, e.g. the `rows` of a range of rows); nested entries
    (`parked.<start>.<key>`) as nested dicts. Moments of DTensor params are DTensors
    sharded like the param here (DCP reads the right slice)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    by_fqn = dict(zip(fqns, params))
    prefix = f"{key}.state."
    out: dict[str, dict[str, Any]] = {}
    for key, md in metadata.state_dict_metadata.items():
        if not key.startswith(prefix):
            continue
        if isinstance(md, BytesStorageMetadata):  # a Python value: DCP puts it in place
            rest = key[len(prefix):]
            fqn = max((f for f in by_fqn if rest.startswith(f + ".")), key=len, default=None)
            if fqn is not None:
                _put(out.setdefault(fqn, {}), rest[len(fqn) + 1:], None)
            continue
        if not isinstance(md, TensorStorageMetadata):
            continue
        rest = key[len(prefix):]
        fqn = max((f for f in by_fqn if rest.startswith(f + ".")), key=len, default=None)
        if fqn is None:
            raise ValueError(f"the checkpoint holds optimizer state for {rest!r}, which is not "
                             "a parameter of this model; load it into the model it was saved "
                             "from")
        p, size = by_fqn[fqn], tuple(md.size)
        dtype = md.properties.dtype
        if rest.rsplit(".", 1)[-1] in (_ROWS, _NUMEL):
            t = _row_template(fqn, p, size, dtype)
        elif _is_dtensor(p) and size == tuple(p.shape):
            t = torch.empty_like(p, dtype=dtype)
        else:
            t = torch.empty(size, dtype=dtype, device=local_tensor(p).device
                            if size else "cpu")
        _put(out.setdefault(fqn, {}), rest[len(fqn) + 1:], t)
    return out


def _put(st: dict[str, Any], path: str, value: Any) -> None:
    """st[a][b]... = value for path "a.b..." (str keys: DCP sets Python values by str key;
    `_int_keys` turns digits back into the int keys NTO's `parked` entries have)."""
    *outer, last = path.split(".")
    for k in outer:
        st = st.setdefault(k, {})
    st[last] = value


def _int_keys(v: Any) -> Any:
    if not isinstance(v, dict):
        return v.to_local() if _is_dtensor(v) else v
    if set(v) == {_ROWS, _NUMEL}:  # this shard's row, as the format keeps it
        return v[_ROWS].to_local()[0, :int(v[_NUMEL].to_local())].clone()
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(x)
            for k, x in v.items()}


def load_optimizer_state(model: nn.Module, optimizer: Any, path: str,
                         key: str = _OPT_KEY) -> None:
    """Load what `save_optimizer_state` wrote into `optimizer`, an NTO built with the same
    arguments over the same model (sharded the same way or not: DCP reshards). `key`: the
    checkpoint's top-level key of the optimizer (a framework's own, e.g. "optimizer_0")."""
    import torch.distributed.checkpoint as dcp

    opt = nto_of(optimizer)
    params, fqns = _param_fqns(model, opt)
    # 1) NTO's entry and the groups (small, replicated): the template's structure comes
    #    from this optimizer, whose configuration must match anyway.
    mine = opt.state_dict()
    head = {key: {"nto": mine["nto"], "param_groups": [
        {**g, "params": [fqns[j] for j in g["params"]]} for g in mine["param_groups"]]}}
    dcp.load(head, checkpoint_id=path)
    # 2) the state tensors the checkpoint has (its active set, not this optimizer's)
    reader = dcp.FileSystemReader(path)
    state = _state_template(reader.read_metadata(), params, fqns, key)
    if state:
        dcp.load({key: {"state": state}}, checkpoint_id=path)
    index = {f: i for i, f in enumerate(fqns)}
    loaded = head[key]
    sd = {
        "state": {index[f]: {k: _int_keys(v) for k, v in st.items()}
                  for f, st in state.items()},
        "param_groups": [{**g, "params": [index[f] for f in g["params"]]}
                         for g in loaded["param_groups"]],
        "nto": loaded["nto"],
    }
    opt.load_state_dict(sd)
