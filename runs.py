"""runs.py: keeping a training run: its folder, checkpoints, logs, resume, and stopping cleanly.

A first reading can skip this file. A run lives in OUTPUT_DIR/vN-YYYYMMDD-HHMMSS/ (as ms-swift's):

    args.json             the flags it was started with (and what `swift infer --adapters` reads)
    logging.jsonl         one line per logged step, with ms-swift's names: loss, learning_rate (after
                          the step), grad_norm, token_acc, speed, memory; eval_loss, eval_token_acc;
                          at the end ms-swift's summary line and last/best_model_checkpoint
    images/               loss.svg and ms-swift's PNG curves (train_loss.png, ...), drawn at the end
    runs/                 TensorBoard's event files (--report_to tensorboard, with the package installed)
    checkpoint-STEP/      the adapter in PEFT's format (adapter_config.json, adapter_model.safetensors),
                          args.json, and what resuming needs: optimizer.pt, rng_state.pt and
                          trainer_state.json (the step, the place in the epoch, the log history)

A checkpoint is written into a hidden temporary folder and renamed into place when complete
(util.atomic_folder), so a crash or Ctrl-C never leaves a half-written one. Resuming restores the
adapter, the optimizer, the random state and the place in the data order: the run ends with the
same adapter, bit for bit, as one that was never stopped. As in ms-swift, a resumed run is a new run
folder under --output_dir; the earlier run's files are never written again. Under torchrun rank 0
writes; all ranks agree on when.
"""

import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import struct
import time
import zlib
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file

import lora
from checkpoints import ARGS_FIELDS
from util import atomic_folder, check_fields, is_whole, read_json, remove_stale_temporaries


class RunError(Exception):
    """A run folder or checkpoint that cannot be used as asked."""


# ----------------------------------------------------------------------------------------------
# Folders and checkpoints


def new_run_dir(output_dir: str, add_version: bool) -> Path:
    """--output_dir itself, or a new vN-TIMESTAMP folder in it, N one more than the highest there.
    Runs started together may pick the same N: each makes its folder, and where two share an N,
    all but the first by name give theirs up and try the next (issue 34: 7 of 80 failed)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not add_version:
        return out
    version = lambda p: int(p.name[1:].split("-")[0]) if p.name[1:].split("-")[0].isdigit() else -1
    while True:
        n = max((version(p) for p in out.glob("v*-*")), default=-1) + 1
        run = out / f"v{n}-{datetime.now():%Y%m%d-%H%M%S}"
        try:
            run.mkdir()
        except FileExistsError:  # another run took this name this second
            continue
        if min(p.name for p in out.glob(f"v{n}-*")) == run.name:
            return run
        run.rmdir()


CHECKPOINT_NAME = re.compile(r"checkpoint-[0-9]+")


def is_checkpoint(folder: Path) -> bool:
    """A complete checkpoint-STEP folder (half-written ones never carry this name)."""
    return bool(CHECKPOINT_NAME.fullmatch(folder.name)) and (folder / "trainer_state.json").is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-STEP folders of a run, oldest first."""
    ckpts = [p for p in Path(run_dir).glob("checkpoint-*") if is_checkpoint(p)]
    return sorted(ckpts, key=lambda p: int(p.name.split("-")[-1]))


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint written last: the furthest step. A run folder's checkpoints are written in step
    order (a resume writes a new run folder; a run into a folder that holds checkpoints is refused),
    so the step says it, where file times do not survive a copy."""
    ckpts = complete_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


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
    loss; the one just written is never deleted. Removes the others from `history` too. Only ever
    deletes a checkpoint-N folder of this toolkit directly inside run_dir, whatever `history` says."""
    if limit is None:
        return
    keep = set(history[-limit:])
    if best in history and best not in keep:
        keep = {best} | set(history[-max(1, limit - 1):])
    for name in [n for n in history if n not in keep]:
        history.remove(name)
        folder = run_dir / name  # a name, not a path: nothing outside run_dir, and no link out of it
        if folder.name == name and is_checkpoint(folder) and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


