"""Continuous batching, chunked prefill and the prefix cache (device / host / disk tiers)."""
import threading

import pytest
import torch

import kt_core
from kt_core.errors import KtError
from kt_core.kvcache.disk_tier import SUFFIX
from kt_core.kvcache.prefix import HOST_ENTRY_OVERHEAD, chain_hashes
from kt_core.models.synthetic import synthesize
from kt_core.runtime.sampling import SamplingParams
from kt_core.runtime.scheduler import QueueFull, Request, Scheduler
from tests.faults import fault_on_temperature

SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=512)
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sched") / "m"
    synthesize(path, preset="tiny-qwen3-moe", layers=2, shape=SHAPE, sample_tokens=64)
    return path


def _engine(path, **kw):
    return kt_core.Engine.from_pretrained(path, overrides=["model.dtype=float32", "model.max_seq_len=256"], **kw)


@pytest.fixture(scope="module")
def engine(model_path):
    return _engine(model_path)


def _prompt(n, seed=0):
    return torch.randint(5, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(engine, prompts, chunk=512, max_batch=16, params=GREEDY):
    sched = Scheduler(engine, max_batch=max_batch, max_queue=64, prefill_chunk=chunk)
    reqs = [sched.submit(Request(p, params)) for p in prompts]
    while sched.has_work():
        sched.step()
    return [r.output for r in reqs], sched


def test_batched_and_chunked_outputs_equal_one_at_a_time(engine):
    prompts = [_prompt(n, i) for i, n in enumerate((5, 40, 17, 70))]
    alone = [_run(engine, [p])[0][0] for p in prompts]
    together, _ = _run(engine, prompts, chunk=24, max_batch=3)  # chunks of 24, one request waits for a slot
    assert together == alone
    assert engine.cache.used_blocks == 0


def test_request_joining_a_running_decode_batch(engine):
    a, b = _prompt(12, 1), _prompt(30, 2)
    alone = [_run(engine, [p])[0][0] for p in (a, b)]
    sched = Scheduler(engine, max_batch=4, prefill_chunk=8)
    ra = sched.submit(Request(a, GREEDY))
    for _ in range(4):  # a is decoding when b arrives; b's prefill is split into chunks of 8
        sched.step()
    assert ra.output and not ra.finished
    rb = sched.submit(Request(b, GREEDY))
    steps_with_both = 0
    while sched.has_work():
        both = ra in sched.running and rb in sched.running
        sched.step()
        steps_with_both += both
    assert [ra.output, rb.output] == alone and steps_with_both >= 4


def test_queue_bound_cancel_and_timeout_free_blocks(engine):
    sched = Scheduler(engine, max_batch=1, max_queue=1, prefill_chunk=512)
    running = sched.submit(Request(_prompt(20), SamplingParams(max_new_tokens=50, ignore_eos=True)))
    sched.step()
    waiting = sched.submit(Request(_prompt(10), GREEDY, timeout_s=0.0))
    with pytest.raises(QueueFull, match="max_queue=1"):
        sched.submit(Request(_prompt(10), GREEDY))
    sched.cancel(running)
    sched.step()
    assert running.finish_reason == "cancelled" and waiting.finish_reason == "timeout"
    assert engine.cache.used_blocks == 0 and not sched.has_work()


def test_prefix_cache_reuses_blocks_and_keeps_outputs(model_path):
    shared = _prompt(64, 7)
    prompts = [shared + _prompt(9, 8), shared + _prompt(5, 9)]
    plain = _engine(model_path)
    want = [_run(plain, [p])[0][0] for p in prompts]
    cached = _engine(model_path)
    pc = cached.enable_prefix_cache()
    got = [_run(cached, [p])[0][0] for p in prompts]
    assert got == want
    assert pc.stats["device"] == 4, "the second prompt reuses the 4 full blocks of the shared 64 tokens"
    assert cached.cache.used_blocks == 0 and pc.idle_count > 0
    # logits after a cached prefix equal a cold prefill of the whole prompt
    r = Request(prompts[1], SamplingParams(max_new_tokens=1))
    s = Scheduler(cached)
    s.submit(r)
    seen = []
    forward = cached.model.forward
    cached.model.forward = lambda batch, cache: seen.append(forward(batch, cache)) or seen[-1]
    try:
        s.step()
    finally:
        del cached.model.forward
    assert r.cached_tokens == 64
    cold = plain.logits(prompts[1])[-1]
    assert len(seen) == 1 and seen[0].shape[0] == 1
    assert torch.allclose(seen[0][0].cpu(), cold, rtol=1e-4, atol=1e-4)


def test_cache_salt_scopes_prefix_sharing_in_every_tier(model_path, tmp_path):
    e = _engine(model_path)
    pc = e.enable_prefix_cache(host_bytes=1 << 20, disk_dir=tmp_path, disk_bytes=1 << 30)
    prompt = _prompt(70, 7)

    def run(salt):
        s = Scheduler(e)
        r = s.submit(Request(prompt, GREEDY, cache_salt=salt))
        while s.has_work():
            s.step()
        return r.cached_tokens, r.output

    plain = run(None)
    assert plain[0] == 0
    assert run("a") == (0, plain[1]), "a salted request reused an unsalted prefix"
    assert run("a") == (64, plain[1]) and run("b")[0] == 0 and run(None)[0] == 64
    assert pc.salted("a") != pc.salted("b") != pc.seed and pc.salted("a") == pc.salted("a")
    # the disk tier is named by the same hashes: a salted block there is not found unsalted
    pc.flush()
    other = _engine(model_path)
    other.enable_prefix_cache(disk_dir=tmp_path, disk_bytes=1 << 30)
    s = Scheduler(other)
    r = s.submit(Request(prompt, GREEDY, cache_salt="c"))
    while s.has_work():
        s.step()
    assert r.cached_tokens == 0 and r.output == plain[1]


def _disk_engine(path, folder, **kw):
    e = _engine(path)
    return e, e.enable_prefix_cache(host_bytes=kw.get("host", 0), disk_dir=folder, disk_bytes=kw.get("disk", 1 << 30))


def test_disk_tier_survives_a_restart_and_rejects_bad_entries(model_path, tmp_path):
    prompt = _prompt(50, 3)
    want = _run(_engine(model_path), [prompt])[0][0]
    first, pc = _disk_engine(model_path, tmp_path)
    assert _run(first, [prompt])[0][0] == want
    assert pc.flush() == 3  # 50 prompt + 8 generated tokens -> 3 full blocks
    files = sorted(tmp_path.glob(f"*{SUFFIX}"))
    assert len(files) == 3 and not list(tmp_path.glob("*.tmp"))

    second, pc2 = _disk_engine(model_path, tmp_path)  # a new process would see the same folder
    out, _ = _run(second, [prompt])
    assert out[0] == want and pc2.stats["disk"] == 3

    # a corrupted entry, then a truncated one: each is dropped (logged, deleted), never fed to the model
    chain = [tmp_path / f"{h.hex()}{SUFFIX}" for h in chain_hashes(pc.seed, prompt + want, 16)]
    data = chain[2].read_bytes()
    chain[2].write_bytes(data[:-7] + bytes(7 * [data[-1] ^ 0xFF]))
    third, pc3 = _disk_engine(model_path, tmp_path)
    assert _run(third, [prompt])[0][0] == want
    assert pc3.stats["disk"] == 2 and pc3.disk.dropped == 1 and _replaced_or_gone(pc3, chain[2])
    chain[0].write_bytes(chain[0].read_bytes()[:100])
    fourth, pc4 = _disk_engine(model_path, tmp_path)
    assert _run(fourth, [prompt])[0][0] == want
    assert pc4.stats["disk"] == 0 and pc4.disk.dropped == 1 and _replaced_or_gone(pc4, chain[0])


def _replaced_or_gone(pc, path) -> bool:
    """A dropped entry is deleted; write-through may then write the recomputed block under the same
    name, and that file must be a good entry (never the bad bytes again)."""
    assert pc.disk.wait_idle(30)
    return not path.exists() or pc.disk._check(path.read_bytes(), path.stem) is None


def test_disk_entries_of_another_model_are_refused(model_path, tmp_path):
    prompt = _prompt(40, 4)
    e, pc = _disk_engine(model_path, tmp_path)
    _run(e, [prompt])
    pc.flush()
    other = _engine(model_path)
    other.fingerprint = "another-model"
    pc2 = other.enable_prefix_cache(disk_dir=tmp_path, disk_bytes=1 << 30)
    _run(other, [prompt])
    assert pc2.stats["disk"] == 0  # another model's chain hashes differ: no entry is even read
    # an entry whose header names another model is refused even under the right name
    victim = next(tmp_path.glob(f"*{SUFFIX}"))
    pc2.disk.header = dict(pc2.disk.header, model="x")
    assert pc2.disk._check(victim.read_bytes(), victim.stem).startswith("written for model=")


def test_host_tier_and_disk_cap(model_path, tmp_path):
    e = kt_core.Engine.from_pretrained(model_path, overrides=["model.dtype=float32", "model.max_seq_len=64",
                                                              "plan.kv_tokens=64"], max_batch=1)
    bb = e.cache.block_bytes()
    pc = e.enable_prefix_cache(host_bytes=2 * bb + 1024, disk_dir=tmp_path, disk_bytes=3 * (bb + 1024))
    prompts = [_prompt(40, s) for s in range(4)]
    first = [_run(e, [p], params=SamplingParams(max_new_tokens=4, ignore_eos=True))[0][0] for p in prompts]
    # 4 blocks of KV in all: every new prompt evicts older blocks to host RAM, then disk (capped)
    assert len(pc.host) <= 2 and pc.disk.used_bytes <= 3 * (bb + 1024)
    # host entries are one tensor each, counted at their real size (data and per-entry overhead)
    assert all(t.is_contiguous() and t.numel() * t.element_size() == bb for t in pc.host.values())
    assert pc.host_used == sum(bb + HOST_ENTRY_OVERHEAD for _ in pc.host) <= pc.host_cap
    again = _run(e, [prompts[-2]], params=SamplingParams(max_new_tokens=4, ignore_eos=True))[0][0]
    assert again == first[-2] and pc.stats["host"] + pc.stats["disk"] > 0


def test_scheduler_thread_serves_concurrent_submitters(engine):
    sched = Scheduler(engine, max_batch=4, max_queue=32, prefill_chunk=16)
    stop = threading.Event()
    worker = threading.Thread(target=sched.run, args=(stop,), daemon=True)
    worker.start()
    reqs = [sched.submit(Request(_prompt(10 + i, i), GREEDY)) for i in range(10)]
    for r in reqs:
        assert r.done.wait(60), "request did not finish"
    stop.set()
    worker.join(10)
    assert all(r.finish_reason == "length" and len(r.output) == 8 for r in reqs)
    assert engine.cache.used_blocks == 0


def test_request_that_cannot_fit_the_cache_is_refused(model_path):
    e = kt_core.Engine.from_pretrained(model_path, overrides=["model.dtype=float32", "model.max_seq_len=256",
                                                              "plan.kv_tokens=32"], max_batch=1)
    with pytest.raises(KtError, match="exceeds the context|KV blocks"):
        Scheduler(e).submit(Request(_prompt(250), SamplingParams(max_new_tokens=4)))


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v32", "glm_moe_dsa", "mixtral", "glm4_moe", "minimax_m2",
                                  "llama4", "deepseek_v4"])
