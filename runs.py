"""runs.py: keeping a training run: its folder, checkpoints, logs, resume, and stopping cleanly.

A first reading can skip this file. A run lives in OUTPUT_DIR/vN-YYYYMMDD-HHMMSS/ (as ms-swift's):

    args.json             the flags it was started with
    logging.jsonl         one line per logged step: loss, learning rate, speed, memory; eval_loss
    images/loss.svg       the loss curve, drawn at the end
    checkpoint-STEP/      the adapter in PEFT's format (adapter_config.json, adapter_model.safetensors),
                          args.json, and what resuming needs: optimizer.pt, rng_state.pt and
                          trainer_state.json (the step, the place in the epoch, the log history)

A checkpoint is written into a hidden temporary folder and renamed into place when complete
(util.atomic_folder), so a crash or Ctrl-C never leaves a half-written one. Resuming restores the
adapter, the optimizer, the random state and the place in the data order: the run ends with the
same adapter, bit for bit, as one that was never stopped. Under torchrun rank 0 writes; all ranks
agree on when.
"""

import json
import os
import pickle
import random
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file

import lora
from util import atomic_folder, read_json, remove_stale_temporaries


class RunError(Exception):
    """A run folder or checkpoint that cannot be used as asked."""


# ----------------------------------------------------------------------------------------------
# Folders and checkpoints


def new_run_dir(output_dir: str, add_version: bool) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not add_version:
        return out
    versions = [int(p.name[1:].split("-")[0]) for p in out.glob("v*-*") if p.name[1:].split("-")[0].isdigit()]
    run = out / f"v{max(versions, default=-1) + 1}-{datetime.now():%Y%m%d-%H%M%S}"
    run.mkdir()
    return run


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-STEP folders of a run, oldest first. Half-written ones never carry this name."""
    ckpts = [p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()
             and (p / "trainer_state.json").exists()]
    return sorted(ckpts, key=lambda p: int(p.name.split("-")[-1]))


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint written last (after a resume from an earlier step, not the highest step)."""
    ckpts = complete_checkpoints(run_dir)
    return max(ckpts, key=lambda p: (p / "trainer_state.json").stat().st_mtime_ns) if ckpts else None


def find_resume_checkpoint(path: str, adapter_only: bool = False) -> Path:
    """A checkpoint folder, or a run folder's newest checkpoint; with adapter_only, also a plain
    adapter folder (peft's or ms-swift's adapter files without trainer_state.json)."""
    p = Path(path)
    if (p / "trainer_state.json").exists() or adapter_only and (p / "adapter_model.safetensors").exists():
        return p
    newest = newest_checkpoint(p)
    if newest is None:
        raise RunError(f"--resume_from_checkpoint {path}: no complete checkpoint-STEP folder in it (a checkpoint holds trainer_state.json).")
    return newest


def save_checkpoint(run_dir: Path, model, optimizer_state: dict, state: dict, args_dict: dict, rng: dict) -> Path:
    """Write checkpoint-STEP atomically; a checkpoint of the same step from an earlier attempt is replaced."""
    final = run_dir / f"checkpoint-{state['global_step']}"
    remove_stale_temporaries(final)  # left by a process killed while saving this step before
    with atomic_folder(final, replace=True) as tmp:
        lora.save_adapter(model, tmp, base_model_name_or_path=args_dict["model"])
        (tmp / "args.json").write_text(json.dumps(args_dict, indent=2, ensure_ascii=False) + "\n")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    return final


def prune_checkpoints(run_dir: Path, limit: int | None, best: str | None, history: list[str]):
    """Keep the newest `limit` checkpoints of `history` (checkpoint names in the order this run
    wrote them: after a resume, not the highest step numbers), and always the best one by eval
    loss; the one just written is never deleted. Removes the others from `history` too."""
    if limit is None:
        return
    keep = set(history[-limit:])
    if best is not None and best not in keep:
        keep = {best} | set(history[-max(1, limit - 1):])
    for name in [n for n in history if n not in keep]:
        shutil.rmtree(run_dir / name, ignore_errors=True)
        history.remove(name)


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class WholeState:
    """What a checkpoint holds of the model and the optimizer, when each rank holds all of them (one
    process, or DDP): gathered for saving, and loaded back. shard.ShardedState does the same for a
    model split over the ranks, in this same form: a checkpoint does not depend on how it was trained."""

    def gather(self, model, optimizer) -> tuple:
        """(a model holding the whole adapter, for lora.save_adapter; the optimizer's state dict)"""
        return model, optimizer.state_dict()

    def load(self, model, optimizer, adapter: dict, optimizer_state: dict | None = None):
        lora.load_lora_state_dict(model, adapter)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)


