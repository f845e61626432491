"""The auxiliary-task registry.

A task is a class registered under a name with `@auxtl.register_task("name")`.
`get_task(name, **params)` instantiates it. Tasks come from three places: the
built-in package `auxtl.tasks` (one module per task), installed packages that
declare the entry-point group `auxtl.tasks`, and user files loaded with
`load_task_module(path)` (the CLI's `--task-module`).
An entry point that fails to import is skipped with an AuxtlWarning
(`load_entry_points`, which the model registry shares).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import pathlib
import pkgutil
import sys
import warnings
from collections.abc import Collection
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
from flax import nnx

from auxtl.errors import (AuxtlWarning, BadParameterError, InputError, MissingFileError,
                          UnknownNameError)

ENTRY_POINT_GROUP = "auxtl.tasks"

_REGISTRY: dict[str, type] = {}
_PLUGINS_LOADED = False


@runtime_checkable
class Task(Protocol):
    """What a task provides. Subclass `TaskBase` to get the defaults."""

    name: str

    def validate(self, image_shape: tuple[int, int, int]) -> None: ...

    def make_examples(self, key: jax.Array, images: jax.Array) -> tuple[Any, Any]: ...

    def make_head(self, feature_dim: int, *, image_shape: tuple[int, int, int],
                  rngs: nnx.Rngs) -> nnx.Module: ...

    def forward(self, trunk: nnx.Module, head: nnx.Module, inputs: Any, *, train: bool,
                frozen: Collection[str] = ()) -> Any: ...

    def loss_and_metrics(self, outputs: Any, targets: Any) -> tuple[jax.Array, dict]: ...


class TaskBase:
    """Defaults for a task: forward = head(trunk(inputs)); no input requirement.

    `make_examples` runs inside the jitted step on normalised float32 NHWC images
    and must be pure jax.numpy. Class attributes `summary`, `needs` and
    `predicts` describe the task in `auxtl tasks`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs: ClassVar[str] = "any NHWC images"
    predicts: ClassVar[str] = ""

    def validate(self, image_shape: tuple[int, int, int]) -> None:
        del image_shape

    def forward(self, trunk, head, inputs, *, train: bool, frozen: Collection[str] = ()):
        return head(trunk(inputs, train=train, frozen=frozen))

    def params(self) -> dict[str, Any]:
        """The constructor arguments that recreate this task (saved in checkpoints)."""
        if dataclasses.is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {}


# The task contract: method -> (positional, keyword) arguments auxtl calls it with
# (besides self). `TaskBase` provides validate and forward.
_CONTRACT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "make_examples": (("key", "images"), ()),
    "make_head": (("feature_dim",), ("image_shape", "rngs")),
    "loss_and_metrics": (("outputs", "targets"), ()),
    "forward": (("trunk", "head", "inputs"), ("train",)),
    "validate": (("image_shape",), ()),
}


def _method_signature(cls: type, method: str) -> inspect.Signature | None:
    """The signature `instance.method` has (self bound), or None where it cannot be
    told cheaply (builtins, callable objects)."""
    raw = inspect.getattr_static(cls, method)
    try:
        if isinstance(raw, staticmethod):
            return inspect.signature(raw.__func__)
        if isinstance(raw, classmethod):
            return inspect.signature(getattr(cls, method))
        if inspect.isfunction(raw):
            parameters = list(inspect.signature(raw).parameters.values())
            if not parameters or parameters[0].kind not in (
                    inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    inspect.Parameter.VAR_POSITIONAL):
                return inspect.Signature([])  # cannot take self: refused below
            if parameters[0].kind is inspect.Parameter.VAR_POSITIONAL:
                return inspect.Signature(parameters)
            return inspect.Signature(parameters[1:])
    except (TypeError, ValueError):
        return None
    return None


