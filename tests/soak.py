"""tests/soak.py: the toolkit under faults for N minutes (issue 34). Not in CI: run it by hand.

    python tests/soak.py --minutes 30 [--seed 0] [--keep]

Each round picks one fault at random and then checks that nothing was lost:

    kill9   train.py killed with SIGKILL at a random moment (mid-step or mid-save): every checkpoint
            folder left loads, and resuming from the newest ends with the adapter of a run that was
            never interrupted, bit for bit
    signal  SIGINT or SIGTERM at a random moment, saves included (a save every step): exit 130 and
            no traceback; resuming ends as above
    disk    a file-size limit (RLIMIT_FSIZE: writes fail as on a disk that fills) somewhere in the
            run: exit 0 or 2, one paragraph, no traceback, what is left loads; resuming ends as above
    merge   merge.py killed at a random moment, then run again: the merged folder is complete and no
            hidden temporary folder is left beside it
    server  serve.py under concurrent clients, some leaving mid-stream, some sending garbage: every
            well-formed request answered, /health still fine, then Ctrl-C exits 0

It prints a tally of rounds and faults by kind and every failure with its output; exit 1 if any.
Everything happens in a temporary folder, removed at the end unless --keep.
"""

import argparse
import http.client
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
ENV = {"OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
STEPS = 8


class Soak:
    def __init__(self, work: Path, seed: int):
        self.work, self.random = work, random.Random(seed)
        self.tally, self.failures, self.rounds = Counter(), [], 0
        data = work / "rows.jsonl"
        data.write_text("".join(json.dumps({"query": f"question {i}?", "response": f"answer number {i}."}) + "\n"
                                for i in range(24)))
        self.train_args = ["--model", "tiny", "--dataset", str(data), "--device", "cpu", "--max_steps", str(STEPS),
                           "--save_steps", "1", "--save_total_limit", "3", "--lora_rank", "64",
                           "--gradient_accumulation_steps", "2", "--lora_dropout", "0.1"]
        reference = work / "reference"
        self.check(self.python("train.py", *self.train_args, "--output_dir", str(reference)).returncode == 0,
                   "the uninterrupted reference run failed", "")
        self.reference = load_file(final_checkpoint(reference) / "adapter_model.safetensors")

    # -- running the scripts

    def python(self, script, *args, limit=None, timeout=600):
        return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=self.work, capture_output=True,
                              text=True, timeout=timeout, env=env(), preexec_fn=file_size_limit(limit))

    def started(self, script, *args):
        return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=self.work, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env())

    def check(self, ok: bool, what: str, output: str):
        if not ok:
            self.failures.append((self.rounds, what, output[-3000:]))
            print(f"  FAILED: {what}", flush=True)
        return ok

    # -- the faults

    def kill9(self, out: Path):
        proc = self.started("train.py", *self.train_args, "--output_dir", str(out))
        time.sleep(self.random.uniform(3.0, 12.0))
        proc.kill()
        proc.communicate()
        self.resume_and_compare(out, "after kill -9")

    def signal(self, out: Path):
        number = self.random.choice([signal.SIGINT, signal.SIGTERM])
        proc = self.started("train.py", *self.train_args, "--output_dir", str(out))
        time.sleep(self.random.uniform(3.0, 12.0))
        proc.send_signal(number)
        stdout, stderr = proc.communicate(timeout=300)
        # killed by the signal itself: acceptable only where nothing could be lost, while Python imports
        # torch (before any handler is set, nothing written yet) or as the finished run exits
        at_exit = proc.returncode == -number and ("\ndone: " in stdout or not list(out.glob("v*")))
        self.tally[f"signal: exit {proc.returncode}{' after done' if at_exit else ''}"] += 1
        self.check(proc.returncode in (0, 130) or at_exit, f"{number.name}: exit {proc.returncode}", stdout[-1500:] + stderr)
        self.check("Traceback" not in stderr, f"{number.name}: a traceback", stderr)
        if proc.returncode == 130 and checkpoints(out):
            self.check("--resume_from_checkpoint" in stdout + stderr, f"{number.name}: no resume hint", stdout + stderr)
        self.resume_and_compare(out, f"after {number.name}")

    def disk(self, out: Path):
        limit = self.random.choice([20_000, 200_000, 2_000_000, 6_000_000])
        r = self.python("train.py", *self.train_args, "--output_dir", str(out), limit=limit)
        self.tally[f"disk: exit {r.returncode}"] += 1
        self.check(r.returncode in (0, 2), f"disk limit {limit}: exit {r.returncode}", r.stderr)
        self.check("Traceback" not in r.stderr, f"disk limit {limit}: a traceback", r.stderr)
        self.resume_and_compare(out, f"after a {limit}-byte file limit")

    def merge(self, out: Path):
        adapter = final_checkpoint(self.work / "reference")
        target = out / "merged"
        args = ["--adapters", str(adapter), "--output_dir", str(target), "--device", "cpu"]
        proc = subprocess.Popen([sys.executable, str(ROOT / "merge.py"), *args], cwd=self.work, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(self.random.uniform(2.0, 8.0))
        proc.kill()
        proc.communicate()
        r = self.python("merge.py", *args, "--exist_ok", "true")
        self.check(r.returncode == 0 and "Traceback" not in r.stderr, f"merge again: exit {r.returncode}", r.stderr)
        hidden = [p.name for p in out.iterdir() if p.name.startswith(".")] if out.exists() else []
        self.check(not hidden, f"merge left {hidden}", r.stderr)
        self.check((target / "merge_info.json").exists() and (target / "config.json").exists(),
                   "the merged folder is incomplete", r.stderr)

    def server(self, out: Path):
        port = free_port()
        proc = self.started("serve.py", "--model", "tiny", "--port", str(port), "--max_batch_size", "4")
        try:
            if not self.check(wait_healthy(port, proc), "the server did not come up", ""):
                return
            outcomes = clients_at_once(port, self.random, 24)
            self.tally.update(f"server: {k}" for k in outcomes)
            self.check("lost" not in outcomes, f"requests lost: {outcomes}", "")
            self.check(wait_healthy(port, proc, 10), "the server stopped answering after the faults", "")
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                _, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, stderr = proc.communicate()
        self.check(proc.returncode == 0, f"serve.py after Ctrl-C: exit {proc.returncode}", stderr)
        self.check("Traceback" not in stderr, "serve.py: a traceback", stderr)

    # -- what every training fault must leave

    def resume_and_compare(self, out: Path, when: str):
        found = checkpoints(out)
        for ckpt in found:  # every checkpoint folder that can be seen is whole
            try:
                load_file(ckpt / "adapter_model.safetensors")
                json.loads((ckpt / "trainer_state.json").read_text())
            except Exception as e:  # noqa: BLE001 (what a user would meet when resuming from it)
                self.check(False, f"{when}: {ckpt.name} is not whole ({e})", "")
                return
        newest = max(found, key=step_of, default=None)
        if newest is not None and step_of(newest) == STEPS:
            final = newest
        else:
            resume = ["--resume_from_checkpoint", str(newest)] if newest else []
            r = self.python("train.py", *self.train_args, "--output_dir", str(out), *resume)
            if not self.check(r.returncode == 0, f"{when}: resuming from {newest}: exit {r.returncode}", r.stderr):
                return
            final = final_checkpoint(out)
        got = load_file(final / "adapter_model.safetensors")
        same = got.keys() == self.reference.keys() and all((got[k] == self.reference[k]).all() for k in got)
        self.check(same, f"{when}: the resumed adapter differs from the uninterrupted run's", "")

    def round(self):
        self.rounds += 1
        fault = self.random.choice(["kill9", "kill9", "signal", "signal", "disk", "merge", "server"])
        out = self.work / f"round{self.rounds}"
        out.mkdir()
        print(f"round {self.rounds}: {fault}", flush=True)
        self.tally[fault] += 1
        try:
            getattr(self, fault)(out)
        except Exception as e:  # noqa: BLE001 (the soak's own failure, reported and counted)
            self.check(False, f"{fault}: the soak itself failed: {type(e).__name__}: {e}", "")
        shutil.rmtree(out, ignore_errors=True)


def env():
    return dict(os.environ, **ENV)


def file_size_limit(limit):
    """For a child process: writes past `limit` bytes in one file fail (EFBIG), as on a full disk."""
    if limit is None:
        return None

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an OSError for the write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def checkpoints(out: Path) -> list[Path]:
    return [p for p in out.glob("v*/checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[1])


def final_checkpoint(out: Path) -> Path:
    """The last step's checkpoint of the newest run folder (v0-..., v1-...) in `out`."""
    return max((p for p in checkpoints(out) if step_of(p) == STEPS), key=lambda p: int(p.parent.name[1:].split("-")[0]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc, seconds: float = 120) -> bool:
    end = time.time() + seconds
    while time.time() < end and proc.poll() is None:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return True
        except OSError:
            time.sleep(0.5)
    return False


def clients_at_once(port: int, rng: random.Random, n: int) -> Counter:
    """n clients at once, each one kind: an answer, a streamed answer, one that leaves mid-stream,
    invalid JSON, raw garbage. Each outcome counted; 'lost' is a well-formed request not answered."""
    kinds = [rng.choice(["answer", "stream", "leave", "bad_json", "garbage"]) for _ in range(n)]
    outcomes, lock = Counter(), threading.Lock()

    def client(kind):
        result = one_client(port, kind)
        with lock:
            outcomes[result] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in kinds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return outcomes


def one_client(port: int, kind: str) -> str:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 24,
            "stream": kind in ("stream", "leave")}
    raw = {"bad_json": b"{not json", "garbage": None}.get(kind, json.dumps(body).encode())
    try:
        if kind == "garbage":
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"\x00\xffNOT HTTP\r\n\r\n")
                return "garbage answered" if s.recv(100) else "garbage closed"
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        c.request("POST", "/v1/chat/completions", raw, {"Content-Type": "application/json"})
        r = c.getresponse()
        if kind == "leave":
            r.read(50)
            c.close()  # gone mid-stream
            return "left"
        text = r.read()
        if kind == "bad_json":
            return "bad_json 400" if r.status == 400 else "lost"
        return f"{kind} 200" if r.status == 200 and text else ("503" if r.status == 503 else "lost")
    except OSError:
        return "lost" if kind in ("answer", "stream") else f"{kind} closed"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    start = time.time()
    soak = Soak(work, a.seed)
    while time.time() - start < a.minutes * 60:
        soak.round()
    print(f"\nsoak: {soak.rounds} rounds in {(time.time() - start) / 60:.1f} minutes (seed {a.seed}); "
          f"{len(soak.failures)} failures")
    for k, v in sorted(soak.tally.items()):
        print(f"  {k}: {v}")
    for number, what, output in soak.failures:
        print(f"\nround {number}: {what}\n{output}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if soak.failures else 0


if __name__ == "__main__":
    sys.exit(main())
