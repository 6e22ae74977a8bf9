"""Expert parallelism over torch.distributed (notebook 09): the 'ep' expert back-end.

The routed experts of an MoE layer are split over W processes; tokens travel to their experts and
back with two all-to-all exchanges (GShard, Lepikhin et al. 2020; Switch Transformer, Fedus et al.
2021). Modules:

    comm             all_to_all with autograd (its backward is the reverse all-to-all), CommStats
    expert_parallel  experts_ep (the back-end), ExpertParallelExperts, ExpertParallelMoE,
                     to_expert_parallel (an MoELayer -> its expert-parallel copy)
    launch           launch(fn, world_size, *args): N local processes from a notebook, that always end
    workers          the functions those processes run (checks of notebook 09 and of the tests)

From a shell, on N processes (CPU, gloo; or GPUs, NCCL):

    torchrun --nproc-per-node 2 -m moe_lab distributed --tokens 64
    python -m moe_lab distributed --world-size 2 --tokens 64      (uses launch instead of torchrun)
"""
from moe_lab.distributed.comm import AllToAll, CommStats, all_to_all, exchange_counts
from moe_lab.distributed.expert_parallel import (ExpertParallelExperts, ExpertParallelMoE, experts_ep,
                                                 local_expert_count, to_expert_parallel)
from moe_lab.distributed.launch import RankFailedError, launch

__all__ = ["AllToAll", "CommStats", "all_to_all", "exchange_counts", "ExpertParallelExperts", "ExpertParallelMoE",
           "experts_ep", "local_expert_count", "to_expert_parallel", "RankFailedError", "launch"]
