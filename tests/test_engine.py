"""engine.Engine (continuous batching) against decode.generate, the one-prompt loop it must agree
with: float32 on the CPU, token for token, rows of very different lengths, more rows than slots."""

import pytest
import torch

import decode
import engine
import fast_decode
import lora
import model as modeling

LENGTHS = (3, 40, 7, 120, 1, 15, 64)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32, device="cpu")
    return m.eval()


def prompts(vocab: int, lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def alone(m, prompt, n, stop=(), **sampling):
    seed = sampling.pop("seed", None)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return list(decode.generate(m, prompt, n, set(stop), generator=generator, **sampling))


@pytest.mark.parametrize("prefill_tokens", [512, 50, 1])
def test_greedy_rows_equal_decoding_each_alone(tiny_model, prefill_tokens):
    """Seven prompts of 1 to 120 tokens through 3 slots: each finished one leaves and the next
    prompt's prefill takes its slot; every answer is the one decoding it alone gives, whether the
    prompts admitted together are prefilled packed into one forward (512; 50: some split) or alone."""
    ps = prompts(tiny_model.config.vocab_size)
    want = [alone(tiny_model, p, 24) for p in ps]
    e = engine.Engine(tiny_model, max_batch_size=3)
    e.prefill_tokens = prefill_tokens
    assert [r.tokens for r in e.run([engine.Request(p, 24) for p in ps])] == want
    assert e.idle() and e.slots == 3


def test_each_row_keeps_its_own_sampling_seed_and_stop_ids(tiny_model):
    ps = prompts(tiny_model.config.vocab_size, seed=1)
    settings = [dict(temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.1, seed=i) if i % 2 else
                dict(repetition_penalty=1.3) for i in range(len(ps))]
    stops = [(), (), (), (), (), (), ()]
    greedy = alone(tiny_model, ps[0], 24)
    stops[0] = (greedy[5],)  # row 0 stops at its sixth token, the stop id included
    want = [alone(tiny_model, p, 24, stop, **dict(s)) for p, stop, s in zip(ps, stops, settings)]
    assert want[0] == alone(tiny_model, ps[0], 24, stops[0], repetition_penalty=1.3)
    requests = [engine.Request(p, 24, frozenset(stop), **s) for p, stop, s in zip(ps, stops, settings)]
    got = engine.Engine(tiny_model, max_batch_size=4).run(requests)
    assert [r.tokens for r in got] == want and all(r.done for r in got)


def test_tokens_arrive_through_the_callback_and_a_cancelled_request_frees_its_slot(tiny_model):
    ps = prompts(tiny_model.config.vocab_size, (5, 9, 12))
    e = engine.Engine(tiny_model, max_batch_size=1)
    seen = []
    first = e.add(engine.Request(ps[0], 50, on_token=lambda t, done: seen.append((t, done))))
    second = e.add(engine.Request(ps[1], 4))
    e.step()
    e.step()
    first.cancelled = True  # as the server does when its client goes away
    while not e.idle():
        e.step()
    assert [t for t, _ in seen] == first.tokens and len(first.tokens) == 3 and not first.done  # prefill + 2 decodes
    assert second.tokens == alone(tiny_model, ps[1], 4) and second.done


@pytest.mark.parametrize("mlp_chunk", [2048, 16])
def test_several_adapters_in_one_batch_equal_each_adapter_alone(tiny_model, tiny_dir, mlp_chunk, monkeypatch):
    """Rows with adapter a (rank 8, all-linear), b (rank 4, q/v only) or none (the base) in the same
    decode batch: each row's tokens are that adapter's alone; nothing merged, nothing swapped. The
    prompts of one adapter are prefilled packed together, also where the MLP splits the packed
    row into pieces (16 tokens, as 2,048 on long rows)."""
    monkeypatch.setattr(modeling.MLP, "chunk", mlp_chunk)
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32, device="cpu")
    m.eval()
    lora.add_adapter(m, lora.LoraConfig(r=8), "a")
    lora.add_adapter(m, lora.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "b")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ps = prompts(m.config.vocab_size, seed=2)
    names = ["a", "b", None, "a", "b", None, "a"]
    want = []
    for p, name in zip(ps, names):
        lora.set_active_adapter(m, name)
        want.append(alone(m, p, 16))
    assert len({tuple(w) for w in want}) == len(want)  # the adapters do change the answers
    e = engine.Engine(m, max_batch_size=4)
    assert [r.tokens for r in e.run([engine.Request(p, 16, adapter=n) for p, n in zip(ps, names)])] == want
    qkv = m.model.layers[0].self_attn.fused_qkv  # q/k/v fused, a's and b's A inside (fast_decode.FusedProjection)
    assert qkv.owner.tolist() == ([1] * 8 + [2] * 8) * 3  # q, k, v: a, then b (rank 4 padded to 8; none on k)
    e.close()
    lora.set_active_adapter(m, "b")
    assert alone(m, ps[1], 16) == want[1]  # the model is as before: one active adapter


