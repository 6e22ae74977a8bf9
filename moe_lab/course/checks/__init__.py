"""Checkers for the notebooks' exercises ("check yourself" cells), one module per topic.

Each checker runs a learner's implementation on small random inputs against the course's reference
and either prints a one-line success or raises CheckFailed explaining what is wrong: the shape, the
values (where and by how much), or the gradient. A function that still raises NotImplementedError
(the stub of a learner notebook) is reported as "not implemented yet". tests/course/test_checks.py proves
every checker fails on the stub and on plausible wrong answers, and passes on the solution.

Topics: setup (00), data (01), transformer (02), moe (03), training (04), kernels (05, 06, Triton),
grpo (08), distributed (09), attention (10: the KV cache and MLA), open_weights (11),
distillation (12).
"""
from moe_lab.course.checks.attention import (check_absorbed_query, check_cache_append, check_mla_kv, check_mla_scores,
                                             check_rope_offset)
from moe_lab.course.checks.common import CheckFailed
from moe_lab.course.checks.data import check_next_token_shift, check_problem_line
from moe_lab.course.checks.distillation import check_completion_loss, check_verified_dataset
from moe_lab.course.checks.distributed import check_all_to_all_sim, check_bytes_by_hand, check_node_limited_topk
from moe_lab.course.checks.grpo import check_clipped_surrogate, check_group_advantages, check_kl_k3
from moe_lab.course.checks.kernels import check_combine, check_rows_to_token_expert, check_swiglu_act, check_tile_of
from moe_lab.course.checks.moe import check_capacity, check_expert_backend, check_switch_aux_loss, check_topk_router
from moe_lab.course.checks.open_weights import check_half_rows, check_weight_names
from moe_lab.course.checks.profiling import check_expected_active_experts, check_moe_flops, check_roofline
from moe_lab.course.checks.setup import check_dtype_policy, check_matmul_flops
from moe_lab.course.checks.training import check_lr_schedule, check_masked_loss
from moe_lab.course.checks.transformer import check_rmsnorm, check_rope, check_swiglu

# Every checker imported above, found by name, so a topic module's checkers are listed once they are
# imported here; tests/course/test_checks.py proves each one against its CASES.
__all__ = ["CheckFailed"] + sorted(name for name in dir() if name.startswith("check_"))
