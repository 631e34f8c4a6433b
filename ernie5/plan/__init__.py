"""The planner: parameter counts, FLOPs per token, per-device memory and throughput on paper, for any layout.

The one source of parameter counts and FLOPs: the trainer's MFU, `ernie5 bench` and `ernie5 plan` all read
`count_parameters` / `flops_per_token` from here. Paddle-free except `plan.lazy` (a build check on meta tensors).
"""

from ernie5.plan.params import ParamCount, count_parameters, flops_per_token
from ernie5.plan.report import PlanOptions, format_plan, plan_report

__all__ = ["ParamCount", "count_parameters", "flops_per_token", "PlanOptions", "format_plan", "plan_report"]
