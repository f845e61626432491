"""The "keras" name map: a Keras 3 small CNN (`read_keras`'s names) onto auxtl's small_cnn.

The Keras model must be small_cnn's shape: blocks Conv2D(3x3, stride 1, padding "same")
-> BatchNormalization -> ReLU [-> MaxPooling2D(2)], then GlobalAveragePooling2D and one
Dense with ReLU (InputLayer and Dropout, identities at inference, may sit anywhere).
Keras's "same" at stride 1 with an odd kernel pads symmetrically, as auxtl's "same" does.
The k-th Conv2D and BatchNormalization become layers/k/conv and layers/k/bn, the Dense
layers/<number of convs>/dense. A conv's bias (use_bias=True, Keras's default) has no
auxtl leaf: `fold_conv_biases` folds it into the next BatchNormalization's moving mean
(exact, see there) before mapping; a bias not folded is left out of the map, so the
strict importer names it as surplus. Likewise a BatchNormalization without gamma or
beta leaves an auxtl leaf unmapped, for the importer to name as missing. A nested
model's layers ("backbone/conv2d") map as they are or after `Source.select("backbone/")`.

Without a config (a `.weights.h5` alone) the layers' kinds come from their arrays (4-D
kernel: Conv2D; 2-D: Dense; four vectors: BatchNormalization) in the reader's order
(model order within each class), and what only the config states is assumed, with an
AuxtlWarning: small_cnn's default pool_after, Keras's default BatchNormalization
epsilon 1e-3, "same" padding.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

from auxtl.errors import AuxtlWarning, InputError
from auxtl.interop.name_maps import NameMap, register_name_map
from auxtl.interop.source import Source

KERAS_BN_EPSILON = 1e-3
# Per kind, the role of each unnamed variable vars/<i> and the auxtl leaf of each role.
_ROLES = {"conv": ("kernel", "bias"), "dense": ("kernel", "bias"),
          "bn": ("gamma", "beta", "moving_mean", "moving_variance")}
_LEAVES = {"conv": {"kernel": "params/layers/{k}/conv/kernel"},
           "dense": {"kernel": "params/layers/{k}/dense/kernel",
                     "bias": "params/layers/{k}/dense/bias"},
           "bn": {"gamma": "params/layers/{k}/bn/scale", "beta": "params/layers/{k}/bn/bias",
                  "moving_mean": "batch_stats/layers/{k}/bn/mean",
                  "moving_variance": "batch_stats/layers/{k}/bn/var"}}
_KINDS = {"Conv2D": "conv", "BatchNormalization": "bn", "Dense": "dense",
          "ReLU": "relu", "MaxPooling2D": "pool", "GlobalAveragePooling2D": "gap"}
_IDENTITIES = ("InputLayer", "Dropout")


@dataclasses.dataclass(frozen=True)
class KerasCNN:
    """A Keras small CNN's weighted layers, by name, in model order."""

    convs: tuple[str, ...]
    bns: tuple[str, ...]
    dense: str
    pool_after: tuple[int, ...] | None   # None: no config says
    epsilons: tuple[float, ...] | None


def _variables(source: Source) -> dict[str, list[str]]:
    """Layer name -> its foreign names, in the source's order."""
    layers: dict[str, list[str]] = {}
    for name in source.tensors:
        match = re.fullmatch(r"(.*)/vars/\d+", name)
        layers.setdefault(match.group(1) if match else name.rsplit("/", 1)[0], []).append(name)
    return layers


