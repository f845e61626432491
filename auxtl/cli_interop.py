"""`auxtl import` and `auxtl export`: flags -> `interop.import_trunk` / `export_trunk`."""

from __future__ import annotations

import argparse

from auxtl.cli_configs import add_model_module, load_model_modules, parse_key_values
from auxtl.data import Normalization
from auxtl.errors import InputError
from auxtl.interop.exporter import EXPORT_FORMATS, export_trunk
from auxtl.interop.importer import import_trunk
from auxtl.interop.layout import LAYOUTS
from auxtl.interop.readers import FORMATS


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """'H,W,C' -> (H, W, C); InputError naming the flag's value otherwise."""
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"--input-shape {text!r} must be H,W,C (three positive integers)")
    return shape


def parse_normalization(mean: str | None, std: str | None) -> Normalization | None:
    """--mean and --std ('0.485,0.456,0.406') into a Normalization; both or neither."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise InputError("--mean and --std go together (one value per channel each)")
    try:
        return Normalization(tuple(float(v) for v in mean.split(",")),
                             tuple(float(v) for v in std.split(",")))
    except ValueError:
        raise InputError(f"--mean {mean!r} / --std {std!r} must be comma-separated numbers") from None


def cmd_import(args: argparse.Namespace) -> int:
    load_model_modules(args.model_module)
    result = import_trunk(
        args.src, model=args.model, format=args.format, out=args.out, name_map=args.map,
        ignore=args.ignore, prefix=args.prefix,
        model_args=parse_key_values(args.model_arg, "--model-arg"), layout=args.layout,
        input_shape=parse_shape(args.input_shape),
        normalization=parse_normalization(args.mean, args.std), strict=not args.no_strict,
        seed=args.seed, overwrite=args.overwrite)
    if not args.quiet:
        print(result.report.table())
    print(result.report.summary())
    metadata = result.metadata
    print(f"input shape {tuple(metadata.input_shape)}, normalization mean "
          f"{list(metadata.normalization.mean)} std {list(metadata.normalization.std)} "
          f"({metadata.imported['normalization']}); --input-shape, --mean/--std change them")
    print(f"saved the {args.model} trunk to {result.path}")
    return 0


def add_import_parser(sub) -> None:
    p = sub.add_parser("import", help="import a trunk from a PyTorch, safetensors, Keras, "
                       "orbax or npz file into an auxtl trunk checkpoint")
    p.add_argument("src", help="the weights file (or orbax folder)")
    p.add_argument("--model", required=True, help="the auxtl model to load it into")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="the file's format (default: from its name; a folder is orbax)")
    p.add_argument("--out", required=True, help="the trunk checkpoint folder to write")
    p.add_argument("--map", default=None, metavar="NAME|RULES",
                   help="a built-in name map (torchvision, keras, auxtl) or regex rules "
                        "'PATTERN=REPLACEMENT;...' (or @FILE) renaming file names to auxtl "
                        "leaves such as params/layers/0/conv/kernel (default: chosen by the names)")
    p.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                   help="drop the file's arrays whose names match (repeatable; reported)")
    p.add_argument("--prefix", default=None,
                   help="use only names under this prefix, stripped (default: none, or a "
                        "common wrapper such as 'state_dict.' or 'module.')")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="model config values over those the file decides")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="the arrays' layout (default: the name map's, else the format's)")
    p.add_argument("--input-shape", default=None, metavar="H,W,C",
                   help="the input size the trunk expects (default: recorded in the file, "
                        "else the model's usual one)")
    p.add_argument("--mean", default=None, metavar="M1,M2,...",
                   help="the normalisation the weights were trained with, per channel, of "
                        "pixels in [0, 1] (with --std; default: recorded in the file, else "
                        "ImageNet's for torchvision weights, else none)")
    p.add_argument("--std", default=None, metavar="S1,S2,...", help="see --mean")
    p.add_argument("--no-strict", action="store_true",
                   help="allow leaves with no array (fresh init) and unused arrays (reported)")
    p.add_argument("--seed", type=int, default=0,
                   help="the fresh initialisation of missing leaves under --no-strict")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint at --out")
    p.add_argument("--quiet", action="store_true", help="print the summary, not every leaf")
    add_model_module(p)
    p.set_defaults(func=cmd_import)


def cmd_export(args: argparse.Namespace) -> int:
    load_model_modules(args.model_module)
    report = export_trunk(args.trunk, args.out, format=args.format, overwrite=args.overwrite)
    print(f"exported {report.count} arrays of {args.trunk} as {report.format} to {report.path}")
    return 0


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export an auxtl trunk checkpoint's weights "
                       "(safetensors with auxtl names, or with torchvision names and layout)")
    p.add_argument("trunk", help="the trunk checkpoint folder")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="safetensors",
                   help="safetensors: auxtl leaf names, Flax layout, the metadata in the "
                        "header (re-imports bit for bit); torch-names: torchvision's names "
                        "and layout, for load_state_dict(..., strict=False)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace a file at --out")
    add_model_module(p)
    p.set_defaults(func=cmd_export)
