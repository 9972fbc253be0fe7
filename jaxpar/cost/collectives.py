"""The collectives a compiled program performs, read from its HLO text: what `--dry-run` lists,
`--project` times, and the metrics count (``collective_bytes``)."""

import re

from jaxpar.cost.projection import array_bytes

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"= (\(.*?\)|\S+) (" + "|".join(COLLECTIVES) + r")(-start)?\(")


def _nbytes(hlo_type: str, started: bool = False) -> int:
    """Bytes of an HLO result type such as ``f32[512,256]`` or a tuple of them (a combined
    collective): the sum, or for an async ``-start`` op, whose tuple also holds its operands, the
    largest element."""
    sizes = array_bytes(hlo_type)
    return max(sizes, default=0) if started else sum(sizes)


def collective_ops(hlo_text: str) -> list[dict]:
    """The collectives one run of a compiled HLO module performs (per device), each as
    ``{"kind", "bytes", "count", "groups"}`` (`groups`: the HLO's replica-group text): an op inside
    a loop (a scan over layers, a pipeline's ticks) counts once per iteration, from XLA's
    ``known_trip_count``."""
    computations, entry, name = {}, None, None
    for line in hlo_text.splitlines():
        if head := _COMPUTATION.match(line):
            name = head[2]
            computations[name] = ([], [])
            entry = name if head[1] else entry
        elif name is not None:
            ops, calls = computations[name]
            if op := _OP.search(line):
                groups = _GROUPS.search(line)
                ops.append((*op.groups(), groups[1] if groups else ""))
            trips = _TRIPS.search(line)
            calls += [(callee, int(trips[1]) if trips and kind == "body" else 1)
                      for kind, callee in _CALLS.findall(line)]  # fmt: skip
    out = []

    def add(name: str, times: int) -> None:
        ops, calls = computations.get(name, ((), ()))
        for hlo_type, kind, started, groups in ops:
            out.append({"kind": kind, "bytes": _nbytes(hlo_type, bool(started)), "count": times,
                        "groups": groups})  # fmt: skip
        for callee, n in calls:
            add(callee, times * n)

    add(entry, 1)
    return out


def collectives(hlo_text: str) -> dict:
    """``{kind: {"count", "bytes"}}`` of the collectives one run of a compiled HLO module
    performs per device (`collective_ops`, summed by kind)."""
    out = {}
    for op in collective_ops(hlo_text):
        entry = out.setdefault(op["kind"], {"count": 0, "bytes": 0})
        entry["count"] += op["count"]
        entry["bytes"] += op["count"] * op["bytes"]
    return out


_GROUPS = re.compile(  # the three spellings of `jaxpar.cost.projection.replica_groups`
    r"(?:replica_groups|source_target_pairs)=(mesh\[[^\]]*\](?:, device_ids=\(\S+\))? \{[^}]*\}"
    r"|\{[\d,{}]*\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)"
)
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) .*\{$")
_CALLS = re.compile(r"\b(body|calls|to_apply|true_computation|false_computation)=%([\w.-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