def _described(layer: dict[str, Any], path: str) -> str:
    """The layer's kind token, after checking the settings auxtl's small_cnn computes alike."""
    name, cls = layer["name"], layer["class_name"]

    def refuse(problem: str):
        raise InputError(f"{path}: Keras layer {name!r} ({cls}) {problem}; auxtl's small_cnn "
                         f"cannot compute it alike")

    if cls == "Conv2D":
        if layer.get("padding") != "same":
            refuse(f"has padding {layer.get('padding')!r}, not 'same'")
        for key, want in (("strides", [1, 1]), ("dilation_rate", [1, 1]),
                          ("kernel_size", [3, 3])):
            if list(layer.get(key, want)) != want:
                refuse(f"has {key} {layer.get(key)}, not {want}")
        if layer.get("groups", 1) != 1 or layer.get("activation", "linear") != "linear":
            refuse("has groups or an activation before its BatchNormalization")
    elif cls == "BatchNormalization" and (layer.get("axis", -1) not in (-1, 3, [-1], [3])
                                          or layer.get("renorm", False)):
        refuse("normalises another axis or uses batch renormalisation")
    elif cls == "ReLU" and any(layer.get(key) not in (None, 0, 0.0)
                               for key in ("max_value", "negative_slope", "threshold")):
        refuse("is not a plain ReLU")
    elif cls == "MaxPooling2D" and (list(layer.get("pool_size", [2, 2])) != [2, 2]
                                    or list(layer.get("strides") or [2, 2]) != [2, 2]
                                    or layer.get("padding", "valid") != "valid"):
        refuse("is not a 2x2, stride 2, 'valid' max-pool")
    elif cls == "Activation" and layer.get("activation") == "relu":
        return "relu"
    elif cls == "GlobalAveragePooling2D" and layer.get("keepdims", False):
        refuse("keeps the spatial dimensions")
    if layer.get("data_format", "channels_last") != "channels_last":
        refuse("is channels_first")
    if cls not in _KINDS:
        refuse("is not part of a small CNN")
    return _KINDS[cls]


def _config_layers(source: Source) -> list[dict[str, Any]]:
    """The config's layers as the arrays name them: where `Source.select` stripped a prefix
    from the arrays' names ("backbone/"), only the layers under it, the prefix stripped."""
    layers, held = source.info["layers"], set(_variables(source))
    names = {layer["name"] for layer in layers}
    prefixes = {name[:-len(inner)] for name in names for inner in held
                if name.endswith("/" + inner)}
    prefix = next((prefix for prefix in sorted(prefixes, key=len)
                   if all(prefix + inner in names for inner in held)), "")
    if held <= names or not prefix:
        return layers
    return [{**layer, "name": layer["name"][len(prefix):]} for layer in layers
            if layer["name"].startswith(prefix)]


def _tokens(source: Source) -> list[tuple[str, dict[str, Any]]]:
    """(kind, layer) in model order, a Dense's ReLU activation as a "relu" of its own."""
    tokens = []
    for layer in _config_layers(source):
        if layer["class_name"] in _IDENTITIES:
            continue
        tokens.append((_described(layer, source.path), layer))
        if layer["class_name"] == "Dense" and layer.get("activation") == "relu":
            tokens.append(("relu", layer))
        elif layer["class_name"] == "Dense" and layer.get("activation", "linear") != "linear":
            raise InputError(f"{source.path}: Keras layer {layer['name']!r} (Dense) has "
                             f"activation {layer.get('activation')!r}; small_cnn's is relu")
    return tokens


def _from_config(source: Source) -> KerasCNN:
    tokens, position = _tokens(source), 0
    convs, bns, pool_after, epsilons = [], [], [], []

    def take(kind: str, after: dict[str, Any] | None) -> dict[str, Any]:
        nonlocal position
        if position < len(tokens) and tokens[position][0] == kind:
            position += 1
            return tokens[position - 1][1]
        where = f"after Keras layer {after['name']!r}" if after else "first"
        found = (f"Keras layer {tokens[position][1]['name']!r} "
                 f"({tokens[position][1]['class_name']})" if position < len(tokens)
                 else "the end of the model")
        raise InputError(f"{source.path}: small_cnn needs a {kind} {where}, found {found} "
                         f"(blocks Conv2D -> BatchNormalization -> ReLU [-> MaxPooling2D], "
                         f"then GlobalAveragePooling2D, one Dense with ReLU)")

    layer = None
    while not convs or (position < len(tokens) and tokens[position][0] == "conv"):
        conv = take("conv", layer)
        bn = take("bn", conv)
        layer = take("relu", bn)
        convs.append(conv["name"])
        bns.append(bn["name"])
        epsilons.append(float(bn.get("epsilon", KERAS_BN_EPSILON)))
        if position < len(tokens) and tokens[position][0] == "pool":
            layer = take("pool", layer)
            pool_after.append(len(convs))
    layer = take("relu", take("dense", take("gap", layer)))
    if position < len(tokens):
        extra = tokens[position][1]
        raise InputError(f"{source.path}: Keras layer {extra['name']!r} ({extra['class_name']}) "
                         f"follows the Dense {layer['name']!r}; small_cnn ends in one Dense")
    return KerasCNN(tuple(convs), tuple(bns), layer["name"], tuple(pool_after), tuple(epsilons))


