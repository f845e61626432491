"""Model-aware transplant: which source layers go where in a target model.

checkpoint metadata -> target architecture (models.target, the source's config
with the target's channel count) -> surgery rules (copy the lowest k layers;
adapt the input channels of the kernels that read the image) -> the target model
with the source's weights and batch statistics. `auxtl.surgery` is the generic
tree engine these rules run on; nothing here trains.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import Any

from flax import nnx

from auxtl import checkpoints, surgery
from auxtl.models import build_trunk, make_config, model_entry, with_compute_dtype
from auxtl.models.target import TargetSpec, TransferModel, build_target_trunk, num_reused
from auxtl.trunk_metadata import TrunkMetadata, as_trunk_metadata


def transfer_rules(k: int, adapt_paths: Sequence[str] = ()) -> list[surgery.Rule]:
    """Copy the lowest k layers; the leaves at `adapt_paths` (the kernels that read the
    input, see `input_channel_paths`) are copied with their input channels adapted."""
    rules = surgery.lower_layers_rules(k)
    if k > 0 and adapt_paths:
        rules = [surgery.Rule(f"^{re.escape(path)}$", "copy", on_mismatch="adapt_channels",
                              label=f"input channels of {path}") for path in adapt_paths] + rules
    return rules


def target_config(metadata: TrunkMetadata, in_channels: int, compute_dtype: str = "float32"):
    """The source trunk's config with the target data's channel count and the transfer's
    compute dtype. A trunk checkpoint's config records the dtype it was pretrained in
    (its weights are float32 either way); a transfer computes in its own
    (`FinetuneConfig.compute_dtype`, float32 unless asked), whatever the source's was.
    InputError for a compute dtype the model cannot take (`with_compute_dtype`)."""
    metadata = as_trunk_metadata(metadata)
    source = {k: v for k, v in metadata.config.items() if k != "dtype"}
    return make_config(metadata.model, None, **with_compute_dtype(
        metadata.model, compute_dtype, {**source, "in_channels": in_channels}))


def new_transfer_model(metadata: TrunkMetadata, spec: TargetSpec, *, num_classes: int,
                       in_channels: int, seed: int,
                       compute_dtype: str = "float32") -> TransferModel:
    """The target architecture with fresh weights, computing in `compute_dtype` (trunk,
    added layers and classifier; parameters float32)."""
    metadata = as_trunk_metadata(metadata)
    rngs = nnx.Rngs(seed)
    config = target_config(metadata, in_channels, compute_dtype)
    trunk = build_target_trunk(metadata.model, config, spec, rngs=rngs)
    return TransferModel(trunk, num_classes, rngs=rngs)


def variables(module) -> dict[str, Any]:
    """{"params", "batch_stats"} of a module as plain dicts: what surgery moves together."""
    return {"params": nnx.to_pure_dict(nnx.state(module, nnx.Param)),
            "batch_stats": nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))}


def _trunk_shapes(model: str, config: dict[str, Any], in_channels: int) -> dict[str, tuple]:
    """Path -> shape of the architecture's variables for `in_channels` (nothing is
    allocated)."""
    trunk = nnx.eval_shape(lambda: build_trunk(
        model, make_config(model, None, **{**config, "in_channels": in_channels}),
        rngs=nnx.Rngs(0)))
    return {path: tuple(leaf.shape) for path, leaf in surgery.flatten(variables(trunk)).items()}


@functools.lru_cache(maxsize=64)
def _changed_paths(model: str, entry, config: str, source_channels: int,
                   in_channels: int) -> tuple[str, ...]:
    """`input_channel_paths` for one architecture, remembered: every seed of a transfer
    asks again, and each answer traces the architecture twice. `entry` (the registered
    config class and builder) is in the key, so a model registered anew is traced anew."""
    del entry
    source = _trunk_shapes(model, json.loads(config), source_channels)
    target = _trunk_shapes(model, json.loads(config), in_channels)
    return tuple(path for path, shape in target.items()
                 if path in source and source[path] != shape)


def input_channel_paths(metadata: TrunkMetadata, in_channels: int) -> tuple[str, ...]:
    """The paths whose shape depends on the input channel count: the kernel(s) of the
    convolution(s) reading the image, found for any registered trunk by building its
    architecture (shapes only) for the source's and the target's channel count and
    comparing. Empty when the counts agree."""
    metadata = as_trunk_metadata(metadata)
    source_channels = int(metadata.input_shape[-1])
    if in_channels == source_channels:
        return ()
    return _changed_paths(metadata.model, model_entry(metadata.model),
                          json.dumps(metadata.config, sort_keys=True), source_channels,
                          int(in_channels))


def reused_layers(metadata: TrunkMetadata, spec: TargetSpec) -> tuple[str, ...]:
    """Names of the source layers the target reuses (the lowest `spec.reuse`)."""
    metadata = as_trunk_metadata(metadata)
    return metadata.layer_names[:num_reused(spec, len(metadata.layer_names))]


def rules_for(metadata: TrunkMetadata, spec: TargetSpec, in_channels: int):
    """The surgery rules of a transfer from `metadata`'s trunk into `spec` on data with
    `in_channels` channels."""
    metadata = as_trunk_metadata(metadata)
    k = len(reused_layers(metadata, spec))
    adapt = tuple(path for path in (input_channel_paths(metadata, in_channels) if k else ())
                  if (surgery.layer_index(path) is not None and surgery.layer_index(path) < k))
    return transfer_rules(k, adapt)


def build_transfer_model(metadata: TrunkMetadata, source_params, source_stats,
                         spec: TargetSpec, *, num_classes: int, in_channels: int, seed: int,
                         transplant: bool = True, compute_dtype: str = "float32"):
    """The target model, with the source's lowest k layers transplanted (or all fresh),
    computing in `compute_dtype` (its float32 weights copied as they are).

    Returns (model, report); report is None when `transplant` is False (scratch).
    """
    metadata = as_trunk_metadata(metadata)
    model = new_transfer_model(metadata, spec, num_classes=num_classes,
                               in_channels=in_channels, seed=seed, compute_dtype=compute_dtype)
    if not transplant:
        return model, None
    tree, report = surgery.transplant({"params": source_params, "batch_stats": source_stats},
                                      variables(model.trunk),
                                      rules_for(metadata, spec, in_channels))
    nnx.update(model.trunk, tree["params"], tree["batch_stats"])
    return model, report


def plan_surgery(metadata: TrunkMetadata, spec: TargetSpec, *, num_classes: int,
                 in_channels: int) -> surgery.SurgeryReport:
    """The surgery report of a transfer from a trunk with this metadata, from shapes
    alone: nothing is loaded, initialised or trained."""
    metadata = as_trunk_metadata(metadata)
    source = checkpoints.abstract_trunk(metadata)
    target = nnx.eval_shape(lambda: new_transfer_model(
        metadata, spec, num_classes=num_classes, in_channels=in_channels, seed=0))
    return surgery.plan(variables(source), variables(target.trunk),
                        rules_for(metadata, spec, in_channels))
