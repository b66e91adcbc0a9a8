"""Where each family's checkpoints keep a MoE layer's tensors.

One table, read by the loader, the planner's tensor list, the GGUF kept-weight path and the
synthesizer, so a new architecture names its tensors once. Names are relative to
``model.layers.{i}.``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class MoeNames:
    block: str = "mlp"  # the MoE block's module
    router: str = "gate"  # the router linear, under the block
    router_bias: bool = False  # the router linear has a bias (GPT-OSS)
    score_bias: str = "gate.e_score_correction_bias"  # sigmoid routers' choice bias, under the block
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # an expert's gate, up, down
    shared: str = "shared_experts"  # the shared expert's module, under the block
    fused: bool = False  # experts stored fused over the expert axis: gate_up_proj [E, H, 2I], down_proj [E, I, H]
    interleaved: bool = True  # fused gate_up alternates gate and up columns (GPT-OSS); else gate | up halves
    dense: str = "mlp"  # a dense layer's MLP module
    shared_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # the shared expert's

    def router_weight(self, p: str) -> str:
        return f"{p}{self.block}.{self.router}.weight"

    def router_bias_name(self, p: str) -> Optional[str]:
        return f"{p}{self.block}.{self.router}.bias" if self.router_bias else None

    def score_bias_name(self, p: str) -> str:
        return f"{p}{self.block}.{self.score_bias}"

    def experts(self, p: str) -> str:
        """The experts' prefix: ``{experts}{j}.{projection}.weight`` names one expert's weight."""
        return f"{p}{self.block}.experts."

    def expert_lists(self, p: str, ids) -> list[list[str]]:
        """[gate names, up names, down names] of the experts ``ids``."""
        e = self.experts(p)
        return [[f"{e}{j}.{n}.weight" for j in ids] for n in self.projections]

    def shared_prefix(self, p: str) -> str:
        return f"{p}{self.block}.{self.shared}."

    def dense_prefix(self, p: str) -> str:
        return f"{p}{self.dense}."

    def shared_gate(self, p: str) -> str:
        return f"{p}{self.block}.shared_expert_gate.weight"


MLP = MoeNames()
_MIXTRAL = MoeNames(block="block_sparse_moe", projections=("w1", "w3", "w2"))
FAMILY = {
    "mixtral": _MIXTRAL,
    # MiniMax-M2 keeps Mixtral's names and its choice bias beside the router, not inside it
    "minimax_m2": MoeNames(block="block_sparse_moe", projections=("w1", "w3", "w2"), score_bias="e_score_correction_bias"),
    "qwen2_moe": MoeNames(shared="shared_expert"),
    "qwen3_next": MoeNames(shared="shared_expert"),
    "qwen3_5_moe": MoeNames(shared="shared_expert"),
    "gpt_oss": MoeNames(router="router", router_bias=True, fused=True),
    "llama4": MoeNames(block="feed_forward", router="router", shared="shared_expert", fused=True, interleaved=False,
                       dense="feed_forward"),
    # DeepSeek-V4 keeps the release's module names: ffn, w1 / w3 / w2, the choice bias as the router's bias
    "deepseek_v4": MoeNames(block="ffn", projections=("w1", "w3", "w2"), score_bias="gate.bias",
                            shared_projections=("w1", "w3", "w2")),
}


def moe_names(family: str) -> MoeNames:
    return FAMILY.get(family, MLP)