def _from_arrays(source: Source) -> KerasCNN:
    kinds: dict[str, list[str]] = {"conv": [], "bn": [], "dense": []}
    for layer, names in _variables(source).items():
        shapes = [source.tensors[name].shape for name in names]
        if len(shapes[0]) == 4 and len(shapes) <= 2:
            kinds["conv"].append(layer)
        elif len(shapes[0]) == 2 and len(shapes) <= 2:
            kinds["dense"].append(layer)
        elif len(shapes) == 4 and all(len(shape) == 1 for shape in shapes):
            kinds["bn"].append(layer)
        else:
            raise InputError(f"{source.path}: Keras layer {layer!r} has arrays {shapes}: not a "
                             f"Conv2D, a Dense or a BatchNormalization with gamma and beta "
                             f"(without a config the kind comes from the shapes)")
    if len(kinds["dense"]) != 1 or not kinds["conv"] or len(kinds["conv"]) != len(kinds["bn"]):
        raise InputError(f"{source.path}: small_cnn needs as many BatchNormalization as Conv2D "
                         f"layers and one Dense; found Conv2D {kinds['conv']}, "
                         f"BatchNormalization {kinds['bn']}, Dense {kinds['dense']}")
    return KerasCNN(tuple(kinds["conv"]), tuple(kinds["bn"]), kinds["dense"][0], None, None)


def keras_cnn(model: str, source: Source) -> KerasCNN:
    """The source's small-CNN structure, from its config when it has one; InputError
    naming the Keras layer that does not fit, or the model if it is not small_cnn."""
    if model != "small_cnn":
        raise InputError(f"{source.path}: the keras name map maps small_cnn, not {model!r}")
    return _from_config(source) if "layers" in source.info else _from_arrays(source)


def _kernel(source: Source, layer: str):
    """The first variable (the kernel) of a Conv2D or Dense; InputError if the file holds
    no weights for a layer its config lists."""
    variables = _variables(source).get(layer)
    if not variables:
        raise InputError(f"{source.path}: Keras layer {layer!r} is in the config but has no "
                         f"weights in the file")
    return source.tensors[variables[0]]


def infer_config(model: str, source: Source) -> dict[str, Any]:
    """in_channels, widths, fc_dim, bn_epsilon, padding "same" and (with a config)
    pool_after; without a config, warns which values were assumed."""
    cnn = keras_cnn(model, source)
    kernels = [_kernel(source, layer) for layer in cnn.convs]
    values: dict[str, Any] = {"in_channels": int(kernels[0].shape[2]),
                              "widths": tuple(int(kernel.shape[3]) for kernel in kernels),
                              "fc_dim": int(_kernel(source, cnn.dense).shape[-1]),
                              "padding": "same", "bn_epsilon": KERAS_BN_EPSILON}
    if cnn.pool_after is None:
        warnings.warn(AuxtlWarning(f"{source.path}: no Keras config, so small_cnn's default "
                                   f"pool_after, BatchNormalization epsilon {KERAS_BN_EPSILON} "
                                   f"(Keras's default) and 'same' padding are assumed"),
                      stacklevel=2)
        return values
    if len(set(cnn.epsilons)) != 1:
        raise InputError(f"{source.path}: the BatchNormalization layers {list(cnn.bns)} have "
                         f"different epsilons {list(cnn.epsilons)}; small_cnn has one")
    return {**values, "pool_after": cnn.pool_after, "bn_epsilon": cnn.epsilons[0]}


def _widths(config: Any) -> tuple[int, ...]:
    return tuple(config["widths"] if isinstance(config, dict) else config.widths)


