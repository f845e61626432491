"""auxtl: pretrain a shared trunk on free-label auxiliary tasks, then transfer it.

The public API: everything a task file or a user script needs is importable
from `auxtl` directly.
"""

from auxtl import freezing, heads, losses, surgery
from auxtl.checkpoints import load_trunk, load_trunk_state, read_metadata, save_trunk
from auxtl import interop
from auxtl.interop import export_trunk, import_trunk
from auxtl.trunk_metadata import TrunkMetadata
from auxtl.errors import (AuxtlError, BadParameterError, InputError, MissingFileError,
                          UnknownNameError, UnsafeFileError)
from auxtl.data import Dataset, Normalization, load_dataset, normalize
from auxtl.splits import SplitRecord, train_test_split
from auxtl.models import (Trunk, build_trunk, global_avg_pool, list_models, load_model_module,
                          make_config, register_model)
from auxtl.optim import OptimizerConfig, make_optimizer
from auxtl.pretrain import PretrainConfig, PretrainResult, TaskConfig, run_pretraining
from auxtl.pretrain_model import PretrainModel, WeightedTask, build_pretrain_model
from auxtl.registry import (Task, TaskBase, get_task, list_tasks, load_task_module,
                            register_task, task_class)
from auxtl.pretrain_step import make_eval_step, make_train_step
from auxtl.train_state import TrainState
from auxtl import finetune  # the module; finetune.finetune runs the phases
from auxtl.finetune import FinetuneConfig, FinetuneResult
from auxtl.freezing import Phase, parse_phases
from auxtl.cpu import keep_freed_memory
from auxtl.models.target import TargetSpec, TransferModel, build_target_trunk
from auxtl.transfer import TransferConfig, plan_transfer, run_transfer
from auxtl.search import SearchResult, SearchSpace, search_transfer
from auxtl.transplant import build_transfer_model
from auxtl.version import __version__
from auxtl import cpu

cpu.install()   # the CPU kernels into the models' ops hooks (AUXTL_CPU_KERNELS=0: none)

__all__ = [
    "freezing", "heads", "losses", "surgery", "load_trunk", "load_trunk_state", "read_metadata", "save_trunk",
    "TrunkMetadata", "interop", "import_trunk", "export_trunk",
    "AuxtlError", "BadParameterError", "InputError", "MissingFileError", "UnknownNameError",
    "UnsafeFileError",
    "Dataset", "Normalization", "load_dataset", "normalize", "SplitRecord", "train_test_split",
    "Trunk", "build_trunk", "global_avg_pool", "list_models", "make_config", "register_model",
    "load_model_module",
    "OptimizerConfig", "make_optimizer",
    "PretrainConfig", "PretrainResult", "TaskConfig", "run_pretraining",
    "PretrainModel", "WeightedTask", "build_pretrain_model",
    "Task", "TaskBase", "get_task", "list_tasks", "load_task_module", "register_task",
    "task_class", "TrainState", "make_eval_step", "make_train_step",
    "FinetuneConfig", "FinetuneResult", "finetune", "Phase", "parse_phases", "keep_freed_memory",
    "TargetSpec", "TransferModel", "build_target_trunk",
    "TransferConfig", "build_transfer_model", "plan_transfer", "run_transfer", "__version__",
    "SearchResult", "SearchSpace", "search_transfer",
]