# trainer_state.json as save_checkpoint writes it: each field's JSON types, and what a value must be.
MAX_STEPS = 10**12  # more than any run takes; TensorBoard's steps are 64-bit
STATE_FIELDS = {
    "global_step": ((int,), "a whole number of steps from 1 to 10**12", lambda v: 1 <= v <= MAX_STEPS),
    "epoch": ((int,), "a whole number of epochs from 0 to 10**12", lambda v: 0 <= v <= MAX_STEPS),
    "step_in_epoch": ((int,), "a whole number of steps from 0 to 10**12", lambda v: 0 <= v <= MAX_STEPS),
    "log_history": ((list,), "a list of logged steps (objects)", lambda v: all(isinstance(e, dict) for e in v)),
    "checkpoints": ((list,), "a list of this run's checkpoint folder names (checkpoint-N)",
                    lambda v: all(isinstance(n, str) and CHECKPOINT_NAME.fullmatch(n) for n in v)),
    "best_checkpoint": ((str, type(None)), "null or a checkpoint folder name (checkpoint-N)",
                        lambda v: v is None or CHECKPOINT_NAME.fullmatch(v)),
    "best_eval_loss": ((int, float, type(None)), "null or a finite number", lambda v: v is None or math.isfinite(v)),
    "elapsed": ((int, float), "seconds, a finite number of 0 or more", lambda v: math.isfinite(v) and v >= 0),
    "loss_scale": ((int, float), "a finite number above 0", lambda v: math.isfinite(v) and v > 0),
}
# Written into every checkpoint since the first (the checkpoints' history came later: restore makes it up)
REQUIRED_STATE = ("global_step", "epoch", "step_in_epoch", "log_history", "best_checkpoint", "best_eval_loss")
STATE_FIX = ("The file was edited or written by another tool: resume from another checkpoint of the run, or pass "
             "--resume_only_model true to start a new run from its adapter alone.")


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json, every field checked against STATE_FIELDS (REQUIRED_STATE
    required) and its step against its folder's name, or a RunError naming the field, what it holds
    and what it should."""
    state = read_json(path, RunError, hint="resume from another checkpoint of the run")  # an object, or RunError
    for key, (types, expected, valid) in STATE_FIELDS.items():
        if key not in state and key not in REQUIRED_STATE:
            continue
        value = state.get(key)
        if key not in state or not isinstance(value, types) or isinstance(value, bool) or not valid(value):
            found = "nothing" if key not in state else json.dumps(value)[:80]
            raise RunError(f"{path}: \"{key}\" holds {found}, where this toolkit writes {expected}. {STATE_FIX}")
    folder = path.parent.name
    if CHECKPOINT_NAME.fullmatch(folder) and int(folder.split("-")[1]) != state["global_step"]:
        raise RunError(f"{path}: \"global_step\" holds {state['global_step']}, but the folder is {folder}, "
                       f"named by the step it was saved at. {STATE_FIX}")
    return state


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
        self.loss_sum, self.epoch = 0.0, 0.0  # for the summary at the end: this run's step losses; the epoch
        self.tensorboard = TensorBoard(run_dir / "runs", args_dict.get("report_to"), rank)
        self.created = bool(args_dict.get("add_version", True))  # a new vN folder, not --output_dir itself

    def said_on_ctrl_c(self, work):
        """work() outside the loop (the answers before or after training), a Ctrl-C in it saying what
        is on disk; a run folder this run created (a new vN folder) that holds no checkpoint yet is
        removed again, so that an interrupted start leaves nothing behind."""
        try:
            work()
        except KeyboardInterrupt:
            last = self.last_checkpoint()
            if last:
                raise KeyboardInterrupt(f"interrupted; the run is kept in {self.dir} (last checkpoint: {last}).") from None
            if self.created and self.rank == 0:
                self.tensorboard.close()
                shutil.rmtree(self.dir, ignore_errors=True)
            raise KeyboardInterrupt("interrupted before the first checkpoint; " + (
                "the new run folder was removed again." if self.created else "no checkpoint was written.")) from None

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
        self.loss_sum += loss
        self.tokens += tokens
        self.rng = rng_state(self.device)

    def log_progress(self, epoch: float, lr: float, grad_norm, token_acc: float | None = None):
        """Average the losses since the last log line into one logging.jsonl entry and print it.
        lr: as ms-swift logs it, the rate after this step (the next step's); token_acc: the share of
        label tokens since the last line whose argmax prediction was right."""
        step, total_steps, elapsed = self.state["global_step"], self.total_steps, time.time() - self.t0
        per_step = elapsed / max(1, step - self.start_step)
        elapsed_in_all = self.elapsed_before + elapsed  # a resumed run goes on counting
        self.epoch = epoch
        entry = {"step": step, "epoch": round(epoch, 4), "loss": round(sum(self.losses) / len(self.losses), 6),
                 "learning_rate": lr, "grad_norm": round(float(grad_norm), 6),
                 **({"token_acc": round(token_acc, 6)} if token_acc is not None else {}),
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
        """Run `evaluate()` (train.evaluate's figures: eval_loss, eval_token_acc, ...), log them, and
        remember the best step by eval_loss. Every rank runs it (a sharded model needs all ranks for
        each forward); rank 0 writes."""
        step, figures = self.state["global_step"], evaluate()
        eval_loss = figures["eval_loss"]
        entry = {"step": step, **{k: round(v, 6) for k, v in figures.items() if v is not None}}
        acc = f" eval_token_acc {entry['eval_token_acc']:.4f}" if "eval_token_acc" in entry else ""
        self._log(entry, f"[{step}/{self.total_steps}] eval_loss {eval_loss:.4f}{acc}")
        if self.state["best_eval_loss"] is None or eval_loss < self.state["best_eval_loss"]:
            self.state.update(best_eval_loss=eval_loss, best_checkpoint=f"checkpoint-{step}")

    def _log(self, entry: dict, line: str | None = None):
        self.state["log_history"].append(entry)
        if self.rank == 0:
            with open(self.dir / "logging.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            self.tensorboard.write(entry, self.state["global_step"])
            if line is not None:
                print(line, flush=True)

    def save(self, model, optimizer, limit: int | None):
        """A checkpoint of this step (rank 0), then --save_total_limit's pruning. Weights that are
        no longer finite are never saved. Ctrl-C must not cut a save in half: it waits until
        the checkpoint is in place."""
        model, optimizer_state = self.states.gather(model, optimizer)  # on every rank
        adapter = lora.lora_state_dict(model)
        if not all(bool(torch.isfinite(t).all()) for t in adapter.values()):
            step = self.state["global_step"]  # the forward of this step was finite, its update was not
            self.diverged(f"the adapter's weights became inf or NaN at step {step}", trusted=step - 1)
        if self.rank == 0:
            arrived = []  # a signal during the save waits for its end (ignoring it lost it: issue 34)
            handlers = {s: signal.signal(s, lambda number, frame: arrived.append(number)) for s in STOP_SIGNALS}
            try:
                name = f"checkpoint-{self.state['global_step']}"
                history = self.state.setdefault("checkpoints", [])
                history[:] = [n for n in history if n != name] + [name]
                self.state["elapsed"] = round(self.elapsed_before + time.time() - self.t0, 1)
                self.write_checkpoint(model, optimizer_state)
                prune_checkpoints(self.dir, limit, self.state["best_checkpoint"], history)
            finally:
                for s, h in handlers.items():
                    signal.signal(s, h)
                for number in arrived[:1]:  # now to StopSignals: stop after the step in progress
                    signal.raise_signal(number)
        self.barrier()

    def write_checkpoint(self, model, optimizer_state):
        """save_checkpoint, a failure (a full disk) said with what is kept and how to go on."""
        try:
            save_checkpoint(self.dir, model, optimizer_state, self.state, self.args, self.rng)
        except (OSError, RuntimeError) as e:  # torch.save says a full disk with a RuntimeError
            self.state["checkpoints"].pop()
            last = self.last_checkpoint()
            raise RunError(f"checkpoint-{self.state['global_step']} could not be written ({e}); nothing of it was "
                           f"kept. Is the disk full? The last complete checkpoint is {last or '(none yet)'}" + (
                               f": free some space, then python train.py ... --resume_from_checkpoint {last}"
                               if last else ".")) from None

    def summary(self) -> dict:
        """The line the HF Trainer logs at the end, for the steps of this run (after a resume, those
        since the checkpoint): train_loss is the mean of their losses."""
        steps, runtime = self.state["global_step"] - self.start_step, time.time() - self.t0
        rows = self.args["per_device_train_batch_size"] * self.args["gradient_accumulation_steps"] * self.world
        return {"step": self.state["global_step"], "train_runtime": round(runtime, 4),
                "train_samples_per_second": round(steps * rows / max(runtime, 1e-9), 3),
                "train_steps_per_second": round(steps / max(runtime, 1e-9), 3),
                "train_loss": round(self.loss_sum / max(1, steps), 6), "epoch": round(self.epoch, 4)}

    def check_finite(self, loss: float):
        """A loss that is not finite stops the run. The checkpoint of the step before holds the
        weights that gave it (resuming there meets it again): the one to name is older."""
        if loss != loss or abs(loss) == float("inf"):
            step = self.state["global_step"] + 1
            self.diverged(f"the loss became {loss} at step {step}", trusted=step - 2)

    def diverged(self, what: str, trusted: int):
        """Stop: `what` went wrong; the checkpoints of steps up to `trusted` hold weights whose next
        step was finite, and the newest of them is the one to go back to."""
        last = self.last_checkpoint(trusted)
        raise FloatingPointError(
            f"{what}: training stopped and nothing more was saved. The last good checkpoint (one whose weights "
            f"gave a finite next step) is {last or '(none)'}. Lower --learning_rate, use --torch_dtype "
            "bfloat16 rather than float16, or check the data.")

    def last_checkpoint(self, up_to: int | None = None) -> Path | None:
        """The checkpoint this run wrote last (every one it wrote had finite weights); with up_to,
        the last of a step up to that."""
        history = [n for n in self.state.get("checkpoints", []) if (self.dir / n / "trainer_state.json").exists()
                   and (up_to is None or int(n.split("-")[-1]) <= up_to)]
        return self.dir / history[-1] if history else None

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def finish(self, interrupted: bool):
        """ms-swift's summary lines (after a complete run), the curves, and what to do next."""
        if self.rank != 0:
            return
        last = self.last_checkpoint()
        if not interrupted:
            summary = self.summary()
            self._log(summary, json.dumps(summary))
            best = self.state["best_checkpoint"]
            self._log({"last_model_checkpoint": str(last) if last else None, "best_model_checkpoint":
                       str(self.dir / best) if best else None, "best_metric": self.state["best_eval_loss"],
                       "global_step": self.state["global_step"]})
        self.tensorboard.close()
        hist = self.state["log_history"]
        write_loss_svg(self.dir / "images" / "loss.svg",
                       {"train_loss": [(e["step"], e["loss"]) for e in hist if "loss" in e],
                        "eval_loss": [(e["step"], e["eval_loss"]) for e in hist if "eval_loss" in e]})
        for key, name in PLOTS.items():  # ms-swift's images/NAME.png
            write_curve_png(self.dir / "images" / f"{name}.png", [(e["step"], e[key]) for e in hist if key in e])
        if interrupted:
            print(f"\nstopped at step {self.state['global_step']}. " + (f"Resume with:\n  python train.py ... "
                  f"--resume_from_checkpoint {last}" if last else "Nothing was saved (--save_strategy no)."))
            return
        print(f"\ndone: {self.state['global_step']} steps in {fmt_time(time.time() - self.t0)}.")
        print(f"  run folder:      {self.dir}")
        print(f"  last checkpoint: {last or '-'}")
        if self.state["best_checkpoint"]:
            print(f"  best checkpoint: {self.dir / self.state['best_checkpoint']} (eval_loss {self.state['best_eval_loss']:.4f})")
        print(f"  loss curve:      {self.dir / 'images' / 'loss.svg'}")
        print(f"  chat with it:    python infer.py --adapters {last}" if last else
              "  no checkpoint was saved (--save_strategy no)")


def due(strategy: str, every: int):
    """--eval_strategy / --save_strategy as a test of (step, last): every `every` steps (steps, and
    epoch once train.schedule has made it the steps of an epoch) and at the last step; never with no."""
    return lambda step, last: strategy != "no" and (step % every == 0 or last)


# What a resume must keep: changing any of these changes what is being trained, so the run would
# end with an adapter that neither the old nor the new flags describe.
RESUME_MUST_MATCH = ("model", "dataset", "val_dataset", "split_dataset_ratio", "max_length", "truncation_strategy",
                     "packing", "system", "model_name", "model_author", "lora_rank", "lora_alpha", "lora_dropout",
                     "use_rslora", "target_modules", "per_device_train_batch_size", "seed", "data_seed", "quant_bits",
                     "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "template", "loss_scale",
                     "add_non_thinking_prefix")
UNSET_MEANS_SAVED = ("template", "loss_scale")  # unset, they are the model's own: the checkpoint's, as recorded
# The ms-swift release whose args.json ours follows (the keys `swift infer --adapters` reads).
SWIFT_ARGS_VERSION = "4.6.0"
# What a resume reads from the checkpoint's args.json (open_run writes it), beyond what inference reads
RESUME_ARGS_FIELDS = {**ARGS_FIELDS, **{key: (lambda v: is_whole(v) and v >= 1, "a whole number of 1 or more")
                                        for key in ("gradient_accumulation_steps", "world_size")}}
CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "rng_state.pt", "trainer_state.json")


def check_resume(a, world: int) -> Path | None:
    """Before anything loads: the checkpoint --resume_from_checkpoint names (None without it),
    complete, and trained with the flags given now (--resume_only_model: only its adapter is
    loaded, into a new run, so any flag may change). A fresh run into a folder that already holds
    checkpoints (--add_version false) is refused: its pruning and resume would mix two runs."""
    check_writable(Path(a.resume_from_checkpoint or a.output_dir or "."), "--resume_from_checkpoint"
                   if a.resume_from_checkpoint else "--output_dir")
    if not a.resume_from_checkpoint:
        check_unused(a)
        return None
    ckpt = find_resume_checkpoint(a.resume_from_checkpoint, a.resume_only_model)
    needed = ("adapter_model.safetensors",) if a.resume_only_model else CHECKPOINT_FILES
    missing = [f for f in needed if not (ckpt / f).is_file()]
    if missing:
        raise RunError(f"{ckpt} cannot be resumed: it has no {', '.join(missing)} (ms-swift's checkpoints name them "
                       "otherwise). Resume from a checkpoint of this toolkit, or pass --resume_only_model true to "
                       "start a new run from its adapter weights alone.")
    if a.resume_only_model:
        continued_step(ckpt, a)  # (its step, checked before the model loads)
        check_unused(a)
        return ckpt
    read_trainer_state(ckpt / "trainer_state.json")
    saved = read_json(ckpt / "args.json", RunError) if (ckpt / "args.json").exists() else {}
    check_fields(ckpt / "args.json", saved, RESUME_ARGS_FIELDS, RunError, "The file was edited or damaged: correct "
                 "that field (the run's own command line says what it was), or pass --resume_only_model true.")
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
    check_unused(a)
    return ckpt


def check_same_data(a, rows: list, steps_per_epoch: int):
    """The training rows' fingerprint into `a` (and so into args.json); a resume whose data changed
    since its checkpoint (a dataset file edited in place) is refused before the model loads: the
    steps, the epochs and the rows already trained would no longer be the ones counted. So is one
    whose place in the epoch is past the epoch's end (it would train on past --max_steps)."""
    digest = hashlib.blake2b(digest_size=12)
    for row in rows:  # data.Row: its token ids and which are trained
        digest.update(row.ids.tobytes())
        digest.update(row.trained.tobytes())
    a.data_fingerprint = f"{len(rows)} rows, {digest.hexdigest()}"
    if not a.resume_from_checkpoint or a.resume_only_model:
        return
    ckpt = find_resume_checkpoint(a.resume_from_checkpoint)
    saved = read_json(ckpt / "args.json", RunError).get("data_fingerprint") if (ckpt / "args.json").exists() else None
    if saved is not None and saved != a.data_fingerprint:
        raise RunError(f"{ckpt} was trained on other data: its run read {saved}, the datasets now give "
                       f"{a.data_fingerprint}. A dataset file changed since, so the steps and the rows already "
                       "trained would not be the ones counted. Put the data back as it was, or pass "
                       "--resume_only_model true to start a new run from its adapter on the data as it is now.")
    path = ckpt / "trainer_state.json"
    place = read_trainer_state(path)["step_in_epoch"]
    if place > steps_per_epoch:
        raise RunError(f"{path}: \"step_in_epoch\" holds {place}, but an epoch of this run has {steps_per_epoch} "
                       f"steps. {STATE_FIX}")


def check_unused(a):
    """A run (a resumed one too: a new run folder, as in ms-swift) never writes into a folder that
    holds another run's checkpoints (--add_version false): it would write over or prune them. Two
    runs started into one such folder at once: the second is refused (lock_folder)."""
    if not a.add_version and int(os.environ.get("RANK", "0")) == 0:
        lock_folder(Path(a.output_dir))
    if not a.add_version and complete_checkpoints(Path(a.output_dir)):
        goes_on = "" if a.resume_from_checkpoint else f" (to go on with that run: --resume_from_checkpoint {a.output_dir})"
        raise RunError(f"--output_dir {a.output_dir} already holds checkpoints of a run, which this run would write "
                       "over or prune. Write this run to another folder: another --output_dir, or --add_version true "
                       f"for a new vN-... folder in it{goes_on}.")


LOCKS = []  # the folders this process writes its run into, locked until it exits


def lock_folder(folder: Path):
    """Hold `folder` (an --add_version false run's) for this process: a second run into it, while
    this one lives, is refused. An flock, which the system lets go of when the process ends."""
    import fcntl
    folder.mkdir(parents=True, exist_ok=True)
    if any(Path(held.name) == folder / ".train.lock" for held in LOCKS):
        return  # held already (the flags are checked before the model loads and again as the run opens)
    lock = open(folder / ".train.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise RunError(f"--output_dir {folder}: another train.py ({holder}) is writing its run into this folder now; "
                       "two runs there would mix their checkpoints. Wait for it, or write this run to another "
                       "folder (another --output_dir, or --add_version true).") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}")
    lock.flush()
    LOCKS.append(lock)


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
        state.update(continued_step(ckpt, a))
    elif ckpt:
        state = restore(ckpt, model, optimizer, device, states)
        # As ms-swift: the resumed run is a new run folder under --output_dir, and every checkpoint of
        # the earlier run stays as it was. Its best checkpoint is named by its path; pruning counts
        # only this run's checkpoints.
        best = state["best_checkpoint"]
        state.update(checkpoints=[], best_checkpoint=str((ckpt.parent / best).absolute()) if best else None)
    if rank == 0:
        run_dir = new_run_dir(a.output_dir, a.add_version)
    if rank == 0 and ckpt:
        print(f"resumed from {ckpt}" + (f" (the adapter only: a new run from step {state['global_step']}, a fresh optimizer)"
                                        if a.resume_only_model else
                                        f" at step {state['global_step']}") + f", into {run_dir}", flush=True)
    if world > 1:  # rank 0 chose the folder
        holder = [str(run_dir) if run_dir else None]
        dist.broadcast_object_list(holder, src=0)
        run_dir = Path(holder[0])
    # model_type and template as ms-swift reads them from a checkpoint's args.json: `swift infer
    # --adapters CKPT` on a local base then needs no --model_type / --template of its own (ms-swift
    # 4.x names every Qwen3 dense model qwen3, the hybrid, Instruct-2507 and Thinking-2507 alike).
    # ms-swift 4.x takes model_type from args.json only when its swift_version is 4.0 or later
    # (BaseArguments.load_args_from_ckpt); 3.x reads model_type whatever swift_version says.
    args_dict = dict(vars(a), model_dir=str(model_dir), world_size=world, model_type=model.config.model_type,
                     template=a.template, swift_version=SWIFT_ARGS_VERSION)
    if rank == 0:
        (run_dir / "images").mkdir(exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(args_dict, indent=2, ensure_ascii=False) + "\n")
        # The steps from here on (after a resume, as ms-swift: trainer_state.json keeps the whole history).
        (run_dir / "logging.jsonl").write_text("")
    return Run(run_dir, state, args_dict, total_steps, device, rank, world, states)