def _role(kind: str, foreign: str, index: int) -> str:
    """A variable's Keras name: its own, or by position for an unnamed vars/<i>."""
    return _ROLES[kind][index] if re.search(r"/vars/\d+$", foreign) else foreign.rsplit("/", 1)[1]


def names(model: str, config: Any, source: Source | None) -> dict[str, str]:
    """{foreign name: auxtl leaf} for small_cnn built from `config`; a conv bias not
    folded (`fold_conv_biases`) and any variable without an auxtl leaf are left out (the
    importer reports them). InputError without a source: Keras export is not supported."""
    if source is None:
        raise InputError(f"{model}: the keras name map only imports; Keras export is not "
                         f"supported (export writes torch names)")
    cnn, layers = keras_cnn(model, source), _variables(source)
    if len(cnn.convs) != len(_widths(config)):
        raise InputError(f"{source.path}: the Keras model has "
                         f"{len(cnn.convs)} Conv2D layers, the small_cnn config "
                         f"{len(_widths(config))} widths")
    where = {layer: ("conv", k) for k, layer in enumerate(cnn.convs)}
    where.update({layer: ("bn", k) for k, layer in enumerate(cnn.bns)})
    where[cnn.dense] = ("dense", len(cnn.convs))
    mapping = {}
    for layer, (kind, k) in where.items():
        for i, foreign in enumerate(layers.get(layer, ())):  # none: the importer says missing
            role = _role(kind, foreign, i)
            if role in _LEAVES[kind]:
                mapping[foreign] = _LEAVES[kind][role].format(k=k)
    return mapping


def _variable(source: Source, layer: str, kind: str, role: str) -> str | None:
    """The foreign name of `layer`'s variable playing `role`, None if it has none."""
    variables = _variables(source).get(layer, [])
    return next((foreign for i, foreign in enumerate(variables)
                 if i < len(_ROLES[kind]) and _role(kind, foreign, i) == role), None)


def fold_conv_biases(source: Source, model: str = "small_cnn") -> Source:
    """`source` with each Conv2D's bias folded into the BatchNormalization after it: the
    bias removed and that BN's moving_mean replaced by moving_mean - bias, one note per
    fold appended to info["notes"] ("conv2d/bias folded into
    batch_normalization/moving_mean"). A source without conv biases comes back unchanged.

    Exact in inference: the BN computes (conv + b - mean) / sqrt(var + eps) * gamma +
    beta, and conv + b - mean = conv - (mean - b) (in float the same up to one rounding
    of the subtraction). In training the BN subtracts the batch mean, which includes b,
    so the bias has no effect there either and dropping it loses nothing. small_cnn's
    convs have no bias, so without the fold the bias would be surplus, and ignoring it
    would shift every output of its BN by gamma * b / sqrt(var + eps).
    InputError if a bias and the moving mean differ in shape, or the source is not a
    small CNN (`keras_cnn`)."""
    cnn = keras_cnn(model, source)
    tensors, notes = dict(source.tensors), []
    for conv, bn in zip(cnn.convs, cnn.bns):
        bias, mean = _variable(source, conv, "conv", "bias"), _variable(source, bn, "bn",
                                                                        "moving_mean")
        if bias is None or mean is None:
            continue
        if tensors[bias].shape != tensors[mean].shape:
            raise InputError(f"{source.path}: Keras bias {bias} has shape "
                             f"{tensors[bias].shape}, the moving mean {mean} after it "
                             f"{tensors[mean].shape}; cannot fold one into the other")
        tensors[mean] = tensors[mean] - tensors.pop(bias).astype(tensors[mean].dtype)
        notes.append(f"{bias} folded into {mean}")
    if not notes:
        return source
    info = {**source.info, "notes": list(source.info.get("notes", [])) + notes}
    return dataclasses.replace(source, tensors=tensors, info=info)


KERAS = register_name_map(NameMap(
    name="keras", models=("small_cnn",), layout="flax",
    recognizes=lambda source: source.format == "keras",
    infer_config=infer_config, names=names, prepare=fold_conv_biases))
