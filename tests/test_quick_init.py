"""storage/quick_init.py: the storage values' faster __init__ builds what the dataclass's own did."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

import pytest

from durable_streams_asgi.storage import base
from durable_streams_asgi.storage.quick_init import quick_init

VALUES = [
    cls
    for cls in vars(base).values()
    if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == base.__name__
]


def plain_twin(cls: type) -> type:
    """The same fields as a frozen, slotted dataclass with the generated __init__."""
    spec = [(f.name, f.type, f) for f in dataclasses.fields(cls)]
    rebuilt = [
        (name, kind, dataclasses.field(default=f.default, default_factory=f.default_factory)) for name, kind, f in spec
    ]
    return dataclasses.make_dataclass(cls.__name__, rebuilt, frozen=True, slots=True)


def test_every_storage_value_has_it() -> None:
    assert len(VALUES) >= 9
    for cls in VALUES:
        assert cls.__init__.__module__ == base.__name__
        assert any(name.startswith("_set_") for name in cls.__init__.__code__.co_freevars)


@pytest.mark.parametrize("cls", VALUES, ids=lambda cls: cls.__name__)
def test_same_signature_same_values_still_frozen(cls: type) -> None:
    twin = plain_twin(cls)
    assert str(inspect.signature(cls)) == str(inspect.signature(twin))
    # Annotations resolve in the class's module, as a dataclass's own __init__'s do.
    assert typing.get_type_hints(cls.__init__) == {**typing.get_type_hints(cls), "return": type(None)}
    inspect.signature(cls, eval_str=True)
    required = [
        f
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    arguments: dict[str, Any] = {f.name: f"value of {f.name}" for f in required}
    made, reference = cls(**arguments), twin(**arguments)
    assert dataclasses.asdict(made) == dataclasses.asdict(reference)  # defaults and factories too
    positional = cls(*arguments.values())
    assert positional == made
    if not any(isinstance(getattr(made, f.name), list) for f in dataclasses.fields(cls)):
        assert hash(positional) == hash(made)
    first = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(made, first, "changed")
    assert getattr(dataclasses.replace(made, **{first: "changed"}), first) == "changed"
    assert getattr(made, first) == f"value of {first}"
    with pytest.raises(TypeError):
        cls()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        cls(**arguments, unknown=1)


def test_a_default_factory_gives_each_instance_its_own_value() -> None:
    info = base.StreamInfo("text/plain", 0, False, None, None, "id")
    one, two = base.ReadResult(info, 0, 0), base.ReadResult(info, 0, 0)
    assert one.items == [] and one.items is not two.items
    given = [b"x"]
    assert base.ReadResult(info, 0, 1, given).items is given


def test_refuses_what_it_would_get_wrong() -> None:
    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class KeywordOnly:
        a: int

    for cls in (NoSlots, PostInit, KeywordOnly):
        with pytest.raises(TypeError):
            quick_init(cls)