def test_prefix_cache_on_mla_latent_and_gqa_layouts(tiny_checkpoint, tmp_path, arch):
    """Blocks shared, demoted to disk and read back give the same greedy tokens on MLA's latent
    cache (no V tensors) as on a K/V cache."""
    path = tiny_checkpoint(arch)
    ov = ["model.dtype=float32", "model.max_seq_len=128"]
    prompt = [t % 90 + 1 for t in _prompt(40, 11)]  # the tiny vocabulary has 96 tokens
    want = _run(kt_core.Engine.from_pretrained(path, overrides=ov), [prompt])[0][0]
    e = kt_core.Engine.from_pretrained(path, overrides=ov)
    pc = e.enable_prefix_cache(disk_dir=tmp_path, disk_bytes=1 << 30)
    assert e.cache.layout == ("mla-latent" if arch.startswith("deepseek") or arch == "glm_moe_dsa" else "mha")
    assert _run(e, [prompt])[0][0] == want
    assert pc.flush() >= 2
    fresh = kt_core.Engine.from_pretrained(path, overrides=ov)
    pc2 = fresh.enable_prefix_cache(disk_dir=tmp_path, disk_bytes=1 << 30)
    assert _run(fresh, [prompt])[0][0] == want and pc2.stats["disk"] == 2


