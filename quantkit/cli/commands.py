"""quantkit's own subcommands: a plugin of the ``quantkit`` entry-point group, registered
through ``quantkit_register_commands`` exactly as a third party's commands are.

Each lives in ``quantkit.cli.<name>`` as ``configure(parser)`` and ``run(args)``, imported
only when that command runs: every registry build (``quantkit.quantize`` too) loads this
plugin, and ``quantkit finetune`` needs peft, whose import alone takes seconds.
"""

from __future__ import annotations

from collections.abc import Callable

from ..core.commands import Command, deferred
from ..core.hookspecs import hookimpl

COMMANDS = {
    "quantize": "quantize a model and save it",
    "backends": "list backends and their capabilities",
    "plugins": "list installed plugins and the hooks they implement",
    "config": "work with config files",
    "estimate": "predict the stored size of a quantized model",
    "compare": "compare quantization methods on one model and one text",
    "recommend": "recommend a method for a hardware and a goal",
    "finetune": "LoRA fine-tune a quantized model and save the adapter",
    "convert": "convert a quantized checkpoint between GPTQ, AWQ and compressed-tensors",
    "imatrix": "collect a llama.cpp importance matrix (GGUF) from calibration text",
}
"""Name -> one-line help, in the order ``quantkit --help`` lists them."""


@hookimpl
def quantkit_register_commands(register: Callable[[Command], None]) -> None:
    for name, summary in COMMANDS.items():
        register(
            Command(name, summary, deferred(f"quantkit.cli.{name}:configure"), deferred(f"quantkit.cli.{name}:run"))
        )
