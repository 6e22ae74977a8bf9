"""Checkers for the notebooks' exercises ("check yourself" cells), one module per topic.

Each checker runs a learner's implementation on small random inputs against the course's reference
and either prints a one-line success or raises CheckFailed explaining what is wrong: the shape, the
values (where and by how much), or the gradient. A function that still raises NotImplementedError
(the stub of a learner notebook) is reported as "not implemented yet". tests/test_checks.py proves
every checker fails on the stub and on plausible wrong answers, and passes on the solution.
"""
from moe_lab.checks.common import CheckFailed
from moe_lab.checks.moe import check_capacity, check_expert_backend, check_switch_aux_loss, check_topk_router
from moe_lab.checks.transformer import check_rmsnorm, check_rope, check_swiglu
