"""The device contract: one abstract class every device plugin implements.

A plugin describes one kind of device (``cpu``, ``cuda``, ...). Its class-level
``probe()`` says whether the kind is usable here *without initialising it* (no
CUDA context at import or probe time); an instance then exposes resources
(devices, memory, pinned host buffers, streams, events) and ops.

Every op has a reference implementation in :class:`kt_core.backend.TorchBackend`
on plain torch; plugins override the hot ones with their own kernels. The
conformance suite (``tests/conformance``) compares every op of every available
plugin against a float64 reference.

Tensor layouts used by the ops (T tokens, H hidden, E experts, K top-k):

- paged KV cache: ``k_cache`` / ``v_cache`` of shape
  ``[num_blocks, block_size, num_kv_heads, head_dim]``; a sequence's blocks are
  listed in a row of ``block_tables [B, max_blocks]`` (int32), a token's slot is
  ``block * block_size + offset``.
- varlen batches: queries of all sequences concatenated ``[T, Hq, D]`` with
  ``query_start_loc [B+1]`` (cumulative), ``seq_lens [B]`` the context length of
  each sequence *including* the new tokens (so prefix-cached or chunked prefill
  is the same call).
"""
from __future__ import annotations

import abc
from concurrent.futures import Future
from enum import Enum
from typing import Any, ClassVar, Optional, Sequence

import torch

from kt_core.backend.types import DeviceInfo, MemoryInfo, ProbeResult
from kt_core.weights.quant import ExpertWeights, Quant, QuantizedWeight


class Op(str, Enum):
    """Operations of the contract; ``supports(op, dtype, quant)`` is asked per op."""

    LINEAR = "linear"
    MOE_EXPERTS = "moe_experts"
    ATTENTION_PREFILL = "attention_prefill"
    ATTENTION_DECODE = "attention_decode"
    ATTENTION_MLA = "attention_mla"
    GATED_DELTA_RULE = "gated_delta_rule"
    CAUSAL_CONV1D = "causal_conv1d"
    SPARSE_INDEX = "sparse_index"
    WRITE_KV = "write_kv"
    COPY_BLOCKS = "copy_blocks"
    SWAP_BLOCKS = "swap_blocks"
    RMSNORM = "rmsnorm"
    ROPE = "rope"
    ROUTE = "route"
    SAMPLE = "sample"


