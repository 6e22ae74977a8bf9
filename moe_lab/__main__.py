"""The course's one command line: `python -m moe_lab COMMAND [ARGS]`; `python -m moe_lab --help` lists them.

Each command is a module with a `main(argv)`; this file only names them and hands over the rest of
the command line. `python -m moe_lab COMMAND --help` shows a command's own arguments.
"""
from __future__ import annotations

import importlib
import sys

# name: (module, what it does in one line). The module is imported only when its command runs, so
# `--help` answers at once and a command never loads what another one needs (Triton, Jupyter).
COMMANDS = {
    "train": ("moe_lab.training.recipe", "train the course's MoE with its recipe and snapshot (the shipped checkpoint)"),
    "checkpoint": ("moe_lab.training.checkpoint", "print what a checkpoint holds: config, figures, tensors"),
    "distributed": ("moe_lab.distributed.__main__", "expert parallelism on N processes, checked against one process"),
    "corpus": ("moe_lab.data.corpus", "rebuild the shipped Python-stdlib text corpus (--build)"),
    "export": ("moe_lab.open_weights.export", "write a checkpoint as a Hugging Face transformers folder (notebook 11)"),
    "bench": ("moe_lab.studies.bench", "time the expert back-ends per layer shape and token count (notebook 07)"),
    "bench-generate": ("moe_lab.studies.bench_generate", "time generation with and without the KV cache (notebook 10)"),
    "tune": ("moe_lab.studies.tune", "tune the Triton kernels' configuration table for this device"),
    "mla-study": ("moe_lab.studies.mla_study", "MLA against MHA at equal parameters, over seeds (notebook 10)"),
    "rl-spread": ("moe_lab.studies.rl_spread", "GRPO (and REINFORCE) from the shipped checkpoint over seeds (notebook 08)"),
    "recipe-spread": ("moe_lab.studies.recipe_spread", "the training recipe over seeds x thread counts"),
    "export-agreement": ("moe_lab.studies.export_agreement", "held-out exact match of a checkpoint through moe_lab and through transformers (notebook 11)"),
    "distill": ("moe_lab.studies.distillation", "GRPO vs distillation vs expert iteration for a small student, over seeds (notebook 12)"),
    "cpu-bench": ("moe_lab.studies.cpu_bench", "CPU training-step times per back-end x threads x wait policy, alone and two at once"),
    "lab": ("moe_lab.commands.lab", "open JupyterLab on your working copies of the notebooks (make lab)"),
    "exercises": ("moe_lab.commands.exercises", "regenerate the learner notebooks from the solutions (make exercises)"),
    "gpu-suite": ("moe_lab.commands.gpu_suite", "every GPU test, benchmark and notebook in one call (needs CUDA)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m moe_lab COMMAND [ARGS]   (python -m moe_lab COMMAND --help for its arguments)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"python -m moe_lab: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"python -m moe_lab {name}", *rest]  # what a command's argparse shows as its name
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
