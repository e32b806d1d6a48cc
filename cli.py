"""cli.py: what the command lines of train.py, infer.py, merge.py and bench.py share.

Flag parsing whose errors are one paragraph, every ms-swift flag of one table (swift_flags.py)
answered (taken, accepted without effect, or refused with what to use instead), ms-swift's
`true`/`false` booleans, the choice of device and dtype, what `--model` names (a folder, a hub id,
or `tiny`), and the error exit: a problem the user can fix is printed as one `error: ...`
paragraph with exit code 2, never a traceback. Only the scripts import this file; the library
files (model, lora, data) raise their own errors and know nothing of flags.
"""

import argparse
import difflib
import os
import re
import signal
import sys
import threading
from pathlib import Path

import torch

import model as modeling
import quant
import swift_flags
import tiny
from data import DataError
from lora import LoraError
from model import ModelError
from runs import RunError
from template import TemplateError


class UsageError(Exception):
    """A flag value that cannot work, found before anything slow happens."""


# ----------------------------------------------------------------------------------------------
# Flags


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none to show (None: the flag's
    own help says what happens, e.g. a default that depends on the machine)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class FlagParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UsageError of one paragraph (argparse prints its whole usage
    first): what is wrong and what to do. An ms-swift flag this script does not take is answered
    from swift_flags.FLAGS (not supported, and what to use instead); any other unknown flag gets
    the nearest known one. run_main reports it like every other error: exit code 2."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=DefaultsHelpFormatter, **kwargs)
        self.ignored = []  # the ms-swift flags accepted here without effect

    def add_swift_flags(self, script: str):
        """The ms-swift flags that `script` accepts only so that ms-swift command lines run
        (swift_flags.FLAGS: ignored, or limited to the values that say what happens here anyway)."""
        group = self.add_argument_group("ms-swift's flags that change nothing here")
        for name, flag in swift_flags.FLAGS.items():
            if script not in flag.scripts or not swift_flags.is_accepted_without_effect(flag):
                continue
            how = "ignored" if flag.ignored else "only " + "/".join(flag.only)
            group.add_argument(f"--{name}", nargs="+" if flag.many else None, default=None, metavar="VALUE",
                               type=only_values(flag.only, flag.note) if flag.only else str, help=f"{how}: {flag.note}")
            if flag.ignored:
                self.ignored.append(name)

    def parse_args(self, args=None, namespace=None):
        """Parsed flags; a note on stderr for each ms-swift flag given that changes nothing here."""
        parsed = super().parse_args(args, namespace)
        for name in self.ignored:
            value = getattr(parsed, name)
            if value is not None and rank_and_world()[0] == 0:
                shown = " ".join(value) if isinstance(value, list) else value
                print(f"note: --{name} {shown} changes nothing here: {swift_flags.FLAGS[name].note}.", file=sys.stderr)
        return parsed

    def error(self, message):
        raise UsageError(self.explain(message))

    def explain(self, message: str) -> str:
        see = f". See python {self.prog} --help for every flag."
        if not message.startswith("unrecognized arguments:"):
            return message + see
        unknown = [w.split("=")[0] for w in message.split()[2:] if w.startswith("--")]
        refusals = [swift_flags.refusal(w[2:]) for w in unknown if w[2:] in swift_flags.FLAGS]
        if refusals:
            return " ".join(refusals)
        known = [s for s in self._option_string_actions if s.startswith("--")]
        near = [m for w in unknown for m in difflib.get_close_matches(w, known, n=1)]
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        return message + hint + see


def only_values(allowed: tuple, why: str):
    """An argparse type that takes only the `allowed` values, saying why otherwise."""
    def check(value: str) -> str:
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"{value!r} is not supported here, only {' or '.join(allowed)} ({why})")
        return value
    return check


def str2bool(v: str) -> bool:
    """ms-swift's boolean flags: `--stream true`, `--merge_lora false`."""
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


