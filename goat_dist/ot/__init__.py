"""goat_dist.ot: batched log-domain Sinkhorn (torch + Triton, one signature), the OAT fusion cost
from sufficient statistics, and exact / debiased OT distances.

    from goat_dist.ot import sinkhorn, SinkhornResult, oat_cost_from_stats, oat_sufficient_stats
"""
from goat_dist.ot.cost import oat_cost, oat_cost_from_stats, oat_sufficient_stats
from goat_dist.ot.sinkhorn import SinkhornResult, sinkhorn

__all__ = ["sinkhorn", "SinkhornResult", "oat_cost", "oat_cost_from_stats", "oat_sufficient_stats"]