# ----------------------------------------------------------------------------------------------
# The run


class Run:
    """A run's folder and state, from the first step (or the resumed one) to the report at the end.

    `state` is what trainer_state.json holds: global_step, epoch and step_in_epoch (where the data
    order goes on), the best eval loss and its checkpoint, and the log history."""

    def __init__(self, run_dir: Path, state: dict, args_dict: dict, total_steps: int, device, rank=0, world=1,
                 states=None):
        self.dir, self.state, self.args, self.total_steps = run_dir, state, args_dict, total_steps
        self.device, self.rank, self.world = device, rank, world
        self.states = states or WholeState()
        self.t0, self.start_step, self.tokens, self.losses = time.time(), state["global_step"], 0, []
        self.elapsed_before = state.get("elapsed", 0.0)  # training time before a resume
        self.rng = rng_state(device)  # the random state after the last complete step

    def end_step(self, epoch: int, steps_done_in_epoch: int, loss: float, tokens: int, loss_scale):
        """Count one optimizer step done: its loss must be finite; a float16 step that overflowed
        (train.LossScale) was skipped, and says so."""
        self.check_finite(loss)
        step = self.state["global_step"] + 1
        self.state.update(global_step=step, epoch=epoch, step_in_epoch=steps_done_in_epoch)
        if loss_scale.enabled:
            if self.rank == 0 and loss_scale.skipped:
                print(f"[{step}/{self.total_steps}] float16 gradients overflowed: step skipped, "
                      f"loss scale now {loss_scale.value:g}", flush=True)
            self.state["loss_scale"] = loss_scale.value
        self.losses.append(loss)
        self.tokens += tokens
        self.rng = rng_state(self.device)

    def log_progress(self, epoch: float, lr: float, grad_norm):
        """Average the losses since the last log line into one logging.jsonl entry and print it."""
        step, total_steps, elapsed = self.state["global_step"], self.total_steps, time.time() - self.t0
        per_step = elapsed / max(1, step - self.start_step)
        elapsed_in_all = self.elapsed_before + elapsed  # a resumed run goes on counting
        entry = {"step": step, "epoch": round(epoch, 4), "loss": round(sum(self.losses) / len(self.losses), 6),
                 "learning_rate": lr, "grad_norm": round(float(grad_norm), 6),
                 "tokens_per_s": round(self.tokens / max(elapsed, 1e-9), 1), "elapsed": fmt_time(elapsed_in_all),
                 "remaining": fmt_time(per_step * (total_steps - step))}
        if "loss_scale" in self.state:
            entry["loss_scale"] = self.state["loss_scale"]
        if self.device.type == "cuda":
            entry["memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self.losses = []
        mem = f" | mem {entry['memory_gib']:.1f} GiB" if "memory_gib" in entry else ""
        self._log(entry, f"[{step}/{total_steps}] loss {entry['loss']:.4f} lr {lr:.2e} grad {entry['grad_norm']:.3f} "
                         f"| {entry['tokens_per_s']:.0f} tok/s | {entry['elapsed']} elapsed, {entry['remaining']} left{mem}")

    def log_eval(self, evaluate):
        """Run `evaluate()` (the validation loss), log it, and remember the best step. Every rank
        runs it (a sharded model needs all ranks for each forward); rank 0 writes."""
        step, eval_loss = self.state["global_step"], evaluate()
        self._log({"step": step, "eval_loss": round(eval_loss, 6)}, f"[{step}/{self.total_steps}] eval_loss {eval_loss:.4f}")
        if self.state["best_eval_loss"] is None or eval_loss < self.state["best_eval_loss"]:
            self.state.update(best_eval_loss=eval_loss, best_checkpoint=f"checkpoint-{step}")

    def _log(self, entry: dict, line: str):
        self.state["log_history"].append(entry)
        if self.rank == 0:
            with open(self.dir / "logging.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            print(line, flush=True)

    def save(self, model, optimizer, limit: int | None):
        """A checkpoint of this step (rank 0), then --save_total_limit's pruning. Weights that are
        no longer finite are never saved. Ctrl-C must not cut a save in half: it is ignored until
        the checkpoint is in place."""
        model, optimizer_state = self.states.gather(model, optimizer)  # on every rank
        adapter = lora.lora_state_dict(model)
        if not all(bool(torch.isfinite(t).all()) for t in adapter.values()):
            self.diverged("the adapter's weights became inf or NaN")
        if self.rank == 0:
            handlers = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
            try:
                name = f"checkpoint-{self.state['global_step']}"
                history = self.state.setdefault("checkpoints", [])
                history[:] = [n for n in history if n != name] + [name]
                self.state["elapsed"] = round(self.elapsed_before + time.time() - self.t0, 1)
                save_checkpoint(self.dir, model, optimizer_state, self.state, self.args, self.rng)
                prune_checkpoints(self.dir, limit, self.state["best_checkpoint"], history)
            finally:
                for s, h in handlers.items():
                    signal.signal(s, h)
        self.barrier()

    def check_finite(self, loss: float):
        if loss != loss or abs(loss) == float("inf"):
            self.diverged(f"the loss became {loss}")

    def diverged(self, what: str):
        last = self.last_checkpoint()
        raise FloatingPointError(
            f"{what} at step {self.state['global_step'] + 1}: training stopped and nothing more was saved. "
            f"The last good checkpoint is {last or '(none yet)'}. Lower --learning_rate, use --torch_dtype "
            "bfloat16 rather than float16, or check the data.")

    def last_checkpoint(self) -> Path | None:
        """The checkpoint this run wrote last (every one it wrote had finite weights)."""
        history = [n for n in self.state.get("checkpoints", []) if (self.dir / n / "trainer_state.json").exists()]
        return self.dir / history[-1] if history else None

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def finish(self, interrupted: bool):
        """The loss curve, and what to do next."""
        if self.rank != 0:
            return
        hist = self.state["log_history"]
        write_loss_svg(self.dir / "images" / "loss.svg",
                       {"train_loss": [(e["step"], e["loss"]) for e in hist if "loss" in e],
                        "eval_loss": [(e["step"], e["eval_loss"]) for e in hist if "eval_loss" in e]})
        last = self.last_checkpoint()
        if interrupted:
            print(f"\nstopped at step {self.state['global_step']}. Resume with:\n  python train.py ... --resume_from_checkpoint {last or self.dir}")
            return
        print(f"\ndone: {self.state['global_step']} steps in {fmt_time(time.time() - self.t0)}.")
        print(f"  run folder:      {self.dir}")
        print(f"  last checkpoint: {last or '-'}")
        if self.state["best_checkpoint"]:
            print(f"  best checkpoint: {self.dir / self.state['best_checkpoint']} (eval_loss {self.state['best_eval_loss']:.4f})")
        print(f"  loss curve:      {self.dir / 'images' / 'loss.svg'}")
        print(f"  chat with it:    python infer.py --adapters {last or self.dir}")


# What a resume must keep: changing any of these changes what is being trained, so the run would
# end with an adapter that neither the old nor the new flags describe.
RESUME_MUST_MATCH = ("model", "dataset", "val_dataset", "split_dataset_ratio", "max_length", "truncation_strategy",
                     "packing", "system", "model_name", "model_author", "lora_rank", "lora_alpha", "lora_dropout",
                     "use_rslora", "target_modules", "per_device_train_batch_size", "seed", "quant_bits",
                     "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "template", "loss_scale",
                     "add_non_thinking_prefix")
UNSET_MEANS_SAVED = ("template", "loss_scale")  # unset, they are the model's own: the checkpoint's, as recorded
CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "rng_state.pt", "trainer_state.json")


def check_resume(a, world: int) -> Path | None:
    """Before anything loads: the checkpoint --resume_from_checkpoint names (None without it),
    complete, and trained with the flags given now (--resume_only_model: only its adapter is
    loaded, into a new run, so any flag may change). A fresh run into a folder that already holds
    checkpoints (--add_version false) is refused: its pruning and resume would mix two runs."""
    check_writable(Path(a.resume_from_checkpoint or a.output_dir or "."), "--resume_from_checkpoint"
                   if a.resume_from_checkpoint else "--output_dir")
    if not a.resume_from_checkpoint:
        if not a.add_version and complete_checkpoints(Path(a.output_dir)):
            raise RunError(f"--output_dir {a.output_dir} already holds checkpoints of a run. Resume it with "
                           f"--resume_from_checkpoint {a.output_dir}, or start a new run elsewhere (another "
                           "--output_dir, or --add_version true for a new vN-... folder in it).")
        return None
    ckpt = find_resume_checkpoint(a.resume_from_checkpoint, a.resume_only_model)
    needed = ("adapter_model.safetensors",) if a.resume_only_model else CHECKPOINT_FILES
    missing = [f for f in needed if not (ckpt / f).is_file()]
    if missing:
        raise RunError(f"{ckpt} cannot be resumed: it has no {', '.join(missing)} (ms-swift's checkpoints name them "
                       "otherwise). Resume from a checkpoint of this toolkit, or pass --resume_only_model true to "
                       "start a new run from its adapter weights alone.")
    if a.resume_only_model:
        return ckpt
    state = read_json(ckpt / "trainer_state.json", RunError, hint="resume from another checkpoint of the run")
    if not isinstance(state.get("global_step"), int) or "log_history" not in state:
        raise RunError(f"{ckpt / 'trainer_state.json'} lacks global_step or log_history; resume from another checkpoint.")
    saved = read_json(ckpt / "args.json", RunError) if (ckpt / "args.json").exists() else {}
    now = dict(vars(a), accumulation_x_ranks=a.gradient_accumulation_steps * world)
    saved["accumulation_x_ranks"] = saved.get("gradient_accumulation_steps", 1) * saved.get("world_size", 1)
    changed = [f"--{k} {saved[k]!r} -> {now[k]!r}" for k in RESUME_MUST_MATCH + ("accumulation_x_ranks",)
               if k in saved and saved[k] != now[k] and not (k in UNSET_MEANS_SAVED and now[k] is None)]
    for k in UNSET_MEANS_SAVED:  # resumed in the template (and loss scale) it was trained in, not in today's guess
        if getattr(a, k) is None and saved.get(k) is not None:
            setattr(a, k, saved[k])
    if changed:
        raise RunError(f"{ckpt} was trained with other flags ({'; '.join(changed)}; accumulation_x_ranks is "
                       "--gradient_accumulation_steps times the number of ranks). Resuming would train something "
                       "neither describes: give the checkpoint's flags, or pass --resume_only_model true to start "
                       "a new run from its adapter weights.")
    return ckpt


def check_writable(folder: Path, flag: str):
    """Before the model loads: the run's checkpoints can be written under `folder`."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise RunError(f"{flag} {folder}: {existing} is a file, not a folder; choose another folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"{flag} {folder}: you cannot write in {existing}; choose a folder you can write to.")


def open_run(a, model_dir, model, optimizer, total_steps: int, device, rank: int = 0, world: int = 1,
             states=None) -> Run:
    """A new run folder, or, with --resume_from_checkpoint, the run of that checkpoint with the
    adapter, optimizer and random state restored into `model` and `optimizer` (with
    --resume_only_model, the adapter alone, into a new run). states: how the model's and the
    optimizer's state is saved and loaded (WholeState, or shard.ShardedState)."""
    states = states or WholeState()
    state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "best_eval_loss": None, "best_checkpoint": None,
             "log_history": [], "checkpoints": []}
    ckpt, run_dir = check_resume(a, world), None
    if ckpt and a.resume_only_model:
        states.load(model, optimizer, load_file(ckpt / "adapter_model.safetensors", device=str(device)))
    elif ckpt:
        run_dir, state = ckpt.parent, restore(ckpt, model, optimizer, device, states)
    if rank == 0 and ckpt:
        print(f"resumed from {ckpt}" + (" (the adapter only: a new run)" if a.resume_only_model else
                                        f" at step {state['global_step']}"), flush=True)
    if rank == 0 and run_dir is None:
        run_dir = new_run_dir(a.output_dir, a.add_version)
    if world > 1:  # rank 0 chose the folder
        holder = [str(run_dir) if run_dir else None]
        dist.broadcast_object_list(holder, src=0)
        run_dir = Path(holder[0])
    # model_type and template as ms-swift reads them from a checkpoint's args.json: `swift infer
    # --adapters CKPT` on a local base then needs no --model_type / --template of its own (ms-swift
    # 4.x names every Qwen3 dense model qwen3, the hybrid, Instruct-2507 and Thinking-2507 alike).
    args_dict = dict(vars(a), model_dir=str(model_dir), world_size=world, model_type=model.config.model_type,
                     template=a.template)
    if rank == 0:
        (run_dir / "images").mkdir(exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(args_dict, indent=2, ensure_ascii=False) + "\n")
        # The log as the checkpoint knew it: steps after it, from the abandoned attempt, go.
        lines = "".join(json.dumps(e) + "\n" for e in state["log_history"])
        (run_dir / ".logging.jsonl.tmp").write_text(lines)
        os.replace(run_dir / ".logging.jsonl.tmp", run_dir / "logging.jsonl")
    return Run(run_dir, state, args_dict, total_steps, device, rank, world, states)


