"""bench.py's --small mode runs end to end on the CPU, so the benchmark script cannot rot."""

import sys

import pytest
import torch

import bench
import model as modeling
from conftest import single_torch_thread


def bench_output(monkeypatch, capsys, *argv) -> str:
    """What `python bench.py ARGV` prints, run in this process, as bench.py already runs its --small
    workers: a process start costs seconds here, and transformers + peft (the reference) take 9 s more
    to import. On one thread: tiny matmuls, and on a busy machine several threads can be many times
    slower. An exception fails the test as a non-zero exit would. What bench.py sets for its whole
    process is put back after the test (--small's long rows: tiles of 64 positions, model.MLP.chunk)."""
    monkeypatch.setattr(sys, "argv", ["bench.py", *map(str, argv)])
    monkeypatch.setattr(modeling.MLP, "chunk", modeling.MLP.chunk)
    capsys.readouterr()
    with single_torch_thread():
        bench.main()
    return capsys.readouterr().out


def test_bench_small_runs_every_workload_and_matches_the_reference_loss(monkeypatch, capsys):
    """--small on the CPU runs every workload to its table (quant: the next test), so a broken
    table is caught here, before a GPU is asked for."""
    out = bench_output(monkeypatch, capsys, "--small", "--steps", "2", "--new_tokens", "16", "--workloads", "train",
                       "decode", "tutorial", "longest", "fit", "batch", "--prompts", "8", "--batch", "4", "--hf_batches", "4")
    assert "| train, 256 tokens | ours (eager) |" in out and "| train, 256 tokens | transformers + peft |" in out
    assert "| decode, batch 1 | ours, adapter merged (eager) |" in out
    # the tutorial's rows: ours packed (train.py's optimizer step), the reference one row at a time
    assert "| tutorial: self-cognition, batch 1 x 16 | ours (default path) | " in out and "2 steps in" in out
    assert "| tutorial, ours (default path): time per optimizer step |" in out
    assert out.count(": OK") == 2 and "MISMATCH" not in out  # first-step loss equals transformers + peft's (train, tutorial)
    # float32 greedy decoding gives transformers' tokens, merged or not
    assert "adapter merged (eager) vs ours unmerged eager: 16/16 identical" in out
    assert "transformers + peft, adapter unmerged vs ours unmerged eager: 16/16 identical" in out
    assert "| longest sequence in 22 GiB | ours | 256 tokens |" in out and "| longest trainable sequence | 1.00x |" in out
    assert "| QWEN3-8B | 15.3 / 5.7 GiB |" in out  # the fit table
    assert "| QWEN3.5-9B | 16.7 / 7.1 GiB |" in out  # its DeltaNet layers counted as built (offload.decoder_sizes)
    # many prompts through the engine, and transformers' generate with left padding: the same greedy answer
    assert "| batch: 8 prompts x 16 tokens | ours, four adapters mixed |" in out
    assert "| batch, four adapters mixed against one merged |" in out
    assert "greedy tokens of the first prompt, ours, adapter unmerged vs transformers + peft: 16/16 identical" in out


@pytest.mark.parametrize("shape", ["qwen3-8b", "qwen3.5-9b"])
def test_bench_small_runs_the_qwen3_shapes_against_transformers(shape, monkeypatch, capsys):
    """Qwen3ForCausalLM and Qwen3_5ForCausalLM (its PyTorch delta rule here) from the same weights."""
    out = bench_output(monkeypatch, capsys, "--small", "--shape", shape, "--steps", "2", "--new_tokens", "8",
                       "--workloads", "train", "decode")
    assert f"shape {shape}" in out and "| memory bandwidth | a 2 GiB copy on the device |" in out
    assert out.count(": OK") == 1 and "MISMATCH" not in out  # the same first-step loss as transformers
    assert "transformers + peft, adapter unmerged vs ours unmerged eager: 8/8 identical" in out
    assert "% of the bandwidth bound" in out


def test_bench_small_runs_the_4bit_workloads_to_the_end(monkeypatch, capsys):
    """--workloads quant crashed after its first row on an H100 (row_of's signature): on the CPU, every row."""
    out = bench_output(monkeypatch, capsys, "--small", "--workloads", "quant", "--steps", "1", "--skip", "14b", "32b")
    assert "| train, 128 tokens | Qwen3-32B 4-bit nf4 (small shape) |" in out
    assert "loss check, 7B 4-bit vs the bf16 model built from its dequantised weights" in out and ": OK" in out


def test_write_checkpoint_gives_a_folder_train_py_loads(tmp_path, monkeypatch):
    """bench.py --write_checkpoint: random weights of a shape in the official layout (how run 17 ran
    the tutorial's train.py line on the 7B shape); here the small shape, on the CPU."""
    import model
    monkeypatch.setitem(bench.SHAPES, "small", bench.SMALL)
    bench.write_checkpoint("small", tmp_path / "ckpt")
    m, _ = model.load_model(str(tmp_path / "ckpt"))
    assert m.config.hidden_size == bench.SMALL["hidden_size"] and (tmp_path / "ckpt" / "tokenizer.json").exists()
    torch.testing.assert_close(m.model.norm.weight, torch.ones(bench.SMALL["hidden_size"], dtype=m.model.norm.weight.dtype))


