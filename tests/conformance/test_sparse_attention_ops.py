"""DeepSeek sparse attention (DeepSeek-V3.2): the lightning indexer's top-k choice of cached tokens and
MLA restricted to it, for every backend, against float64 references."""
from __future__ import annotations

import torch

from kt_core.backend.contract import Op
from tests.conformance import reference as ref
from tests.conformance.test_ops import check, dtype, need, on, rnd  # noqa: F401 (dtype: the fixture)


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}  # float32 sums of the same rounded inputs


def _paged(rows_per_seq, width, dtype, tables, bs):
    cache = torch.zeros(16, bs, 1, width, dtype=dtype)
    for b, rows in enumerate(rows_per_seq):
        for p in range(rows.shape[0]):
            cache[tables[b, p // bs], p % bs, 0] = rows[p]
    return cache


def test_sparse_index_picks_the_top_scores(backend, dtype):
    need(backend, Op.SPARSE_INDEX, dtype)
    Hi, Di, bs, topk = 4, 16, 4, 5
    lens, new = [13, 9], [13, 1]  # a prefill (its first queries see fewer than topk tokens) and a decode
    tables = torch.tensor([[5, 2, 7, 1], [0, 3, 9, 0]], dtype=torch.int32)
    keys = [rnd(L, Di, seed=200 + b).to(dtype) for b, L in enumerate(lens)]
    q = rnd(sum(new), Hi, Di, seed=210).to(dtype)
    weights = rnd(sum(new), Hi, seed=211).float().abs() + 0.1  # positive: every score is distinct from 0 ties
    qsl = torch.tensor([0, 13, 14], dtype=torch.int32)
    scale = Di ** -0.5
    got = backend.sparse_index(on(backend, q), on(backend, weights), on(backend, _paged(keys, Di, dtype, tables, bs)),
                               on(backend, tables), on(backend, torch.tensor(lens, dtype=torch.int32)),
                               on(backend, qsl), scale, topk).cpu()
    assert got.shape == (14, topk) and got.dtype == torch.int64
    for b in range(2):
        s, e = int(qsl[b]), int(qsl[b + 1])
        scores = ref.index_scores(q[s:e], weights[s:e], keys[b], scale)
        for i in range(e - s):
            row = scores[i]
            visible = int(torch.isfinite(row).sum())
            k = min(topk, visible)
            picked = got[s + i]
            chosen = picked[picked >= 0]
            assert chosen.numel() == k and len(set(chosen.tolist())) == k and int((picked < 0).sum()) == topk - k
            # a valid top-k: nothing left out scores above the k-th best, nothing chosen below it, up to the
            # arithmetic of the dtype (near-ties at the cut may go either way)
            kth = float(row.sort(descending=True).values[k - 1])
            tol = TOL[dtype] * (float(row[torch.isfinite(row)].abs().max()) + 1)
            assert float(row[chosen].min()) >= kth - tol, (b, i)
            left_out = [t for t in range(visible) if t not in set(chosen.tolist())]
            assert not left_out or float(row[left_out].max()) <= kth + tol, (b, i)


def test_attention_mla_sees_only_the_selected_tokens(backend, dtype):
    need(backend, Op.ATTENTION_MLA, dtype)
    H, dn, dr, dv, lora, bs = 4, 16, 8, 12, 24, 4
    lens, new = [11, 6], [11, 2]
    tables = torch.tensor([[5, 2, 7], [0, 3, 0]], dtype=torch.int32)
    lat = [rnd(L, lora + dr, seed=300 + b).to(dtype) for b, L in enumerate(lens)]
    w_uk, w_uv = rnd(H, dn, lora, scale=0.2, seed=310).to(dtype), rnd(H, dv, lora, scale=0.2, seed=311).to(dtype)
    q_nope, q_pe = rnd(sum(new), H, dn, seed=312).to(dtype), rnd(sum(new), H, dr, seed=313).to(dtype)
    qsl = torch.tensor([0, 11, 13], dtype=torch.int32)
    g = torch.Generator().manual_seed(314)
    selected = torch.full((13, 3), -1, dtype=torch.long)
    for b in range(2):
        for i in range(int(qsl[b]), int(qsl[b + 1])):
            pos = lens[b] - (int(qsl[b + 1]) - i)
            pick = torch.randperm(pos + 1, generator=g)[:3]
            selected[i, : pick.numel()] = pick
    scale = (dn + dr) ** -0.5
    out = backend.attention_mla(on(backend, q_nope), on(backend, q_pe), on(backend, _paged(lat, lora + dr, dtype, tables,
                                                                                            bs)),
                                on(backend, w_uk), on(backend, w_uv), on(backend, tables),
                                on(backend, torch.tensor(lens, dtype=torch.int32)), on(backend, qsl), scale,
                                selected=on(backend, selected))
    expected = torch.cat([ref.mla(q_nope[qsl[b]:qsl[b + 1]], q_pe[qsl[b]:qsl[b + 1]], lat[b][:, :lora], lat[b][:, lora:],
                                  w_uk, w_uv, scale, selected=[set(r.tolist()) - {-1} for r in selected[qsl[b]:qsl[b + 1]]])
                          for b in range(2)])
    check("attention_mla", dtype, out, expected)
