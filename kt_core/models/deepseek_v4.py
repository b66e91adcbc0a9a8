"""DeepSeek-V4's decoder layer: hyper-connected residual streams around an attention that reads a
sliding window of one shared key=value head plus compressed entries (``spec_v4`` describes both).

The paged cache keeps, per token, the key (the latent cache, one head) and, on compressing layers, a
row of compressor features (``V4Spec.extra_dim``): the token's projected kv and gate, and at the last
token of each window of ``rate`` tokens the pooled entry of that window (normalised and roped). Every
row depends only on the tokens up to it, so blocks are shared by the prefix cache like any other.
"""
from __future__ import annotations

import torch

from kt_core.backend.contract import Backend
from kt_core.kvcache.paged import Batch
from kt_core.models import shapes_v4
from kt_core.models.spec import ModelSpec


def rope(x: torch.Tensor, cs: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate adjacent pairs of the last ``cs.shape[-1]`` features of ``x`` [T, ..., D] by the table rows
    ``cs`` [T, cos | sin] (``inverse``: by minus the angle), in float32 as the reference does."""
    rd = cs.shape[-1]
    cos, sin = cs[:, : rd // 2].to(x.dtype).float(), cs[:, rd // 2:].to(x.dtype).float()
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if inverse:
        sin = -sin
    r = x[..., -rd:].float()
    x1, x2 = r[..., 0::2], r[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((x[..., :-rd], out.to(x.dtype)), dim=-1)


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a weight (the per-head query norm, the hyper-connections' input)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def _slots(cache: torch.Tensor, blocks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The cache slots of one sequence's ``positions`` (its block table ``blocks``)."""
    bs = cache.shape[1]
    return blocks[positions // bs].long() * bs + positions % bs


def _rows(cache: torch.Tensor, blocks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One sequence's cache rows at ``positions``: [n, D]."""
    return cache.view(-1, cache.shape[-1])[_slots(cache, blocks, positions)]


class Compressor:
    """Pools every ``rate`` tokens' projected features into one entry: softmax-weighted per feature by
    gate + a learned bias per position in the window. ``overlap`` (csa layers): each token projects two
    series, and entry w pools the first series of window w-1 with the second of window w."""

    def __init__(self, w: dict, rate: int, dim: int, overlap: bool, col: int) -> None:
        self.w, self.rate, self.dim, self.overlap, self.col = w, rate, dim, overlap, col
        self.width = 2 * dim if overlap else dim  # projected features per token
        self.entry = col + 2 * self.width  # where the pooled entry sits in a row

    def write(self, be: Backend, x: torch.Tensor, batch: Batch, extra: torch.Tensor) -> None:
        feats = torch.cat((be.linear(x, self.w["wkv"]), be.linear(x, self.w["wgate"])), dim=-1)
        flat = extra.view(-1, extra.shape[-1])
        flat[batch.slot_mapping.long(), self.col: self.entry] = feats.to(extra.dtype)

    def pool(self, be: Backend, blocks: torch.Tensor, first: int, last: int, extra: torch.Tensor,
             table: torch.Tensor, eps: float) -> None:
        """Pool the windows that end at positions first..last of one sequence and store each entry
        at its window's last token."""
        m, c = self.rate, self.width
        wins = torch.arange(first // m, (last + 1) // m, device=extra.device)
        if not wins.numel():
            return
        pos = (wins[:, None] * m + torch.arange(m, device=extra.device)).reshape(-1)
        rows = _rows(extra, blocks, pos).view(-1, m, extra.shape[-1])
        kv, gate = rows[..., self.col: self.col + c], rows[..., self.col + c: self.entry].float() + self.w["ape"]
        if self.overlap:
            d = self.dim
            prev_kv, prev_gate = kv[..., :d], gate[..., :d]  # the first series, read by the next window
            if int(wins[0]) > 0:  # window w-1 of the first window here: from the cache
                before = _rows(extra, blocks, pos[:m] - m)
                head_kv = before[None, :, self.col: self.col + d]
                head_gate = before[None, :, self.col + c: self.col + c + d].float() + self.w["ape"][:, :d]
            else:
                head_kv, head_gate = torch.zeros_like(kv[:1, :, :d]), torch.full_like(gate[:1, :, :d], float("-inf"))
            kv = torch.cat((torch.cat((head_kv, prev_kv[:-1])), kv[..., d:]), dim=1)
            gate = torch.cat((torch.cat((head_gate, prev_gate[:-1])), gate[..., d:]), dim=1)
        pooled = (kv * gate.softmax(dim=1).to(kv.dtype)).sum(dim=1)
        entry = rope(be.rmsnorm(pooled, self.w["norm"], eps), table[wins * m])
        flat = extra.view(-1, extra.shape[-1])
        flat[_slots(extra, blocks, wins * m + m - 1), self.entry: self.entry + self.dim] = entry.to(extra.dtype)

    def entries(self, extra: torch.Tensor, blocks: torch.Tensor, count: int) -> torch.Tensor:
        """The sequence's first ``count`` pooled entries [count, dim]."""
        pos = torch.arange(count, device=extra.device) * self.rate + self.rate - 1
        return _rows(extra, blocks, pos)[:, self.entry: self.entry + self.dim]


def _compressor(r, a: str, rate: int, dim: int, overlap: bool, col: int, H: int) -> Compressor:
    width = 2 * dim if overlap else dim
    w = {"wkv": r.dense(a + "wkv.weight", (width, H)), "wgate": r.dense(a + "wgate.weight", (width, H)),
         "ape": r.t(a + "ape", (rate, width), torch.float32), "norm": r.t(a + "norm.weight", (dim,))}
    return Compressor(w, rate, dim, overlap, col)


class V4Attention:
    def __init__(self, w: dict, spec: ModelSpec, layer: int, compressor=None, indexer=None) -> None:
        self.w, self.spec, self.v = w, spec, spec.v4
        self.kind, self.rate = self.v.kinds[layer], self.v.rate(layer)
        self.table = "main" if self.kind == "sliding" else "compress"
        self.compressor, self.indexer = compressor, indexer

    def _select(self, be: Backend, x, q_res, batch: Batch, extra, tables, counts) -> list:
        """csa: per sequence, the entries each new query attends to (the indexer's top-k of the
        completed windows it may see): a boolean [n, count] mask."""
        v, w, T = self.v, self.w, x.shape[0]
        iq = be.linear(q_res, w["i_wq_b"]).view(T, v.index_heads, v.index_dim)
        iq = rope(iq, tables["compress"][batch.positions])
        hw = be.linear(x, w["i_weights"]).float() * v.index_heads ** -0.5
        out, qsl = [], batch.query_start_loc.tolist()
        for j, count in enumerate(counts):
            a, b = qsl[j], qsl[j + 1]
            ent = self.indexer.entries(extra, batch.block_tables[j], count).float()
            score = torch.relu(torch.einsum("nhd,wd->nhw", iq[a:b].float(), ent)) * v.index_dim ** -0.5
            score = (score * hw[a:b, :, None]).sum(1)
            seen = (batch.positions[a:b] + 1) // self.rate
            allowed = torch.arange(count, device=x.device)[None, :] < seen[:, None]
            score = score.masked_fill(~allowed, float("-inf"))
            pick = torch.zeros_like(allowed)
            if count:
                top = score.topk(min(v.index_topk, count), dim=-1).indices
                pick.scatter_(1, top, True)
            out.append(pick & allowed)
        return out

    def __call__(self, be: Backend, x: torch.Tensor, batch: Batch, kv_cache, extra, tables) -> torch.Tensor:
        s, v, w, T = self.spec, self.v, self.w, x.shape[0]
        nh, hd, eps = s.num_heads, s.head_dim, s.rms_eps
        cs = tables[self.table][batch.positions]
        q_res = be.rmsnorm(be.linear(x, w["wq_a"]), w["q_norm"], eps)
        q = rope(unit_rms(be.linear(q_res, w["wq_b"]).view(T, nh, hd), eps), cs)
        kv = rope(be.rmsnorm(be.linear(x, w["wkv"]), w["kv_norm"], eps), cs)
        be.write_kv(kv[:, None, :], None, kv_cache, None, batch.slot_mapping)
        qsl, lens = batch.query_start_loc.tolist(), batch.seq_lens.tolist()
        counts = [L // self.rate for L in lens] if self.rate else [0] * len(lens)
        for part in (self.compressor, self.indexer):
            if part is not None:
                part.write(be, x, batch, extra)
                for j, L in enumerate(lens):
                    n = qsl[j + 1] - qsl[j]
                    part.pool(be, batch.block_tables[j], L - n, L - 1, extra, tables["compress"], eps)
        picks = self._select(be, x, q_res, batch, extra, tables, counts) if self.indexer is not None else None
        o = torch.empty(T, nh, hd, dtype=torch.float32, device=x.device)
        for j, L in enumerate(lens):
            a, b = qsl[j], qsl[j + 1]
            p = batch.positions[a:b]
            kpos = torch.arange(max(0, L - (b - a) - v.window + 1), L, device=x.device)
            keys = _rows(kv_cache, batch.block_tables[j], kpos).float()
            mask = (kpos[None, :] <= p[:, None]) & (kpos[None, :] > p[:, None] - v.window)
            if counts[j]:
                keys = torch.cat((keys, self.compressor.entries(extra, batch.block_tables[j], counts[j]).float()))
                seen = torch.arange(counts[j], device=x.device)[None, :] < ((p + 1) // self.rate)[:, None]
                mask = torch.cat((mask, seen if picks is None else picks[j]), dim=1)
            logits = torch.einsum("nhd,kd->nhk", q[a:b].float(), keys) * s.softmax_scale
            logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
            sinks = w["sinks"].float()[None, :, None].expand(b - a, nh, 1)
            probs = torch.cat((logits, sinks), dim=-1).softmax(dim=-1)[..., :-1]
            o[a:b] = torch.einsum("nhk,kd->nhd", probs, keys)
        o = rope(o.to(x.dtype), cs, inverse=True).reshape(T, v.o_groups, -1)
        grouped = torch.cat([be.linear(o[:, g].contiguous(), wg) for g, wg in enumerate(w["wo_a"])], dim=-1)
        return be.linear(grouped, w["wo_b"])


def load_attention(r, spec: ModelSpec, i: int) -> V4Attention:
    v, H, nh, hd = spec.v4, spec.hidden_size, spec.num_heads, spec.head_dim
    a = shapes_v4.prefix(i) + "attn."
    w = {"wq_a": r.dense(a + "wq_a.weight", (v.q_lora_rank, H)), "q_norm": r.t(a + "q_norm.weight", (v.q_lora_rank,)),
         "wq_b": r.dense(a + "wq_b.weight", (nh * hd, v.q_lora_rank)), "wkv": r.dense(a + "wkv.weight", (hd, H)),
         "kv_norm": r.t(a + "norm.weight", (hd,)), "wo_b": r.dense(a + "wo_b.weight", (H, v.o_groups * v.o_lora_rank)),
         "wo_a": r.dense_rows(a + "wo_a.weight", (v.o_groups * v.o_lora_rank, nh * hd // v.o_groups), v.o_groups),
         "sinks": r.t(a + "attn_sink", (nh,), torch.float32)}
    kind, rate = v.kinds[i], v.rate(i)
    comp = idx = None
    if kind == "hca":
        comp = _compressor(r, a + "compressor.", rate, hd, False, 0, H)
    elif kind == "csa":
        comp = _compressor(r, a + "compressor.", rate, hd, True, 0, H)
        idx = _compressor(r, a + "indexer.compressor.", rate, v.index_dim, True, 5 * hd, H)
        w.update(i_wq_b=r.dense(a + "indexer.wq_b.weight", (v.index_heads * v.index_dim, v.q_lora_rank)),
                 i_weights=r.dense(a + "indexer.weights_proj.weight", (v.index_heads, H)))
    return V4Attention(w, spec, i, comp, idx)


def hyper(h: torch.Tensor, w: dict, spec: ModelSpec):
    """A hyper-connection's weights from the streams h [T, n, D]: (post [T, n], comb [T, n, n], the
    streams collapsed into the block's input [T, D])."""
    v, T = spec.v4, h.shape[0]
    n = v.hc_mult
    flat = unit_rms(h.reshape(T, -1).float(), spec.rms_eps)
    pre, post, comb = (flat @ w["fn"].float().T).split([n, n, n * n], dim=-1)
    bpre, bpost, bcomb = w["base"].float().split([n, n, n * n])
    scale = w["scale"].float()
    pre = torch.sigmoid(pre * scale[0] + bpre) + v.hc_eps
    post = 2 * torch.sigmoid(post * scale[1] + bpost)
    comb = torch.softmax(comb.view(T, n, n) * scale[2] + bcomb.view(n, n), dim=-1) + v.hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + v.hc_eps)
    for _ in range(v.hc_iters - 1):  # Sinkhorn-Knopp: towards a doubly stochastic mix
        comb = comb / (comb.sum(dim=-1, keepdim=True) + v.hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + v.hc_eps)
    return post, comb, (pre.unsqueeze(-1) * h).sum(dim=1).to(h.dtype)


def mix(post: torch.Tensor, comb: torch.Tensor, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The streams after a block: its output spread by ``post`` plus the old streams mixed by ``comb``."""
    dt = h.dtype
    return post.to(dt).unsqueeze(-1) * out.unsqueeze(1) + torch.matmul(comb.to(dt).transpose(-1, -2), h)


def collapse(h: torch.Tensor, w: dict, spec: ModelSpec) -> torch.Tensor:
    """The final streams [R, n, D] collapsed into one hidden state per row (the model's hc_head)."""
    flat = unit_rms(h.reshape(h.shape[0], -1).float(), spec.rms_eps)
    pre = torch.sigmoid(flat @ w["fn"].float().T * w["scale"].float() + w["base"].float()) + spec.v4.hc_eps
    return (pre.unsqueeze(-1) * h).sum(dim=1).to(h.dtype)


class V4Layer:
    """One decoder layer: attention, then MoE, each between two hyper-connections of the streams."""

    def __init__(self, attn: V4Attention, ffn, norm1, norm2, hc: dict, be: Backend, device, tables: dict) -> None:
        self.attn, self.ffn, self.norm1, self.norm2, self.hc = attn, ffn, norm1, norm2, hc
        self.be, self.device, self.tables = be, device, tables
        self.cos_sin = tables["compress"]  # its length is the model's context

    def run(self, be: Backend, h: torch.Tensor, batch: Batch, caches, spec: ModelSpec) -> torch.Tensor:
        eps = spec.rms_eps
        post, comb, x = hyper(h, self.hc["attn"], spec)
        h = mix(post, comb, self.attn(be, be.rmsnorm(x, self.norm1, eps), batch, *caches, self.tables), h)
        post, comb, x = hyper(h, self.hc["ffn"], spec)
        return mix(post, comb, self.ffn(be, be.rmsnorm(x, self.norm2, eps), batch.tokens), h)


def rope_tables(spec: ModelSpec, max_positions: int) -> dict:
    from kt_core.backend.torch_ops.norm_rope import rope_cos_sin

    out = {}
    for name, r in (("main", spec.v4.rope_main), ("compress", spec.v4.rope_compress)):
        inv, mscale = r.inv_freq()
        out[name] = rope_cos_sin(r.rot_dim, max_positions, inv_freq=inv, mscale=mscale)
    return out


def load_layer(r, spec: ModelSpec, i: int, ffn, be: Backend, device, tables: dict) -> V4Layer:
    """Layer ``i``'s attention, norms and hyper-connections (``ffn``: its MoE block, loaded by the caller)."""
    p, H, n = shapes_v4.prefix(i), spec.hidden_size, spec.v4.hc_mult
    mixw = (2 + n) * n
    hc = {k: {"fn": r.t(f"{p}hc_{k}_fn", (mixw, n * H), torch.float32),
              "base": r.t(f"{p}hc_{k}_base", (mixw,), torch.float32),
              "scale": r.t(f"{p}hc_{k}_scale", (3,), torch.float32)} for k in ("attn", "ffn")}
    return V4Layer(load_attention(r, spec, i), ffn, r.norm(p + "attn_norm.weight", (H,)),
                   r.norm(p + "ffn_norm.weight", (H,)), hc, be, device, tables)


def load_head(r, spec: ModelSpec) -> dict:
    """The final collapse of the streams (hc_head)."""
    g, n, H = shapes_v4.GLOBALS, spec.v4.hc_mult, spec.hidden_size
    return {"fn": r.t(g["hc_fn"], (n, n * H), torch.float32), "base": r.t(g["hc_base"], (n,), torch.float32),
            "scale": r.t(g["hc_scale"], (1,), torch.float32)}
