"""Zero-shot evaluation of masked diffusion LMs with and without unsupervised CFG.

`tasks` turns rows of public datasets (local files) into scored requests with lm-eval's prompt
formats, `runner` scores them at several cfg scales (sharded across processes when
torch.distributed is initialised), `report` writes the table.
"""

from .report import markdown_table, write_report
from .runner import EvalConfig, MetricValue, PairedDelta, TaskResult, evaluate, evaluate_task
from .tasks import BUNDLED_TASKS, DEFAULT_TASKS, TASKS, Item, Task, get_task, load_items

__all__ = [
    "markdown_table", "write_report", "EvalConfig", "MetricValue", "PairedDelta", "TaskResult", "evaluate", "evaluate_task",
    "BUNDLED_TASKS", "DEFAULT_TASKS", "TASKS", "Item", "Task", "get_task", "load_items",
]
