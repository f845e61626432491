"""Import trunks from other frameworks (PyTorch, safetensors, Keras, orbax/Flax, npz) and
export auxtl trunks to them: `import_trunk`, `export_trunk`; name maps register in
`name_maps` (built in: torchvision/timm ResNets, Keras small CNNs, auxtl's own names)."""

from auxtl.interop.exporter import EXPORT_FORMATS, ExportReport, export_trunk
from auxtl.interop.importer import ImportResult, import_trunk
from auxtl.interop.name_maps import NameMap, register_name_map
from auxtl.interop.readers import FORMATS, read_source
from auxtl.interop.report import ImportMismatchError, ImportReport, LeafRecord
from auxtl.interop.source import Source

__all__ = ["EXPORT_FORMATS", "ExportReport", "export_trunk", "ImportResult", "import_trunk",
           "NameMap", "register_name_map", "FORMATS", "read_source", "ImportMismatchError",
           "ImportReport", "LeafRecord", "Source"]