class Backend(abc.ABC):
    """A device plugin. Subclass :class:`kt_core.backend.TorchBackend`, not this,
    unless the plugin does not run on torch at all.

    Class attributes:
      name:          the plugin's registry name (``cuda``, ``cpu``, ...)
      device_type:   the torch device string (ROCm is ``cuda``, Ascend is ``npu``)
      dist_backend:  torch.distributed backend name (nccl, gloo, xccl, hccl)
      visible_devices_env: environment variable that limits visible devices
    """

    name: ClassVar[str]
    device_type: ClassVar[str]
    dist_backend: ClassVar[str] = "gloo"
    visible_devices_env: ClassVar[Optional[str]] = None

    # ---- identity and probing (class-level: nothing is initialised) ----
    @classmethod
    @abc.abstractmethod
    def probe(cls) -> ProbeResult:
        """Availability plus a human reason; must not initialise the device."""

    @classmethod
    def score(cls) -> int:
        """Rank among variants of one kind (higher is better); 0 = unusable here."""
        return 1 if cls.probe().available else 0

    # ---- resources ----
    @abc.abstractmethod
    def devices(self) -> list[DeviceInfo]:
        """The devices of this kind visible to the process."""

    @abc.abstractmethod
    def memory_info(self, index: int = 0) -> MemoryInfo:
        """Free and total memory of device ``index`` in bytes."""

    @abc.abstractmethod
    def torch_device(self, index: int = 0) -> torch.device:
        """The torch device tensors of device ``index`` live on."""

    @abc.abstractmethod
    def host_buffer(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A host tensor this device copies to/from asynchronously (pinned where it can)."""

    @abc.abstractmethod
    def new_stream(self, index: int = 0) -> Any:
        """A new stream (work queue) on device ``index``."""

    @abc.abstractmethod
    def new_event(self, index: int = 0) -> Any:
        """A new event to record on a stream and wait for."""

    @abc.abstractmethod
    def synchronize(self, index: Optional[int] = None) -> None:
        """Wait for all queued work on device ``index`` (all devices if None)."""

    def begin_step(self, decode: bool) -> None:
        """A forward step starts: a decode step (one token per sequence) or one with prefill rows.
        A device whose best settings differ between the two (the CPU's thread split) sets them here."""

    def decode_plan(self, model, cache):
        """Whole decoder layers of a decode step in one call, where the device has such a path (the CPU's
        native kernels): an object with ``stop(i)`` (the end of the run of layers it takes from layer i)
        and ``run(h, batch, i, j)`` (layers [i, j) -> the new hidden states, or None: run them per op).
        None: every layer runs op by op through this contract."""
        return None

    # ---- capabilities (class-level, so the planner can ask about an absent device) ----
    @classmethod
    @abc.abstractmethod
    def supports(cls, op: Op | str, dtype: torch.dtype, quant: Quant | str = Quant.NONE) -> bool:
        """Whether ``op`` runs here with activations in ``dtype`` and weights in ``quant``."""

    # ---- expert GEMM and dense ----
    def prepare_experts(self, experts: ExpertWeights, index: int = 0) -> Any:
        """Repack experts device ``index`` will hold into its kernels' layout, once, at load time.
        The result is what ``moe_experts`` then receives; the default keeps them as they are."""
        return experts

    def prepare_dense(self, weight: Any, index: int = 0, owned: bool = False) -> Any:
        """Repack a dense (attention / MLP / lm_head) weight device ``index`` will hold, once, at
        load time; ``linear`` then receives the result. ``owned``: the caller hands the weight's memory
        over (codes it has just quantized, into ``dense_empty``'s memory), so the repacking may lay them
        out where they lie. The default keeps it as it is."""
        return weight

    def dense_empty(self, shape: Sequence[int], dtype: torch.dtype, index: int = 0) -> Optional[torch.Tensor]:
        """Memory device ``index`` wants an unquantized dense weight of ``shape`` read straight into, or a
        quantized one's codes made in (the CPU's huge pages): a contiguous tensor of exactly ``shape``
        and ``dtype`` on ``torch_device(index)``, or None: the reader places its own tensor. The
        default: None."""
        return None

    def moe_experts_async(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                          experts: Any, activation: str = "silu") -> "Future":
        """Start ``moe_experts`` and return a Future of its result, so the caller can compute
        other shards meanwhile. The default computes now and returns a finished Future."""
        fut: Future = Future()
        try:
            fut.set_result(self.moe_experts(hidden, topk_ids, topk_weights, experts, activation))
        except Exception as exc:  # surfaced by fut.result()
            fut.set_exception(exc)
        return fut

    @abc.abstractmethod
    def linear(self, x: torch.Tensor, weight: Any, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x @ W.T + b``; ``weight`` is a tensor or a :class:`QuantizedWeight`."""

    @abc.abstractmethod
    def moe_experts(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        experts: ExpertWeights,
        activation: str = "silu",
    ) -> torch.Tensor:
        """Weighted sum over the routes that land on experts this device holds.

        hidden [T, H]; topk_ids [T, K] (global expert ids); topk_weights [T, K].
        Routes to experts not in ``experts.expert_ids`` contribute zero, so the
        partial sums of several devices add up to the full MoE output.
        """

    # ---- attention over the paged cache ----
    @abc.abstractmethod
    def attention_prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        scale: float,
        causal: bool = True,
        sliding_window: Optional[int] = None,
        sinks: Optional[torch.Tensor] = None,
        chunk: Optional[int] = None,
    ) -> torch.Tensor:
        """Varlen attention of new queries [T, Hq, D] over each sequence's cached context.

        ``sliding_window`` w: a query at position p sees keys in (p - w, p]. ``sinks [Hq]``:
        a per-head logit that joins the softmax denominator and attends to nothing. ``chunk`` c
        (Llama 4's chunked local attention): a query at position p sees keys in [p - p mod c, p]."""

    @abc.abstractmethod
    def attention_decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
        sliding_window: Optional[int] = None,
        sinks: Optional[torch.Tensor] = None,
        chunk: Optional[int] = None,
    ) -> torch.Tensor:
        """One query per sequence, q [B, Hq, D], over its seq_lens[b] cached tokens (the masks as in
        ``attention_prefill``)."""

    @abc.abstractmethod
    def attention_mla(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent_cache: torch.Tensor,
        w_uk: torch.Tensor,
        w_uv: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        scale: float,
        causal: bool = True,
        selected: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Multi-head latent attention (DeepSeek MLA) over the compressed cache.

        q_nope [T, H, dn], q_pe [T, H, dr] (roped); ``latent_cache [nb, bs, 1, lora + dr]``
        holds per token the normalised compressed KV and the roped shared key; w_uk
        [H, dn, lora] / w_uv [H, dv, lora] are the key / value halves of kv_b_proj.
        Varlen like ``attention_prefill`` (decode is n = 1 per sequence). ``selected [T, k]``
        (DeepSeek sparse attention): the only key positions each query sees (-1: none), as
        ``sparse_index`` picks them. Returns [T, H, dv]."""

    @abc.abstractmethod
    def sparse_index(self, q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                     scale: float, topk: int) -> torch.Tensor:
        """DeepSeek sparse attention's lightning indexer: for each query, the ``topk`` visible cached
        positions of highest score ``sum_h weights[h] * relu(scale * q[h] . k_t)``.

        q [T, Hi, Di] (roped), weights [T, Hi] float32; ``index_cache [nb, bs, 1, Di]`` holds each
        token's indexer key (paged like the latent cache). Causal: a query sees its own position and
        those before it. Returns [T, topk] int64 positions, -1 where fewer than topk are visible."""

    # ---- linear attention (Qwen3-Next's Gated DeltaNet): per-sequence state in slot-indexed pools ----
    @abc.abstractmethod
    def gated_delta_rule(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                         beta: torch.Tensor, state: torch.Tensor, slots: torch.Tensor,
                         query_start_loc: torch.Tensor) -> torch.Tensor:
        """Gated delta-rule attention of each sequence's new tokens, continuing its recurrent state.

        q, k [T, Hk, dk] (L2-normalised here, q also scaled by dk^-0.5); v [T, Hv, dv] (Hv a
        multiple of Hk: key head h serves value heads h*Hv/Hk..); g [T, Hv] the log decay (<= 0) and
        beta [T, Hv] the write strength; ``state [S, Hv, dk, dv]`` float32, the rows ``slots [B]``
        read and updated in place. Per token: S = exp(g) S; S += k (beta (v - k^T S))^T; o = q^T S.
        Varlen like ``attention_prefill``. Returns [T, Hv, dv] in v's dtype."""

    @abc.abstractmethod
    def causal_conv1d(self, x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, slots: torch.Tensor,
                      query_start_loc: torch.Tensor, activation: str = "silu") -> torch.Tensor:
        """Depthwise causal convolution of each sequence's new rows x [T, C] with ``weight [C, K]``,
        continuing from its last K - 1 inputs in ``conv_state [S, C, K - 1]`` (rows ``slots``,
        updated in place), then ``activation`` (silu or none). Returns [T, C] in x's dtype."""

    # ---- cache ops ----
    @abc.abstractmethod
    def write_kv(self, k: torch.Tensor, v: Optional[torch.Tensor], k_cache: torch.Tensor,
                 v_cache: Optional[torch.Tensor], slot_mapping: torch.Tensor) -> None:
        """Store k/v [T, Hkv, D] at flat slots [T] (negative slots are skipped: padding).
        For the MLA latent cache, k is the latent [T, 1, lora + dr] and v / v_cache are None."""

    @abc.abstractmethod
    def copy_blocks(self, caches: Sequence[torch.Tensor], block_mapping: torch.Tensor) -> None:
        """For every (src, dst) row of ``block_mapping [N, 2]`` copy block src to dst in each cache."""

    @abc.abstractmethod
    def swap_blocks(self, src: torch.Tensor, dst: torch.Tensor, block_mapping: torch.Tensor) -> None:
        """Copy blocks between caches on different devices (host <-> device), rows (src, dst)."""

    # ---- small ops ----
    @abc.abstractmethod
    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMS normalisation over the last dim, computed in float32, returned in x's dtype."""

    @abc.abstractmethod
    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
             cos_sin: torch.Tensor, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding on q [T, Hq, D] and k [T, Hk, D].

        ``cos_sin [max_pos, rot_dim]`` holds cos in the first half, sin in the second;
        the first ``rot_dim`` features rotate (partial rotary), the rest pass through.
        ``interleaved`` pairs (0,1),(2,3).. (GPT-J / DeepSeek MLA); else halves (NeoX / Llama).
        """

    @abc.abstractmethod
    def route(self, logits: torch.Tensor, top_k: int, scoring: str = "softmax",
              renormalize: bool = True, n_group: int = 1, topk_group: int = 1,
              bias: Optional[torch.Tensor] = None, routed_scaling_factor: float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [T, E] -> (weights float32 [T, K], ids int64 [T, K]).

        scoring: ``softmax`` (Mixtral, Qwen), ``sigmoid`` (DeepSeek-V3; ``bias`` is the
        e_score_correction_bias used only for choosing), ``softmax_topk`` (softmax over
        the chosen logits, GPT-OSS). ``n_group > 1`` limits the choice to the best
        ``topk_group`` groups (group score: max for softmax, sum of top-2 for sigmoid).
        """

    @abc.abstractmethod
    def sampling_probs(self, logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
        """Per-row sampling distribution [B, V] after temperature, top-k, top-p and min-p
        (top_k <= 0 / top_p >= 1 / min_p <= 0 disable a filter). Rows with temperature 0
        are greedy: all mass on the argmax."""

    @abc.abstractmethod
    def sample(self, logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
               top_p: torch.Tensor, min_p: torch.Tensor,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw one token id per row from :meth:`sampling_probs`; int64 [B]."""

__all__ = ["Backend", "DeviceInfo", "ExpertWeights", "MemoryInfo", "Op", "ProbeResult", "Quant", "QuantizedWeight"]
