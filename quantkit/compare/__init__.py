"""Compare quantization methods on one model, one text and one protocol.

- :mod:`.protocol`: what every method is measured on;
- :mod:`.methods`: the methods (configs or float dtypes) and how names and files resolve to them;
- :mod:`.results`: the typed :class:`Result` record, whose fields declare every view of it;
- :mod:`.runner`: the parent, one worker process per method, resumable;
- :mod:`.worker`: the measurement of one method (``python -m quantkit.compare JOB``);
- :mod:`.checks`, :mod:`.report`, :mod:`.plots`: the Pareto front, the checks, the terminal
  table, CSV, Markdown and PNG views;
- :mod:`.recommend`: a method for a hardware and a goal, from declarations and results.
"""

from .checks import Check, pareto_front, run_checks
from .environment import environment, run_header
from .methods import BASELINE, Method, method_from_name, methods_from_file, resolve_methods
from .protocol import Protocol
from .recommend import GOALS, Recommendation, recommend
from .report import terminal_table, to_csv, to_markdown, write_reports
from .results import Column, Group, Result, column, complete, is_done, load_results, read_result, write_json_atomic
from .runner import Comparison, Event, model_config
from .worker import apply_method, quantized_linears, save_and_measure

__all__ = [
    "BASELINE",
    "GOALS",
    "Check",
    "Column",
    "Comparison",
    "Event",
    "Group",
    "Method",
    "Protocol",
    "Recommendation",
    "Result",
    "apply_method",
    "column",
    "complete",
    "environment",
    "is_done",
    "load_results",
    "method_from_name",
    "methods_from_file",
    "model_config",
    "pareto_front",
    "quantized_linears",
    "read_result",
    "recommend",
    "resolve_methods",
    "run_checks",
    "run_header",
    "save_and_measure",
    "terminal_table",
    "to_csv",
    "to_markdown",
    "write_json_atomic",
    "write_reports",
]
