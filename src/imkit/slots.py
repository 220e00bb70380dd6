"""
Building frozen attrs records without their ``__init__``.

A frozen, slotted attrs class stores each field with ``object.__setattr__``, which is most of
what it costs to make one.  On the hot path (the codec's decoders, the SQLite writer's appends)
imkit stores the values straight into the slots instead: the same object, for less.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import attrs


def slot_setters(cls: type) -> dict[str, Callable[[Any, Any], None]] | None:
    """
    The slot setters of an attrs class whose ``__init__`` does nothing but store its arguments
    (no validators, converters, hooks or hidden slots such as a cached hash), by field name;
    None for any other class, which must then be built by calling it.
    """
    if not attrs.has(cls) or cls.__new__ is not object.__new__:
        return None
    if hasattr(cls, "__attrs_pre_init__") or hasattr(cls, "__attrs_post_init__"):
        return None
    fields = attrs.fields(cls)
    if any(not a.init or a.validator is not None or a.converter is not None for a in fields):
        return None
    slots: set[str] = set()
    for klass in cls.__mro__[:-1]:
        if "__slots__" not in klass.__dict__:
            return None  # instances have a __dict__: not a plain slotted class
        declared = klass.__dict__["__slots__"]
        slots.update([declared] if isinstance(declared, str) else declared)
    if slots - {a.name for a in fields} - {"__weakref__"}:
        return None
    setters = {}
    for a in fields:
        descriptor = next(k.__dict__[a.name] for k in cls.__mro__ if a.name in k.__dict__)
        if not isinstance(descriptor, types.MemberDescriptorType):
            return None
        setters[a.name] = descriptor.__set__
    return setters


def builder(cls: type) -> Callable[..., Any]:
    """
    A function taking every field of ``cls`` positionally (defaults included) that returns the
    instance ``cls(...)`` would; ``cls`` itself when its ``__init__`` does more than store.
    """
    setters = slot_setters(cls)
    if setters is None:
        return cls
    names = list(setters)
    namespace: dict[str, Any] = {"new": object.__new__, "cls": cls}
    lines = [f"def build_{cls.__name__}({', '.join(names)}):", "    obj = new(cls)"]
    for index, name in enumerate(names):
        namespace[f"set{index}"] = setters[name]
        lines.append(f"    set{index}(obj, {name})")
    lines.append("    return obj")
    exec(compile("\n".join(lines), f"<imkit.slots builder of {cls.__qualname__}>", "exec"), namespace)
    return namespace[f"build_{cls.__name__}"]