def restore(ckpt: Path, model, optimizer, device, states=None) -> dict:
    """Load a checkpoint's adapter, optimizer and random state; its trainer_state."""
    state = read_json(ckpt / "trainer_state.json", RunError)
    try:
        (states or WholeState()).load(model, optimizer, load_file(ckpt / "adapter_model.safetensors", device=str(device)),
                                      torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        set_rng_state(torch.load(ckpt / "rng_state.pt", weights_only=True), device)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, ValueError, KeyError, EOFError) as e:  # broken files
        raise RunError(f"{ckpt} cannot be resumed: {str(e).splitlines()[0]}. Resume from another checkpoint of "
                       "the run, or pass --resume_only_model true to start a new run from its adapter.") from None
    # Checkpoints written before the history was kept: this one and the earlier steps beside it.
    state.setdefault("checkpoints", [p.name for p in complete_checkpoints(ckpt.parent)
                                     if int(p.name.split("-")[-1]) <= state["global_step"]])
    return state


# ----------------------------------------------------------------------------------------------
# Stopping on Ctrl-C (or a scheduler's SIGTERM): finish the step, save, exit

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the step in
    progress (it then saves a checkpoint); a second one stops at once (KeyboardInterrupt), leaving
    the last complete checkpoint untouched. Batch schedulers and containers send SIGTERM before
    they kill: it is treated as Ctrl-C."""

    def __init__(self, rank: int = 0, world: int = 1, device=None):
        self.rank, self.world, self.device = rank, world, device
        self.requested = False
        self.previous = {}

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)
        if exc[0] is KeyboardInterrupt:  # the second Ctrl-C: stopped now, reported by the caller
            self.requested = True
            return True
        return False

    def _on_signal(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.rank == 0:
            print("\ninterrupted: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)", flush=True)

    def agreed(self) -> bool:
        """Whether to stop now; under torchrun every rank must stop at the same step."""
        if self.world > 1:
            flag = torch.tensor([float(self.requested)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.requested = bool(flag.item())
        return self.requested


# ----------------------------------------------------------------------------------------------
# Reporting


def write_loss_svg(path: Path, series: dict[str, list[tuple[int, float]]]):
    """A loss-curve image as SVG: plain text, no plotting library needed."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return
    W, H, L, B = 640, 360, 60, 40  # size, left and bottom margins
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
    sx = lambda x: L + (x - x0) / (x1 - x0) * (W - L - 20)
    sy = lambda y: 20 + (y1 - y) / (y1 - y0) * (H - B - 20)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - 20}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="20" x2="{L}" y2="{H - B}" stroke="black"/>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{L - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        x = x0 + (x1 - x0) * i / 4
        out.append(f'<text x="{sx(x):.1f}" y="{H - B + 16}" text-anchor="middle">{x:.0f}</text>')
    out.append(f'<text x="{(W + L) / 2}" y="{H - 6}" text-anchor="middle">step</text>')
    for (name, s), color, ly in zip(series.items(), ("#1f77b4", "#d62728"), (20, 36)):
        if s:
            line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{line}"/>')
            out.append(f'<text x="{W - 30}" y="{ly}" text-anchor="end" fill="{color}">{name}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