def continued_step(ckpt: Path, a) -> dict:
    """--resume_only_model: the step the checkpoint's training had reached, so that the new run goes on
    from there and skips the rows already trained (with a fresh optimizer), as ms-swift 4.x does. {}
    (step 0) for --adapters, --ignore_data_skip true or an adapter without trainer_state.json. The
    epoch and the place in it are left to train.steps_to_run, which knows the steps of an epoch."""
    path = ckpt / "trainer_state.json"
    if a.adapters or a.ignore_data_skip or not path.is_file():
        return {}
    state = read_json(path, RunError)  # ours, or the HF Trainer's (ms-swift's checkpoints)
    step = state.get("global_step")
    if not (is_whole(step) and 0 <= step <= MAX_STEPS):
        found = json.dumps(step)[:80] if "global_step" in state else "nothing"
        raise RunError(f"{path}: \"global_step\" holds {found}, where a trainer_state.json holds a "
                       "whole number of steps. The file was edited or damaged: fix that field, or pass "
                       "--ignore_data_skip true to start the new run at step 0.")
    return {"global_step": step, "epoch": None, "step_in_epoch": None} if step else {}


def restore(ckpt: Path, model, optimizer, device, states=None) -> dict:
    """Load a checkpoint's adapter, optimizer and random state; its trainer_state."""
    state = read_trainer_state(ckpt / "trainer_state.json")
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

