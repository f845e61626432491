"""The built-in name maps, registered, and the order maps are tried in: importing this
module registers them with `name_maps`."""

from __future__ import annotations

from auxtl.interop import keras_names, rule_maps, torchvision_names
from auxtl.interop.name_maps import NameMap, maps_for

BUILT_IN_MAPS = (torchvision_names.TORCHVISION, keras_names.KERAS, rule_maps.AUXTL)


def maps_in_order(model: str) -> list[NameMap]:
    """The maps for `model`: a user's registered maps first (in registration order), then
    the built-in ones, most specific first (auxtl's own names, which any model has, last)."""
    found = maps_for(model)
    users = [m for m in found if m not in BUILT_IN_MAPS]
    return users + [m for m in BUILT_IN_MAPS if m in found]