def test_linear_attention_state_through_batching_and_a_prefix_cache(tiny_checkpoint, tmp_path):
    """Qwen3-Next's per-sequence recurrent state follows each sequence through chunked prefill and a
    batch whose members join and leave. With the prefix cache on, a step ends on each block boundary
    a prompt crosses, the state there is snapshotted, and a later request with the same prefix
    resumes from it: same tokens as without the cache, fewer computed. A prefix whose blocks reached
    disk but whose state did not (a restart) is recomputed, not misread."""
    path = tiny_checkpoint("qwen3_next")
    ov = ["model.dtype=float32", "model.max_seq_len=128"]
    prompts = [[t % 90 + 1 for t in _prompt(n, s)] for n, s in ((40, 11), (9, 12), (23, 13))]
    again = [prompts[0], prompts[0][:35] + [7, 8, 9], prompts[2]]
    alone = kt_core.Engine.from_pretrained(path, overrides=ov)
    want = {tuple(p): _run(alone, [p])[0][0] for p in prompts + again}
    e = kt_core.Engine.from_pretrained(path, overrides=ov)
    pc = e.enable_prefix_cache(disk_dir=tmp_path, disk_bytes=1 << 30)
    got, _ = _run(e, prompts, chunk=7, max_batch=2)
    assert got == [want[tuple(p)] for p in prompts]
    assert pc.stats["device"] == 0 and len(e.cache.states.snapshots) >= 3
    got, sched = _run(e, again, chunk=7, max_batch=3)
    assert got == [want[tuple(p)] for p in again]
    # prompt 0 again: its 2 full blocks (max (40 - 1) // 16); the variant shares 2 blocks; prompt 2 one
    assert pc.stats["device"] == 5
    assert e.cache.states.of == {} and e.cache.used_blocks == 0
    assert pc.flush() >= 2
    fresh = kt_core.Engine.from_pretrained(path, overrides=ov)
    pc2 = fresh.enable_prefix_cache(disk_dir=tmp_path, disk_bytes=1 << 30)
    assert _run(fresh, [prompts[0]])[0][0] == want[tuple(prompts[0])]
    assert pc2.stats["disk"] == 0, "blocks on disk without their state are not used"