def test_a_served_checkpoint_answers_in_tokens_the_tokenizer_has_text_for(tmp_path, monkeypatch):
    """bench.py --serve's checkpoint (text_only): the 7B's 152,064 ids against the tiny tokenizer's 898
    plain tokens made nearly every greedy token textless, so "time to first token" timed the first
    text (runs 22 to 24). lm_head's rows past the plain tokens are zero: greedy picks plain tokens."""
    import data
    import decode
    import model
    monkeypatch.setitem(bench.SHAPES, "wide", dict(bench.SMALL, vocab_size=152064))
    bench.write_checkpoint("wide", tmp_path / "ckpt", text_only=True)
    m, _ = model.load_model(str(tmp_path / "ckpt"), dtype=torch.float32)
    tok = data.Tokenizer(tmp_path / "ckpt")
    plain = tok.endoftext_id  # the first added token
    assert plain == 898 and not m.lm_head.weight[plain:].any() and m.lm_head.weight[:plain].abs().sum(1).all()
    out = list(decode.generate(m, tok.encode_text("hello there"), 12, set()))
    assert len(out) == 12 and max(out) < plain and tok.decode(out)


def test_write_tokenizer_rebuilds_byte_pair_merges_from_ranks(tmp_path):
    """--write_tokenizer turns BPE ranks (tiktoken's file: base64 token, rank) into a tokenizer.json
    that encodes as the ranks say: each merge the pair joined last, bytes in the byte-level alphabet.
    (On Qwen's 151,643 ranks it gives Qwen2.5's ids: "Hello world" -> 9707, 1879; BENCHMARKS.md.)"""
    import base64
    import data
    ranks = [bytes([b]) for b in range(256)] + [b"ab", b"abc", b" \xe4", b" \xe4\xbd", b" \xe4\xbd\xa0"]  # " 你" in UTF-8
    (tmp_path / "ranks").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    bench.write_tokenizer(tmp_path / "ranks", tmp_path / "tok")
    tok = data.Tokenizer(tmp_path / "tok")
    assert tok.encode_text("abc") == [257] and tok.encode_text("abd") == [256, ord("d")]
    assert tok.encode_text("x 你") == [ord("x"), 260] and tok.decode([ord("x"), 260]) == "x 你"
    assert (tok.im_start_id, tok.im_end_id, tok.endoftext_id) == (262, 263, 261)  # after the ranks, in Qwen2.5's order


def test_profile_prints_the_step_and_its_heaviest_operations(monkeypatch, capsys):
    """--profile (how BENCHMARKS.md's profiles are taken): on the CPU with --small, the operators by time."""
    out = bench_output(monkeypatch, capsys, "--profile", "--small", "--seq", "64", "--plan", "fused")
    assert "fused, 64 tokens:" in out and "ms a step" in out and "CPU work:" in out
    assert "aten::mm" in out  # the matmuls are among the heaviest


def test_bench_serve_measures_streaming_clients_against_the_real_server(monkeypatch, capsys):
    out = bench_output(monkeypatch, capsys, "--small", "--serve", "3", "--new_tokens", "6")
    assert "server, 3 streaming clients at once (tiny): time to first token median" in out
    assert "output tok/s" in out


def test_bench_small_measures_a_long_row_step_phase_by_phase_and_searches_by_doubling(monkeypatch, capsys):
    """--memory_table and --longest_search (issue 33) on the CPU, through the code the GPU runs: the
    long-row plan's layers (offloaded checkpoints with stand-in host copies, tiles of 64 positions),
    one step a length, every row of the table, each step's loss equal to the plain forward's; the
    search doubles from --seq (the numbers are a GPU's: zero here)."""
    out = bench_output(monkeypatch, capsys, "--memory_table", "--small", "--seqs", "256", "512", "--quant", "nf4")
    assert "offloaded checkpoints and tiles forced" in out and "4-bit nf4" in out
    assert "| | 256 tokens | 512 tokens |" in out
    for row in ("weights (on the GPU)", "LoRA state", "forward: peak", "one layer's backward: peak", "loss: peak", "step"):
        assert f"| {row}" in out, row
    assert "(0.0 u), layer 1 |" in out and out.count(" OK |") == 2 and "MISMATCH" not in out
    out = bench_output(monkeypatch, capsys, "--longest_search", "--small", "--seq", "128")
    assert "offloaded checkpoints and tiles: 512 tokens (3 steps: 128 fits, 256 fits, 512 fits)" in out


def test_the_longest_search_doubles_then_bisects_to_a_multiple_of_its_quantum():
    """Where every length up to 100,000 fits: 10 steps from 16,384 to the answer 99,328 (a multiple of
    1,024), where stepping by 1,024 took 82; one that fits all the way stops at the longest allowed;
    one where the start fails halves it."""
    best, probes = bench.longest_search(lambda n: n <= 100_000, 16384, 262144, 1024)
    assert best == 99328 and len(probes) == 10
    assert [n for n, _ in probes[:4]] == [16384, 32768, 65536, 131072] and probes[3] == (131072, False)
    assert bench.longest_search(lambda n: True, 16384, 100_000, 4096) == (100_000, [(16384, True), (32768, True),
                                                                                 (65536, True), (100_000, True)])
    assert bench.longest_search(lambda n: n <= 5000, 16384, 262144, 1024)[0] == 4096