# ----------------------------------------------------------------------------------------------
# Device, dtype, model folder

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def quant_flags(p):
    """The 4-bit base's flags (ms-swift's names and defaults), the same in train.py and infer.py."""
    g = p.add_argument_group("4-bit base (QLoRA, quant.py)")
    g.add_argument("--quant_bits", type=int, choices=[4], default=None, help="4: keep the decoder's linear layers in 4 bits (QLoRA)")
    g.add_argument("--quant_method", choices=["bnb"], default=None, help="bnb: bitsandbytes' 4-bit format, made here (implied by --quant_bits 4)")
    g.add_argument("--bnb_4bit_quant_type", choices=quant.QUANT_TYPES, default=quant.QuantConfig.quant_type,
                   help="nf4 (normal-distribution quantiles) or fp4 (a 4-bit float)")
    g.add_argument("--bnb_4bit_use_double_quant", type=str2bool, default=quant.QuantConfig.double_quant,
                   help="also keep the block scales in 8 bits: 4.127 instead of 4.5 bits a weight")
    g.add_argument("--bnb_4bit_compute_dtype", default=None, help="dtype of the dequantised weights: --torch_dtype's only")


def rank_and_world(local: bool = False) -> tuple[int, int]:
    """(this process's rank, how many there are) as torchrun sets them: (0, 1) without torchrun.
    local: the rank among this machine's processes (which GPU it takes) instead."""
    rank = os.environ.get("LOCAL_RANK" if local else "RANK", "0")
    return int(rank), int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(flag: str | None) -> torch.device:
    """--device: cpu, cuda or cuda:N; by default the GPU when there is one."""
    name = flag or ("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UsageError(f"--device {name}: use cpu, cuda or cuda:N.")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible to PyTorch here; use --device cpu.")
    return torch.device(name)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"--torch_dtype {name!r} is not one of bfloat16, float16, float32.")
    return DTYPES[name]


def pick_dtype(flag: str | None, device: torch.device) -> torch.dtype:
    """--torch_dtype, else bf16 on a GPU (as the checkpoints are) and float32 on the CPU, where
    bf16 matmuls are slow."""
    if flag:
        return parse_dtype(flag)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def model_dir(name: str) -> Path:
    """--model: `tiny`, `tiny-qwen3` or `tiny-qwen3_5` (the built-in demo models, written on first use), a local
    folder, or a hub id such as Qwen/Qwen2.5-7B-Instruct (downloaded once into the Hugging Face cache)."""
    return tiny_dir(name) if name in tiny.BUILT_IN else modeling.resolve_model_dir(name)


def tiny_dir(name: str = "tiny") -> Path:
    """A built-in tiny model's folder, written on first use; a damaged copy is named, with what to do."""
    try:
        folder = tiny.tiny_model_dir(name)
    except OSError as e:
        raise ModelError(f"the built-in tiny model could not be written ({e}). Set QWEN_LORA_HOME to a folder "
                         f"you can write to (it goes to QWEN_LORA_HOME/{tiny.TINY_VERSION[tiny.BUILT_IN[name]]}).") from None
    try:
        for f in modeling.checkpoint_files(folder):
            modeling.shard_shapes(f)
        modeling.Config.from_json(folder / "config.json")
    except ModelError as e:
        raise ModelError(f"the built-in tiny model in {folder} is damaged ({e}) Delete that folder: it is written "
                         "again on the next run.") from None
    return folder


# ----------------------------------------------------------------------------------------------
# The error exit

ERRORS = (UsageError, DataError, ModelError, LoraError, RunError, TemplateError, FloatingPointError, OSError)


def run_main(body, interrupted: str = "", term_as_ctrl_c: bool = False) -> int:
    """Run a script's body; its exit code. Errors a user can fix are one paragraph on stderr:
    exit 2 (1 when training diverged). Under torchrun every rank checks the same flags and data,
    so for those only rank 0 speaks. Ctrl-C prints `interrupted` (or the KeyboardInterrupt's own
    message, when it carries one) and exits 130. term_as_ctrl_c: SIGTERM too (a batch scheduler's
    stop), where it would otherwise kill the process mid-write with no word."""
    if term_as_ctrl_c and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return body()
    except ERRORS as e:
        quiet = isinstance(e, (UsageError, DataError, RunError, TemplateError)) and rank_and_world()[0] > 0
        if not quiet:
            hint = " Check the path and its permissions, and that the disk has room." if isinstance(e, OSError) else ""
            print(f"error: {e}{hint}", file=sys.stderr)
        return 1 if isinstance(e, FloatingPointError) else 2
    except KeyboardInterrupt as e:
        message = str(e) or interrupted  # one raised with a message knows better what is on disk
        print(f"\n{message}" if message else "", file=sys.stderr)
        return 130
