"""The torchvision/timm ResNet name map: every trunk leaf named once, configs inferred
from torchvision-named arrays (made here in torch layout, no torch needed), and the
files it must refuse."""

import numpy as np
import pytest
from flax import nnx

import auxtl
from auxtl.errors import InputError
from auxtl.interop.layout import from_flax
from auxtl.interop.name_maps import flat_leaves, get_name_map, maps_for
from auxtl.interop.source import Source
from auxtl.interop.torchvision_names import TORCHVISION, names


def trunk_leaves(model, config):
    """{auxtl leaf: shape} of the trunk `model` built from `config` (abstract, no init)."""
    trunk = nnx.eval_shape(lambda: auxtl.build_trunk(model, config, rngs=nnx.Rngs(0)))
    _, params, stats = nnx.split(trunk, nnx.Param, nnx.BatchStat)
    return {leaf: tuple(value.shape) for leaf, value in
            flat_leaves(nnx.to_pure_dict(params), nnx.to_pure_dict(stats)).items()}


def torch_named(model, config, extra=()):
    """A Source as a torchvision state dict of the trunk would read: torch names, torch
    layout (zeros), plus what torchvision adds (fc, num_batches_tracked)."""
    leaves = trunk_leaves(model, config)
    tensors = {foreign: from_flax(np.zeros(leaves[leaf], np.float32), "torch", leaf)
               for foreign, leaf in names(model, config).items()}
    tensors.update({"bn1.num_batches_tracked": np.zeros((), np.int64),
                    "fc.weight": np.zeros((10, 4), np.float32),
                    "fc.bias": np.zeros((10,), np.float32), **dict(extra)})
    return Source(path="resnet.pth", format="torch", tensors=tensors, layout="torch")


CONFIGS = [
    ("resnet18", {"width": 8, "large_stem": True}),
    ("resnet18", {"width": 4, "stem_width": 16, "stage_sizes": (1, 2, 1)}),
    ("resnet50", {"width": 4, "large_stem": True}),
    ("resnet50", {"width": 2, "stem_width": 8, "stage_sizes": (2, 1), "in_channels": 1}),
]


@pytest.mark.parametrize("model,config", CONFIGS)
def test_the_map_names_every_leaf_of_the_trunk_once(model, config):
    leaves = trunk_leaves(model, config)
    mapping = names(model, config)
    assert sorted(mapping.values()) == sorted(leaves)  # each leaf once, nothing else
    for foreign, leaf in mapping.items():
        module = foreign.rsplit(".", 1)[0]
        if leaf.endswith("/kernel"):
            assert foreign.endswith(".weight") and len(leaves[leaf]) == 4
        assert (module.startswith("layer") and module.count(".") >= 2) or module in ("conv1", "bn1")


def test_a_torchvision_resnet18_maps_as_torchvision_names_it():
    mapping = names("resnet18", {"width": 64, "large_stem": True})
    assert mapping["conv1.weight"] == "params/layers/0/conv/kernel"
    assert mapping["bn1.running_var"] == "batch_stats/layers/0/bn/var"
    assert mapping["layer1.1.bn2.weight"] == "params/layers/2/bn2/scale"
    assert mapping["layer2.0.downsample.0.weight"] == "params/layers/3/proj_conv/kernel"
    assert mapping["layer2.0.downsample.1.running_mean"] == "batch_stats/layers/3/proj_bn/mean"
    assert mapping["layer4.1.conv2.weight"] == "params/layers/8/conv2/kernel"
    assert "layer1.0.downsample.0.weight" not in mapping  # 64 -> 64, stride 1: identity
    assert "layer1.0.downsample.0.weight" in names("resnet50", {"width": 64})  # 64 -> 256


def test_the_map_is_registered_for_both_resnets_in_torch_layout():
    assert get_name_map("torchvision") is TORCHVISION and TORCHVISION.layout == "torch"
    assert all(TORCHVISION in maps_for(model) for model in ("resnet18", "resnet50"))
    assert TORCHVISION.ignored("layer3.1.bn2.num_batches_tracked")
    assert TORCHVISION.ignored("fc.weight") and TORCHVISION.ignored("fc.bias")
    assert TORCHVISION.ignored("layer1.0.conv1.weight") is None


@pytest.mark.parametrize("model,config", CONFIGS)
def test_the_config_is_inferred_from_the_arrays(model, config):
    source = torch_named(model, config)
    assert TORCHVISION.recognizes(source)
    inferred = TORCHVISION.infer_config(model, source)
    expected = auxtl.models.make_config(model, None, **config)
    assert inferred == {"in_channels": expected.in_channels, "stem_width": expected.stem_width,
                        "width": expected.width, "large_stem": expected.large_stem,
                        "stage_sizes": expected.stage_sizes, "padding": "torch",
                        "bn_epsilon": 1e-5}
    assert sorted(names(model, inferred).values()) == sorted(trunk_leaves(model, config))


def test_other_names_are_not_recognized():
    leaves = {leaf: np.zeros(1) for leaf in names("resnet18", {"width": 2}).values()}
    assert not TORCHVISION.recognizes(Source("a.safetensors", "safetensors", leaves))
    keras = {"conv2d/kernel": np.zeros((3, 3, 1, 4)), "conv1.weight": np.zeros((4, 1, 3, 3))}
    assert not TORCHVISION.recognizes(Source("b.h5", "keras", keras))


@pytest.mark.parametrize("model,file_model,held", [
    ("resnet18", "resnet50", "bottleneck blocks"), ("resnet50", "resnet18", "basic blocks")])
def test_a_file_of_the_other_block_kind_is_refused(model, file_model, held):
    source = torch_named(file_model, {"width": 2, "stage_sizes": (1, 1)})
    with pytest.raises(InputError, match=f"model '{model}'.*{held}"):
        TORCHVISION.infer_config(model, source)


def test_a_deep_stem_is_refused():
    source = torch_named("resnet50", {"width": 2, "stage_sizes": (1, 1)},
                         extra={"conv1.0.weight": np.zeros((2, 3, 3, 3), np.float32)})
    with pytest.raises(InputError, match=r"deep stem \(conv1\.0\.weight"):
        TORCHVISION.infer_config("resnet50", source)


def test_average_pool_downsampling_is_refused():
    source = torch_named("resnet50", {"width": 2, "stage_sizes": (1, 1)})
    tensors = {name.replace("downsample.1", "downsample.2").replace("downsample.0",
                                                                    "downsample.1"): array
               for name, array in source.tensors.items()}
    with pytest.raises(InputError, match=r"layer1\.0\.downsample\.1\.weight.*avg_down"):
        TORCHVISION.infer_config("resnet50", Source("d.pth", "torch", tensors, "torch"))


def test_a_stem_neither_7x7_nor_3x3_is_refused():
    source = torch_named("resnet18", {"width": 2, "stage_sizes": (1, 1)},
                         extra={"conv1.weight": np.zeros((2, 3, 5, 5), np.float32)})
    with pytest.raises(InputError, match="conv1.weight is 5x5"):
        TORCHVISION.infer_config("resnet18", source)


def test_other_models_are_refused_by_name():
    with pytest.raises(InputError, match="'small_cnn'"):
        names("small_cnn", {})