def test_a_request_whose_sampling_or_emission_fails_finishes_alone(engine, monkeypatch):
    prompts = [_prompt(12, 1), _prompt(20, 2)]
    want = [_run(engine, [p])[0][0] for p in prompts]
    fault_on_temperature(monkeypatch, engine, 1.25)
    sched = Scheduler(engine, max_batch=8)
    good = [sched.submit(Request(p, GREEDY)) for p in prompts]
    bad_sample = sched.submit(Request(_prompt(9, 3), SamplingParams(max_new_tokens=8, temperature=1.25)))

    def broken_sink(r, tok, text):
        if tok is not None and len(r.output) == 3:
            raise RuntimeError("injected sink fault")

    bad_emit = sched.submit(Request(_prompt(7, 4), GREEDY, broken_sink))
    while sched.has_work():
        sched.step()  # before: the first fault raised out of step() and took the whole batch with it
    assert bad_sample.finish_reason == "error" and "sampling" in bad_sample.error and "injected" in bad_sample.error
    assert bad_emit.finish_reason == "error" and "emitting" in bad_emit.error and len(bad_emit.output) == 3
    assert [r.output for r in good] == want and all(r.finish_reason == "length" for r in good)
    assert sched.counters["errors"] == 2 and engine.cache.used_blocks == 0


def test_a_failed_forward_pass_fails_its_batch_as_an_error_and_the_queue_carries_on(engine, monkeypatch):
    model, real, calls = engine.model, type(engine.model).forward, []

    def forward(batch, cache):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected forward fault")
        return real(model, batch, cache)

    monkeypatch.setattr(model, "forward", forward)
    sched = Scheduler(engine, max_batch=2, max_queue=8)
    reqs = [sched.submit(Request(_prompt(10 + i, i), GREEDY)) for i in range(3)]
    stop = threading.Event()
    worker = threading.Thread(target=sched.run, args=(stop,), daemon=True)
    worker.start()
    for r in reqs:
        assert r.done.wait(60), "request did not finish"
    stop.set()
    worker.join(10)
    # the two in the failed step's batch fail as errors (not "abort", which means shutdown); the third,
    # still waiting then, is served
    assert [r.finish_reason for r in reqs] == ["error", "error", "length"]
    assert "forward step" in reqs[0].error and "injected forward fault" in reqs[0].error
    assert engine.cache.used_blocks == 0


def test_extreme_but_valid_sampling_values(engine):
    p = _prompt(12, 4)
    want = _run(engine, [p])[0][0]
    tiny = SamplingParams(max_new_tokens=8, temperature=1e-45, ignore_eos=True)  # below the floor: greedy
    assert _run(engine, [p], params=tiny)[0][0] == want
    kw = dict(max_new_tokens=8, temperature=0.8, ignore_eos=True)
    for seed in (2**64 - 1, -(2**63), 0):
        off = _run(engine, [p], params=SamplingParams(top_k=0, seed=seed, **kw))[0][0]
        huge = _run(engine, [p], params=SamplingParams(top_k=2**31 - 1, seed=seed, **kw))[0][0]
        assert huge == off  # a top_k beyond the vocabulary keeps every token
    for pen in (0.01, 100.0):
        out = _run(engine, [p], params=SamplingParams(repetition_penalty=pen, seed=1, **kw))[0][0]
        assert len(out) == 8


def test_a_cancelled_request_holds_no_place_in_the_queue(engine):
    """A client that gives up and retries at once must not find the queue full of its own
    abandoned request (it leaves the queue only at the next step)."""
    sched = Scheduler(engine, max_batch=1, max_queue=1, prefill_chunk=512)
    sched.submit(Request(_prompt(20), SamplingParams(max_new_tokens=4, ignore_eos=True)))
    sched.step()
    gone = sched.submit(Request(_prompt(10), GREEDY))
    sched.cancel(gone)
    retry = sched.submit(Request(_prompt(10), GREEDY))  # no QueueFull
    while sched.has_work():
        sched.step()
    assert gone.finish_reason == "cancelled" and retry.finish_reason == "length"
    assert engine.cache.used_blocks == 0