# What ms-swift (transformers' TensorBoardCallback) writes to TensorBoard, as train/KEY and eval/KEY.
TENSORBOARD_KEYS = ("loss", "grad_norm", "learning_rate", "token_acc", "epoch", "eval_loss", "eval_token_acc",
                    "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")
# logging.jsonl key -> the curve ms-swift draws of it, images/NAME.png
PLOTS = {"loss": "train_loss", "learning_rate": "train_learning_rate", "grad_norm": "train_grad_norm",
         "token_acc": "train_token_acc", "eval_loss": "eval_loss", "eval_token_acc": "eval_token_acc"}


class TensorBoard:
    """--report_to tensorboard (ms-swift's default; unset counts as it): event files in RUN/runs/,
    with the scalars ms-swift writes. Needs the tensorboard package, an optional import: without
    it, a one-line note, and the run goes on."""

    def __init__(self, folder: Path, report_to, rank: int = 0):
        self.writer = None
        if rank != 0 or "tensorboard" not in (report_to or ["tensorboard"]):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError:
            print("note: --report_to tensorboard: the tensorboard package is not installed (pip install tensorboard), "
                  "so no event files; logging.jsonl and images/ are written as always.", flush=True)
            return
        self.writer = SummaryWriter(str(folder))

    def write(self, entry: dict, step: int):
        if self.writer is None:
            return
        for key in TENSORBOARD_KEYS:
            if entry.get(key) is not None:
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                self.writer.add_scalar(tag, entry[key], step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def write_curve_png(path: Path, points: list[tuple[int, float]], W: int = 640, H: int = 400):
    """One curve as a PNG (as ms-swift draws with matplotlib), drawn here pixel by pixel and written
    with zlib: axes with a tick at each quarter, the curve in blue (a single point as a dot). The
    numbers are in logging.jsonl and loss.svg; this is the shape at a glance."""
    points = [(x, y) for x, y in points if math.isfinite(y)]  # a float16 step that overflowed logs inf
    if not points:
        return
    img = bytearray(b"\xff" * (W * H * 3))  # white, RGB

    def dot(x: int, y: int, rgb=(31, 119, 180), r: int = 1):
        for yy in range(max(0, y - r), min(H, y + r + 1)):
            for xx in range(max(0, x - r), min(W, x + r + 1)):
                img[3 * (yy * W + xx):3 * (yy * W + xx) + 3] = bytes(rgb)

    L, B, M = 50, 40, 20  # left, bottom and other margins
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
    px = lambda x: round(L + (x - x0) / (x1 - x0) * (W - L - M))
    py = lambda y: round(M + (y1 - y) / (y1 - y0) * (H - B - M))
    for x in range(L, W - M + 1):
        dot(x, H - B, (0, 0, 0), 0)
    for y in range(M, H - B + 1):
        dot(L, y, (0, 0, 0), 0)
    for i in range(5):  # ticks
        for d in range(1, 6):
            dot(L + i * (W - L - M) // 4, H - B + d, (0, 0, 0), 0)
            dot(L - d, M + i * (H - B - M) // 4, (0, 0, 0), 0)
    if len(points) == 1:
        dot(px(points[0][0]), py(points[0][1]), r=3)
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        a, b = (px(xa), py(ya)), (px(xb), py(yb))
        n = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
        for t in range(n + 1):
            dot(round(a[0] + (b[0] - a[0]) * t / n), round(a[1] + (b[1] - a[1]) * t / n))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + bytes(img[3 * W * y:3 * W * (y + 1)]) for y in range(H))  # filter 0 per row
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


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
