"""The model: layers (norm, RoPE, attention, SwiGLU), the MoE layer and its router, expert
back-ends, and the transformer."""
from moe_lab.model.expert_backends import run_experts
from moe_lab.model.experts import experts_grouped_mm, experts_reference, experts_sorted
from moe_lab.model.layers import CausalSelfAttention, RMSNorm, SwiGLU, apply_rope, rope_tables
from moe_lab.model.moe import Experts, MoELayer
from moe_lab.model.router import Router, Routing, RoutingStats, apply_capacity, router_z_loss, switch_aux_loss
from moe_lab.model.transformer import Transformer

__all__ = ["experts_grouped_mm", "experts_reference", "experts_sorted", "run_experts", "Experts", "CausalSelfAttention", "RMSNorm", "SwiGLU",
           "apply_rope", "rope_tables", "MoELayer", "Router", "Routing", "RoutingStats", "apply_capacity",
           "router_z_loss", "switch_aux_loss", "Transformer"]