def check_task_class(cls, name: str = "") -> None:
    """Refuses a class that does not provide the task contract (`Task`): callables
    make_examples, make_head, loss_and_metrics, forward and validate (`TaskBase` gives
    the last two) that accept the arguments auxtl passes. Every problem is named."""
    label = f"task {name!r}" if name else "a task"
    if not isinstance(cls, type):
        raise BadParameterError(f"register_task registers classes; {label} got {cls!r}")
    missing = [m for m in _CONTRACT if not callable(getattr(cls, m, None))]
    if missing:
        defaults = [m for m in missing if m in ("validate", "forward")]
        hint = (f" (subclass auxtl.TaskBase for the default {' and '.join(defaults)})"
                if defaults else "")
        raise BadParameterError(
            f"{label} class {_origin(cls)} lacks the method(s) {', '.join(missing)}{hint}; "
            f"a task provides make_examples, make_head, loss_and_metrics, forward and "
            f"validate")
    problems = []
    for method, (positional, keywords) in _CONTRACT.items():
        signature = _method_signature(cls, method)
        if signature is None:
            continue
        try:
            signature.bind(*positional, **dict.fromkeys(keywords))
        except TypeError as error:
            call = ", ".join([*positional, *(f"{k}=..." for k in keywords)])
            problems.append(f"{method}{signature} cannot be called as {method}({call}): "
                            f"{error}")
    if problems:
        raise BadParameterError(f"{label} class {_origin(cls)}: " + "; ".join(problems))


def register_task(name: str):
    """Class decorator registering a task under `name`; a second, different class raises,
    and so does a class lacking a method of the task contract (`check_task_class`)."""
    if not name or not name.replace("_", "").isalnum():
        raise InputError(f"task name must be a non-empty identifier, got {name!r}")

    def decorator(cls: type) -> type:
        existing = _REGISTRY.get(name)
        if existing is not None and _origin(existing) != _origin(cls):
            raise InputError(f"task {name!r} is already registered by {_origin(existing)}; "
                             f"cannot register {_origin(cls)} under the same name")
        check_task_class(cls, name)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _origin(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def load_entry_points(group: str, kind: str) -> list[str]:
    """Loads every installed entry point of `group` (so their registrations run) and
    returns the names of those that loaded. One that fails to load is skipped with an
    `AuxtlWarning` naming it (name, value) and its error, so a broken plugin neither
    hides the others nor stops auxtl; `kind` ("task", "model") words the warning."""
    loaded = []
    for entry_point in importlib.metadata.entry_points(group=group):
        try:
            entry_point.load()
        except Exception as error:  # any error of a third party's import: reported, skipped
            detail = " ".join(f"{type(error).__name__}: {error}".split())
            warnings.warn(f"skipped the {kind} plugin {entry_point.name!r} "
                          f"({entry_point.value}, entry point group {group!r}): it failed "
                          f"to load: {detail}", AuxtlWarning, stacklevel=2)
        else:
            loaded.append(entry_point.name)
    return loaded


def _load_plugins() -> None:
    """Imports the built-in task modules and the `auxtl.tasks` entry points, once."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True   # first: a plugin that lists tasks as it loads must not recurse
    try:
        import auxtl.tasks as builtin
        for module in pkgutil.iter_modules(builtin.__path__):
            importlib.import_module(f"{builtin.__name__}.{module.name}")
    except BaseException:    # a broken built-in is a bug: raised, and again next call
        _PLUGINS_LOADED = False
        raise
    load_entry_points(ENTRY_POINT_GROUP, "task")


def import_user_file(path: str | pathlib.Path, *, kind: str, package: str) -> None:
    """Imports a user's Python file once (as `package.<stem>_<hash>`), so that the
    registrations it runs take effect; MissingFileError when there is no such file."""
    path = pathlib.Path(path).resolve()
    if not path.is_file():
        raise MissingFileError(f"{kind} module {str(path)!r} does not exist")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    module_name = f"{package}.{path.stem}_{digest}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise


def load_task_module(path: str | pathlib.Path) -> None:
    """Imports a user's task file so its `@register_task` classes register."""
    import_user_file(path, kind="task", package="auxtl_user_tasks")


def list_tasks() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def task_class(name: str) -> type:
    _load_plugins()
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_task(name: str, **params: Any) -> Task:
    """Instantiates the task `name` with `params`; unknown names list the known ones."""
    cls = task_class(name)
    try:  # check the call against the signature, so a TypeError inside the task stays a bug
        inspect.signature(cls).bind(**params)
    except TypeError as error:
        raise BadParameterError(f"bad parameters {params} for task {name!r}: {error}") from None
    try:
        return cls(**params)
    except ValueError as error:  # the task's own check of its parameters' values
        raise InputError(f"task {name!r} with {params}: {error}") from error