def test_a_prompt_with_no_room_is_refused_and_answers_are_cut_at_the_context(tiny_model):
    e = engine.Engine(tiny_model, max_batch_size=2, max_len=50)
    with pytest.raises(modeling.ModelError, match="no room for an answer"):
        e.add(engine.Request([1] * 50, 4))
    (r,) = e.run([engine.Request([1] * 45, 100)])
    assert len(r.tokens) == 5 and r.done


def test_slots_come_from_free_memory_on_a_gpu(monkeypatch):
    """1,000 prompts never run out of GPU memory: the cache gets the slots that fit, the rest wait."""
    cfg = modeling.Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=28,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=128)
    per_slot = 2 * 28 * 4 * 128 * 4096 * 2  # bytes of one slot of 4,096 positions in bf16: 224 MiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * per_slot, 80 * 2**30))
    gpu = torch.device("cuda")
    assert engine.plan_slots(cfg, 1000, 4096, gpu, torch.bfloat16, memory_fraction=0.8) == 8
    assert engine.plan_slots(cfg, 4, 4096, gpu, torch.bfloat16) == 4
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (per_slot // 2, 80 * 2**30))
    with pytest.raises(modeling.ModelError, match="lower --max_new_tokens"):
        engine.plan_slots(cfg, 4, 4096, gpu, torch.bfloat16)


def test_bucketed_steps_give_the_eager_tokens_on_the_cpu(tiny_model):
    """fast_decode.CUDAGraphBatchDecoding's buckets without capture (capture=False: each bucket's step run on
    the fixed buffers instead of replayed): rows padded to a power of two with dummy rows, spans
    rounded up, one row run as two, and each row's tokens as the eager engine's."""
    ps = prompts(tiny_model.config.vocab_size, seed=6)
    ps[1] = prompts(tiny_model.config.vocab_size, [250], seed=7)[0]  # its answer crosses position 256
    runs = []
    for bucketed in (False, True):
        e = engine.Engine(tiny_model, max_batch_size=5, max_len=600)
        if bucketed:
            e.forward = fast_decode.CUDAGraphBatchDecoding(e, capture=False)
        runs.append([r.tokens for r in e.run([engine.Request(p, 12) for p in ps])])
    assert runs[0] == runs[1]
    assert {b for b, _ in e.forward.graphs} <= {2, 4, 5} and {s for _, s in e.forward.graphs} == {256, 512}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU: run on the GPU machine")
@pytest.mark.parametrize("compile", [False, True], ids=["recorded", "compiled"])
def test_cuda_graph_batches_give_the_eager_tokens(tiny_dir, compile):
    """Decode steps replayed per bucket of batch size and span (fast_decode.CUDAGraphBatchDecoding) give
    the eager engine's tokens, with two adapters and the base mixed in the batch (float32, a
    decisive lm_head), and rows that cross from the 256-position span into the 512 one; compiled
    first too (one compiled step for every bucket)."""
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32, device="cuda")
    m.eval()
    lora.add_adapter(m, lora.LoraConfig(r=8), "a")
    lora.add_adapter(m, lora.LoraConfig(r=4), "b")
    with torch.no_grad():
        m.lm_head.weight.mul_(50)
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    ps = prompts(m.config.vocab_size, seed=4)
    ps[1] = prompts(m.config.vocab_size, [250], seed=5)[0]  # its answer crosses position 256
    names = ["a", None, "b", "a", None, "b", "a"]
    runs = []
    for graph in (False, True):
        e = engine.Engine(m, max_batch_size=5, max_len=600, cuda_graph=graph, compile=graph and compile)
        e.warm_up()  # a server's start: every batch bucket recorded at the shortest span (eager: nothing)
        runs.append([r.tokens for r in e.run([engine.Request(p, 20, adapter=n) for p, n in zip(ps, names)])])
        e.close()
    assert runs[0] == runs[1]
    buckets = set(e.forward.graphs)  # one graph a bucket used
    assert {b for b, _ in buckets} <= {2, 4, 5} and len({b for b, _ in buckets}) >= 2  # one row runs as two
    assert {s for _, s in buckets} == {256, 512} and {(b, 256) for b in (2, 4, 5)} <= buckets


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen attention needs a GPU: run on the GPU machine")
def test_prompts_prefilled_packed_through_varlen_attention_give_each_ones_first_token(tiny_dir):
    """bfloat16 on a GPU: the prompts of one step prefilled packed into one row through varlen
    attention (fast_decode.plan_batch_decoding) pick the first token each one's own prefill picks."""
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.bfloat16, device="cuda")
    m.eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(50)
    ps = prompts(m.config.vocab_size, seed=6)
    want = [alone(m, p, 1) for p in ps]
    e = engine.Engine(m, max_batch_size=len(ps))
    assert e.cache.packed_mask is not None and e.prefill_tokens > sum(map(len, ps))  # one packed forward
    assert [r.tokens for r in e.run([engine.Request(p, 1) for p in ps])] == want
