"""What every fuzz target shares: how many examples, the allowed exceptions, the memory bound,
and strategies that make inputs both random and close to valid (so parsers get past their first
check)."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from safehold.errors import SafeholdError

EXAMPLES = int(os.environ.get("SAFEHOLD_FUZZ_EXAMPLES", "150"))
"""Examples per target: CI runs the default (all targets in well under a minute);
``python fuzz/run.py --examples 100000`` runs the long mode."""
LONG = "SAFEHOLD_FUZZ_EXAMPLES" in os.environ

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not LONG,  # CI: the same examples every run; the long mode explores
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MEMORY_BOUND = 48 << 20
"""No parser may allocate more than this for one (small) input: in particular a zstd frame
that declares gigabytes costs at most the documented bound (16 MiB for an object's payload)."""

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.sampled_from([0, 1, -1, 28, 84, 255, 256, 1 << 31, 1 << 32, (1 << 64) - 1, -(1 << 63)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=40)
    | st.sampled_from([b"\x00" * 32, b"\x01" * 16, b"\xff" * 80])
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.text(max_size=10) | st.binary(max_size=4), inner, max_size=6)
    ),
    max_leaves=24,
)


def mutate(draw: Callable[[Any], Any], obj: Any, depth: int = 0) -> Any:
    """A copy of ``obj`` with a few random edits: a value replaced, a key dropped or added, a
    list shortened or grown."""
    choice = draw(st.integers(0, 9))
    if depth > 6 or choice == 0:
        return draw(values)
    if isinstance(obj, dict) and obj:
        out = dict(obj)
        key = draw(st.sampled_from(sorted(out, key=repr)))
        action = draw(st.integers(0, 5))
        if action == 0:
            del out[key]
        elif action == 1:
            out[draw(st.text(max_size=8))] = draw(values)
        else:
            out[key] = mutate(draw, out[key], depth + 1)
        return out
    if isinstance(obj, list) and obj:
        out_l = list(obj)
        i = draw(st.integers(0, len(out_l) - 1))
        action = draw(st.integers(0, 5))
        if action == 0:
            del out_l[i]
        elif action == 1:
            out_l.append(draw(values))
        elif action == 2:
            out_l = out_l * draw(st.integers(2, 4))
        else:
            out_l[i] = mutate(draw, out_l[i], depth + 1)
        return out_l
    if choice < 5:
        return obj  # unchanged: the edits elsewhere are what matters
    return draw(values)


def msgpack_inputs(draw: Callable[[Any], Any], valid: Any) -> bytes:
    """Raw bytes, a truncated or bit-flipped valid encoding, or the encoding of a mutation."""
    encoded = msgpack.packb(valid, use_bin_type=True)
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return bytes(draw(st.binary(max_size=300)))
    if kind == 1:
        return encoded[: draw(st.integers(0, len(encoded)))]
    if kind == 2:
        data = bytearray(encoded)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == 3:
        return bytes(msgpack.packb(draw(values), use_bin_type=True))
    edited = valid
    for _ in range(draw(st.integers(1, 3))):
        edited = mutate(draw, edited)
    return bytes(msgpack.packb(edited, use_bin_type=True))


def call(
    fn: Callable[[], object],
    allowed: tuple[type[BaseException], ...] = (SafeholdError,),
    bound: int = MEMORY_BOUND,
) -> object:
    """Run ``fn``: it returns, or raises one of ``allowed`` (with a one-line message); and it
    allocates less than ``bound`` bytes at its peak."""
    tracemalloc.start()
    try:
        try:
            return fn()
        except allowed as e:
            assert "\n" not in str(e), repr(str(e))
            return e
        finally:
            _, peak = tracemalloc.get_traced_memory()
            assert peak < bound, f"peak {peak} bytes"
    finally:
        tracemalloc.stop()
